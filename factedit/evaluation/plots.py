"""PNG plots of a run's summary, drawn with matplotlib's object API and the Agg canvas (no pyplot, no
global backend switch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

BAR_KEYS = ["cf/es", "cf/ps", "cf/ns", "cf/score", "tok/reliability", "tok/generalization", "tok/locality"]
CURVE_KEYS = ["cf/es", "cf/ps", "cf/ns", "tok/locality", "seq/retention", "drift/ppl_ratio"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_metrics(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Grouped bars: one group per metric (0..1), one bar per method and the unedited model."""
    columns = {"unedited": summary["baseline"], **summary["metrics"]}
    keys = [k for k in BAR_KEYS if any(k in c for c in columns.values())]
    if not keys:
        return None
    figure = _figure(max(6.0, 1.3 * len(keys)), 3.8)
    axes = figure.add_subplot()
    width = 0.8 / len(columns)
    for i, (name, values) in enumerate(columns.items()):
        xs = [k + (i - (len(columns) - 1) / 2) * width for k in range(len(keys))]
        axes.bar(xs, [values.get(k, 0.0) for k in keys], width, label=name)
    axes.set_xticks(range(len(keys)), keys, rotation=20, ha="right")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("share")
    axes.set_title(
        f"{summary['data']['format']} · {summary['data']['evaluated']} records · {summary['mode']}"
    )
    axes.legend(fontsize="small", ncols=min(len(columns), 4), loc="upper center", bbox_to_anchor=(0.5, -0.28))
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_retention(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Sequential runs: each metric over all edits so far, against the number of edits made."""
    runs = summary.get("sequential", {})
    if not runs:
        return None
    figure = _figure(11, 6)
    for slot, key in enumerate(CURVE_KEYS, start=1):
        axes = figure.add_subplot(2, 3, slot)
        for method, view in runs.items():
            points = [(c["edits"], c["metrics"][key]) for c in view["checkpoints"] if key in c["metrics"]]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=method)
        if key in summary["baseline"] and key.startswith("cf/ns"):
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
