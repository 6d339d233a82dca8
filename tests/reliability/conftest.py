"""Shared machinery of the reliability suite: sizes, figures, a daemon in a child process, a PLC poller.

``RELIABILITY_SCALE=ci`` (the default) runs bounded sizes that fit the normal test command;
``RELIABILITY_SCALE=full`` runs the sizes of issue E (≥ 50 kills, 20 camera pulls, 10^5 Modbus
frames, a 30 min soak).  Every test records its figures with :func:`record`; they are printed and
merged into ``tests/artifacts/reliability.json`` (git-ignored; under "ci" or "full") at the end of
the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import write_yaml

SCALE = os.environ.get("RELIABILITY_SCALE", "ci").strip().lower()
if SCALE not in ("ci", "full"):
    raise pytest.UsageError(f"RELIABILITY_SCALE must be 'ci' or 'full', not {SCALE!r}")
ARTIFACT = Path(__file__).resolve().parents[1] / "artifacts" / "reliability.json"
REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"

_FIGURES: dict[str, dict[str, Any]] = {}


def sized(ci: Any, full: Any) -> Any:
    """The CI size or the full size of one knob, by RELIABILITY_SCALE."""
    return full if SCALE == "full" else ci


def record(test: str, **figures: Any) -> dict[str, Any]:
    """Keep a test's figures for the artifact and print them (visible with ``-s`` or on failure)."""
    entry = {"scale": SCALE, "at": datetime.now(UTC).isoformat(timespec="seconds"), **figures}
    _FIGURES[test] = entry
    print(f"\n[reliability] {test}: {json.dumps(entry, default=str)}")
    return entry


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _FIGURES:
        return
    try:
        merged = json.loads(ARTIFACT.read_text()) if ARTIFACT.is_file() else {}
    except (OSError, ValueError):
        merged = {}
    merged.setdefault(SCALE, {}).update(_FIGURES)  # "ci" and "full" figures live side by side
    merged["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "python": platform.python_version(), "load_avg_at_end": os.getloadavg()}
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(merged, indent=2, default=str) + "\n")


# -- /proc readings ------------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


# -- a daemon in a child process ----------------------------------------------------------------------

def config_file(path: Path, cfg: Any) -> Path:
    """Write a loaded AppConfig back out as YAML for ``python -m appliance run --config``."""
    return write_yaml(path, cfg.model_dump(mode="json", by_alias=True))


class DaemonProcess:
    """``python -m appliance run`` as a child process, its log in a file, its API on a known port.

    ``prelude`` is Python run before the CLI in the child (a test knob such as a smaller journal
    segment); without it the child is exactly the product's command line.
    """

    def __init__(self, config: Path, api_port: int, log_dir: Path, env: dict[str, str] | None = None,
                 prelude: str | None = None) -> None:
        self.config, self.api_port, self.log_dir = config, api_port, log_dir
        self.env = {**os.environ, **(env or {})}
        self.prelude = prelude
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.starts = 0
        self.spawned_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        self.log_path = self.log_dir / f"daemon-{self.starts:03d}.log"
        if self.prelude is None:
            argv = [sys.executable, "-m", "appliance", "run", "--config", str(self.config)]
        else:
            code = f"{self.prelude}\nimport sys\nfrom appliance.cli import main\nsys.argv = ['appliance', " \
                   f"'run', '--config', {str(self.config)!r}]\nmain()\n"
            argv = [sys.executable, "-c", code]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self.spawned_at = time.monotonic()
        return self.proc

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        return httpx.get(f"http://{HOST}:{self.api_port}/api/v1/health", timeout=timeout).json()

    def metrics(self, timeout: float = 5.0) -> str:
        return httpx.get(f"http://{HOST}:{self.api_port}/api/v1/metrics", timeout=timeout).text

    def wait_running(self, timeout: float = 60.0) -> float:
        """Seconds from spawn until GET /health says status "running"."""
        assert self.proc is not None
        deadline = self.spawned_at + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                if self.health(timeout=2.0).get("status") == "running":
                    return time.monotonic() - self.spawned_at
            time.sleep(0.05)
        raise AssertionError(f"not running {timeout:.0f} s after spawn:\n{self.output()[-4000:]}")

    def wait_judged(self, at_least: int, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                health = self.health()
                if health["judged"] >= at_least:
                    return health
            time.sleep(0.1)
        raise AssertionError(f"fewer than {at_least} parts judged in {timeout:.0f} s: {health}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"SIGTERM did not stop the daemon in {timeout:.0f} s") from None

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon_process() -> Iterator[list[DaemonProcess]]:
    """Register DaemonProcess objects here; whatever still runs at the end of the test is killed."""
    made: list[DaemonProcess] = []
    yield made
    for d in made:
        d.cleanup()


# -- Modbus TCP from the PLC's side --------------------------------------------------------------------

MBAP = struct.Struct(">HHHB")


def mbap(tid: int, pdu: bytes, unit: int = 1, pid: int = 0, length: int | None = None) -> bytes:
    return MBAP.pack(tid, pid, len(pdu) + 1 if length is None else length, unit) + pdu


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return bytes(data)


def read_holding(sock: socket.socket, address: int, count: int, tid: int = 1) -> list[int]:
    """One FC 3 request; raises on an exception answer or a transaction id mix-up."""
    sock.sendall(mbap(tid, struct.pack(">BHH", 3, address, count)))
    head = recv_exactly(sock, 7)
    r_tid, _, length, _ = MBAP.unpack(head)
    body = recv_exactly(sock, length - 1)
    if r_tid != tid or body[0] != 3:
        raise AssertionError(f"unexpected answer tid {r_tid} (sent {tid}), body {body.hex()}")
    return list(struct.unpack(f">{count}H", body[2:2 + 2 * count]))


def result_block(regs: list[int]) -> tuple[int, str]:
    """(result_sequence, result_part_id) from holding registers 10..35 (shipped map, word order big)."""
    seq = regs[0] << 16 | regs[1]
    part = struct.pack(">16H", *regs[10:26]).split(b"\0")[0].decode("ascii", "replace")
    return seq, part


class ModbusPoller(threading.Thread):
    """A PLC polling the result block every ``period_s``; keeps every (sequence, part id) it saw.

    It reconnects by itself (the daemon comes and goes in the kill test).
    """

    def __init__(self, port: int, period_s: float = 0.005) -> None:
        super().__init__(name="plc-poller", daemon=True)
        self.port, self.period_s = port, period_s
        self.seen: dict[int, str] = {}
        self.polls = self.errors = 0
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        sock: socket.socket | None = None
        tid = 0
        while not self._stop_event.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection((HOST, self.port), timeout=2.0)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tid = (tid + 1) & 0xFFFF
                seq, part = result_block(read_holding(sock, 10, 26, tid))
                self.polls += 1
                if seq:
                    with self._lock:
                        self.seen.setdefault(seq, part)
            except (OSError, ConnectionError):
                self.errors += 1
                if sock is not None:
                    sock.close()
                    sock = None
                self._stop_event.wait(0.05)
                continue
            self._stop_event.wait(self.period_s)
        if sock is not None:
            sock.close()

    def take(self) -> dict[int, str]:
        """What was seen since the last take."""
        with self._lock:
            seen, self.seen = self.seen, {}
        return seen

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
