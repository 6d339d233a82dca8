"""Shadow mode: a challenger model judges the same live frames; its predictions are stored, never
published.  It runs in its own low-priority thread on a bounded queue, so the line never waits for
it: when the challenger falls behind, frames are skipped (and counted)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from appliance.inference import BadImage, Classifier
from appliance.priority import lower_this_thread
from appliance.store import Store

log = logging.getLogger(__name__)
FLUSH_EVERY_S = 0.5


class ShadowRunner:
    def __init__(self, classifier: Classifier, store: Store, max_pending: int) -> None:
        self.classifier = classifier
        self.store = store
        self._queue: queue.Queue[tuple[str, np.ndarray] | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self.judged = 0
        self.skipped = 0
        self._thread.start()

    @property
    def version(self) -> str:
        return self.classifier.version

    def offer(self, result_id: str, image: np.ndarray) -> None:
        try:
            self._queue.put_nowait((result_id, image))
        except queue.Full:
            self.skipped += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        lower_this_thread()  # below the line's inference workers
        rows: list[dict[str, Any]] = []
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=FLUSH_EVERY_S)
            except queue.Empty:
                item = ()  # type: ignore[assignment]
            if item is None:
                break
            if item:
                result_id, image = item
                try:
                    prediction = self.classifier.classify(image)
                except BadImage:
                    continue
                self.judged += 1
                rows.extend({"result_id": result_id, "model_version": self.version, "role": "shadow",
                             "head": head, "label": p.label, "confidence": p.confidence,
                             "probs": list(p.probs)} for head, p in prediction.items())
            if rows and time.monotonic() - last_flush >= FLUSH_EVERY_S:
                self._flush(rows)
                rows, last_flush = [], time.monotonic()
        if rows:
            self._flush(rows)

    def _flush(self, rows: list[dict[str, Any]]) -> None:
        try:
            self.store.add_predictions(rows)
        except Exception:  # the shadow is diagnostics: never let it take anything else down
            log.exception("could not store %d shadow predictions", len(rows))
