"""Chart times read as the plant's wall clock, on a 24-hour axis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from dashboard import charts


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def points(spec: dict) -> list[dict]:
    (data,) = spec["datasets"].values()
    return data


def test_times_are_the_appliances_local_time_not_utc(berlin: None) -> None:
    spec = charts.throughput([{"t": "2026-11-24T14:00:00Z", "parts": 3},
                              {"t": "2026-07-01T22:30:00Z", "parts": 4}]).to_dict()
    assert [p["t"] for p in points(spec)] == ["2026-11-24T15:00:00", "2026-07-02T00:30:00"], \
        "CET in winter, CEST in summer, written without a zone so the browser draws it as it is"


def test_time_axes_use_a_24_hour_clock() -> None:
    row = {"t": "2026-11-24T14:00:00Z", "p": 0.1, "n": 50, "defects": 5, "ucl": 0.2, "lcl": 0.0, "out": False}
    specs = [charts.throughput([{"t": row["t"], "parts": 3}]).to_dict(),
             charts.control([row], 0.1).to_dict()["layer"][1],
             charts.trend([{"t": row["t"], "rate": 0.1, "group": "a", "n": 50, "defects": 5}], "asset").to_dict()]
    for spec in specs:
        assert spec["encoding"]["x"]["axis"]["format"]["hours"] == "%H:%M"
