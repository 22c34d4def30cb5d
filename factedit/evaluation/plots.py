"""PNG plots of a run's summary, drawn with matplotlib's object API and the Agg canvas (no pyplot, no
global backend switch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .report import method_columns

# Two panels side by side: the same questions scored from probabilities, and by what the model says.
BAR_PANELS = {
    "teacher-forced (probabilities)": [
        "cf/es", "cf/ps", "cf/ns", "cf/score", "tok/reliability", "tok/generalization", "tok/locality"
    ],
    "generated (what the model says)": [
        "gen/prompt", "gen/paraphrase", "gen/paraphrase_prompts", "gen/neighbour_kept", "gen/chat",
        "gen/chat_paraphrase",
    ],
}
CURVE_KEYS = [
    "cf/es", "cf/ps", "cf/ns", "seq/retention",
    "gen/prompt", "gen/paraphrase", "gen/neighbour_kept", "gen/retention",
    "tok/locality", "drift/ppl_ratio", "drift/ppl_ratio_heldout",
]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_metrics(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Grouped bars: one group per metric (0..1), one bar per method and the unedited model; the
    teacher-forced metrics and the generated ones in two panels side by side (a metric a method
    lacks, e.g. gen/chat without a chat template, is left out, not drawn as 0)."""
    columns = method_columns(summary)
    panels = {
        title: [k for k in keys if any(k in c for c in columns.values())] for title, keys in BAR_PANELS.items()
    }
    panels = {title: keys for title, keys in panels.items() if keys}
    if not panels:
        return None
    sizes = [len(keys) for keys in panels.values()]
    figure = _figure(max(6.0, 1.2 * sum(sizes) + 1), 4.2)
    grid = figure.add_gridspec(1, len(panels), width_ratios=sizes)
    width = 0.8 / len(columns)
    for slot, (title, keys) in enumerate(panels.items()):
        axes = figure.add_subplot(grid[0, slot])
        for i, (name, values) in enumerate(columns.items()):
            xs = [k + (i - (len(columns) - 1) / 2) * width for k in range(len(keys)) if keys[k] in values]
            axes.bar(xs, [values[k] for k in keys if k in values], width, label=name, color=f"C{i}")
        axes.set_xticks(range(len(keys)), keys, rotation=20, ha="right")
        axes.set_ylim(0, 1.05)
        axes.set_title(title, fontsize="medium")
        axes.grid(axis="y", alpha=0.3)
        if slot == 0:
            axes.set_ylabel("share")
            axes.legend(
                fontsize="small", ncols=min(len(columns), 4), loc="upper center", bbox_to_anchor=(0.5, -0.3)
            )
    figure.suptitle(
        f"{summary['data']['format']} · {summary['data']['evaluated']} records · {summary['mode']}"
    )
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_retention(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Sequential runs: each metric over all edits so far, against the number of edits made."""
    runs = summary.get("sequential", {})
    if not runs:
        return None
    present = {k for view in runs.values() for c in view["checkpoints"] for k in c["metrics"]}
    keys = [k for k in CURVE_KEYS if k in present]
    if not keys:
        return None
    rows = (len(keys) + 3) // 4
    figure = _figure(14, 3.2 * rows)
    for slot, key in enumerate(keys, start=1):
        axes = figure.add_subplot(rows, 4, slot)
        for method, view in runs.items():
            points = [(c["edits"], c["metrics"][key]) for c in view["checkpoints"] if key in c["metrics"]]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=method)
        if key in summary["baseline"] and key in ("cf/ns", "gen/prompt", "gen/paraphrase"):
            axes.axhline(summary["baseline"][key], color="grey", linestyle=":", label="unedited")
        axes.set_title(key)
        axes.set_xlabel("edits made")
        if key.startswith("drift/"):  # a ratio: 1 = the unedited model; log scale shows a collapse too
            axes.set_yscale("log")
            axes.axhline(1.0, color="grey", linestyle=":")
            axes.set_title(f"{key} (reference perplexity / unedited)")
            axes.grid(alpha=0.3)
            continue
        axes.set_ylim(-0.02, 1.02)
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize="small")
    figure.suptitle("sequential editing: all edits so far, re-measured at each checkpoint")
    figure.tight_layout()
    figure.savefig(path)
    return path
