"""``predict_images``: classify image files with a model package, one JSON-able dict each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from appliance.imageio import read_image
from appliance.inference import BadImage, Classifier


def predict_images(model: Path, images: list[Path]) -> Iterator[dict]:
    """Yield ``{"image", "heads": {head: {"class", "confidence"}}}`` per image, or
    ``{"image", "error"}`` for one that cannot be read or classified; the others still run."""
    classifier = Classifier(model)
    for path in images:
        try:
            pred = classifier.classify(read_image(Path(path)))
        except BadImage as exc:
            yield {"image": str(path), "error": str(exc)}
            continue
        yield {"image": str(path),
               "heads": {name: {"class": p.label, "confidence": p.confidence} for name, p in pred.items()}}
