"""Fixtures for the dashboard tests: a running replay line (real daemon, real HTTP API)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dashboard.line import Line


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    running = Line(tmp_path_factory.mktemp("line")).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def api_url(line: Line, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the dashboard (run in this process by AppTest) at the test line."""
    monkeypatch.setenv("APPLIANCE_API_URL", line.url)
    return line.url


@pytest.fixture(scope="module")
def two_person_line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    running = Line(tmp_path_factory.mktemp("line2"), two_person=True).start()
    try:
        yield running
    finally:
        running.stop()
