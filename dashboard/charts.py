"""Altair charts for the dashboard: one function per picture, fed with the API's JSON.

Large type and fixed disposition colours, so the charts read from a few metres away on a
plant-floor monitor.
"""

from __future__ import annotations

from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from dashboard.ui import DISPOSITION_COLOURS, DISPOSITIONS

FONT = 15
RED = DISPOSITION_COLOURS["reject"]
BLUE = DISPOSITION_COLOURS["hold"]
GREY = "#5F6368"
TIME_AXIS = alt.Axis(format={"seconds": "%H:%M:%S", "minutes": "%H:%M", "hours": "%H:%M", "days": "%d %b",
                             "weeks": "%d %b", "months": "%b %Y", "years": "%Y"})
"""A 24-hour clock on every time axis (Vega's default reads '01 PM'), dates where a tick is a day."""


AnyChart = alt.Chart | alt.LayerChart | alt.FacetChart
"""What every function here returns: something ``st.altair_chart`` draws."""


def _style(chart: AnyChart, height: int = 300, rows: bool = False) -> AnyChart:
    """``rows``: ``height`` is for the bands alone, the axis comes on top (Streamlit's default
    autosize fits the axis inside ``height``, which squeezes a chart of two classes flat)."""
    if rows:
        chart = chart.properties(autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))
    return (chart.properties(height=height)
            .configure_axis(labelFontSize=FONT, titleFontSize=FONT)
            .configure_legend(labelFontSize=FONT, titleFontSize=FONT, orient="bottom")
            .configure_view(strokeWidth=0))


def _frame(rows: list[dict[str, Any]], *times: str) -> pd.DataFrame:
    """Time columns become the appliance's wall-clock time (as in every table, ``ui.when``), without
    a zone: the browser draws a naive time as it is, so a remote viewer sees the plant's clock."""
    df = pd.DataFrame(rows)
    for column in times:
        if column in df:  # per value: the zone's offset changes with daylight saving time
            df[column] = pd.to_datetime([t.to_pydatetime().astimezone().replace(tzinfo=None)
                                         for t in pd.to_datetime(df[column], utc=True)])
    return df


def disposition_mix(mix: dict[str, int]) -> AnyChart:
    """One horizontal bar split by disposition, in the fixed colours."""
    df = pd.DataFrame([{"disposition": d, "parts": mix.get(d, 0), "order": i}
                       for i, d in enumerate(DISPOSITIONS)])
    chart = alt.Chart(df).mark_bar(size=30).encode(
        x=alt.X("sum(parts):Q", title="parts", stack="normalize", axis=alt.Axis(format="%")),
        color=alt.Color("disposition:N", scale=alt.Scale(domain=list(DISPOSITIONS),
                                                         range=list(DISPOSITION_COLOURS.values())),
                        legend=alt.Legend(title=None)),
        order="order:Q",
        tooltip=["disposition", "parts"])
    return _style(chart, 110)


def throughput(per_minute: list[dict[str, Any]]) -> AnyChart:
    """One bar per minute, as wide as its minute (the time unit makes the band; a plain time axis
    draws 1-px bars)."""
    df = _frame(per_minute, "t")
    chart = alt.Chart(df).mark_bar(color=BLUE, binSpacing=2).encode(
        x=alt.X("yearmonthdatehoursminutes(t):T", title=None, axis=TIME_AXIS),
        y=alt.Y("parts:Q", title="parts / min"),
        tooltip=[alt.Tooltip("t:T", format="%H:%M"), "parts"])
    return _style(chart, 220)


def pareto(items: list[dict[str, Any]], type_head: str | None) -> AnyChart:
    """Bars by count, most frequent first, with the cumulative share as a line on a second axis."""
    df = pd.DataFrame(items)
    order = list(df["label"]) if not df.empty else []
    x = alt.X("label:N", sort=order, title=type_head or "defect type", axis=alt.Axis(labelAngle=-30))
    bars = alt.Chart(df).mark_bar(color=RED).encode(
        x=x, y=alt.Y("n:Q", title="defective parts"), tooltip=["label", "n", alt.Tooltip("share:Q", format=".1%")])
    line = alt.Chart(df).mark_line(point=True, color=GREY, strokeWidth=3).encode(
        x=x, y=alt.Y("cumulative:Q", title="cumulative share", axis=alt.Axis(format="%"),
                     scale=alt.Scale(domain=[0, 1])),
        tooltip=[alt.Tooltip("cumulative:Q", format=".1%")])
    return _style(alt.layer(bars, line).resolve_scale(y="independent"))


def control(points: list[dict[str, Any]], centre: float | None) -> AnyChart:
    """p-chart: the defect rate per subgroup, its 3σ limits (step lines), out-of-control points red."""
    df = _frame(points, "t")
    if df.empty:
        return _style(alt.layer(alt.Chart(pd.DataFrame({"t": [], "p": []})).mark_line()))
    df["state"] = df["out"].map({True: "out of control", False: "in control"})
    base = alt.Chart(df).encode(x=alt.X("t:T", title=None, axis=TIME_AXIS))
    rate = base.mark_line(color=BLUE, strokeWidth=2).encode(
        y=alt.Y("p:Q", title="defect rate", axis=alt.Axis(format="%")))
    dots = base.mark_circle(size=90).encode(
        y="p:Q", color=alt.Color("state:N", scale=alt.Scale(domain=["in control", "out of control"],
                                                            range=[BLUE, RED]), legend=alt.Legend(title=None)),
        tooltip=[alt.Tooltip("t:T", format="%Y-%m-%d %H:%M"), alt.Tooltip("p:Q", format=".2%"), "n",
                 "defects", alt.Tooltip("ucl:Q", format=".2%"), alt.Tooltip("lcl:Q", format=".2%")])
    ucl = base.mark_line(color=RED, strokeDash=[6, 4], interpolate="step-after").encode(y="ucl:Q")
    lcl = base.mark_line(color=RED, strokeDash=[6, 4], interpolate="step-after").encode(y="lcl:Q")
    ticks = [base.mark_tick(color=RED, thickness=2, size=18).encode(y=f"{limit}:Q") for limit in ("ucl", "lcl")]
    layers = [ucl, lcl, *ticks, rate, dots]
    if centre is not None:
        layers.insert(0, alt.Chart(pd.DataFrame({"centre": [centre]})).mark_rule(
            color=GREY, strokeWidth=2).encode(y="centre:Q"))
    return _style(alt.layer(*layers), 320)


def trend(points: list[dict[str, Any]], by: str | None) -> AnyChart:
    df = _frame(points, "t")
    if df.empty:
        df = pd.DataFrame({"t": [], "rate": [], "group": [], "n": []})
    chart = alt.Chart(df).mark_line(point=True, strokeWidth=2.5).encode(
        x=alt.X("t:T", title=None, axis=TIME_AXIS),
        y=alt.Y("rate:Q", title="defect rate", axis=alt.Axis(format="%")),
        color=alt.Color("group:N", title=by or None, legend=alt.Legend(title=by) if by else None),
        tooltip=["group", alt.Tooltip("t:T", format="%Y-%m-%d %H:%M"), alt.Tooltip("rate:Q", format=".2%"),
                 "n", "defects"])
    return _style(chart)


def breakdown(groups: list[dict[str, Any]], by: str, centre: float | None) -> AnyChart:
    """Defect rate per group as bars, the overall rate as a rule.  A bar is red when its group is
    worse than chance explains: above the p-chart's upper limit p̄ + 3·√(p̄(1−p̄)/n) for its size."""
    df = pd.DataFrame(groups)
    if df.empty:
        df = pd.DataFrame({"group": [], "rate": [], "n": [], "defects": []})
    if centre is None:
        df["worse"] = False
    else:
        limit = centre + 3 * np.sqrt(centre * (1 - centre) / df["n"].clip(lower=1).astype(float))
        df["worse"] = (df["rate"] > limit) & (df["n"] > 0)
    bars = alt.Chart(df).mark_bar().encode(
        x=alt.X("group:N", title=by, sort="-y", axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("rate:Q", title="defect rate", axis=alt.Axis(format="%")),
        color=alt.condition("datum.worse", alt.value(RED), alt.value(BLUE)),
        tooltip=["group", alt.Tooltip("rate:Q", format=".2%"), "n", "defects"])
    layers: list[Any] = [bars]
    if centre is not None:
        layers.append(alt.Chart(pd.DataFrame({"centre": [centre]})).mark_rule(
            color=GREY, strokeDash=[6, 4], strokeWidth=2).encode(y="centre:Q"))
    return _style(alt.layer(*layers))


def severity(cells: list[dict[str, Any]], classes: list[str], type_head: str | None,
             severity_head: str | None) -> AnyChart:
    """Defective parts per defect type, stacked by severity (light to dark = mild to severe)."""
    df = pd.DataFrame(cells)
    if df.empty:
        df = pd.DataFrame({"type": [], "severity": [], "n": []})
    order = classes or sorted(df["severity"].unique())
    df["rank"] = df["severity"].map({c: i for i, c in enumerate(order)}).fillna(len(order))
    chart = alt.Chart(df).mark_bar().encode(
        x=alt.X("type:N", title=type_head or "defect type", sort="-y", axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("sum(n):Q", title="defective parts"),
        color=alt.Color("severity:N", sort=order, scale=alt.Scale(scheme="orangered"),
                        legend=alt.Legend(title=severity_head or "severity")),
        order=alt.Order("rank:Q"),
        tooltip=["type", "severity", "n"])
    return _style(chart)


def rate_by_value(variable: dict[str, Any], centre: float | None) -> AnyChart:
    """Defect rate per bin of one process value; bar width = the bin, opacity = how many parts."""
    df = pd.DataFrame(variable.get("bins", []))
    if df.empty:
        df = pd.DataFrame({"lo": [], "hi": [], "rate": [], "n": []})
    df["mid"] = (df["lo"] + df["hi"]) / 2
    bars = alt.Chart(df).mark_bar(color=RED).encode(
        x=alt.X("lo:Q", title=variable.get("name"), scale=alt.Scale(zero=False)), x2="hi:Q",
        y=alt.Y("rate:Q", title="defect rate", axis=alt.Axis(format="%")),
        opacity=alt.Opacity("n:Q", legend=None, scale=alt.Scale(range=[0.35, 1])),
        tooltip=[alt.Tooltip("lo:Q", format=".3g"), alt.Tooltip("hi:Q", format=".3g"),
                 alt.Tooltip("rate:Q", format=".2%"), "n"])
    layers: list[Any] = [bars]
    if centre is not None:
        layers.append(alt.Chart(pd.DataFrame({"centre": [centre]})).mark_rule(
            color=GREY, strokeDash=[6, 4], strokeWidth=2).encode(y="centre:Q"))
    return _style(alt.layer(*layers), 280)


def probabilities(classes: list[str], probs: list[float], chosen: str) -> AnyChart:
    df = pd.DataFrame({"class": classes, "p": probs})
    df["top"] = df["class"] == chosen
    chart = alt.Chart(df).mark_bar().encode(
        y=alt.Y("class:N", sort=classes, title=None),
        x=alt.X("p:Q", title=None, scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        color=alt.condition("datum.top", alt.value(BLUE), alt.value("#9AA0A6")),
        tooltip=["class", alt.Tooltip("p:Q", format=".1%")])
    text = chart.mark_text(align="left", dx=4, fontSize=FONT).encode(
        text=alt.Text("p:Q", format=".0%"), color=alt.value("#202124"))
    return _style(alt.layer(chart, text), 32 * len(classes), rows=True)


def hold_curve(curve: dict[str, list[Any]], setting: float, classes: int) -> AnyChart:
    """Per ``min_confidence``: the share of parts held and the accuracy on the parts decided, with the
    line's setting as a rule.  Thresholds below 1/classes hold nothing, so the axis starts there."""
    start = int(100 / classes) / 100
    rows = [{"min confidence": t, "what": what, "share": v}
            for t, held, acc in zip(curve["threshold"], curve["held"], curve["accuracy"], strict=True) if t >= start
            for what, v in (("parts held", held), ("accuracy of the parts decided", acc)) if v is not None]
    df = pd.DataFrame(rows or {"min confidence": [], "what": [], "share": []})
    x = alt.X("min confidence:Q", scale=alt.Scale(domain=[start, 1], nice=False),
              axis=alt.Axis(values=[t / 10 for t in range(11) if t / 10 >= start], format=".1f"))
    lines = alt.Chart(df).mark_line(strokeWidth=3).encode(
        x=x, y=alt.Y("share:Q", title=None, axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("what:N", scale=alt.Scale(domain=["parts held", "accuracy of the parts decided"],
                                                   range=[BLUE, GREY]), legend=alt.Legend(title=None, labelLimit=0)),
        tooltip=[alt.Tooltip("min confidence:Q", format=".2f"), "what", alt.Tooltip("share:Q", format=".1%")])
    rule = alt.Chart(pd.DataFrame({"min confidence": [setting]})).mark_rule(
        color="#202124", strokeDash=[6, 4], strokeWidth=2).encode(x="min confidence:Q")
    return _style(alt.layer(lines, rule), 260)


def confusion(matrix: list[list[int]], classes: list[str]) -> AnyChart:
    rows = [{"truth": t, "predicted": p, "n": matrix[i][j]}
            for i, t in enumerate(classes) for j, p in enumerate(classes)]
    df = pd.DataFrame(rows)
    base = alt.Chart(df).encode(x=alt.X("predicted:N", sort=classes), y=alt.Y("truth:N", sort=classes))
    cells = base.mark_rect().encode(color=alt.Color("n:Q", scale=alt.Scale(scheme="blues"), legend=None))
    text = base.mark_text(fontSize=FONT).encode(
        text="n:Q", color=alt.condition(f"datum.n > {max(1, df['n'].max()) / 2}", alt.value("white"),
                                        alt.value("#202124")))
    return _style(alt.layer(cells, text), 40 * len(classes), rows=True)
