"""The durable half of the store: an append-only journal of results, fsynced before publication.

DuckDB needs 2-7 ms per committed statement on a 2-core edge PC, more than a part's latency
budget.  So a result is first appended to a journal segment and ``fdatasync``-ed (≈0.3 ms,
shared by every result that arrived meanwhile: group commit), and only then published; DuckDB
ingests the journal in batches in the background.  ``kill -9`` or power loss after publication
loses nothing: on start, :meth:`Journal.recover` returns every journaled record so the store can
insert those DuckDB has not seen.  A torn last line (power loss mid-write) was never
acknowledged, so it is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Done = Callable[[BaseException | None], None]
SEGMENT_BYTES = 32 << 20


class Journal:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._queue: queue.SimpleQueue[tuple[bytes, int, Done] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._segment = 0
        self._size = 0
        self._lock = threading.Lock()
        self._sealed: list[tuple[int, int]] = []
        self._last_seq = -1

    def _path(self, n: int) -> Path:
        return self.directory / f"journal-{n:08d}.jsonl"

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("journal-*.jsonl"))

    def recover(self) -> list[dict[str, Any]]:
        """Every complete record in the existing segments, oldest first."""
        self.directory.mkdir(parents=True, exist_ok=True)
        records = []
        for path in self.segments():
            data = path.read_bytes()
            lines = data.split(b"\n")
            if lines and lines[-1]:
                log.warning("journal %s ends in a torn record (%d bytes); dropped", path.name, len(lines[-1]))
            for line in lines[:-1]:
                if line:
                    records.append(json.loads(line))
        return records

    def discard_recovered(self) -> None:
        """Delete the old segments once their records are safely in DuckDB."""
        for path in self.segments():
            path.unlink()

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.segments()
        self._segment = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self._open_segment()
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def _open_segment(self) -> None:
        self._fd = os.open(self._path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = 0
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new file's name must survive power loss too
        finally:
            os.close(dir_fd)

    def append(self, record: dict[str, Any], done: Done) -> None:
        """Queue one record; ``done`` is called from the journal thread once it is on disk."""
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        self._queue.put((line, int(record["seq"]), done))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            stop = False
            while True:  # group commit: everything that queued up meanwhile shares one fsync
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            error: BaseException | None = None
            try:
                data = b"".join(line for line, _, _ in batch)
                os.write(self._fd, data)
                os.fdatasync(self._fd)
                self._size += len(data)
                self._last_seq = batch[-1][1]
                if self._size >= self.segment_bytes:
                    self._rotate()
            except OSError as exc:
                error = exc
                log.error("journal write failed: %s", exc)
            for _, _, done in batch:
                done(error)
            if stop:
                break

    def _rotate(self) -> None:
        os.close(self._fd)
        with self._lock:
            self._sealed.append((self._segment, self._last_seq))
        self._segment += 1
        self._open_segment()

    def release_sealed(self, ingested_seq: int) -> None:
        """Delete sealed segments whose every record (seq ≤ ``ingested_seq``) is in DuckDB."""
        with self._lock:
            done = [n for n, last in self._sealed if last <= ingested_seq]
            self._sealed = [(n, last) for n, last in self._sealed if last > ingested_seq]
        for n in done:
            self._path(n).unlink(missing_ok=True)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
