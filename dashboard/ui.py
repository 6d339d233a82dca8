"""What every page shares: the session's API client and role, disposition colours, page styling.

Colours are fixed per disposition everywhere (charts, badges, tables) so a glance across the
plant floor reads the same on every page: pass green, rework amber, reject red, hold blue.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import streamlit as st

from dashboard.api_client import Api, ApiError

T = TypeVar("T")

DISPOSITION_COLOURS = {"pass": "#1E8E3E", "rework": "#E8A200", "reject": "#D93025", "hold": "#1A73E8"}
DISPOSITIONS = tuple(DISPOSITION_COLOURS)
ROLES = ("operator", "engineer", "admin")
NEUTRAL = "#5F6368"

CSS = """
<style>
  [data-testid="stMetricValue"] { font-size: 2.4rem; font-weight: 700; }
  [data-testid="stMetricLabel"] p { font-size: 1.0rem; }
  .badge { display: inline-block; padding: 0.15rem 0.6rem; border-radius: 0.4rem; color: #fff;
           font-weight: 700; font-size: 0.95rem; letter-spacing: 0.02em; }
  .status-ok { color: #1E8E3E; font-weight: 700; }
  .status-bad { color: #D93025; font-weight: 700; }
  .big-label { font-size: 1.6rem; font-weight: 700; }
  .muted { color: #5F6368; }
  .no-image { display: flex; align-items: center; justify-content: center; text-align: center;
              background: #F1F3F4; border-radius: 0.5rem; color: #5F6368; font-size: 0.85rem;
              margin-bottom: 1rem; padding: 0.3rem; }
  .alarm { background: #D93025; color: #fff; padding: 0.8rem 1rem; border-radius: 0.5rem;
           font-size: 1.15rem; font-weight: 700; }
</style>
"""


# ASCII punctuation (every character Markdown, Streamlit's directives or HTML give a meaning) and
# control characters (a newline could end an HTML block or start a Markdown one)
_INERT = {ord(c): f"&#{ord(c)};" for c in string.punctuation} | {c: f"&#{c};" for c in (*range(32), 127)}


def esc(value: Any) -> str:
    """Text from the API (a part id, a batch, a user name, a class or model name, an error message)
    made inert for ``st.markdown`` — with or without ``unsafe_allow_html`` — and every other element
    that renders Markdown (captions, alerts, labels, help, toasts, button-group options).

    Each punctuation or control character becomes a numeric character reference, which the Markdown
    parser and the browser both show as the character itself: no tag, link, image, emphasis or
    directive can form, inside an HTML block or out.  Not for plain-text places (dataframes,
    selectbox options, chart data), where the references would show.
    """
    return str(value).translate(_INERT)


def style() -> None:
    st.html(CSS)


def api() -> Api:
    """An API client with the logged-in user's token (none before log-in)."""
    return Api(st.session_state.get("token"))


def role() -> str | None:
    return st.session_state.get("role")


def at_least(required: str) -> bool:
    """Whether the logged-in user's role is ``required`` or higher (the API checks again)."""
    current = role()
    return current in ROLES and ROLES.index(current) >= ROLES.index(required)


def badge(disposition: str) -> str:
    colour = DISPOSITION_COLOURS.get(disposition, NEUTRAL)
    return f'<span class="badge" style="background:{colour}">{esc(disposition.upper())}</span>'


def rule_in_words(rule: str) -> str:
    """Why the disposition was made, for a supervisor: 'low_confidence:defect_grade=1' reads
    'the model was unsure of defect_grade = 1'; a table rule is named as the table names it."""
    if rule.startswith("low_confidence:"):
        return f"the model was unsure of {rule.removeprefix('low_confidence:').replace('=', ' = ', 1)}"
    return {"no_rule": "no rule of the table matched", "image_error": "the image could not be judged"}.get(
        rule, f"rule '{rule}'")


def call(fn: Callable[[], T], what: str) -> T | None:
    """Run an API call; on refusal show the API's reason (and log out on an expired token)."""
    try:
        return fn()
    except ApiError as exc:
        if exc.status == 401 and st.session_state.get("token"):
            logout()
            st.warning("Your session has expired or your account changed; please log in again.")
            st.stop()
        if exc.status == 403:
            st.error(f"Not allowed to {esc(what)}: {esc(exc.message)}")
        elif exc.status == 0:
            st.error(f"Cannot {esc(what)}: {esc(exc.message)}")
        else:
            st.error(f"Could not {esc(what)} ({exc.status}): {esc(exc.message)}")
        return None


def logout() -> None:
    for key in ("token", "user", "role", "expires_at"):
        st.session_state.pop(key, None)


def when(value: Any) -> str:
    """An API timestamp as local wall-clock time, e.g. '2026-11-20 14:03:07'."""
    if not value:
        return "—"
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f} %"
