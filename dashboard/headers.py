"""The response headers the dashboard is served with (``serve.py``): a Content-Security-Policy,
``X-Frame-Options``, ``X-Content-Type-Options`` and ``Referrer-Policy``.

The policy allows what Streamlit's own front end needs and nothing else: scripts only from this
server plus the one inline script of Streamlit's ``index.html`` (by its hash, read from the
installed Streamlit, so an upgrade cannot break it silently), no ``eval`` ('wasm-unsafe-eval' lets
the protobuf decoder compile its small WebAssembly helper, nothing more); styles inline too
(Streamlit's CSS-in-JS and ``st.html``); images, fonts and workers also as ``data:``/``blob:``
URLs; the WebSocket to this server ('self'); no plugins, no frames, no other origin (the page icon
is an emoji for that reason: a Material icon would be fetched from fonts.gstatic.com), and the
dashboard may not be framed.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import streamlit

INDEX_HTML = Path(streamlit.__file__).parent / "static" / "index.html"


def inline_script_hashes(index_html: str) -> list[str]:
    """CSP sources for the inline scripts of Streamlit's page (``<script>`` without ``src``)."""
    bodies = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", index_html, flags=re.DOTALL)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'" for body in bodies]


def content_security_policy() -> str:
    scripts = " ".join(["'self'", "'wasm-unsafe-eval'", *inline_script_hashes(INDEX_HTML.read_text(encoding="utf-8"))])
    return "; ".join([
        "default-src 'self'",
        f"script-src {scripts}",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "frame-src 'none'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])


HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": content_security_policy(),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def dashboard_headers(path: str) -> Mapping[str, str]:
    """The same headers on every page and file."""
    return HEADERS
