"""Chart times read as the plant's wall clock, on a 24-hour axis; red means worse than chance."""

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


def points(spec: dict, layer: int | None = None) -> list[dict]:
    """The rows of a chart's one data set, or of one layer's."""
    if layer is not None:
        return spec["datasets"][spec["layer"][layer]["data"]["name"]]
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


def test_a_group_is_red_only_when_chance_cannot_explain_its_rate() -> None:
    groups = [{"group": "LOT-1", "n": 400, "defects": 80, "rate": 0.2},  # 20 % on 400: far above 10 %
              {"group": "LOT-2", "n": 400, "defects": 48, "rate": 0.12},  # limit 10 % + 3·1.5 % = 14.5 %
              {"group": "LOT-3", "n": 10, "defects": 2, "rate": 0.2},  # limit for 10 parts: 38 %
              {"group": "LOT-4", "n": 0, "defects": 0, "rate": None}]
    bars = points(charts.breakdown(groups, "batch", 0.1).to_dict(), layer=0)
    assert {p["group"]: p["worse"] for p in bars} == {"LOT-1": True, "LOT-2": False, "LOT-3": False,
                                                             "LOT-4": False}
    assert not any(p["worse"] for p in points(charts.breakdown(groups, "batch", None).to_dict()))
