"""What every browser test needs: the dashboard served against the module's ``line``, and Chromium."""

from collections.abc import Iterator
from typing import Any

import pytest

from tests.dashboard.line import Line
from tests.e2e.browser import launch, serve_dashboard


@pytest.fixture(scope="module")
def dashboard(line: Line, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_dashboard(line.url, tmp_path_factory.mktemp("streamlit") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    with playwright_api.sync_playwright() as p:
        chromium = launch(p)
        try:
            yield chromium
        finally:
            chromium.close()
