"""A real daemon on a triggered replay line, running in a background thread with its own event loop,
so dashboard tests (AppTest in this thread, or a browser) talk to it over real HTTP.

Each part is triggered with a batch and PLC process values, so every analytics view has data:
the brightness test model holds mid-grey parts (64, 128, 192) for review and judges the others
confidently (32 pass, 96 rework, 160 and 224 reject).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from PIL import Image

from appliance.config import load_config
from appliance.daemon import Daemon
from appliance.registry import ModelRegistry
from tests.brightness_model import make_brightness_model
from tests.conftest import DISPOSITION, write_holdout, write_yaml

T = TypeVar("T")

# brightness of each part, in trigger order: 8 held parts, 24 confident ones
BRIGHTNESS = [32, 64, 96, 32, 160, 32, 224, 128, 32, 32, 96, 192, 32, 160, 32, 32,
              64, 32, 224, 32, 96, 32, 128, 32, 32, 160, 192, 32, 32, 96, 64, 32]
HELD = sum(1 for b in BRIGHTNESS if b in (64, 128, 192))
PASSWORDS = {"operator": "olga-password-1", "engineer": "erik-password-1", "admin": "anna-password-1"}
USERS = {"operator": "olga", "engineer": "erik", "admin": "anna"}


def process_values(i: int, brightness: int) -> dict[str, float]:
    """Oven temperature runs hot on defective parts: a correlation the dashboard should find."""
    defective = brightness in (96, 160, 224)
    return {"oven_temp_c": 180.0 + (8.0 if defective else 0.0) + (i % 3), "line_speed_m_min": 12.0 + (i % 2)}


class Line:
    """Start with :meth:`start`; ``url`` is the daemon's base URL (without /api/v1)."""

    def __init__(self, root: Path, two_person: bool = False, loop: bool = False) -> None:
        self.root = root
        images = root / "images"
        images.mkdir(parents=True, exist_ok=True)
        for i, value in enumerate(BRIGHTNESS):
            Image.fromarray(np.full((48, 64), value, np.uint8)).save(images / f"part{i:03d}.png")
        state = root / "state"
        registry = ModelRegistry(state / "models")
        for version in ("brightness-v1", "brightness-v2"):
            make_brightness_model(root / version, version=version)
            registry.register(root / version)
        registry.set_champion("brightness-v1")
        config = {
            "state_dir": str(state),
            "line": {"line_id": "line-1", "asset_id": "station-7", "batch": "B-001"},
            "camera": {"view": "top", "source": "replay",
                       "replay": {"path": str(images), "triggered": True, "loop": loop}},
            "model": {"warmup_runs": 1},
            "disposition": DISPOSITION,
            "store": {"retention": {"pass": 1.0, "min_free_mb": 0}},
            "api": {"host": "127.0.0.1", "port": 0},
            "review": {"two_person": two_person},
            "registry": {"holdout": str(write_holdout(root / "holdout"))},
        }
        self.config = load_config(write_yaml(root / "line.yaml", config))
        self.daemon = Daemon(self.config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-line", daemon=True)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Line:
        self._thread.start()
        self.run(self.daemon.start())
        for role, name in USERS.items():
            self.daemon.users.set(name, role, PASSWORDS[role])
        for i, value in enumerate(BRIGHTNESS):
            self.run(self._trigger(i, value))
        self.daemon.store.flush()
        return self

    async def _trigger(self, i: int, value: int) -> None:
        result = await self.daemon.trigger(part_id=f"P-{i:04d}", batch=f"B-{1 + i // 16:03d}",
                                           process_values=process_values(i, value))
        await asyncio.wait_for(result, 30)

    def feed(self, rate_hz: float) -> None:
        """Keep the line busy: trigger a part every 1/rate_hz seconds until stop (needs loop=True)."""
        async def feeder() -> None:
            i = len(BRIGHTNESS)
            while self.daemon.running:
                value = BRIGHTNESS[i % len(BRIGHTNESS)]
                await self._trigger(i, value)
                i += 1
                await asyncio.sleep(1 / rate_hz)

        self._feeder = asyncio.run_coroutine_threadsafe(feeder(), self.loop)

    def stop(self) -> None:
        feeder = getattr(self, "_feeder", None)
        if feeder is not None:
            feeder.cancel()
        try:
            self.run(self.daemon.stop())
            self.run(_cancel_the_rest())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def rewrite(self, result_id: str, **columns: str | None) -> dict[str, Any]:
        """Overwrite text columns of a stored result straight in the daemon's DuckDB, past every check
        at the wire, as data stored before those checks (or imported) would be; returns the old values."""
        names = ", ".join(columns)
        sets = ", ".join(f"{name} = ${name}" for name in columns)
        with self.daemon.store.cursor() as cur:
            row = cur.execute(f"SELECT {names} FROM results WHERE result_id = $rid", {"rid": result_id}).fetchone()
            if row is None:
                raise KeyError(f"no stored result {result_id}")
            cur.execute(f"UPDATE results SET {sets} WHERE result_id = $rid", {**columns, "rid": result_id})
        return dict(zip(columns, row, strict=True))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.api_port}"

    def token(self, role: str) -> str:
        token, _ = self.daemon.tokens.issue(self.daemon.users.identity(USERS[role]))
        return token

    def api(self, role: str) -> httpx.Client:
        return httpx.Client(base_url=self.url + "/api/v1", headers={"Authorization": f"Bearer {self.token(role)}"},
                            timeout=30)


async def _cancel_the_rest() -> None:
    """Tasks the daemon leaves behind (e.g. a feeder's pending trigger) end before the loop closes."""
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
