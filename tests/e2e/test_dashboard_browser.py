"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a fresh daemon on a
replay line and a fresh ``streamlit run dashboard/serve.py`` (the pages of app.py, with security headers).

An operator logs in, confirms a held part with one key (Enter), and the label is then in the store
and in the next retraining set (a verified label); the same operator finds retrain and promote
disabled and the API answers 403.  Screenshots of every page go to tests/artifacts/dashboard/ (the
README's come from the real demo: tests/e2e/readme_screenshots.py).  Never downloads a browser:
Chromium comes from Debian (scripts/system-deps.sh).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dashboard.line import PASSWORDS, USERS, Line
from tests.e2e.browser import (
    CHROMIUM,
    CSP_WATCH,
    ROOT,
    VIEWPORT,
    go,
    log_out,
    screenshot,
    settle,
)
from tests.e2e.browser import log_in as browser_log_in

ARTIFACTS = ROOT / "tests" / "artifacts" / "dashboard"

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/system-deps.sh)")


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    running = Line(tmp_path_factory.mktemp("e2e"), loop=True).start()
    running.feed(rate_hz=4)
    try:
        yield running
    finally:
        running.stop()


def shot(page: object, name: str, height: int | None = None) -> None:
    screenshot(page, ARTIFACTS / f"{name}.png", height)


def log_in(page: object, url: str, role: str) -> None:
    browser_log_in(page, url, USERS[role], PASSWORDS[role])


def assert_no_csp_violations(page: object) -> None:
    """Every page so far rendered under the dashboard's Content-Security-Policy without breaking it."""
    assert page.evaluate("window.__csp") == []  # type: ignore[attr-defined]


def test_operator_labels_a_held_part_and_cannot_retrain_or_promote(line: Line, dashboard: str,
                                                                     browser: object) -> None:
    page = browser.new_page(viewport=VIEWPORT)  # type: ignore[attr-defined]
    page.add_init_script(CSP_WATCH)
    page.goto(dashboard)
    page.get_by_role("textbox", name="User name").wait_for(timeout=30_000)
    settle(page)
    shot(page, "login")

    log_in(page, dashboard, "operator")
    page.get_by_text("Holds waiting").wait_for()
    page.locator('[data-testid="stImage"]').nth(7).wait_for(timeout=30_000)
    settle(page)
    shot(page, "live", height=1100)

    go(page, "Review")
    page.get_by_role("button", name="Confirm prediction").wait_for()
    part_id = page.locator("span.big-label").first.inner_text().strip()
    with line.api("operator") as api:
        (part,) = api.get("/results", params={"part_id": part_id}).json()["results"]
    assert part["review"] == "hold", "held parts come first"
    shot(page, "review", height=1300)
    page.locator("body").press("Enter")  # one key confirms the model's answer
    page.get_by_text("Part confirmed").wait_for(timeout=30_000)
    settle(page)

    with line.api("operator") as api:
        labels = api.get("/labels", params={"result_id": part["result_id"]}).json()["labels"]
        training_set = api.get("/labels", params={"verified": True}).json()["labels"]
        refused_retrain = api.post("/retrain", json={})
        refused_promote = api.post("/models/brightness-v2/promote", json={"force": False})
    predicted = {p["head"]: p["label"] for p in part["predictions"]}
    assert {label["head"]: label["label"] for label in labels} == predicted
    assert all(label["labelled_by"] == "olga" and label["labelled_at"] for label in labels)
    assert {label["label_id"] for label in labels} <= {label["label_id"] for label in training_set}, \
        "a verified label is what the next retraining reads"
    assert refused_retrain.status_code == 403
    assert refused_promote.status_code == 403

    go(page, "Root cause")
    page.locator(".vega-embed").nth(5).wait_for(timeout=30_000)
    settle(page)
    shot(page, "root_cause", height=2100)

    go(page, "Models")
    page.locator("summary", has_text="brightness-v2").click()
    assert page.get_by_role("button", name="Start retraining").is_disabled()
    assert page.get_by_role("button", name="Promote", exact=True).first.is_disabled()
    assert page.get_by_role("button", name="Roll back").is_disabled()
    assert page.get_by_role("link", name="Audit").count() == 0, "operators have no Audit page"
    assert_no_csp_violations(page)
    log_out(page)

    log_in(page, dashboard, "engineer")
    go(page, "Models")
    page.locator("summary", has_text="brightness-v2").click()
    assert page.get_by_role("button", name="Promote", exact=True).first.is_enabled()
    page.get_by_role("button", name="Run gate").first.click()  # brightness-v2's, the newest first
    page.get_by_text("Done: gate brightness-v2.").wait_for(timeout=30_000)
    settle(page)
    verdict = page.get_by_text("Validation gate passed against brightness-v1")
    if not verdict.is_visible():  # the page re-ran: open the card again
        page.locator("summary", has_text="brightness-v2").click()
    verdict.wait_for(timeout=30_000)
    settle(page)
    shot(page, "models", height=1400)
    go(page, "Audit")
    page.locator('[data-testid="stDataFrame"]').wait_for()
    with line.api("engineer") as api:
        entries = api.get("/audit").json()["entries"]
    assert any(e["action"] == "label" and e["user"] == "olga" and e["target"] == part["result_id"]
               for e in entries), "the label is in the audit log the page shows"
    shot(page, "audit")
    assert_no_csp_violations(page)
    log_out(page)

    log_in(page, dashboard, "admin")
    go(page, "Users")
    shot(page, "users")
    assert_no_csp_violations(page)
    page.close()
