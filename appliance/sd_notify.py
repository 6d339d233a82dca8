"""systemd's notification protocol (sd_notify): READY, STATUS, WATCHDOG, STOPPING.

A datagram to ``$NOTIFY_SOCKET``; a no-op when not started by systemd.  Twenty lines do not
justify a dependency (the PyPI implementations are unmaintained or need libsystemd headers).
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send ``KEY=value`` fields; returns False when there is no systemd to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto("\n".join(fields).encode(), address)
    return True


def watchdog_interval_s() -> float | None:
    """Half of ``WatchdogSec`` (systemd's advice for how often to ping), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
