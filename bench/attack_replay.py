"""The security review's attacks (issue F), replayed against one running appliance: what each got.

One real daemon (in this process) replays the line at ``--rate`` parts/s with the real model, its
HTTP API (admin, engineer and operator users), OPC UA (one trusted PLC certificate; no users
configured, so the generated operator login, read from its credentials file as an admin would) and
Modbus TCP (``allowed_clients: [127.0.0.1]``).  Login settings are the defaults except
``backoff_base_s: 0``, so 20 quick guesses reach the lock instead of waiting out the backoff.  The
dashboard is started (``dashboard/serve.py``) for its response headers.  The daemon's log is
rendered as ``appliance run`` renders it (level info) into memory and searched.

Then each attack is made as an attacker would (a stranger is 127.0.0.2; all of 127/8 is this host
on Linux), and for each the answer expected, the answer observed (status code, Modbus exception,
HTTP status, bytes), what the line shows after (part id taken or not, state), the audit rows written
while it ran, and the counters that rose.  PASS when the answer is the expected one, the line shows
what it should, the expected audit rows were written and the expected counters rose.
Writes bench/results/attack_replay.json; exits 1 if any attack FAILs.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from appliance.daemon import Daemon
from appliance.logs import setup_logging
from appliance.plc.opcua_security import GENERATED_USER
from bench.attacker import HOST, make_identity
from bench.attacks import ATTACKS, PASSWORDS, STRANGER, USERS, Replay
from bench.common import (
    bench_line,
    free_port,
    line_and_model,
    line_arguments,
    machine,
    serve_dashboard,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def daemon_log() -> Iterator[io.StringIO]:
    """The daemon's log as ``appliance run`` renders it at level info, written into memory."""
    setup_logging("info", "console")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        handler.setStream(sys.stderr)


async def replay(args: argparse.Namespace) -> dict[str, Any]:
    base, model, images = line_and_model(args)
    load_at_start = round(os.getloadavg()[0], 2)
    started = time.monotonic()
    for name in ("APPLIANCE_OPCUA_USER", "APPLIANCE_OPCUA_PASSWORD"):  # no users: the generated login
        os.environ.pop(name, None)
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp, daemon_log() as log:
        state, clients = Path(tmp) / "state", Path(tmp) / "clients"
        ua_port, mb_port = free_port(), free_port()
        cfg = bench_line(base, model, images, state, args.rate)
        cfg = cfg.model_copy(update={
            "opcua": cfg.opcua.model_copy(update={"enabled": True, "host": HOST, "port": ua_port, "users": [],
                                                  "insecure_commissioning": False}),
            "modbus": cfg.modbus.model_copy(update={"enabled": True, "host": HOST, "port": mb_port,
                                                    "allowed_clients": [ip_network(HOST)], "allow_control": True}),
            "login": cfg.login.model_copy(update={"backoff_base_s": 0})})
        plc = make_identity(clients, "plc")
        (state / "pki" / "trusted").mkdir(parents=True)
        shutil.copy(plc.cert, state / "pki" / "trusted" / plc.cert.name)
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            for role, user in USERS.items():
                await asyncio.to_thread(daemon.users.set, user, role, PASSWORDS[role])
            api_url = f"http://{HOST}:{daemon.api_port}"
            with serve_dashboard(api_url, Path(tmp) / "streamlit.log") as dashboard_url:
                r = Replay(daemon, ua_port, mb_port, plc, clients, log, dashboard_url)
                for run in ATTACKS:
                    await run(r)
        finally:
            await daemon.stop()
        log_lines = len(log.getvalue().splitlines())
    passed = sum(o.verdict == "PASS" for o in r.outcomes)
    return {"benchmark": "attack_replay", "machine": machine(), "load_average_1m_at_start": load_at_start,
            "model": str(model), "rate_hz": args.rate, "seconds": round(time.monotonic() - started, 1),
            "login_config": cfg.login.model_dump(), "login_changed_from_defaults": {"backoff_base_s": 0},
            "modbus_allowed_clients": [HOST], "stranger": STRANGER,
            "opcua_user": GENERATED_USER, "daemon_log_lines": log_lines,
            "passed": passed, "failed": len(r.outcomes) - passed, "attacks": [asdict(o) for o in r.outcomes]}


def table(outcomes: Sequence[dict[str, Any]], markdown: bool = True) -> list[str]:
    """The attacks as a Markdown table (what bench/run_all.py renders; the payloads' tags as character
    references, so they show as text), or as plain text for the terminal."""
    def cell(text: Any) -> str:
        text = str(text).replace("\n", "\\n")
        return html.escape(text, quote=False).replace("|", "\\|") if markdown else text

    def audit(rows: Sequence[str]) -> str:
        return ", ".join(f"{a} ×{n}" if n > 1 else a for a, n in Counter(rows).items()) or "none"

    def counted(rose: dict[str, float]) -> str:
        return ", ".join(f"{name} +{value:g}" for name, value in rose.items()) or "–"

    return ["| # | attack | expected | observed | the line after | audit rows written | counters | verdict |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {o['finding']} | {cell(o['attack'])} | {cell(o['expected'])} | {cell(o['observed'])} | "
              f"{cell(o['line'])} | {cell(audit(o['audit']))} | {cell(counted(o['counted']))} | {o['verdict']} |"
              for o in outcomes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    line_arguments(parser)
    parser.add_argument("--rate", type=float, default=5.0, help="parts/s on the line while it is attacked")
    args = parser.parse_args()
    report = asyncio.run(replay(args))
    write_result("attack_replay", report)
    print("\n".join(table(report["attacks"], markdown=False)))
    print(f"{report['passed']} PASS, {report['failed']} FAIL in {report['seconds']} s "
          f"(machine load {report['load_average_1m_at_start']} → {report['machine']['load_average_1m']})")
    sys.exit(1 if report["failed"] else 0)


if __name__ == "__main__":
    main()
