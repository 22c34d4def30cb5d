"""The two charts of the app, as explicit Altair specs (horizontal bars, labelled values)."""

from __future__ import annotations

import altair as alt
import pandas as pd

BEFORE, AFTER = "before", "after"
COLOURS = alt.Scale(domain=[BEFORE, AFTER], range=["#8c96a3", "#d62728"])


def probability_chart(frame: pd.DataFrame) -> alt.Chart:
    """Grouped bars: for each quantity (p(new target), p(old answer)) its value before and after.

    frame: columns quantity, when ("before"/"after"), probability.
    """
    frame = frame.assign(bar=frame["quantity"] + " " + frame["when"])
    base = alt.Chart(frame).encode(
        y=alt.Y("bar:N", title=None, sort=None, axis=alt.Axis(labelLimit=320)),
        x=alt.X("probability:Q", title="probability", scale=alt.Scale(domain=[0, 1])),
    )
    bars = base.mark_bar().encode(
        color=alt.Color("when:N", scale=COLOURS, title=None, legend=alt.Legend(orient="bottom")),
        tooltip=["quantity", "when", alt.Tooltip("probability:Q", format=".4f")],
    )
    labels = base.mark_text(align="left", dx=3, fontSize=11).encode(text=alt.Text("probability:Q", format=".3f"))
    return (bars + labels).properties(height=alt.Step(26))


def layer_chart(frame: pd.DataFrame) -> alt.Chart:
    """‖Δ‖_F per layer; frame: columns layer (str, in order), norm."""
    return alt.Chart(frame).mark_bar(color="#d62728").encode(
        x=alt.X("layer:N", sort=None, title="layer"),
        y=alt.Y("norm:Q", title="‖Δ‖_F"),
        tooltip=["layer", alt.Tooltip("norm:Q", format=".4g")],
    ).properties(height=200)
