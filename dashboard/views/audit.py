"""Audit: every privileged action — labels, verifications, gate runs, promotions, roll-backs, shadow
changes, exports and user changes — with who, when and what (engineers and admins)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import ui


def describe(detail: dict[str, Any] | None) -> str:
    """An entry's detail as a person reads it: ``labels: defect_grade=1, cell_type=poly``, empty
    fields left out (a label without a comment says nothing about a comment)."""
    def text(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k}={text(x)}" for k, x in v.items())
        if isinstance(v, list):
            return "; ".join(text(x) for x in v)
        if isinstance(v, bool):
            return "yes" if v else "no"
        return str(v)
    return " · ".join(f"{k}: {text(v)}" for k, v in (detail or {}).items() if v not in (None, "", [], {}))


st.title("Audit log")
if not ui.at_least("engineer"):
    st.error("The audit log needs the engineer role.")
    st.stop()
data = ui.call(lambda: ui.api().get("/audit", limit=2000), "read the audit log")
if data is not None:
    entries = data["entries"]
    if not entries:
        st.info("No privileged actions yet.")
        st.stop()
    df = pd.DataFrame(entries)
    c = st.columns(3)
    actions = c[0].multiselect("Action", sorted(df["action"].unique()), key="audit_action")
    users = c[1].multiselect("User", sorted(df["user"].unique()), key="audit_user")
    text = c[2].text_input("Target or detail contains", key="audit_target", placeholder="a part, a version, a user…")
    if actions:
        df = df[df["action"].isin(actions)]
    if users:
        df = df[df["user"].isin(users)]
    df["detail"] = df["detail"].map(describe)
    if text:
        df = df[(df["target"].fillna("") + " " + df["detail"]).str.contains(text, case=False, regex=False)]
    df["at"] = df["at"].map(ui.when)
    st.caption(f"{len(df)} of {len(entries)} entries, newest first")
    st.dataframe(df[["at", "user", "role", "action", "target", "detail"]], hide_index=True, width="stretch",
                 height=min(640, 36 * (len(df) + 1) + 4))
