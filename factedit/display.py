"""Plain-text rendering of predictions, records and diffs for the CLI and the demo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .core.record import EditRecord
from .editing.diff import EditDiff


def format_top(top: Sequence[dict[str, Any]], k: int = 3) -> str:
    """`' Paris' 0.77 | ' the' 0.05 | ...`"""
    return " | ".join(f"{t['token']!r} {t['prob']:.3f}" for t in top[:k])


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_record(record: EditRecord) -> str:
    lines = [f"edit {record.id}  method={record.method}  status={record.status}  "
             f"edit {record.timings.get('edit_ms', float('nan')):.0f} ms"]
    pre_rows, post_rows = record.pre.get("requests", []), record.post.get("requests", [])
    for i, request in enumerate(record.requests):
        lines.append(f"  {request.prompt!r} -> {request.target!r}")
        if i < len(pre_rows) and i < len(post_rows):
            pre, post = pre_rows[i], post_rows[i]
            lines.append(f"    before: {format_top(pre['top'])}   p(target)={pre['target_prob']:.4f}")
            lines.append(f"    after:  {format_top(post['top'])}   p(target)={post['target_prob']:.4f}")
    return "\n".join(lines)


def format_history(records: Sequence[EditRecord]) -> str:
    rows = [
        (r.id, r.method, r.status, r.request.prompt[:40], r.request.target[:20],
         f"{r.timings.get('edit_ms', float('nan')):.0f}")
        for r in records
    ]
    return format_table(rows, ["id", "method", "status", "prompt", "target", "edit ms"]) if rows else "(no edits)"


def format_diff(diff: EditDiff) -> str:
    rows = [(p.name, "x".join(map(str, p.shape)), p.kind, f"{p.fro_norm:.4g}", f"{p.relative_norm:.3g}", p.rank)
            for p in diff.params]
    parts = [format_table(rows, ["parameter", "shape", "kind", "|Δ|_F", "|Δ|/|W|", "rank"])]
    for row in diff.predictions + diff.probes:
        before, after = format_top(row["before"], 5), format_top(row["after"], 5)
        parts.append(f"{row['prompt']!r}\n  before: {before}\n  after:  {after}")
    return "\n\n".join(parts)
