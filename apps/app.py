"""factedit's fact-editing app: preview and apply, compare, inspect, revert and diff facts, and talk to the
edited model, in a browser.

    make app                      # then open http://127.0.0.1:8501 (PORT=... for another port)

Settings come from factedit/conf/app.yaml; FACTEDIT_APP_MODEL (a local model folder), FACTEDIT_APP_JOURNAL
and FACTEDIT_APP_CONFIG override it (see apps/editapp/config.py). The model, the journal and the Editor
live in one factedit.session.EditSession per server process, shared by every tab.
"""

from __future__ import annotations

import logging
import time

import streamlit as st
from editapp.compare_view import render_compare
from editapp.config import AppConfig, load_app_config
from editapp.diff_view import render_diff
from editapp.edit_view import render_edit
from editapp.health_view import render_header
from editapp.history_view import render_history
from editapp.probes_view import render_probes
from editapp.try_view import render_try
from editapp.ui import write_timing

from factedit.session import EditSession

SYNC_SECONDS = 2.0  # how often a tab checks whether another tab changed the model
logger = logging.getLogger("factedit.app")


@st.cache_resource(show_spinner="Loading the model and replaying the journal…", on_release=EditSession.close)
def get_service(key: str, _config: AppConfig) -> EditSession:
    """One EditSession per settings (`key`) and process: every session shares it."""
    return EditSession(_config)


@st.fragment(run_every=SYNC_SECONDS)
def follow_other_tabs(service: EditSession) -> None:
    """Rerun the page when another tab changed the model (every tab shows the same history)."""
    if st.session_state.get("seen_version", service.version) != service.version:
        st.rerun()


def main() -> None:
    start, started_at = time.perf_counter(), time.time()
    st.set_page_config(page_title="factedit", layout="wide")
    try:
        config = load_app_config()
        service = get_service(config.cache_key(), config)
    except Exception as exc:
        st.error(f"The app could not start: {type(exc).__name__}: {exc}", icon="⚠️")
        st.stop()
    header = st.container()
    pending = st.session_state.get("pending")
    acting = pending is not None  # an action runs in this run: draw the header after it
    if not acting:
        render_header(service, header)
    left, right = st.columns([3, 2], gap="large")
    st.divider()
    compare = st.container()
    st.divider()
    # The section whose button queued the action runs first, into its place on the page, so that everything
    # drawn after it (the prediction, the probes, the last edit) shows the weights after the action.
    if acting and pending.get("section") == "compare":
        with compare:
            render_compare(service)
    with left:
        render_edit(service)
    with right:
        render_probes(service)
    if not (acting and pending.get("section") == "compare"):
        with compare:
            render_compare(service)
    selected = render_history(service)
    render_diff(service, selected)
    render_try(service, selected)
    if acting:
        render_header(service, header)
    st.session_state["seen_version"] = service.version
    logger.debug("page run: %.3f s (weights version %d)", time.perf_counter() - start, service.version)
    write_timing(started_at)
    follow_other_tabs(service)


main()
