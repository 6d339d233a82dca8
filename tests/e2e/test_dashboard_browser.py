"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a fresh daemon on a
replay line and a fresh ``streamlit run dashboard/app.py``.

An operator logs in, confirms a held part with one key (Enter), and the label is then in the store
and in the next retraining set (a verified label); the same operator finds retrain and promote
disabled and the API answers 403.  Screenshots of every page go to tests/artifacts/dashboard/ and
are copied to docs/screenshots/ for the README when UPDATE_SCREENSHOTS=1.  Never downloads a
browser: Chromium comes from Debian (scripts/system-deps.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.dashboard.line import PASSWORDS, USERS, Line

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "tests" / "artifacts" / "dashboard"
SCREENSHOTS = ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1500, "height": 950}

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


@pytest.fixture(scope="module")
def dashboard(line: Line, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("streamlit") / "streamlit.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        env={**os.environ, "APPLIANCE_API_URL": line.url}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=2).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start; see {log.name}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def shot(page: object, name: str, height: int | None = None) -> None:
    """Screenshot into the artefact folder; the README's copies live in docs/screenshots/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if height:
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})  # type: ignore[attr-defined]
        page.wait_for_timeout(800)  # type: ignore[attr-defined]
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))  # type: ignore[attr-defined]
    if height:
        page.set_viewport_size(VIEWPORT)  # type: ignore[attr-defined]
    if os.environ.get("UPDATE_SCREENSHOTS"):  # refresh the README's copies on request only
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / f"{name}.png")


def settle(page: object) -> None:
    """Wait until Streamlit has finished running the script (the 'Running…' widget is gone)."""
    page.wait_for_load_state("networkidle")  # type: ignore[attr-defined]
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=30_000)  # type: ignore[attr-defined]
    page.wait_for_timeout(700)  # type: ignore[attr-defined]
    # a fragment that is refreshing greys out its old elements: wait for the fresh ones
    page.wait_for_function("document.querySelectorAll('[data-stale=\"true\"]').length === 0",  # type: ignore[attr-defined]
                           timeout=30_000)


def log_in(page: object, url: str, role: str) -> None:
    page.goto(url)  # type: ignore[attr-defined]
    page.get_by_role("textbox", name="User name").fill(USERS[role])  # type: ignore[attr-defined]
    page.get_by_role("textbox", name="Password").fill(PASSWORDS[role])  # type: ignore[attr-defined]
    page.get_by_role("button", name="Log in").click()  # type: ignore[attr-defined]
    page.get_by_role("heading", name="Live").wait_for(timeout=30_000)  # type: ignore[attr-defined]
    settle(page)


def go(page: object, title: str) -> None:
    page.get_by_role("link", name=title).click()  # type: ignore[attr-defined]
    page.get_by_role("heading", name=title).first.wait_for(timeout=30_000)  # type: ignore[attr-defined]
    settle(page)


def test_operator_labels_a_held_part_and_cannot_retrain_or_promote(line: Line, dashboard: str,
                                                                     browser: object) -> None:
    page = browser.new_page(viewport=VIEWPORT)  # type: ignore[attr-defined]
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
    page.get_by_role("button", name="Log out").click()
    page.get_by_role("textbox", name="User name").wait_for()

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
    page.get_by_role("button", name="Log out").click()

    log_in(page, dashboard, "admin")
    go(page, "Users")
    shot(page, "users")
    page.close()
