"""History: the journal as a table (imports and compared edits marked, with their original timings); the
selected edit (the diff and the try box follow it); revert one or all; export an edit, import an edit file;
compact the journal."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import streamlit as st

import factedit
from factedit.session import EditSession

from .actions import select
from .ui import flash, run_action, show_messages, token

SECTION = "history"


def render_history(service: EditSession) -> str | None:
    """The history and its actions; returns the selected edit's id (None without edits)."""
    st.subheader("History")
    records = service.history()
    selected = None
    if not records:
        show_messages(SECTION)
        st.info("No edits yet. Edits are kept in the journal "
                f"`{service.journal_path.name}` and replayed when the app starts.")
    else:
        frame = history_frame(records, service.origins.all())
        st.table(frame.style.apply(_grey_reverted, axis=1).format(
                     {"edit ms": "{:.0f}", "compute ms": "{:.0f}"}, na_rep="?"),
                 hide_index=True, height="content" if len(frame) <= 12 else 480)
        selected = _actions(service, records)
        show_messages(SECTION)  # under the buttons that made them (revert, import, compact)
        _journal_upkeep(service, records)
    _import(service)
    return selected


def history_frame(records: list[factedit.EditRecord], origins: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per edit. "edit ms" and "compute ms" are the original edit's for an import (the import's own
    time is in its record) and the comparison's compute time for a compared edit applied as computed."""
    rows = []
    for r in records:
        pre = (r.pre.get("requests") or [{}])[0]
        old = pre.get("old_answer", {}).get("token")
        origin = origins.get(r.id) or {}
        timings = dict(r.timings)
        if origin.get("kind") == "import":
            timings = dict(origin.get("timings") or {})
            source = f"imported from {origin.get('source_id') or '?'}"
            if origin.get("source_created_at"):
                source += time.strftime(" (%Y-%m-%d %H:%M)", time.localtime(origin["source_created_at"]))
        elif origin.get("kind") == "preview":
            timings["compute_ms"] = (origin.get("timings") or {}).get("compute_ms")
            source = "previewed, applied as computed"  # in the edit form or compared
        else:
            source = "edit"
        rows.append({
            "id": r.id,
            "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
            "method": r.method,
            "prompt": r.request.prompt + (f" (+{len(r.requests) - 1})" if len(r.requests) > 1 else ""),
            "old → new": f"{token(old) if old is not None else '?'} → {token(r.request.target)}",
            "status": r.status,
            "origin": source,
            "compute ms": timings.get("compute_ms"),
            "edit ms": timings.get("edit_ms"),
        })
    return pd.DataFrame(rows)


def _grey_reverted(row: pd.Series) -> list[str]:
    return ["color: #8c96a3" if row["status"] != "active" else ""] * len(row)


def _label(record: factedit.EditRecord) -> str:
    """What the selectbox shows for an edit: nothing that changes (a browser keeps an option's old label)."""
    return f"{record.id} · {record.request.prompt} → {record.request.target} · {record.method}"


def _actions(service: EditSession, records: list[factedit.EditRecord]) -> str:
    by_id = {r.id: r for r in records}
    ids = [r.id for r in reversed(records)]  # newest first
    state = st.session_state
    if state.get("selection") not in by_id:
        state["selection"] = ids[0]
    key = _selection_key()
    st.selectbox("Selected edit", ids, index=ids.index(state["selection"]), format_func=lambda i: _label(by_id[i]),
                 key=key, on_change=_picked, args=(key,),
                 help="The diff and the “try the model” box below are about this edit.")
    selected = state["selection"]
    record = by_id[selected]
    active = [r.id for r in records if r.status == "active"]
    cols = st.columns(4)
    cols[0].button("Revert selected", key="revert_selected", on_click=_revert, args=(service,),
                   disabled=record.status != "active")
    cols[1].button(f"Revert all ({len(active)})", key="revert_all", on_click=_revert_all, args=(service,),
                   disabled=not active)
    cols[2].button("Diff selected", key="diff_selected", on_click=st.session_state.update,
                   kwargs={"show_diff": True})
    cols[3].download_button(
        "Export selected", data=lambda: service.export_edit(selected), file_name=f"edit-{selected}.safetensors",
        mime="application/octet-stream", key="export_selected", on_click="ignore",
    )
    return selected


def _journal_upkeep(service: EditSession, records: list[factedit.EditRecord]) -> None:
    """The journal's size, and compaction: reverted edits' deltas dropped, their records kept."""
    journal = service.health()["journal"]
    droppable = sum(r.status == "reverted" and r.compacted_at is None for r in records)
    size = f"{journal['bytes'] / 2**20:.1f} MiB" if journal.get("bytes") is not None else "size unknown"
    text, days, button = st.columns([3, 1, 1], vertical_alignment="bottom")
    text.caption(f"Journal: {size}, {journal.get('deltas', 0)} stored delta(s), {droppable} of them of reverted "
                 "edits. Compacting drops those deltas (the records stay; a dropped edit can no longer be "
                 "diffed, exported or re-applied); the active edits and their replay are untouched.")
    days.number_input("reverted at least (days) ago", min_value=0.0, value=0.0, step=1.0, key="compact_days")
    button.button("Compact journal", key="compact_journal", on_click=_compact, args=(service,),
                  disabled=not droppable)


def _compact(service: EditSession) -> None:
    days = float(st.session_state.get("compact_days") or 0.0)
    report = run_action(SECTION, "Compacting the journal", lambda: service.compact_journal(days * 86400))
    if report is not None:
        flash(SECTION, "success", f"Dropped the deltas of {report['dropped']} reverted edit(s): journal "
                                  f"{report['bytes_before'] / 2**20:.1f} → {report['bytes_after'] / 2**20:.1f} MiB.")


def _picked(key: str) -> None:
    """The user chose an edit in the selectbox `key`. A selectbox an earlier selection replaced (its key has
    an older nonce) is ignored: a rerun request the browser sent before it drew the new one carries the old
    box's value, and Streamlit, which forgot that box, calls this as if the value had just changed."""
    state = st.session_state
    if key == _selection_key():
        state["selection"] = state[key]


def _selection_key() -> str:
    return f"selected_edit_{st.session_state.get('selection_nonce', 0)}"  # see edit_view.select


def _revert(service: EditSession) -> None:
    """Revert the edit selected when the click arrives (a click during a run must not use the selection of the
    page before it)."""
    edit_id = st.session_state.get("selection")
    if edit_id is None:
        flash(SECTION, "error", "Select an edit first.")
        return
    if run_action(SECTION, "The revert", lambda: service.revert(edit_id)) is not None:
        flash(SECTION, "success", f"Edit {edit_id} reverted.")


def _revert_all(service: EditSession) -> None:
    reverted = run_action(SECTION, "Revert all", service.revert_all)
    if reverted is None:
        return
    if reverted:
        flash(SECTION, "success", f"{len(reverted)} edit(s) reverted: {', '.join(r.id for r in reverted)}.")
    else:  # a second click, or another tab, got there first
        flash(SECTION, "info", "No edit was active any more: nothing reverted.")


def _import(service: EditSession) -> None:
    """Always shown (an expander would close on the rerun the file choice causes)."""
    with st.container(border=True):
        st.markdown("**Import an edit file**")
        file, button = st.columns([4, 1], vertical_alignment="bottom")
        file.file_uploader("Edit file exported by factedit (.safetensors)", type=["safetensors"], key="import_file")
        button.button("Apply imported edit", key="import_apply", on_click=_apply_import, args=(service,))


def _apply_import(service: EditSession) -> None:
    upload = st.session_state.get("import_file")
    if upload is None:
        flash(SECTION, "error", "Choose an edit file first.")
        return
    record = run_action(SECTION, f"Importing {upload.name}",
                        lambda: service.import_edit(upload.getvalue(), name=upload.name))
    if record is not None:
        select(record.id)
        origin = service.origin(record.id) or {}
        flash(SECTION, "success", f"Imported {upload.name} as edit {record.id} ({record.method}, originally edit "
                                  f"{origin.get('source_id') or '?'}).")
