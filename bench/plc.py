"""PLC-side latency: frame acquired → seen by a PLC, over OPC UA and over Modbus TCP.

The daemon runs as its own process (a replay line at 10 and 100 parts/s, the real model).  Two
independent client processes watch it: an OPC UA client subscribed to ResultReadyEvents with
SignAndEncrypt + user name, and a Modbus client polling ``result_sequence`` every millisecond
over a raw socket.  Each records when it saw which result; afterwards the results' ``acquired_at``
times are read from the stored database, so the figures are what the PLC experiences end to end.
Writes bench/results/plc.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
from ruamel.yaml import YAML

from bench.common import free_port, line_and_model, line_arguments, machine, percentiles, write_result

MV_URI = "http://opcfoundation.org/UA/MachineVision"
USER, PASSWORD = "bench", "bench-password-0123"
SEQ_REGISTER = 10  # result_sequence, uint32 high word first (configs/modbus_map.yaml)



def opcua_listener(url: str, pki: str, out: str, ready: Any, stop: Any) -> None:
    """Child process: subscribe to ResultReadyEvents, record (result_id, wall time) per event."""
    from asyncua import Client, ua
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
    from cryptography.x509.oid import ExtendedKeyUsageOID

    async def main() -> None:
        cert, key = Path(pki) / "bench-client.der", Path(pki) / "bench-client.pem"
        uri = "urn:defect-appliance:bench-client"
        await setup_self_signed_certificate(key, cert, uri, socket.gethostname(),
                                            [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "bench"})
        shutil.copy(cert, Path(pki) / "trusted" / "bench-client.der")
        seen: list[tuple[str, float]] = []

        class Handler:
            def event_notification(self, event: Any) -> None:
                seen.append((event.ResultId.Id, time.time()))

        client = Client(url, timeout=10)
        client.application_uri = uri
        await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
        client.set_user(USER)
        client.set_password(PASSWORD)
        async with client:
            await client.load_data_type_definitions()
            mv = await client.get_namespace_index(MV_URI)
            sub = await client.create_subscription(1, Handler())
            await sub.subscribe_events(client.nodes.server, ua.NodeId.from_string(f"ns={mv};s=ResultReadyEventType"))
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
        Path(out).write_text(json.dumps(seen))

    asyncio.run(main())


def modbus_poller(port: int, out: str, ready: Any, stop: Any) -> None:
    """Child process: read result_sequence every millisecond; record each change with its time."""
    seen: list[tuple[int, float]] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tid, last = 0, None
        ready.set()
        while not stop.is_set():
            tid = (tid + 1) & 0xFFFF
            sock.sendall(struct.pack(">HHHBBHH", tid, 0, 6, 1, 3, SEQ_REGISTER, 2))
            reply = sock.recv(64)
            now = time.time()
            seq = struct.unpack(">I", reply[9:13])[0]
            if seq != last:
                if last is not None:
                    seen.append((seq, now))
                last = seq
            time.sleep(0.001)
    Path(out).write_text(json.dumps(seen))


def run_rate(base_cfg: Path, model: Path, replay: Path, rate: float, seconds: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-plc-"))
    try:
        ports = {"api": free_port(), "opcua": free_port(), "modbus": free_port()}
        yaml = YAML()
        cfg = yaml.load(base_cfg.read_text())
        cfg["state_dir"] = str(tmp / "state")
        cfg["camera"]["replay"].update({"path": str(replay), "rate_hz": rate, "loop": True})
        cfg["model"]["path"] = str(model)
        cfg["api"]["port"], cfg["opcua"]["port"], cfg["modbus"]["port"] = (
            ports["api"], ports["opcua"], ports["modbus"])
        cfg["logging"]["level"] = "warning"
        with (tmp / "line.yaml").open("w") as fh:
            yaml.dump(cfg, fh)
        env = {**os.environ, "APPLIANCE_OPCUA_USER": USER, "APPLIANCE_OPCUA_PASSWORD": PASSWORD}
        daemon = subprocess.Popen([sys.executable, "-m", "appliance", "run", "-c", str(tmp / "line.yaml")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=(tmp / "daemon.log").open("w"))
        try:
            for _ in range(600):
                try:  # "running" once every endpoint is up, not just the API
                    health = httpx.get(f"http://127.0.0.1:{ports['api']}/api/v1/health", timeout=1).json()
                    if health["status"] == "running":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.1)
            ctx = mp.get_context("spawn")
            stop = ctx.Event()
            ready_opc, ready_mb = ctx.Event(), ctx.Event()
            clients = [
                ctx.Process(target=opcua_listener, args=(f"opc.tcp://127.0.0.1:{ports['opcua']}",
                                                         str(tmp / "state" / "pki"), str(tmp / "opc.json"),
                                                         ready_opc, stop)),
                ctx.Process(target=modbus_poller, args=(ports["modbus"], str(tmp / "mb.json"), ready_mb, stop)),
            ]
            for c in clients:
                c.start()
            if not (ready_opc.wait(60) and ready_mb.wait(60)):
                raise SystemExit(f"clients did not connect; see {tmp / 'daemon.log'}")
            time.sleep(seconds)
            stop.set()
            for c in clients:
                c.join(30)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        con = duckdb.connect(str(tmp / "state" / "results.duckdb"), read_only=True)
        rows = con.execute("SELECT result_id, seq, epoch(acquired_at), epoch(decided_at) FROM results").fetchall()
        con.close()
        acquired = {rid: t for rid, _, t, _ in rows}
        by_seq = {seq: t for _, seq, t, _ in rows}
        opc = [(t - acquired[rid]) * 1e3 for rid, t in json.loads((tmp / "opc.json").read_text())
               if rid in acquired]
        mb = [(t - by_seq[seq]) * 1e3 for seq, t in json.loads((tmp / "mb.json").read_text()) if seq in by_seq]
        return {"rate_hz": rate, "seconds": seconds, "results": len(rows),
                "opcua_event_ms": percentiles(opc), "modbus_poll_ms": percentiles(mb)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    line_arguments(parser)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 100.0])
    args = parser.parse_args()
    _, model, replay = line_and_model(args)
    runs = [run_rate(args.config, model, replay, rate, args.seconds) for rate in args.rates]
    report = {"benchmark": "plc", "machine": machine(), "model": str(model), "runs": runs,
              "goal": "p99 <= 10 ms end to end at 100 parts/s"}
    write_result("plc", report)
    for r in runs:
        o, m = r["opcua_event_ms"], r["modbus_poll_ms"]
        print(f"{r['rate_hz']:>5.0f} parts/s  OPC UA event p50 {o['p50']} ms p99 {o['p99']} ms (n={o['n']})   "
              f"Modbus poll p50 {m['p50']} ms p99 {m['p99']} ms (n={m['n']})")


if __name__ == "__main__":
    main()
