"""Serve the dashboard with security headers: ``streamlit run dashboard/serve.py`` (same flags as app.py).

Streamlit has no option for response headers, but ``streamlit run`` serves an ``st.App`` it finds in
the script (its documented ASGI entry point) with the middleware the app is given: here one that
adds the headers of ``dashboard/headers.py`` (a Content-Security-Policy among them) to every page
and file.  The pages themselves are ``app.py``, as before; ``streamlit run dashboard/app.py`` still
works, without the headers.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

from appliance.http_headers import SecurityHeaders
from dashboard.headers import dashboard_headers

app = st.App(Path(__file__).with_name("app.py"),
             middleware=[Middleware(SecurityHeaders, headers_for=dashboard_headers)])
