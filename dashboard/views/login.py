"""Log-in: user name and password are exchanged for an API token (the daemon checks the argon2 hash)."""

from __future__ import annotations

import streamlit as st

from dashboard import ui
from dashboard.api_client import ApiError, base_url

st.title("Defect appliance")
st.caption(f"Quality dashboard · {ui.esc(base_url())}")
left, _ = st.columns([1, 1.4])
with left, st.form("login"):
    st.subheader("Log in")
    username = st.text_input("User name", key="login_user")
    password = st.text_input("Password", type="password", key="login_password")
    submitted = st.form_submit_button("Log in", type="primary")
if submitted:
    if not username or not password:
        left.error("Enter your user name and password.")
    else:
        try:
            token = ui.api().login(username, password)
        except ApiError as exc:
            left.error("Wrong user name or password." if exc.status == 401 else f"Cannot log in: {ui.esc(exc.message)}")
        else:
            st.session_state.update(token=token["access_token"], user=token["user"], role=token["role"],
                                    expires_at=token["expires_at"])
            st.rerun()
