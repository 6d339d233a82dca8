"""The Review page under the two-person rule: a label waits until someone else verifies it."""

from __future__ import annotations

import pytest

from tests.dashboard.line import Line
from tests.dashboard.test_pages import app, open_page, texts


@pytest.fixture
def line(two_person_line: Line) -> Line:
    return two_person_line


def test_second_person_verifies_from_the_review_page(line: Line, api_url: str) -> None:
    olga = open_page(app(line, "operator"), "review")
    olga.button(key="review_save").click().run()
    assert "waits for a second person to verify it" in texts(olga)
    with line.api("operator") as api:
        pending = api.get("/labels", params={"verified": False}).json()["labels"]
    assert pending and {p["labelled_by"] for p in pending} == {"olga"}
    assert not [b for b in olga.button if (b.key or "").startswith("verify_")], "nobody verifies their own label"
    assert "of your own labels wait for someone else" in texts(olga)

    erik = open_page(app(line, "engineer"), "review")
    buttons = [b for b in erik.button if (b.key or "").startswith("verify_")]
    assert len(buttons) == len(pending)
    for _ in pending:
        next(b for b in erik.button if (b.key or "").startswith("verify_")).click().run()
    with line.api("operator") as api:
        verified = api.get("/labels", params={"verified": True}).json()["labels"]
    assert {(v["labelled_by"], v["verified_by"]) for v in verified} == {("olga", "erik")}
