"""The supervisors' Streamlit dashboard; talks to the daemon only through its HTTP API (issue D)."""
