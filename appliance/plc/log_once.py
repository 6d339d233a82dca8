"""Logging a condition once, however often it recurs: the PLC ports' defence against log floods.

Both PLC ports face clients that can cause the same event thousands of times (a connection flood
at ``max_connections``, malformed traffic): the journal gets a line when such a condition starts
and one when it ends, and the events themselves are counted (the servers' counters, Prometheus).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
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


class PerHost:
    """Log an event once per host: the first from a host at ``level``, more from it at debug until it
    has been quiet for ``quiet_s``.  At most ``hosts`` hosts are remembered; while that many are, a new
    host's events go to debug, so a flood from many addresses grows neither memory nor the journal
    (every event is still counted by the caller).
    """

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, *, quiet_s: float,
                 hosts: int = 1024) -> None:
        self.log, self.level, self.quiet_s, self.hosts = logger, level, quiet_s, hosts
        self._last: OrderedDict[str, float] = OrderedDict()  # host → its latest event, oldest first

    def event(self, host: str, msg: str, *args: Any) -> None:
        now = clock()
        while self._last and now - next(iter(self._last.values())) >= self.quiet_s:
            self._last.popitem(last=False)
        known = host in self._last
        if known or len(self._last) < self.hosts:
            self._last[host] = now
            self._last.move_to_end(host)
        self.log.log(self.level if not known and host in self._last else logging.DEBUG, msg, *args)
