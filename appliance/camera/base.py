"""The contract every camera source keeps.

A source is an async context manager (setup on enter, teardown on exit) that yields
:class:`Frame` objects from :meth:`FrameSource.frames` until it is closed.  A frame that could not
be decoded still arrives, with ``image=None`` and ``error`` set, so the part fails visibly instead
of vanishing.  Blocking driver calls run in threads with timeouts; a source never blocks the loop.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import numpy as np


@dataclass(slots=True)
class Frame:
    image: np.ndarray | None
    """H×W (mono) or H×W×C uint8 pixels; None when acquisition or decoding failed."""
    camera_view: str
    source_ref: str
    """Where the pixels came from: a file path, or ``<device>#<frame id>``."""
    acquired_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    acquired_ns: int = field(default_factory=time.perf_counter_ns)
    """Monotonic clock at acquisition, for per-stage latency: when the pixels are in memory (a
    camera's buffer delivered, a replayed file decoded), the moment the appliance can start on them."""
    error: str | None = None
    encoded: bytes | None = None
    """The original file bytes when the source had them (kept for the image archive)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Source-specific extras, e.g. ground-truth labels of a replayed dataset, chunk data."""


class TriggerNotSupported(RuntimeError):
    """The source runs free; it cannot take a software trigger."""


class FrameSource(abc.ABC):
    """Base class of camera sources."""

    camera_view: str
    finished: bool = False
    """True once a finite source (a replay without loop) has delivered everything."""


    async def __aenter__(self) -> FrameSource:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and start acquisition; undo anything half-done if it fails."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop acquisition and release the device; safe to call twice."""

    @abc.abstractmethod
    def frames(self) -> AsyncIterator[Frame]:
        """Yield frames until closed."""

    async def trigger(self) -> None:
        """Ask for one frame now (triggered sources only)."""
        raise TriggerNotSupported(f"{type(self).__name__} runs free and takes no trigger")

    async def set_continuous(self, on: bool) -> None:
        """Switch between free-running and triggered acquisition at run time, where supported."""
        raise TriggerNotSupported(f"{type(self).__name__} cannot switch its acquisition mode at run time")

    @property
    def continuous(self) -> bool:
        """Free-running (frames come by themselves) rather than one frame per trigger."""
        return True

    @property
    def online(self) -> bool:
        """Whether the source is currently delivering (or able to deliver) frames."""
        return True
