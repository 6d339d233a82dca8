"""Running it like plant equipment: systemd notifications and watchdog, camera stall, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from appliance.camera.base import Frame, FrameSource
from appliance.daemon import Daemon
from tests.conftest import write_grade_images


class FlakyCamera(FrameSource):
    """Delivers ``burst`` frames per opening, then goes silent (a camera pulled off the network)."""

    def __init__(self, burst: int) -> None:
        self.camera_view = "top"
        self.burst = burst
        self.opened = 0
        self._open = False

    async def open(self) -> None:
        self.opened += 1
        self._open = True

    async def close(self) -> None:
        self._open = False

    @property
    def online(self) -> bool:
        return self._open

    async def frames(self) -> AsyncIterator[Frame]:
        for i in range(self.burst):
            await asyncio.sleep(0.01)
            yield Frame(image=np.full((32, 32), 32, np.uint8), camera_view="top", source_ref=f"flaky#{i}")
        while self._open:  # silent, but still "connected"
            await asyncio.sleep(0.05)


async def test_stalled_camera_is_reported_and_reconnected(tmp_path: Path, line_config) -> None:
    cfg = line_config(tmp_path, camera={"view": "top", "source": "replay", "stall_timeout_s": 1.0,
                                        "replay": {"path": str(tmp_path)}})
    camera = FlakyCamera(burst=5)
    daemon = Daemon(cfg, source=camera)
    await daemon.start()
    try:
        await daemon.wait_for_results(5, timeout=10)
        states = []
        started = time.monotonic()
        while camera.opened < 2 and time.monotonic() - started < 10:
            states.append(daemon.state)
            await asyncio.sleep(0.1)
        detected_after = time.monotonic() - started
        await daemon.wait_for_results(10, timeout=10)
    finally:
        await daemon.stop()
    assert "error" in states, "a stalled camera puts the vision system in Error"
    assert camera.opened == 2 and detected_after < 10, "reconnected within the 10 s goal"
    assert daemon.stats.judged >= 10, "frames flow again after the reconnect"


async def test_systemd_ready_and_watchdog(tmp_path: Path, line_config,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    images = tmp_path / "img"
    write_grade_images(images, ["0", "1"] * 5)
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: ping every 0.5 s
    daemon = Daemon(line_config(images, camera={"view": "top", "source": "replay", "replay": {
        "path": str(images), "rate_hz": 50, "loop": True}}))
    await daemon.start()
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                await asyncio.sleep(0.05)
    finally:
        await daemon.stop()
        with contextlib.suppress(TimeoutError):
            while True:  # everything sent up to and including STOPPING=1
                messages.append(listener.recv(4096).decode())
        listener.close()
    assert messages[0].startswith("READY=1")
    assert sum("WATCHDOG=1" in m for m in messages) >= 3
    assert any("STOPPING=1" in m for m in messages)


async def test_metrics_endpoint(tmp_path: Path, line_config) -> None:
    images = tmp_path / "img"
    write_grade_images(images, ["0", "1", "1/3"])
    (images / "broken.png").write_bytes(b"nope")
    daemon = Daemon(line_config(images))
    await daemon.start()
    try:
        await daemon.wait_for_results(4, timeout=10)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}") as api:
            text = (await api.get("/api/v1/metrics")).text
    finally:
        await daemon.stop()
    assert "appliance_frames_total 4.0" in text
    assert 'appliance_results_total{disposition="reject",status="ok"} 1.0' in text
    assert 'appliance_results_total{disposition="hold",status="failed"} 1.0' in text
    assert 'appliance_stage_latency_ms_count{stage="inference"} 4.0' in text
    assert 'appliance_state{state="operational"} 1.0' in text
    assert "appliance_model_info{" in text and "appliance_camera_online 1.0" in text


async def test_quality_alarm_follows_the_control_chart(tmp_path: Path, line_config) -> None:
    images = tmp_path / "img"
    write_grade_images(images, ["1"] * 30)  # every part a reject
    daemon = Daemon(line_config(images))
    await daemon.start()
    try:
        await daemon.wait_for_results(30, timeout=20)
        daemon.store.flush()
        await daemon._check_quality()  # the real control chart on 30 stored rejects: no limits left
        computed = dict(daemon.health()["quality_alarm"])
        assert daemon.analytics is not None
        daemon.analytics.control = lambda *a, **k: {"alarm": {"active": True, "reason": "p above UCL"}}  # type: ignore[method-assign]
        await daemon._check_quality()
        raised = dict(daemon.health()["quality_alarm"])
        metrics = daemon.metrics.render().decode()
    finally:
        await daemon.stop()
    assert computed["active"] is False  # one subgroup at p = 1 has zero width: nothing to judge
    assert raised == {"active": True, "reason": "p above UCL"}
    assert "appliance_quality_alarm 1.0" in metrics
