"""CPU priority inside the daemon: the line first, everything a person or a schedule asks for after.

The line's threads (event loop, inference workers, journal, camera) keep the process's priority.
Work that can wait runs ``BACKGROUND_NICE`` steps lower: API and dashboard queries (the event
loop's default executor), DuckDB's own worker threads, result ingest, the image archive and the
shadow model.  On Linux a thread's nice value is its own and is inherited by the threads it starts,
which is how DuckDB's workers get it.  Lowering needs no privilege; where it is impossible (not
Linux), the work simply runs at the line's priority.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

BACKGROUND_NICE = 10
"""Under CFS, a thread 10 nice steps lower gets about a tenth of the CPU when both want it."""


def lower_this_thread(steps: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread's priority (and that of the threads it starts from now on)."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))


def idle_this_thread() -> None:
    """Let the calling thread (and those it starts) run only when no other thread wants a core:
    Linux's SCHED_IDLE, for work an outsider can make the daemon do at will (password checks);
    where that is impossible, background priority."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        lower_this_thread()


def background_executor(workers: int, name: str = "background") -> ThreadPoolExecutor:
    """A thread pool whose threads run at background priority."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=lower_this_thread)


def at_background_priority(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new background-priority thread and return its result (or raise its error).

    For set-up whose threads must inherit the lower priority, e.g. opening a DuckDB database.
    """
    with background_executor(1, "background-setup") as pool:
        return pool.submit(fn).result()
