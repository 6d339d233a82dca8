"""Optional int8 export: static onnxruntime quantisation, accepted only if accuracy holds.

The convolutions and the head matrices are quantised (QDQ, per-channel weights, activations
calibrated with MinMax on training images); the uint8 ``image`` input, the in-graph resize and
normalisation and the softmax outputs stay as they are, so the package contract does not change.
The candidate is compared with the fp32 graph on the validation images (accuracy per head, and
bs-1 latency); if any head loses more than ``max_drop`` accuracy the fp32 model is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from appliance.model_package import INPUT_NAME
from appliance.training.export import session

QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]
LATENCY_RUNS = 60


class _Images(CalibrationDataReader):
    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self._it = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._it, None)
        return None if image is None else {INPUT_NAME: image[None]}


def quantize_int8(fp32: Path, int8: Path, calibration: Sequence[np.ndarray]) -> None:
    """Write the statically quantised copy of ``fp32`` to ``int8``."""
    quantize_static(
        str(fp32), str(int8), _Images(calibration), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANTIZED_OPS, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
    )


def _accuracy_and_latency(path: Path, images: Sequence[np.ndarray], y: np.ndarray,
                          threads: int) -> tuple[list[float], float]:
    sess = session(path, threads)
    preds: list[list[int]] = []
    times = []
    for image in images:
        t = time.perf_counter()
        out = sess.run(None, {INPUT_NAME: image[None]})
        times.append(time.perf_counter() - t)
        preds.append([int(o[0].argmax()) for o in out])
    p = np.array(preds).reshape(len(images), y.shape[1])
    accs = []
    for j in range(y.shape[1]):
        known = y[:, j] >= 0
        accs.append(float((p[known, j] == y[known, j]).mean()) if known.any() else float("nan"))
    for image in images[:LATENCY_RUNS]:  # second, warm pass for the latency figure
        t = time.perf_counter()
        sess.run(None, {INPUT_NAME: image[None]})
        times.append(time.perf_counter() - t)
    return accs, float(np.median(times[-LATENCY_RUNS:]) * 1000)


def quantize_if_accurate(model: Path, calibration: Sequence[np.ndarray], val_paths: Sequence[Path],
                         load: Callable[[Path], np.ndarray], y_val: np.ndarray, head_names: list[str],
                         max_drop: float, threads: int) -> dict:
    """Quantise ``model`` in place when no head's validation accuracy drops more than
    ``max_drop``; returns the comparison recorded in the card (``applied`` says which was kept)."""
    candidate = model.with_name(model.stem + ".int8.onnx")
    started = time.perf_counter()
    try:
        quantize_int8(model, candidate, calibration)
        images = [load(p) for p in val_paths]
        acc32, ms32 = _accuracy_and_latency(model, images, y_val, threads)
        acc8, ms8 = _accuracy_and_latency(candidate, images, y_val, threads)
        drops = {h: round(a - b, 4) for h, a, b in zip(head_names, acc32, acc8, strict=True)}
        applied = all(not d > max_drop for d in drops.values())
        report = {
            "applied": applied,
            "format": "int8 QDQ static (onnxruntime), per-channel weights, MinMax calibration",
            "calibration_images": len(calibration),
            "val_accuracy_fp32": dict(zip(head_names, [round(a, 4) for a in acc32], strict=True)),
            "val_accuracy_int8": dict(zip(head_names, [round(a, 4) for a in acc8], strict=True)),
            "accuracy_drop": drops,
            "max_drop": max_drop,
            "latency_p50_ms_fp32": round(ms32, 2),
            "latency_p50_ms_int8": round(ms8, 2),
            "speedup": round(ms32 / ms8, 2) if ms8 > 0 else None,
        }
        if applied:
            candidate.replace(model)
        else:
            report["reason"] = (f"refused: accuracy drop above {max_drop} on "
                                + ", ".join(h for h, d in drops.items() if d > max_drop) + "; fp32 kept")
    except Exception as exc:  # noqa: BLE001 - quantisation is optional; the fp32 model stands
        report = {"applied": False, "reason": f"quantisation failed: {exc}; fp32 kept"}
    finally:
        candidate.unlink(missing_ok=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report
