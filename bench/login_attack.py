"""Does a password-guessing attack hurt the line?  Part latency while the API and OPC UA are
attacked, against the same line idle.

The real daemon (in this process) replays the line at ``--rate`` parts/s with the real model, its
HTTP API and OPC UA server on free ports, and the default ``login`` settings.  After ``--seconds``
of idle running, an attacker in its own process (at nice 19: an attacker's CPU is its own, not the
line's) guesses, first over the API (rounds for at least ``--seconds``), then over OPC UA:

* API, in rounds: ``--sequential`` wrong passwords for ``admin`` one after another (the user is
  locked after ``login.max_failures``; the rest are refused without a password check), then
  ``--parallel`` at once, each for another user name (no lock applies yet, so each needs a
  password check: the worst case, held off by ``login.parallel_checks`` and ``max_waiting``).
  The attacker comes from 127.0.0.1, a relay address (the dashboard's), so no address lock helps.
* OPC UA: ``--opcua`` wrong passwords for the PLC operator, each on a new SignAndEncrypt session
  with a trusted client certificate.

Goal: stored p99 during each attack ≤ 1.5 × idle.  Before the API attack, one round of the same
requests without any log-in (an empty user name, refused as invalid) shows what the HTTP traffic
alone costs the line, which shares its event loop with the API.  Also reported: how many guesses had their password
checked (argon2) and how many were refused by lockout, backoff or a full queue.
Writes bench/results/login_attack.json.  Needs a model: run `appliance demo` once, or pass --model.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import secrets
import socket
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from appliance.daemon import Daemon
from appliance.result import PartResult
from bench.common import bench_line, free_port, line_and_model, line_arguments, machine, percentiles, write_result

OPCUA_USER, OPCUA_PASSWORD = "bench-plc", "bench-plc-password-0123"
CLIENT_URI = "urn:defect-appliance:bench-attacker"



def api_attacker(url: str, seconds: float, sequential: int, parallel: int, guess_passwords: bool = True
                 ) -> dict[str, Any]:
    """Child process: rounds of sequential guesses for admin, then parallel ones for other names; or,
    without ``guess_passwords``, the same requests with an empty user name (refused as invalid, 422):
    what the same HTTP traffic costs without any log-in."""
    os.nice(19)
    statuses: Counter[str] = Counter()
    rounds = 0
    deadline = time.monotonic() + seconds

    def guess(client: httpx.Client, user: str) -> str:
        r = client.post("/auth/token", json={"username": user if guess_passwords else "",
                                             "password": secrets.token_urlsafe(12)})
        return str(r.status_code)

    limits = httpx.Limits(max_connections=parallel + 1, max_keepalive_connections=parallel + 1)
    with httpx.Client(base_url=url, timeout=30, limits=limits) as client, ThreadPoolExecutor(parallel) as pool:
        while rounds == 0 or time.monotonic() < deadline:
            statuses.update(guess(client, "admin") for _ in range(sequential))
            names = [f"guess-{rounds}-{i}" for i in range(parallel)]
            statuses.update(pool.map(lambda name: guess(client, name), names))
            rounds += 1
    return {"rounds": rounds, "attempts": sum(statuses.values()), "status": dict(statuses)}


def opcua_attacker(url: str, pki: str, server_cert: str, attempts: int) -> dict[str, Any]:
    """Child process: wrong passwords for the PLC operator, one new secure session each."""
    os.nice(19)
    logging.getLogger("asyncua").setLevel(logging.ERROR)  # a refused session is the expected answer here
    from asyncua import Client, ua
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
    from cryptography.x509.oid import ExtendedKeyUsageOID

    async def main() -> dict[str, Any]:
        cert, key = Path(pki) / "attacker.der", Path(pki) / "attacker.pem"
        await setup_self_signed_certificate(key, cert, CLIENT_URI, socket.gethostname(),
                                            [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "attacker"})
        (Path(pki) / "trusted" / "attacker.der").write_bytes(cert.read_bytes())
        outcomes: Counter[str] = Counter()
        started = time.monotonic()
        for _ in range(attempts):
            client = Client(url, timeout=10)
            client.application_uri = CLIENT_URI
            await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), server_certificate=server_cert,
                                      mode=ua.MessageSecurityMode.SignAndEncrypt)
            client.set_user(OPCUA_USER)
            client.set_password(secrets.token_urlsafe(12))
            try:
                async with client:
                    outcomes["activated"] += 1
            except ua.UaStatusCodeError as exc:
                outcomes[type(exc).__name__] += 1
        return {"attempts": attempts, "outcomes": dict(outcomes), "seconds": round(time.monotonic() - started, 2)}

    return asyncio.run(main())


def counters(daemon: Daemon) -> dict[str, Any]:
    """The guard's figures from the daemon's Prometheus registry, by channel."""
    out: dict[str, Any] = {}
    for metric in daemon.metrics.registry.collect():
        if metric.name.startswith("appliance_login"):
            for s in metric.samples:
                if s.name.endswith("_total"):
                    key = "/".join([s.name.removesuffix("_total").removeprefix("appliance_"), *s.labels.values()])
                    out[key] = int(s.value)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base, model, replay = line_and_model(args)
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine shows in every phase alike
    with tempfile.TemporaryDirectory(prefix="bench-login-") as tmp:
        cfg = bench_line(base, model, replay, Path(tmp) / "state", args.rate)
        port = free_port()
        cfg = cfg.model_copy(update={"opcua": cfg.opcua.model_copy(update={
            "enabled": True, "host": "127.0.0.1", "port": port, "users": [], "insecure_commissioning": False})})
        os.environ["APPLIANCE_OPCUA_USER"], os.environ["APPLIANCE_OPCUA_PASSWORD"] = OPCUA_USER, OPCUA_PASSWORD
        daemon = Daemon(cfg)
        phase = {"name": "warm-up"}
        stored: dict[str, list[float]] = {"idle": [], "http": [], "api": [], "opcua": []}

        async def record(result: PartResult) -> None:
            if phase["name"] in stored:
                stored[phase["name"]].append(daemon.stats.stored_ms[-1])

        daemon.publishers.append(record)
        await daemon.start()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(daemon.users.set, "admin", "admin", secrets.token_urlsafe(16))
            pki = cfg.state_dir / "pki"
            with ThreadPoolExecutor(1) as waiter, mp.get_context("spawn").Pool(1) as pool:
                await loop.run_in_executor(waiter, pool.apply, time.sleep, (0.1,))  # imports done before
                await asyncio.sleep(3)

                async def attack(name: str, fn: Any, *fn_args: Any) -> tuple[dict[str, Any], float]:
                    phase["name"] = name
                    started = time.monotonic()
                    report = await loop.run_in_executor(waiter, pool.apply, fn, fn_args)
                    phase["name"] = "between"
                    return report, round(time.monotonic() - started, 1)

                phase["name"] = "idle"
                await asyncio.sleep(args.seconds)
                url = f"http://127.0.0.1:{daemon.api_port}/api/v1"
                http_report, http_s = await attack("http", api_attacker, url, 0, args.sequential, args.parallel, False)
                api_report, api_s = await attack("api", api_attacker, url, args.seconds, args.sequential,
                                                 args.parallel)
                opc_report, opc_s = await attack("opcua", opcua_attacker, f"opc.tcp://127.0.0.1:{port}",
                                                 str(pki), str(pki / "own" / "cert.der"), args.opcua)
        finally:
            dropped = daemon.stats.dropped
            guard = counters(daemon)
            await daemon.stop()
    idle = percentiles(stored["idle"])

    def ratio(name: str) -> float | None:
        p99 = percentiles(stored[name])["p99"]
        return round(p99 / idle["p99"], 3) if idle["p99"] and p99 else None

    ratios = {"http": ratio("http"), "api": ratio("api"), "opcua": ratio("opcua")}
    checked = guard.get("login_failures/api", 0) + guard.get("logins/api", 0)
    refused = {k.split("/")[-1]: v for k, v in guard.items() if k.startswith("login_refused/api/")}
    return {"benchmark": "login_attack", "machine": machine(), "load_average_1m_at_start": load_at_start,
            "model": str(model), "rate_hz": args.rate,
            "stored_ms": {"idle": idle, "http_no_login": percentiles(stored["http"]),
                          "api_attack": percentiles(stored["api"]),
                          "opcua_attack": percentiles(stored["opcua"])},
            "p99_ratio": ratios, "dropped_frames": dropped,
            "http_no_login": {**http_report, "seconds": http_s},
            "api": {**api_report, "seconds": api_s, "password_checked": checked, "refused": refused},
            "opcua": {**opc_report, "seconds": opc_s}, "guard_counters": guard,
            "login_config": cfg.login.model_dump(),
            "goal": "p99 under each attack <= 1.5 x p99 idle",
            "goal_met": all((r := ratios[k]) is not None and r <= 1.5 for k in ("api", "opcua"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    line_arguments(parser)
    parser.add_argument("--rate", type=float, default=20.0, help="parts/s on the line")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="length of the idle phase, and the least of the API attack")
    parser.add_argument("--sequential", type=int, default=300, help="sequential API guesses per round")
    parser.add_argument("--parallel", type=int, default=200, help="parallel API guesses per round")
    parser.add_argument("--opcua", type=int, default=25, help="OPC UA guesses")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    write_result("login_attack", report)
    api, opc = report["api"], report["opcua"]
    for name, p in report["stored_ms"].items():
        print(f"{name:<13} stored p50 {p['p50']} ms  p99 {p['p99']} ms  (n={p['n']})")
    print(f"p99 ratios {report['p99_ratio']} (goal ≤ 1.5), dropped frames {report['dropped_frames']}, "
          f"machine load {report['load_average_1m_at_start']} → {report['machine']['load_average_1m']}")
    print(f"API: {api['attempts']} guesses in {api['rounds']} round(s), {api['seconds']} s, answers {api['status']}; "
          f"password checked {api['password_checked']}, refused unchecked {api['refused']}")
    print(f"OPC UA: {opc['attempts']} guesses in {opc['seconds']} s, answers {opc['outcomes']}")

if __name__ == "__main__":
    main()
