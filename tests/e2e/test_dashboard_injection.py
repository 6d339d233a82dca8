"""Script injection through PLC text, in a real browser: a part id and a batch carrying an ``<iframe
srcdoc=…>`` and a ``<script>`` reach the Live and Review pages as text, never as elements, and the
dashboard is served with its Content-Security-Policy.

The wire now refuses such text, so it is written straight into the daemon's store, as results stored
before that check (or imported) would be there.  Screenshots go to tests/artifacts/dashboard/.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.dashboard.line import PASSWORDS, USERS, Line
from tests.e2e.browser import (
    CHROMIUM,
    CSP_WATCH,
    ROOT,
    VIEWPORT,
    go,
    log_in,
    screenshot,
    settle,
)

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/system-deps.sh)")

ARTIFACTS = ROOT / "tests" / "artifacts" / "dashboard"
IFRAME = '<iframe srcdoc="<script>document.title=\'pwned\'; parent.document.title=\'pwned\'</script>">'
SCRIPT = "<script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    """A line without a feeder (the newest parts stay the newest) whose two newest parts and top held
    part carry the hostile text."""
    running = Line(tmp_path_factory.mktemp("injection")).start()
    try:
        with running.api("operator") as api:
            newest = [r["result_id"] for r in api.get("/results", params={"limit": 3}).json()["results"]]
            held = api.get("/review/queue").json()["results"][0]["result_id"]
        for rid in (newest[0], held):
            running.rewrite(rid, part_id=IFRAME, batch=SCRIPT)
        running.rewrite(next(rid for rid in newest if rid not in (newest[0], held)), part_id=SCRIPT)
        yield running
    finally:
        running.stop()


def injected(page: Any) -> dict[str, Any]:
    """What the hostile text could have created: frames, scripts beyond Streamlit's own, a new title."""
    return page.evaluate("""() => ({
        iframes: document.querySelectorAll('iframe').length,
        pwned_scripts: [...document.scripts].filter(s => s.textContent.includes('pwned')).length,
        title: document.title,
        csp: window.__csp,
    })""")


def test_hostile_part_text_is_shown_as_text_under_a_csp(line: Line, dashboard: str, browser: Any) -> None:
    answer = httpx.get(dashboard + "/")
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, policy
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";", 1)[0], "no inline scripts run"
    assert answer.headers["x-frame-options"] == "DENY" and answer.headers["x-content-type-options"] == "nosniff"

    page = browser.new_page(viewport=VIEWPORT)
    page.add_init_script(CSP_WATCH)
    log_in(page, dashboard, USERS["operator"], PASSWORDS["operator"])
    page.locator('[data-testid="stImage"]').nth(7).wait_for(timeout=30_000)  # the last parts are drawn
    settle(page)
    found = injected(page)
    assert found == {"iframes": 0, "pwned_scripts": 0, "title": found["title"], "csp": []}, found
    assert "pwned" not in found["title"]
    cards = page.locator("span.muted")
    assert cards.filter(has_text=IFRAME).count() >= 1, "the <iframe> part id is on the Live page, as text"
    assert cards.filter(has_text=SCRIPT).count() == 1, "and so is the <script> one"
    screenshot(page, ARTIFACTS / "injection_live.png", height=1100)

    go(page, "Review")
    big = page.locator("span.big-label").first
    assert big.inner_text().strip() == IFRAME, "the held part's id, shown as it was stored"
    assert page.locator("span.muted").filter(has_text=f"batch {SCRIPT}").count() == 1
    found = injected(page)
    assert found == {"iframes": 0, "pwned_scripts": 0, "title": found["title"], "csp": []}, found
    assert "pwned" not in found["title"]
    screenshot(page, ARTIFACTS / "injection_review.png", height=1100)
    page.close()
