"""Logging a condition once, however often it recurs: the PLC ports' defence against log floods.

Both PLC ports face clients that can cause the same event thousands of times (a connection flood
at ``max_connections``, malformed traffic): the journal gets a line when such a condition starts
and one when it ends, and the events themselves are counted (the servers' counters, Prometheus).
"""

from __future__ import annotations

import logging
import time
from typing import Any

clock = time.monotonic
"""Where :class:`Persistent` reads the time (tests move it forward)."""


class Persistent:
    """Log a condition once when it starts, at debug while it persists, at info when it ends.

    With ``quiet_s``, a condition that comes in bursts (refusals during a flood at the connection
    limit, which lets a client in whenever another leaves) ends only once it has been quiet that
    long: :meth:`recover` says nothing until then, so a flood logs one warning rather than a
    warning and an info line each time a client gets in; and a failure after such a quiet spell
    starts a new condition (logged at ``level``) even if nothing called :meth:`recover`.  Without
    ``quiet_s`` the condition lasts until :meth:`recover`.
    """

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, *,
                 quiet_s: float | None = None) -> None:
        self.log, self.level, self.quiet_s, self.active = logger, level, quiet_s, False
        self.last_failed = -float("inf")

    def _quiet(self, now: float) -> bool:
        return self.quiet_s is not None and now - self.last_failed >= self.quiet_s

    def fail(self, msg: str, *args: Any, **kwargs: Any) -> None:
        now = clock()
        if self._quiet(now):
            self.active = False  # the last burst ended without a recover(): this is a new one
        self.log.log(logging.DEBUG if self.active else self.level, msg, *args, **kwargs)
        self.active, self.last_failed = True, now

    def recover(self, msg: str, *args: Any) -> None:
        if self.active and (self.quiet_s is None or self._quiet(clock())):
            self.log.info(msg, *args)
            self.active = False


class PerPeer:
    """A :class:`Persistent` condition per peer host, each ending after ``quiet_s`` without a failure.

    A host's first failure is logged at ``level``, its repeats at debug while they go on.  At most
    ``tracked`` hosts are remembered; failures of further hosts go to debug, so a scan from many
    addresses cannot grow the table nor flood the log.
    """

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, *, quiet_s: float,
                 tracked: int = 16) -> None:
        self.log, self.level, self.quiet_s, self.tracked = logger, level, quiet_s, tracked
        self._hosts: dict[str, Persistent] = {}

    def fail(self, host: str, msg: str, *args: Any) -> None:
        now = clock()
        for other, condition in list(self._hosts.items()):
            if now - condition.last_failed >= self.quiet_s:
                del self._hosts[other]
        if host not in self._hosts:
            if len(self._hosts) >= self.tracked:
                self.log.debug(msg, *args)
                return
            self._hosts[host] = Persistent(self.log, self.level, quiet_s=self.quiet_s)
        self._hosts[host].fail(msg, *args)
