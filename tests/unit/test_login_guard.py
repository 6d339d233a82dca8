"""The login guard's policy, on a fake clock: backoff, lockout, relays, bounded tables, unlocks."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.config import LoginConfig
from appliance.errors import UserError
from appliance.login_guard import UNLOCK_DIR, LoginGuard, LoginRefused, request_unlock
from appliance.metrics import LineMetrics

ATTACKER, OTHER = "10.0.0.66", "10.0.0.7"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Audit:
    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def record(self, *row: Any) -> None:
        self.rows.append(row)


def guard(clock: Clock, audit: Audit | None = None, metrics: LineMetrics | None = None,
          unlock_dir: Path | None = None, **cfg: Any) -> LoginGuard:
    return LoginGuard(LoginConfig(**cfg), audit, metrics, unlock_dir, clock)  # type: ignore[arg-type]


def fail_until_refused(g: LoginGuard, clock: Clock, user: str, source: str | None, attempts: int) -> list[str]:
    """Try ``attempts`` wrong passwords, waiting out every backoff: what each attempt met."""
    seen = []
    for _ in range(attempts):
        refusal = g.refusal("api", user, source)
        while refusal is not None and refusal.reason == "backoff":
            clock.now += refusal.retry_after_s
            refusal = g.refusal("api", user, source)
        if refusal is not None:
            seen.append(f"refused:{refusal.scope}")
            continue
        lock = g.failed("api", user, source)
        seen.append("locked" if lock else "failed")
    return seen


def test_failures_back_off_doubling_then_lock_for_the_configured_time() -> None:
    clock = Clock()
    g = guard(clock, max_failures=5, backoff_after=2, backoff_base_s=1, backoff_max_s=3, lockout_s=600)
    assert g.failed("api", "ana", ATTACKER) is None
    assert g.refusal("api", "ana", ATTACKER) is None, "no wait after the first failure"
    g.failed("api", "ana", ATTACKER)
    waits = [g.refusal("api", "ana", ATTACKER)]
    clock.now += 1
    g.failed("api", "ana", ATTACKER)
    waits.append(g.refusal("api", "ana", ATTACKER))
    clock.now += 2
    g.failed("api", "ana", ATTACKER)
    waits.append(g.refusal("api", "ana", ATTACKER))
    assert [(w.reason, w.retry_after_s) for w in waits if w] == [("backoff", 1), ("backoff", 2), ("backoff", 3)]
    clock.now += 3
    lock = g.failed("api", "ana", ATTACKER)
    assert lock is not None and lock.reason == "locked" and lock.retry_after_s == 600
    clock.now += 599
    refused = g.refusal("api", "ana", ATTACKER)
    assert refused is not None and refused.reason == "locked" and refused.scope == "user"
    assert "ask an admin to unlock" in refused.message("ana")
    clock.now += 1
    assert g.refusal("api", "ana", ATTACKER) is None, "the lock expires"
    assert g.failed("api", "ana", ATTACKER) is None, "and the count starts again"


def test_a_success_forgets_the_users_failures_but_not_the_addresss() -> None:
    clock = Clock()
    g = guard(clock, max_failures=5, backoff_base_s=0)
    for _ in range(3):
        g.failed("api", "ana", ATTACKER)
    g.succeeded("api", "ana", ATTACKER)
    assert g.failed("api", "ana", ATTACKER) is None, "ana's count started again"
    lock = g.failed("api", "bo", ATTACKER)
    assert lock is not None and lock.scope == "source", "the address's count went on: 3 + 1 + 1 = 5"


def test_spraying_names_from_one_address_locks_the_address_first() -> None:
    clock = Clock()
    g = guard(clock, max_failures=10, backoff_base_s=0)
    seen = [fail_until_refused(g, clock, f"user{i}", ATTACKER, 1)[0] for i in range(12)]
    assert seen == ["failed"] * 9 + ["locked", "refused:source", "refused:source"]
    assert g.refusal("api", "user0", OTHER) is None, "nobody else is locked out"
    assert g.refusal("opcua", "plc", ATTACKER) is not None, "the address is locked on every channel"


def test_guessing_one_name_locks_that_user_from_everywhere_on_its_channel() -> None:
    clock = Clock()
    g = guard(clock)  # defaults: 10 failures, backoff from the third
    seen = fail_until_refused(g, clock, "admin", ATTACKER, 20)
    assert seen == ["failed"] * 9 + ["locked"] + ["refused:user"] * 10
    refused = g.refusal("api", "admin", OTHER)
    assert refused is not None and refused.scope == "user" and refused.retry_after_s <= 900
    assert g.refusal("opcua", "admin", OTHER) is None, "OPC UA accounts are other people"


def test_relay_addresses_are_never_locked_themselves() -> None:
    clock = Clock()
    g = guard(clock, backoff_base_s=0, relay_sources=["127.0.0.0/8", "::1"])
    for i in range(30):
        g.failed("api", f"user{i}", "127.0.0.1")
    assert g.refusal("api", "someone", "127.0.0.1") is None
    assert g.sources.entries == {}
    assert fail_until_refused(g, clock, "ana", "::1", 11)[-2:] == ["locked", "refused:user"]


def test_tables_stay_bounded_and_forget_unlocked_entries_first() -> None:
    clock = Clock()
    g = guard(clock, max_tracked=16, max_failures=2, backoff_base_s=0)
    g.failed("api", "admin", None)
    assert g.failed("api", "admin", None) is not None
    for i in range(1000):  # a spray of names from unknown addresses
        g.failed("api", f"spray{i}", None)
    assert len(g.users.entries) == 16
    g.failed("opcua", "x" * 1_000_000, None)
    assert max(len(name) for _, name in g.users.entries) <= 128, "a huge name is not kept whole"
    assert g.refusal("api", "admin", None) is not None, "the locked user was not forgotten"


def test_failures_age_out_of_the_window() -> None:
    clock = Clock()
    g = guard(clock, max_failures=3, window_s=60, backoff_base_s=0)
    g.failed("api", "ana", ATTACKER)
    g.failed("api", "ana", ATTACKER)
    clock.now += 61
    assert g.refusal("api", "ana", ATTACKER) is None
    assert g.failed("api", "ana", ATTACKER) is None
    assert ("api", "ana") in g.users.entries and g.users.entries[("api", "ana")].count == 1


def test_logins_are_audited_and_counted_and_names_cannot_forge_log_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    clock, audit, metrics = Clock(), Audit(), LineMetrics()
    g = guard(clock, audit, metrics, max_failures=2, backoff_base_s=0)
    forged = "eve\n2025-01-01 INFO admin logged in"
    with caplog.at_level(logging.DEBUG, logger="appliance.login_guard"):
        g.failed("opcua", forged, ATTACKER)
        g.failed("opcua", forged, ATTACKER)
        g.refusal("opcua", forged, ATTACKER)
        g.succeeded("api", "ana", OTHER)
    assert [(r[1], r[2], r[3]) for r in audit.rows] == [
        ("opcua", "login.failed", ATTACKER), ("opcua", "login.failed", ATTACKER),
        ("opcua", "login.locked", ATTACKER), ("opcua", "login.locked", ATTACKER), ("api", "login", OTHER)]
    assert audit.rows[0][0] == "eve\\n2025-01-01 INFO admin logged in"
    assert {r[4]["scope"] for r in audit.rows if r[2] == "login.locked"} == {"user", "source"}
    assert all("\n" not in r.getMessage() for r in caplog.records) and len(caplog.records) == 6

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("appliance_login_failures_total", channel="opcua") == 2
    assert value("appliance_login_lockouts_total", channel="opcua", scope="user") == 1
    assert value("appliance_login_lockouts_total", channel="opcua", scope="source") == 1
    assert value("appliance_login_refused_total", channel="opcua", reason="locked") == 1
    assert value("appliance_logins_total", channel="api") == 1


def test_an_admin_unlock_lifts_the_users_lock_on_every_channel() -> None:
    clock = Clock()
    g = guard(clock, max_failures=2, backoff_base_s=0)
    for channel in ("api", "opcua"):
        g.failed(channel, "ana", None)
        g.failed(channel, "ana", None)
    assert g.unlock("ana") is True
    assert g.refusal("api", "ana", None) is None and g.refusal("opcua", "ana", None) is None
    assert g.unlock("ana") is False


def test_the_cli_unlock_request_is_honoured_once_and_only_for_a_lock_it_follows(tmp_path: Path) -> None:
    clock, audit = Clock(), Audit()
    g = guard(clock, audit, unlock_dir=tmp_path / UNLOCK_DIR, max_failures=2, backoff_base_s=0)
    stale = request_unlock(tmp_path, "ana")
    os.utime(stale, (time.time() - 60, time.time() - 60))  # asked for before the lock below
    g.failed("api", "ana", None)
    g.failed("api", "ana", None)
    assert g.refusal("api", "ana", None) is not None, "a request older than the lock does not lift it"
    assert not stale.exists(), "and is used up"
    request = request_unlock(tmp_path, "ana")
    assert oct(request.stat().st_mode & 0o777) == "0o600"
    assert g.refusal("api", "ana", None) is None
    assert not request.exists()
    assert audit.rows[-1][:4] == ("appliance user unlock", "cli", "login.unlocked", "ana")
    with pytest.raises(UserError, match="user name"):
        request_unlock(tmp_path, "../etc")
    with pytest.raises(UserError, match="user name"):
        request_unlock(tmp_path, "..")


async def test_password_checks_are_bounded_idle_priority_and_the_queue_refuses_at_once() -> None:
    clock = Clock()
    g = guard(clock, parallel_checks=1, max_waiting=2, backoff_base_s=0)
    running, most = 0, 0
    release = threading.Event()

    def password_check() -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        release.wait(10)
        running -= 1
        return os.sched_getscheduler(0)

    async def attempt(i: int) -> str:
        try:
            policy = await g.check("api", f"user{i}", ATTACKER, password_check)
            return "checked at idle priority" if policy == os.SCHED_IDLE else f"checked with policy {policy}"
        except LoginRefused as refused:
            return f"{refused.refusal.reason} {refused.refusal.retry_after_s:.0f}"

    try:
        tasks = [asyncio.create_task(attempt(i)) for i in range(6)]
        await asyncio.sleep(0.05)
        release.set()
        outcomes = await asyncio.gather(*tasks)
    finally:
        g.close()
    assert most == 1
    assert sorted(outcomes) == ["busy 1"] * 3 + ["checked at idle priority"] * 3, \
        "one checking, two waiting, the rest refused"


async def test_a_lock_that_lands_while_an_attempt_waits_refuses_it_unchecked() -> None:
    clock = Clock()
    g = guard(clock, max_failures=2, backoff_base_s=0)
    g.failed("api", "ana", None)
    checked: list[str] = []

    def wrong_password(attempt: str) -> None:
        checked.append(attempt)
        g.failed("api", "ana", None)  # as the route records it (here from the check's thread)

    try:
        first = asyncio.create_task(g.check("api", "ana", None, wrong_password, "first"))
        second = asyncio.create_task(g.check("api", "ana", None, wrong_password, "second"))
        await first
        with pytest.raises(LoginRefused) as refused:
            await second
    finally:
        g.close()
    assert checked == ["first"] and refused.value.refusal.reason == "locked"
