"""History: the journal as a table; revert one edit or all; export an edit, import an edit file."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

import factedit
from factedit.session import EditSession

from .ui import flash, run_action, show_messages, token

SECTION = "history"


def render_history(service: EditSession) -> None:
    st.subheader("History")
    show_messages(SECTION)
    records = service.history()
    if not records:
        st.info("No edits yet. Edits are kept in the journal "
                f"`{service.journal_path}` and replayed when the app starts.")
    else:
        frame = history_frame(records)
        st.table(frame.style.apply(_grey_reverted, axis=1).format({"edit ms": "{:.0f}"}, na_rep="?"),
                 hide_index=True, height="content" if len(frame) <= 12 else 480)
        _actions(service, records)
    _import(service)


def history_frame(records: list[factedit.EditRecord]) -> pd.DataFrame:
    rows = []
    for r in records:
        pre = (r.pre.get("requests") or [{}])[0]
        old = pre.get("old_answer", {}).get("token")
        rows.append({
            "id": r.id,
            "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
            "method": r.method,
            "prompt": r.request.prompt + (f" (+{len(r.requests) - 1})" if len(r.requests) > 1 else ""),
            "old → new": f"{token(old) if old is not None else '?'} → {token(r.request.target)}",
            "status": r.status,
            "edit ms": r.timings.get("edit_ms"),
        })
    return pd.DataFrame(rows)


def _grey_reverted(row: pd.Series) -> list[str]:
    return ["color: #8c96a3" if row["status"] != "active" else ""] * len(row)


def _label(record: factedit.EditRecord) -> str:
    return f"{record.id} · {record.request.prompt} → {record.request.target} · {record.method}"


def _actions(service: EditSession, records: list[factedit.EditRecord]) -> None:
    by_id = {r.id: r for r in records}
    ids = [r.id for r in reversed(records)]  # newest first
    if st.session_state.get("selected_edit") not in by_id:
        st.session_state["selected_edit"] = ids[0]
    selected = st.selectbox("Selected edit", ids, format_func=lambda i: _label(by_id[i]), key="selected_edit")
    record = by_id[selected]
    any_active = any(r.status == "active" for r in records)
    cols = st.columns(4)
    cols[0].button("Revert selected", key="revert_selected", on_click=_revert, args=(service, selected),
                   disabled=record.status != "active")
    cols[1].button("Revert all", key="revert_all", on_click=_revert_all, args=(service,), disabled=not any_active)
    cols[2].button("Diff selected", key="diff_selected", on_click=_show_diff, args=(selected,))
    cols[3].download_button(
        "Export selected", data=lambda: service.export_edit(selected), file_name=f"edit-{selected}.safetensors",
        mime="application/octet-stream", key="export_selected", on_click="ignore",
    )


def _revert(service: EditSession, edit_id: str) -> None:
    if run_action(SECTION, "The revert", lambda: service.revert(edit_id)) is not None:
        flash(SECTION, "success", f"Edit {edit_id} reverted.")


def _revert_all(service: EditSession) -> None:
    reverted = run_action(SECTION, "Revert all", service.revert_all)
    if reverted is not None:
        flash(SECTION, "success", f"{len(reverted)} edit(s) reverted.")


def _show_diff(edit_id: str) -> None:
    st.session_state["diff_edit"] = edit_id


def _import(service: EditSession) -> None:
    with st.expander("Import an edit file"):
        st.file_uploader("Edit file exported by factedit (.safetensors)", type=["safetensors"], key="import_file")
        st.button("Apply imported edit", key="import_apply", on_click=_apply_import, args=(service,))


def _apply_import(service: EditSession) -> None:
    upload = st.session_state.get("import_file")
    if upload is None:
        flash(SECTION, "error", "Choose an edit file first.")
        return
    record = run_action(SECTION, f"Importing {upload.name}", lambda: service.import_edit(upload.getvalue()))
    if record is not None:
        st.session_state["selected_edit"] = record.id
        flash(SECTION, "success", f"Imported {upload.name} as edit {record.id} ({record.method}).")
