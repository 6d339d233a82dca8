"""Entry point: ``streamlit run dashboard/app.py`` (with ``APPLIANCE_API_URL`` pointing at the daemon).

Before log-in only the log-in page exists; afterwards the navigation offers the pages the user's
role may use (operator: Live, Review, Root cause, Models; engineer: + Audit; admin: + Users).
Hiding a page is a convenience: the API refuses the same actions with 403 whatever the page shows.
"""

from __future__ import annotations

import streamlit as st

from dashboard import ui
from dashboard.api_client import base_url

# an emoji icon is drawn in the page; a Material one would be fetched from Google (refused by the CSP)
st.set_page_config(page_title="Defect appliance", page_icon="🏭", layout="wide")
ui.style()

if not st.session_state.get("token"):
    page = st.navigation([st.Page("views/login.py", title="Log in", icon=":material/login:")],
                         position="hidden")
else:
    pages = [
        st.Page("views/live.py", title="Live", icon=":material/monitoring:", default=True),
        st.Page("views/review.py", title="Review", icon=":material/fact_check:"),
        st.Page("views/root_cause.py", title="Root cause", icon=":material/troubleshoot:"),
        st.Page("views/models.py", title="Models", icon=":material/model_training:"),
    ]
    if ui.at_least("engineer"):
        pages.append(st.Page("views/audit.py", title="Audit", icon=":material/policy:"))
    if ui.at_least("admin"):
        pages.append(st.Page("views/users.py", title="Users", icon=":material/group:"))
    page = st.navigation(pages)
    with st.sidebar:
        st.markdown(f"**{ui.esc(st.session_state['user'])}** · {ui.esc(st.session_state['role'])}")
        st.caption(f"Appliance: {ui.esc(base_url())}")
        if st.button("Log out", icon=":material/logout:", key="logout"):
            ui.logout()
            st.rerun()
page.run()
