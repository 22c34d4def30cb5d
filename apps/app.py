"""factedit's fact-editing app: apply, inspect, revert and diff facts in a browser.

    make app                      # then open http://127.0.0.1:8501 (PORT=... for another port)

Settings come from factedit/conf/app.yaml; FACTEDIT_APP_MODEL (a local model folder), FACTEDIT_APP_JOURNAL
and FACTEDIT_APP_CONFIG override it (see apps/editapp/config.py). The model, the journal and the
Editor live in one EditSession per server process, shared by every tab (apps/editapp/service.py).
"""

from __future__ import annotations

import streamlit as st
from editapp.config import AppConfig, load_app_config
from editapp.diff_view import render_diff
from editapp.edit_view import render_edit
from editapp.history_view import render_history
from editapp.probes_view import render_probes
from editapp.ui import run_action, show_messages

from factedit.session import EditSession

SYNC_SECONDS = 2.0  # how often a tab checks whether another tab changed the model


@st.cache_resource(show_spinner="Loading the model and replaying the journal…", on_release=EditSession.close)
def get_service(key: str, _config: AppConfig) -> EditSession:
    """One EditSession per settings (`key`) and process: every session shares it."""
    return EditSession(_config)


def header(service: EditSession) -> None:
    st.title("factedit: edit facts in a language model")
    active = sum(r.status == "active" for r in service.history())
    st.caption(f"model `{service.config.model}` · journal `{service.journal_path}` · {active} active edit(s) · "
               "every tab of this server shares the model and history")
    if service.journal_error:
        st.error(f"The journal cannot be used: {service.journal_error}", icon="⚠️")
        st.button("Start a new journal (the old file is kept)", key="new_journal",
                  on_click=lambda: run_action("journal", "Starting a new journal", service.start_new_journal))
    show_messages("journal")


@st.fragment(run_every=SYNC_SECONDS)
def follow_other_tabs(service: EditSession) -> None:
    """Rerun the page when another tab changed the model (every tab shows the same history)."""
    if st.session_state.get("seen_version", service.version) != service.version:
        st.rerun()


def main() -> None:
    st.set_page_config(page_title="factedit", layout="wide")
    try:
        config = load_app_config()
        service = get_service(config.cache_key(), config)
    except Exception as exc:
        st.error(f"The app could not start: {type(exc).__name__}: {exc}", icon="⚠️")
        st.stop()
    header(service)
    left, right = st.columns([3, 2], gap="large")
    with left:
        render_edit(service)
    with right:
        render_probes(service)
    render_history(service)
    render_diff(service)
    st.session_state["seen_version"] = service.version
    follow_other_tabs(service)


main()
