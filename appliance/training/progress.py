"""Training progress: a tqdm bar for people at a terminal, or a callback for the retraining job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm import tqdm

ProgressFn = Callable[[str, float], None]
Progress = bool | ProgressFn
"""True: a bar on stderr; False: silent; a callable: called with (stage, fraction done)."""


class _Bar(tqdm):
    def __init__(self, *args: Any, report: ProgressFn | None = None, **kwargs: Any) -> None:
        self._report = report
        self._stage = str(kwargs.get("desc", ""))
        self._done = 0
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        self._done += int(n or 0)
        total = self.total  # set even when the bar is disabled
        if self._report is not None and total:
            self._report(self._stage, min(1.0, self._done / total))
        return super().update(n)


def progress_bar(total: int, desc: str, unit: str, progress: Progress) -> tqdm:
    report = progress if callable(progress) else None
    return _Bar(total=total, desc=desc, unit=unit, disable=progress is not True, report=report)
