"""The README's dashboard screenshots, taken from the real demo: ELPV solar cells judged by the demo
model, as a supervisor sees them.

Start the demo (``scripts/demo.sh``), let it run a minute so every chart has data, then from a
second terminal:

    .venv/bin/python -m tests.e2e.readme_screenshots          # writes docs/screenshots/*.png

It logs in with the demo's own logins (``var/demo-credentials.json``): the operator shows Live,
Review and Root cause and labels the top held cell with its true ELPV grade (one real label, so
the Audit page has an entry); the engineer shows Models and Audit; the admin shows Users.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from tests.e2e.browser import VIEWPORT, go, launch, log_in, log_out, screenshot, settle

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "screenshots"
HEIGHTS = {"live": 1100, "review": 1250, "root_cause": 2100, "models": 2100}


def true_labels(dataset: Path) -> dict[str, dict[str, str]]:
    """ELPV's labels by part id (the demo names each part after its image file)."""
    with (dataset / "labels.csv").open(newline="") as f:
        return {Path(row["image"]).stem: row for row in csv.DictReader(f)}


def label_top_part(page: Any, truth: dict[str, dict[str, str]]) -> None:
    """Pick the true class of every head of the part on screen, then save (as a supervisor does)."""
    part_id = page.locator("span.big-label").first.inner_text().strip()
    row = truth.get(part_id)
    if row is None:
        raise SystemExit(f"{part_id} is not an ELPV cell: is this the demo line?")
    for head in ("defect_grade", "cell_type"):
        control = page.get_by_role("radiogroup", name=f"What is the {head}?")
        control.get_by_role("radio", name=row[head], exact=True).click()
        settle(page)
    page.get_by_role("button", name=re.compile(r"^(Confirm prediction|Save correction)")).click()
    page.get_by_text(re.compile(r"^Part (confirmed|corrected):")).wait_for(timeout=30_000)
    settle(page)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8501", help="the demo's dashboard")
    ap.add_argument("--state-dir", type=Path, default=ROOT / "var", help="the demo's state directory")
    ap.add_argument("--out", type=Path, default=SHOTS)
    args = ap.parse_args()
    logins = json.loads((args.state_dir / "demo-credentials.json").read_text())["dashboard"]
    truth = true_labels(args.state_dir / "datasets" / "elpv")

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(args.url)
        page.get_by_role("textbox", name="User name").wait_for(timeout=30_000)
        settle(page)
        screenshot(page, args.out / "login.png")

        log_in(page, args.url, "operator", logins["operator"])
        page.locator('[data-testid="stImage"]').first.wait_for(timeout=30_000)
        settle(page)
        screenshot(page, args.out / "live.png", HEIGHTS["live"])
        go(page, "Review")
        screenshot(page, args.out / "review.png", HEIGHTS["review"])
        label_top_part(page, truth)
        go(page, "Root cause")
        page.locator(".vega-embed").nth(5).wait_for(timeout=30_000)
        settle(page)
        screenshot(page, args.out / "root_cause.png", HEIGHTS["root_cause"])
        log_out(page)

        log_in(page, args.url, "engineer", logins["engineer"])
        go(page, "Models")
        screenshot(page, args.out / "models.png", HEIGHTS["models"])
        go(page, "Audit")
        screenshot(page, args.out / "audit.png")
        log_out(page)

        log_in(page, args.url, "admin", logins["admin"])
        go(page, "Users")
        screenshot(page, args.out / "users.png")
        browser.close()
    print(f"wrote {len(list(args.out.glob('*.png')))} screenshots to {args.out}")


if __name__ == "__main__":
    main()
