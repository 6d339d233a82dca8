"""Driving the dashboard in Debian's Chromium with Playwright: what the browser test and the README
screenshot tool share.  Never downloads a browser (scripts/system-deps.sh installs chromium)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import serve_dashboard  # noqa: F401 - the browser tests start it from here

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1500, "height": 950}


CSP_WATCH = """window.__csp = [];
document.addEventListener('securitypolicyviolation',
  e => window.__csp.push(`${e.violatedDirective} ${e.blockedURI} (${e.sourceFile}:${e.lineNumber})`));"""
"""An init script: every Content-Security-Policy violation of the page, in ``window.__csp``."""


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)



def settle(page: Any) -> None:
    """Wait until Streamlit has finished running the script (the 'Running…' widget is gone)."""
    page.wait_for_load_state("networkidle")
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=30_000)
    page.wait_for_timeout(700)
    # a fragment that is refreshing greys out its old elements: wait for the fresh ones (polled from
    # here: wait_for_function compiles its predicate in the page, which the dashboard's CSP refuses)
    deadline = time.monotonic() + 30
    while page.evaluate("document.querySelectorAll('[data-stale=\"true\"]').length"):
        if time.monotonic() > deadline:
            raise TimeoutError("the dashboard kept stale elements for 30 s")
        page.wait_for_timeout(100)


def log_in(page: Any, url: str, user: str, password: str) -> None:
    page.goto(url)
    page.get_by_role("textbox", name="User name").fill(user)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("heading", name="Live").wait_for(timeout=30_000)
    settle(page)


def log_out(page: Any) -> None:
    page.get_by_role("button", name="Log out").click()
    page.get_by_role("textbox", name="User name").wait_for()


def go(page: Any, title: str) -> None:
    page.get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=30_000)
    settle(page)


def screenshot(page: Any, path: Path, height: int | None = None) -> None:
    """A PNG of the viewport, made ``height`` pixels tall for this one picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if height:
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.wait_for_timeout(800)
    page.screenshot(path=str(path))
    if height:
        page.set_viewport_size(VIEWPORT)
