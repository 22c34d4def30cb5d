"""Several modes in one evaluation: every method, one edit at a time, kept in sequence and in batches,
in one overview table.

    factedit eval method=all mode=all n=200 batch_size=64 out=runs/eval/all

Each mode is an ordinary run in out/<mode>/ (its own report, cases and journal; each resumes on its
own). The overview (out/overview.md, out/overview.json) puts one row per method and mode: the headline
figures, what the model says, retention and drift where the mode measures them, and cost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import NONE_METHOD, EvalConfig
from .report import format_value
from .runner import EvalResult, run_eval

# (column label, metric key); a mode that does not measure a key shows "–".
OVERVIEW_COLUMNS = [
    ("ES", "cf/es"),
    ("said", "gen/prompt"),
    ("chat", "gen/chat"),
    ("PS", "cf/ps"),
    ("said para", "gen/paraphrase"),
    ("chat para", "gen/chat_paraphrase"),
    ("chat loops", "gen/chat_loops"),
    ("said para, same question", "gen/paraphrase_prompts"),
    ("NS", "cf/ns"),
    ("nbr kept", "gen/neighbour_kept"),
    ("retention", "seq/retention"),
    ("drift", "drift/ppl_ratio"),
    ("drift, held-out text", "drift/ppl_ratio_heldout"),
    ("exact revert", "revert/exact"),
    ("refused", "data/errors"),
    ("ES, refused = failed", "cf/es_requested"),
    ("edit ms", "time/edit_ms"),
    ("edit ÷ fwd+bwd", "time/edit_per_fwd_bwd"),
    ("peak MB", "mem/peak_mb"),
]


@dataclass(frozen=True)
class SuiteResult:
    out: Path  # the folder holding every mode's run and the overview
    results: dict[str, EvalResult]  # mode -> its run
    overview: str  # overview.md's table


def overview_rows(results: dict[str, EvalResult]) -> list[dict[str, Any]]:
    """One row per (method, mode), after the unedited model's figures on the same records."""
    first = next(iter(results.values())).summary
    rows = [{"method": "unedited", "mode": "–", "edits": first["data"]["evaluated"], **first["baseline"]}]
    for mode, result in results.items():
        summary = result.summary
        for method, values in summary["metrics"].items():
            if method != NONE_METHOD:
                rows.append({"method": method, "mode": mode, "edits": summary["data"]["evaluated"], **values})
    return rows


def overview_table(rows: Sequence[dict[str, Any]]) -> str:
    head = "| method | mode | records | " + " | ".join(label for label, _ in OVERVIEW_COLUMNS) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(OVERVIEW_COLUMNS)]
    for row in rows:
        cells = " | ".join(format_value(key, row.get(key)) for _, key in OVERVIEW_COLUMNS)
        lines.append(f"| {row['method']} | {row['mode']} | {row['edits']} | {cells} |")
    return "\n".join(lines)


def run_suite(configs: Sequence[EvalConfig]) -> SuiteResult:
    """Run each mode's config in turn (each resumable), then write the overview next to their folders."""
    results = {config.mode: run_eval(config) for config in configs}
    out = configs[0].out.parent
    rows = overview_rows(results)
    table = overview_table(rows)
    first, evaluated = configs[0], rows[0]["edits"]
    text = (
        "# factedit evaluation: every mode\n\n"
        f"- data: `{first.data.path}`: {evaluated} records from record {first.start}; batch mode: "
        f"{first.batch_size} facts per edit_batch; sequential: {first.sequential_batch} fact(s) per kept "
        "edit, every edit re-measured after the last\n"
        "- each mode's full report: " + ", ".join(f"[{m}]({m}/report.md)" for m in results) + "\n\n"
        + table
        + "\n"
    )
    out.joinpath("overview.md").write_text(text)
    out.joinpath("overview.json").write_text(json.dumps(rows, indent=1))
    return SuiteResult(out, results, table)
