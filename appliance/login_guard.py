"""Password log-ins under attack: backoff, temporary lockout, audit and metrics, for the API and OPC UA.

Failures are counted per user name (per channel: API users and OPC UA accounts are different
people) and per source address (across channels).  After ``backoff_after`` failures each further
attempt must wait, the wait doubling with each failure; after ``max_failures`` within ``window_s``
the name, or the address, is locked for ``lockout_s``.  A refused attempt costs a dictionary look-up:
no password is checked, so the line keeps its CPU.  A success forgets the user's failures, not the
address's (an attacker with one valid login cannot reset its address's count).

Per-address lockout stops an attacker who sprays many names from one host before it locks anyone
else out; an attacker who guesses one name does lock that user out — the price of capping guesses.
The user waits ``lockout_s``, or an admin lifts the lock (:meth:`LoginGuard.unlock`: the API's
``POST /users/{name}/unlock``, or ``appliance user unlock NAME``, which leaves a request file the
daemon honours at the user's next attempt).  Relay addresses (the dashboard on this host) are
never locked themselves, or one person's typos would lock out everybody behind them.

Both tables are bounded (``max_tracked``): once full, the longest-quiet entry that is not locked is
forgotten (a locked one only when a scan of the oldest finds none unlocked).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from appliance.auth import NAME as USER_NAME
from appliance.config import LoginConfig
from appliance.errors import UserError
from appliance.part_text import loggable
from appliance.priority import idle_this_thread

if TYPE_CHECKING:
    from appliance.audit import AuditTrail
    from appliance.metrics import LineMetrics

log = logging.getLogger(__name__)

UNLOCK_DIR = "login-unlock"
"""Folder in ``state_dir`` where ``appliance user unlock NAME`` leaves a request (a file NAME)."""
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
EVICTION_SCAN = 32
"""Oldest entries looked at for an unlocked one to forget when a table is full."""
KEY_CHARS = 128
"""Characters of a tried user name kept as its key (names are at most 64), so huge ones cost no memory."""


@dataclass(slots=True)
class _Failures:
    count: int = 0
    since: float = 0.0
    retry_at: float = 0.0
    locked_until: float = 0.0
    locked_at_wall: float = 0.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an attempt is refused before its password is checked, and for how long."""

    reason: Literal["locked", "backoff", "busy"]
    scope: Literal["user", "source", "server"]
    retry_after_s: float

    def message(self, user: str) -> str:
        wait = f"try again in {self.retry_after_s:.0f} s"
        if self.reason == "busy":
            return f"too many log-ins at once; {wait}"
        what = f"user '{loggable(user)}'" if self.scope == "user" else "this address"
        if self.reason == "backoff":
            return f"too many failed log-ins for {what}; {wait}"
        return (f"too many failed log-ins: {what} is locked; {wait}"
                + (", or ask an admin to unlock it" if self.scope == "user" else ""))


class LoginRefused(Exception):
    """An attempt refused before its password was checked: locked, backing off, or too many waiting."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message(""))
        self.refusal = refusal


class _Table(Generic[K]):
    """Failure counts by key, least recently touched first, at most ``limit`` entries."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: OrderedDict[K, _Failures] = OrderedDict()

    def get(self, key: K, now: float, window_s: float) -> _Failures | None:
        entry = self.entries.get(key)
        if entry is not None and entry.locked_until <= now and now - entry.since > window_s:
            del self.entries[key]  # its failures have aged out
            return None
        return entry

    def touch(self, key: K, now: float) -> _Failures:
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.limit:
                self._forget_one(now)
            entry = self.entries[key] = _Failures(since=now)
        self.entries.move_to_end(key)
        return entry

    def _forget_one(self, now: float) -> None:
        oldest = itertools.islice(self.entries.items(), EVICTION_SCAN)
        key = next((k for k, e in oldest if e.locked_until <= now), None)
        if key is None:
            self.entries.popitem(last=False)
        else:
            del self.entries[key]


def request_unlock(state_dir: Path, user: str) -> Path:
    """Leave a request for the running daemon to lift ``user``'s lock at the next attempt (the CLI's
    way in: it works without logging in, for whoever may write the state directory)."""
    if not USER_NAME.match(user) or user.startswith("."):
        raise UserError(f"user name '{loggable(user)}': use 1-64 letters, digits, '_', '.', '@' or '-'")
    folder = state_dir / UNLOCK_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    request = folder / user
    request.touch(mode=0o600)  # or a fresh time on an old request
    return request


class LoginGuard:
    """Decides whether a log-in attempt may check its password; records what came of it."""

    def __init__(self, cfg: LoginConfig, audit: AuditTrail | None = None, metrics: LineMetrics | None = None,
                 unlock_dir: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.audit = audit
        self.metrics = metrics
        self.unlock_dir = unlock_dir
        self.clock = clock
        self.users: _Table[tuple[str, str]] = _Table(cfg.max_tracked)  # (channel, user name)
        self.sources: _Table[str] = _Table(cfg.max_tracked)
        self._relays = [ipaddress.ip_network(n, strict=False) for n in cfg.relay_sources]
        self._slots = asyncio.Semaphore(cfg.parallel_checks)
        self._checker = ThreadPoolExecutor(cfg.parallel_checks, "login-check", initializer=idle_this_thread)
        self._waiting = 0

    # -- before the password is checked ------------------------------------------------------------
    def refusal(self, channel: str, user: str, source: str | None) -> Refusal | None:
        """Why this attempt must not check its password now, or None; a refusal is counted."""
        now = self.clock()
        found = self._refusal_of(self.users, (channel, user[:KEY_CHARS]), now, "user")
        if found is not None and found.reason == "locked" and self._unlock_requested(user, now):
            found = None
        if found is None and (address := self._lockable(source)) is not None:
            found = self._refusal_of(self.sources, address, now, "source")
        if found is not None:
            if self.metrics is not None:
                self.metrics.login_refused.labels(channel, found.reason).inc()
            log.debug("%s log-in of %s from %s refused: %s", channel, loggable(user), source, found.reason)
        return found

    def _refusal_of(self, table: _Table[K], key: K, now: float,
                    scope: Literal["user", "source"]) -> Refusal | None:
        entry = table.get(key, now, self.cfg.window_s)
        if entry is None:
            return None
        if entry.locked_until > now:
            return Refusal("locked", scope, entry.locked_until - now)
        if entry.retry_at > now:
            return Refusal("backoff", scope, entry.retry_at - now)
        return None

    async def check(self, channel: str, user: str, source: str | None, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, the password check, unless the attempt is refused (LoginRefused): it runs on
        one of ``parallel_checks`` threads that get a core only when the line leaves one idle, and
        at most ``max_waiting`` attempts wait for them."""
        if refusal := self.refusal(channel, user, source):
            raise LoginRefused(refusal)
        if self._slots.locked() and self._waiting >= self.cfg.max_waiting:
            if self.metrics is not None:
                self.metrics.login_refused.labels(channel, "busy").inc()
            raise LoginRefused(Refusal("busy", "server", 1.0))
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            if refusal := self.refusal(channel, user, source):  # a lock that landed while this one waited
                raise LoginRefused(refusal)
            return await asyncio.get_running_loop().run_in_executor(self._checker, fn, *args)
        finally:
            self._slots.release()

    def close(self) -> None:
        self._checker.shutdown(wait=False, cancel_futures=True)

    # -- after it was checked ----------------------------------------------------------------------
    def succeeded(self, channel: str, user: str, source: str | None) -> None:
        self.users.entries.pop((channel, user[:KEY_CHARS]), None)
        self._record(user, channel, "login", source)
        if self.metrics is not None:
            self.metrics.logins.labels(channel).inc()
        log.info("%s log-in of %s from %s", channel, loggable(user), source)

    def failed(self, channel: str, user: str, source: str | None) -> Refusal | None:
        """Count a wrong password; the lock it imposed, if it was the one too many."""
        now = self.clock()
        entry = self._fail(self.users.touch((channel, user[:KEY_CHARS]), now), now)
        address = self._lockable(source)
        source_entry = None if address is None else self._fail(self.sources.touch(address, now), now)
        self._record(user, channel, "login.failed", source, {"failures": entry.count})
        if self.metrics is not None:
            self.metrics.login_failures.labels(channel).inc()
        log.info("%s log-in of %s from %s failed (%d of %d)", channel, loggable(user), source, entry.count,
                 self.cfg.max_failures)
        lock: Refusal | None = None
        for scope, e in (("user", entry), ("source", source_entry)):
            if e is not None and e.count >= self.cfg.max_failures and e.locked_until <= now:
                e.locked_until, e.locked_at_wall = now + self.cfg.lockout_s, time.time()
                lock = Refusal("locked", scope, self.cfg.lockout_s)  # type: ignore[arg-type]
                self._record(user, channel, "login.locked", source,
                             {"scope": scope, "seconds": self.cfg.lockout_s, "failures": e.count})
                if self.metrics is not None:
                    self.metrics.login_lockouts.labels(channel, scope).inc()
                log.warning("%s log-ins: %s locked for %.0f s after %d failures within %.0f s (last from %s)",
                            channel, f"user {loggable(user)}" if scope == "user" else f"address {source}",
                            self.cfg.lockout_s, e.count, self.cfg.window_s, source)
        return lock

    def _fail(self, entry: _Failures, now: float) -> _Failures:
        if entry.locked_until <= now and (entry.locked_until > 0 or now - entry.since > self.cfg.window_s):
            entry.count, entry.since, entry.retry_at, entry.locked_until = 0, now, 0.0, 0.0  # a fresh start
        entry.count += 1
        if entry.count >= self.cfg.backoff_after and self.cfg.backoff_base_s > 0:
            wait = self.cfg.backoff_base_s * 2 ** min(entry.count - self.cfg.backoff_after, 32)
            entry.retry_at = now + min(wait, self.cfg.backoff_max_s)
        return entry

    # -- lifting a lock ----------------------------------------------------------------------------
    def unlock(self, user: str) -> bool:
        """Forget the failures of ``user`` on every channel; whether it was locked."""
        now = self.clock()
        locked = False
        for key in [k for k in self.users.entries if k[1] == user]:
            locked |= self.users.entries.pop(key).locked_until > now
        if locked:
            log.warning("log-in lock of user %s lifted by an admin", loggable(user))
        return locked

    def _unlock_requested(self, user: str, now: float) -> bool:
        """Whether ``appliance user unlock`` asked, since the lock began, to lift this user's lock."""
        if self.unlock_dir is None or user.startswith(".") or "/" in user or not user:
            return False
        request = self.unlock_dir / user
        try:
            asked_at = request.stat().st_mtime
            request.unlink()
        except OSError:
            return False
        locked_at = max((e.locked_at_wall for k, e in self.users.entries.items() if k[1] == user),
                        default=0.0)
        if asked_at < locked_at:
            return False  # a request older than this lock: used up
        self.unlock(user)
        self._record("appliance user unlock", "cli", "login.unlocked", user,
                     {"asked_at": datetime.fromtimestamp(asked_at, UTC).isoformat()})
        return True

    # -- helpers -----------------------------------------------------------------------------------
    def _lockable(self, source: str | None) -> str | None:
        """``source`` if it is an address that can be locked (known, and not a relay), else None."""
        if not source:
            return None
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return source
        return None if any(address in net for net in self._relays) else source

    def _record(self, user: str, channel: str, action: str, target: str | None,
                detail: dict[str, object] | None = None) -> None:
        if self.audit is not None:
            self.audit.record(loggable(user), channel, action, target, detail)
