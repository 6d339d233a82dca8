"""Log-ins under attack through the real HTTP API and a real OPC UA server: lockout, unlock, audit,
token revocation on a password change, and the last admin."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from appliance.cli import app
from appliance.daemon import Daemon
from tests.brightness_model import GRADES
from tests.conftest import auth_headers, free_port, write_grade_images

CLIENT_URI = "urn:defect-appliance:test-login-client"
RIGHT = "correct horse battery"
NO_WAITS = {"backoff_base_s": 0}


async def start(tmp_path: Path, line_config: Any, **overrides: Any) -> Daemon:
    images = tmp_path / "images"
    write_grade_images(images, GRADES)
    daemon = Daemon(line_config(images, **overrides))
    await daemon.start()
    return daemon


def api(daemon: Daemon, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}/api/v1", headers=headers or {})


async def audit_rows(daemon: Daemon, logins: int) -> list[tuple[str, str, str, str | None]]:
    """The audit table, once it holds ``logins`` login rows (the trail's own thread may be writing)."""
    for _ in range(50):
        daemon.audit_trail.flush()
        rows = [(e["user"], e["role"], e["action"], e["target"]) for e in reversed(daemon.store.audit_log(1000))]
        if sum(r[2].startswith("login") for r in rows) >= logins:
            break
        await asyncio.sleep(0.1)
    return rows


async def test_api_lockout_after_repeated_failures_and_the_ways_back_in(
        tmp_path: Path, line_config: Any) -> None:
    daemon = await start(tmp_path, line_config, login={**NO_WAITS, "lockout_s": 600})
    try:
        daemon.users.set("ana", "operator", RIGHT)
        admin = auth_headers(daemon, "admin")
        async with api(daemon) as client:
            wrong = [await client.post("/auth/token", json={"username": "ana", "password": f"guess-{i:04d}"})
                     for i in range(20)]
            right_while_locked = await client.post("/auth/token", json={"username": "ana", "password": RIGHT})
            unlocked = await client.post("/users/ana/unlock", headers=admin)
            right = await client.post("/auth/token", json={"username": "ana", "password": RIGHT})
            again = await client.post("/users/ana/unlock", headers=admin)
            by_operator = await client.post("/users/ana/unlock",
                                            headers={"Authorization": f"Bearer {right.json()['access_token']}"})
            metrics = (await client.get("/metrics")).text
        rows = await audit_rows(daemon, 12)
    finally:
        await daemon.stop()
    assert [r.status_code for r in wrong] == [401] * 9 + [429] * 11
    assert all(1 <= int(r.headers["Retry-After"]) <= 600 for r in wrong[9:])
    assert "locked" in wrong[-1].json()["detail"] and "unlock" in wrong[-1].json()["detail"]
    assert right_while_locked.status_code == 429, "the right password is refused while the user is locked"
    assert unlocked.json() == {"user": "ana", "was_locked": True}
    assert right.status_code == 200
    assert again.json()["was_locked"] is False and by_operator.status_code == 403
    logins = [r for r in rows if r[2].startswith("login")]
    assert logins == [("ana", "api", "login.failed", "127.0.0.1")] * 10 + [
        ("ana", "api", "login.locked", "127.0.0.1"), ("ana", "api", "login", "127.0.0.1")]
    assert ("test-admin", "admin", "user.unlock", "ana") in rows
    assert 'appliance_login_failures_total{channel="api"} 10.0' in metrics
    assert 'appliance_login_lockouts_total{channel="api",scope="user"} 1.0' in metrics
    assert 'appliance_login_refused_total{channel="api",reason="locked"} 11.0' in metrics


async def test_cli_unlock_backoff_password_change_and_the_last_admin(tmp_path: Path, line_config: Any) -> None:
    daemon = await start(tmp_path, line_config, login={"max_failures": 3, "backoff_after": 2})
    config = str(tmp_path / "line.yaml")
    runner = CliRunner()
    try:
        daemon.users.set("ana", "operator", RIGHT)
        daemon.users.set("boss", "admin", "boss-password-1")
        async with api(daemon) as client:
            async def login(password: str, user: str = "ana") -> httpx.Response:
                return await client.post("/auth/token", json={"username": user, "password": password})

            first, second, backing_off = await login("nope-1"), await login("nope-2"), await login(RIGHT)
            await asyncio.sleep(float(backing_off.headers["Retry-After"]))
            locking = await login("nope-3")
            cli = runner.invoke(app, ["user", "unlock", "ana", "-c", config])
            after_cli = await login(RIGHT)
            old_token = {"Authorization": f"Bearer {after_cli.json()['access_token']}"}
            before_change = await client.get("/auth/me", headers=old_token)
            boss = {"Authorization": f"Bearer {(await login('boss-password-1', 'boss')).json()['access_token']}"}
            changed = await client.put("/users/ana", json={"role": "operator", "password": "new password 123"},
                                       headers=boss)
            after_change = await client.get("/auth/me", headers=old_token)
            new_login = await login("new password 123")
            demote_self = await client.put("/users/boss", json={"role": "engineer", "password": "boss-password-2"},
                                           headers=boss)
            boss_still = await client.get("/auth/me", headers=boss)
            cli_remove = runner.invoke(app, ["user", "remove", "boss", "-c", config])
            cli_demote = runner.invoke(app, ["user", "set", "boss", "--role", "operator", "-c", config],
                                       env={"APPLIANCE_PASSWORD": "boss-password-3"})
            daemon.users.set("second", "admin", "second-password-1")
            second_admin = auth_headers(daemon, "admin", "second")
            removed = await client.delete("/users/boss", headers=second_admin)
            last = await client.delete("/users/second", headers=second_admin)
        rows = await audit_rows(daemon, 8)
    finally:
        await daemon.stop()
    assert (first.status_code, second.status_code) == (401, 401)
    assert backing_off.status_code == 429 and "try again" in backing_off.json()["detail"]
    assert locking.status_code == 429 and "locked" in locking.json()["detail"]
    assert cli.exit_code == 0, cli.output
    assert after_cli.status_code == 200, "the CLI's request lifted the lock at the next attempt"
    assert ("appliance user unlock", "cli", "login.unlocked", "ana") in rows
    assert before_change.status_code == 200 and changed.status_code == 200
    assert after_change.status_code == 401, "a password change revokes the user's tokens"
    assert new_login.status_code == 200
    assert demote_self.status_code == 422 and "last admin" in demote_self.json()["detail"]
    assert boss_still.json() == {"user": "boss", "role": "admin"}, "nothing changed"
    assert cli_remove.exit_code == 2 and "last admin" in cli_remove.output
    assert cli_demote.exit_code == 2 and "last admin" in cli_demote.output
    assert removed.status_code == 200, "with a second admin, the first may go"
    assert last.status_code == 422 and "yourself" in last.json()["detail"]


async def test_opcua_lockout_refuses_the_right_password_and_is_audited(
        tmp_path: Path, line_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_OPCUA_PW", "plc-password-1")
    port = free_port()
    daemon = await start(tmp_path, line_config, login=NO_WAITS, opcua={
        "enabled": True, "host": "127.0.0.1", "port": port,
        "users": [{"name": "plc", "role": "operator", "password_env": "TEST_OPCUA_PW"}]})
    pki = daemon.config.state_dir / "pki"
    cert, key = tmp_path / "client.der", tmp_path / "client.pem"
    await setup_self_signed_certificate(key, cert, CLIENT_URI, socket.gethostname(),
                                        [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "login test"})
    (pki / "trusted" / "client.der").write_bytes(cert.read_bytes())

    async def session(password: str) -> str:
        client = Client(f"opc.tcp://127.0.0.1:{port}", timeout=10)
        client.application_uri = CLIENT_URI
        await client.set_security(SecurityPolicyBasic256Sha256, certificate=str(cert), private_key=str(key),
                                  server_certificate=str(pki / "own" / "cert.der"),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
        client.set_user("plc")
        client.set_password(password)
        try:
            async with client:
                return "activated"
        except ua.UaStatusCodeError as exc:
            return type(exc).__name__

    try:
        wrong = [await session(f"guess-{i}") for i in range(20)]
        right_while_locked = await session("plc-password-1")
        rows = await audit_rows(daemon, 11)
        was_locked = daemon.login_guard.unlock("plc")
        right = await session("plc-password-1")
    finally:
        await daemon.stop()
    assert wrong == ["BadUserAccessDenied"] * 20
    assert right_while_locked == "BadUserAccessDenied", "the right password is refused while locked"
    assert was_locked and right == "activated"
    logins = [r for r in rows if r[2].startswith("login")]
    assert logins == [("plc", "opcua", "login.failed", "127.0.0.1")] * 10 + [
        ("plc", "opcua", "login.locked", "127.0.0.1")], "the client's address is known to the guard"
    refused = daemon.metrics.registry.get_sample_value("appliance_login_refused_total",
                                                       {"channel": "opcua", "reason": "locked"})
    assert refused == 11
