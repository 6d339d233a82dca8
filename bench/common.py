"""What the benchmarks share: the line they run on, the model they serve, percentiles, the JSON out."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from appliance.config import AppConfig, load_config
from appliance.registry import ModelRegistry

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def line_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    parser.add_argument("--model", type=Path, help="model package (default: the registry champion)")


def line_and_model(args: argparse.Namespace) -> tuple[AppConfig, Path, Path]:
    """The configured line, the model to serve, and the replay folder (absolute)."""
    cfg = load_config(args.config)
    model = args.model or ModelRegistry(cfg.models_dir).champion_path()
    if model is None:
        raise SystemExit("no model: run `appliance demo` once (it trains one) or pass --model")
    if cfg.camera.replay is None:
        raise SystemExit(f"{args.config}: the benchmarks need a replay camera")
    return cfg, model.resolve(), cfg.resolve(cfg.camera.replay.path).resolve()


def bench_line(base: AppConfig, model: Path | None, replay: Path, state_dir: Path,
               rate: float | None = None) -> AppConfig:
    """The configured line as the benchmarks run it in-process: ``model`` served (None: the
    registry's champion), API on a free port, PLC servers off, replaying ``replay`` (looping, at
    ``rate`` if given), state in ``state_dir``."""
    assert base.camera.replay is not None
    replay_update: dict[str, Any] = {"path": replay} | ({"rate_hz": rate, "loop": True} if rate else {})
    return base.model_copy(update={
        "state_dir": state_dir, "model": base.model.model_copy(update={"path": model}),
        "api": base.api.model_copy(update={"port": 0}),
        "opcua": base.opcua.model_copy(update={"enabled": False}),
        "modbus": base.modbus.model_copy(update={"enabled": False}),
        "camera": base.camera.model_copy(update={"replay": base.camera.replay.model_copy(update=replay_update)}),
    })


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    arr = np.asarray(values, float)
    return {"n": len(values), "p50": round(float(np.percentile(arr, 50)), 3),
            "p99": round(float(np.percentile(arr, 99)), 3), "max": round(float(arr.max()), 3)}


def cpu_model() -> str:
    """The CPU's name (/proc/cpuinfo): the sessions' machines differ, and so do their timings."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "cpu": cpu_model(),
            "python": platform.python_version(), "load_average_1m": round(os.getloadavg()[0], 2)}


def write_result(name: str, report: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_dashboard(api_url: str, log_path: Path) -> Iterator[str]:
    """``streamlit run dashboard/serve.py`` (the pages with their security headers) against ``api_url``
    on a free port; yields its URL once it answers, stops it after."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "serve.py"), "--server.headless",
             "true", "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats",
             "false"], env={**os.environ, "APPLIANCE_API_URL": api_url}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
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
                    raise RuntimeError(f"streamlit did not start; see {log_path}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
