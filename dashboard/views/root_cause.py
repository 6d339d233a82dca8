"""Root cause: where do the defects come from — which type, batch, asset, camera view, shift, process value.

All figures come from the daemon's analytics API (DuckDB in the daemon); answers are cached for a
few seconds per filter so moving between charts does not re-query.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, ui

WINDOWS = {"Last hour": timedelta(hours=1), "Last 8 hours": timedelta(hours=8),
           "Last 24 hours": timedelta(days=1), "Last 7 days": timedelta(days=7), "Everything": None}
DIMENSIONS = {"camera_view": "camera view", "asset_id": "asset", "line_id": "line", "batch": "batch",
              "shift": "shift", "model_version": "model version"}
ALL = "All"


@st.cache_data(ttl=10, show_spinner=False)
def fetch(token: str, path: str, params: tuple[tuple[str, Any], ...]) -> Any:
    return ui.Api(token).get(path, **dict(params))


def get(path: str, params: dict[str, Any], what: str) -> Any:
    token = st.session_state.get("token", "")
    return ui.call(lambda: fetch(token, path, tuple(sorted(params.items()))), what)


def filters(facets: dict[str, Any]) -> dict[str, Any]:
    """The filter bar; returns the API query parameters."""
    row = st.columns([1.3, 1, 1, 1, 1.3, 1, 1.4])
    window = row[0].selectbox("Time window", list(WINDOWS), index=2, key="rc_window")
    params: dict[str, Any] = {}
    span = WINDOWS[window]
    if span is not None:
        params["since"] = (datetime.now(UTC) - span).isoformat()
    for col, (key, label) in zip(row[1:], [("line_id", "Line"), ("asset_id", "Asset"),
                                           ("camera_view", "Camera view"), ("batch", "Batch"),
                                           ("shift", "Shift"), ("model_version", "Model")], strict=True):
        choice = col.selectbox(label, [ALL, *facets.get(key, [])], key=f"rc_{key}")
        if choice != ALL:
            params[key] = choice
    # round 'since' to the minute so the cache hits between reruns
    if "since" in params:
        params["since"] = params["since"][:16] + ":00+00:00"
    return params


def export(params: dict[str, Any]) -> None:
    token = st.session_state.get("token")
    stamp = datetime.now().strftime("%Y%m%d-%H%M")
    cols = st.columns([1, 1, 3])
    for col, fmt, mime in ((cols[0], "csv", "text/csv"), (cols[1], "parquet", "application/vnd.apache.parquet")):
        def data(fmt: str = fmt) -> bytes:
            return ui.Api(token, timeout=300).content("/analytics/export", timeout=300, format=fmt, **params)

        col.download_button(f"Export {fmt.upper()}", data, file_name=f"results-{stamp}.{fmt}", mime=mime,
                            icon=":material/download:", key=f"export_{fmt}", on_click="ignore")
    cols[2].caption("One row per part in the selection, with defect type, severity and process values.")


st.title("Root cause")
facets = get("/analytics/facets", {}, "read the filter choices")
if facets is None:
    st.stop()
params = filters(facets)
plan = ", ".join(f"{s['name']} {s['starts']}" for s in facets["shifts"])
st.caption(f"{facets['results']:,} results stored · shifts: {ui.esc(plan)} ({ui.esc(facets['timezone'])}) · "
           "defect = rework or reject; defect rate = defects / decided parts (holds excluded)")

control = get("/analytics/control", params, "read the control chart")
if control:
    alarm = control["alarm"]
    if alarm["active"]:
        st.html(f"<div class='alarm'>⚠ Control chart alarm: {ui.esc(alarm['reason'])}</div>")
    elif alarm["run_warning"]:
        st.warning(ui.esc(alarm["reason"]))
    st.subheader("Defect rate · p-chart")
    st.caption(f"Centre line {ui.pct(control['centre'], 2)} · 3σ limits per subgroup · subgroup = "
               f"{ui.esc(control['bucket'])} · {alarm['out_of_control']} subgroups out of control")
    st.altair_chart(charts.control(control["points"], control["centre"]), width="stretch")

left, right = st.columns(2)
with left:
    pareto = get("/analytics/pareto", params, "read the Pareto")
    st.subheader(f"Pareto of defective parts by {ui.esc(pareto['type_head'])}" if pareto else "Pareto")
    if pareto:
        if pareto["items"]:
            st.altair_chart(charts.pareto(pareto["items"], pareto["type_head"]), width="stretch")
        else:
            st.info("No defective parts in this selection.")
with right:
    sev = get("/analytics/severity", params, "read the severities")
    st.subheader(f"{ui.esc(sev['severity_head'])} per {ui.esc(sev['type_head'])}" if sev else "Severity")
    if sev:
        if sev["cells"]:
            st.altair_chart(charts.severity(sev["cells"], sev["severity_classes"], sev["type_head"],
                                            sev["severity_head"]), width="stretch")
        else:
            st.info("No defective parts in this selection.")

st.subheader("Defect rate by …")
by = st.segmented_control("Group by", list(DIMENSIONS), format_func=lambda d: DIMENSIONS[d], default="camera_view",
                          key="rc_by", required=True, label_visibility="collapsed") or "camera_view"
left, right = st.columns([1.4, 1])
with left:
    trend = get("/analytics/trend", {**params, "by": by}, "read the trend")
    if trend:
        st.altair_chart(charts.trend(trend["points"], DIMENSIONS[by]), width="stretch")
        st.caption(f"one point per {ui.esc(trend['bucket'])}")
with right:
    groups = get("/analytics/breakdown", {**params, "by": by, "limit": 30}, "read the breakdown")
    if groups:
        st.altair_chart(charts.breakdown(groups["groups"], DIMENSIONS[by], control and control["centre"]),
                        width="stretch")
        st.caption("dashed: the rate of the whole selection · red: a group worse than chance explains "
                   "(above p̄ + 3σ for its number of parts, as on the control chart)")

st.subheader("Process values")
corr = get("/analytics/correlation", params, "read the correlations")
if corr:
    if not corr["variables"]:
        st.info("The PLC has recorded no process values for these parts.")
    else:
        table = pd.DataFrame([{"process value": v["name"], "correlation r": v["r"], "parts": v["n"]}
                              for v in corr["variables"]])
        c1, c2 = st.columns([1.1, 1.6])
        with c1:
            st.dataframe(table, hide_index=True, width="stretch", column_config={
                "correlation r": st.column_config.NumberColumn(format="%+.3f")})
            st.caption(f"Point-biserial correlation with 'defective' over {corr['n']:,} of {corr['decided']:,} "
                       "decided parts (evenly spread sample)")
        with c2:
            name = st.selectbox("Defect rate by value of", [v["name"] for v in corr["variables"]], key="rc_var")
            variable = next(v for v in corr["variables"] if v["name"] == name)
            st.altair_chart(charts.rate_by_value(variable, control and control["centre"]), width="stretch")

if ui.at_least("engineer"):
    st.subheader("Export")
    export(params)
