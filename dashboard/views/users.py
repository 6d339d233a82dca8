"""Users (admin): who may log in, with which role.  Passwords are hashed by the daemon (argon2) and
never shown; a removed user's token stops working at once."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import ui

st.title("Users")
if not ui.at_least("admin"):
    st.error("User administration needs the admin role.")
    st.stop()
api = ui.api()
if notice := st.session_state.pop("users_notice", None):
    st.success(notice)
users = ui.call(lambda: api.get("/users"), "list the users")
if users is not None:
    st.dataframe(pd.DataFrame(users), hide_index=True, width="content")

left, right = st.columns(2)
with left, st.form("user_form", clear_on_submit=True):
    st.subheader("Add a user or change one")
    name = st.text_input("User name", key="user_name")
    role = st.selectbox("Role", ui.ROLES, key="user_role")
    password = st.text_input("Password (at least 10 characters)", type="password", key="user_password")
    submitted = st.form_submit_button("Save user", type="primary")
    if submitted and ui.call(lambda: api.put(f"/users/{name}", {"role": role, "password": password}),
                             "save the user"):
        st.session_state["users_notice"] = f"Saved {ui.esc(name)} as {ui.esc(role)}."
        st.rerun()
with right:
    st.subheader("Remove a user")
    others = [u["user"] for u in users or [] if u["user"] != st.session_state.get("user")]
    gone = st.selectbox("User", others, key="user_remove", index=None, placeholder="choose a user")
    remove = st.button("Remove", key="user_remove_button", disabled=gone is None)
    if remove and ui.call(lambda: api.delete(f"/users/{gone}"), "remove the user"):
        st.session_state["users_notice"] = f"Removed {ui.esc(gone)}."
        st.rerun()
