"""Active-learning simulation on ELPV: does labelling in the review queue's order need fewer labels
than labelling in random order?

The simulation plays a supervisor who labels ``--batch`` parts per round from the ELPV training
split (1,968 cells, their true grades revealed only when labelled), after which the model is
retrained and scored on the untouched test split (656 cells).  Two orders are compared, from the
same random start (``--start`` labelled cells) and with the same seeds:

- ``random``: the next cells in a random order;
- ``active``: the order of :func:`appliance.active.rank` — the product's review queue (entropy +
  margin, class balance, diversity) — over the current model's calibrated probabilities.  As on
  the line, the queue ranks a bounded candidate list: the ``--candidates`` most informative
  unlabelled cells.

Retraining the real recipe ~20 times per order and seed would take hours on two cores, so the
model in the loop is a proxy: the frozen EfficientNet-Lite0 trunk of the product (pretrained
ImageNet weights, 160 px, features computed once, average pooled) with a multinomial
logistic regression on top (temperature-calibrated on the labelled cells).  Both orders use the
same proxy, so the comparison is fair; absolute accuracies are the proxy's, below the fine-tuned
model's (bench/results/elpv.json).

    python -m bench.active_learning                 # 5 seeds, 40 + 40 per round up to 800 labels
    python -m bench.active_learning --seeds 0 1 --max-labels 400

Prints the curves and the labels each order needs to reach the target accuracy (``--target``,
default: 97 % of what the proxy reaches with every training cell labelled); writes
bench/results/active_learning.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appliance.active import informativeness, rank
from appliance.dataset import load_dataset
from appliance.training.data import loader
from appliance.training.export import export_onnx
from appliance.training.features import View, extract
from appliance.training.network import build
from bench.common import machine, write_result
from bench.elpv import DEFAULT_DATA, GRADE_HEAD, ensure_dataset

IMAGE_SIZE = 160
L2 = 3e-2
"""Chosen on the proxy with every training cell labelled (avg pooling: 1e-3 0.753, 1e-2 0.758,
3e-2 0.759, 1e-1 0.739; average + max pooling at its best 0.758)."""


def pooled_features(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Standardised (train X, train y, test X, test y, grade classes) from the frozen trunk."""
    dataset = load_dataset(data)
    classes = dataset.head(GRADE_HEAD).classes
    train, test = dataset.split("train"), dataset.split("test")
    frozen, _ = build("NHW", IMAGE_SIZE, 16, [len(classes)], 0.0, 0.0)
    with tempfile.TemporaryDirectory(prefix="al-trunk-") as tmp:
        onnx = Path(tmp) / "trunk.onnx"
        export_onnx(frozen, onnx, "NHW", IMAGE_SIZE, ["features"])
        maps = [extract(onnx, [s.image for s in rows], loader("NHW"), [View()], torch.get_num_threads(),
                        False, "features")[0].astype(np.float32) for rows in (train, test)]
    pooled = [m.mean(axis=(2, 3)) for m in maps]
    mean, std = pooled[0].mean(axis=0), pooled[0].std(axis=0) + 1e-6
    x_train, x_test = ((p - mean) / std for p in pooled)
    y = [np.array([classes.index(s.labels[GRADE_HEAD]) for s in rows]) for rows in (train, test)]
    return x_train, y[0], x_test, y[1], classes


def fit_proxy(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression (L-BFGS, L2) and a temperature fitted on the same labels
    (a cheap stand-in for the recipe's validation-split calibration)."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + L2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = xt @ w + b
    log_t = torch.zeros(1, requires_grad=True)
    t_opt = torch.optim.LBFGS([log_t], max_iter=50, line_search_fn="strong_wolfe")

    def t_closure() -> torch.Tensor:
        t_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), yt)
        loss.backward()
        return loss

    t_opt.step(t_closure)
    return w.detach(), b.detach(), float(log_t.detach().exp().clamp(0.05, 20.0))


def probabilities(x: np.ndarray, model: tuple[torch.Tensor, torch.Tensor, float]) -> np.ndarray:
    w, b, t = model
    return torch.softmax((torch.from_numpy(x) @ w + b) / t, dim=1).numpy()


def next_batch(order: str, unlabelled: np.ndarray, probs: np.ndarray, classes: list[str], batch: int,
               candidates: int, rng: np.random.Generator) -> np.ndarray:
    if order == "random":
        return rng.choice(unlabelled, size=min(batch, len(unlabelled)), replace=False)
    scores = np.array([informativeness(probs[i]) for i in unlabelled])
    shortlist = unlabelled[np.argsort(-scores)[:candidates]]
    queue = [{"index": int(i), "review": "hold",
              "predictions": [{"head": GRADE_HEAD, "label": classes[int(probs[i].argmax())],
                               "probs": probs[i].tolist()}]} for i in shortlist]
    return np.array([c["index"] for c in rank(queue, limit=batch)])


def simulate(order: str, seed: int, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
             classes: list[str], args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(seed)
    labelled = rng.choice(len(y), size=args.start, replace=False)  # the same start for both orders
    order_rng = np.random.default_rng(seed + 1000)
    curve = []
    while True:
        model = fit_proxy(x[labelled], y[labelled], len(classes))
        accuracy = float((probabilities(x_test, model).argmax(axis=1) == y_test).mean())
        curve.append({"labels": len(labelled), "accuracy": round(accuracy, 4),
                      "per_grade_labelled": np.bincount(y[labelled], minlength=len(classes)).tolist()})
        if len(labelled) >= args.max_labels:
            return curve
        unlabelled = np.setdiff1d(np.arange(len(y)), labelled)
        pick = next_batch(order, unlabelled, probabilities(x, model), classes, args.batch, args.candidates,
                          order_rng)
        labelled = np.concatenate([labelled, pick])


def labels_to_reach(curve: list[dict], target: float) -> int | None:
    return next((p["labels"] for p in curve if p["accuracy"] >= target), None)


def _median_labels(reached: list[int | None]) -> int | None:
    """Median over seeds; a seed that never reached the target counts as more than any budget."""
    median = float(np.median([np.inf if r is None else r for r in reached]))
    return None if not np.isfinite(median) else int(median)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ELPV dataset folder (imported if absent)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--start", type=int, default=40, help="randomly labelled cells to begin with")
    parser.add_argument("--batch", type=int, default=40, help="cells labelled per round")
    parser.add_argument("--max-labels", type=int, default=800)
    parser.add_argument("--candidates", type=int, default=200, help="shortlist the queue ranks per round")
    parser.add_argument("--target", type=float, help="accuracy to reach (default: 97 %% of all-labels)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    x, y, x_test, y_test, classes = pooled_features(ensure_dataset(args.data))
    feature_seconds = time.perf_counter() - t0
    full = float((probabilities(x_test, fit_proxy(x, y, len(classes))).argmax(axis=1) == y_test).mean())
    target = args.target or round(0.97 * full, 4)
    print(f"proxy with all {len(y)} training cells labelled: {full:.4f}; target {target:.4f}")
    curves: dict[str, dict[int, list[dict]]] = {"random": {}, "active": {}}
    for seed in args.seeds:
        for order in curves:
            curves[order][seed] = simulate(order, seed, x, y, x_test, y_test, classes, args)
            reached = labels_to_reach(curves[order][seed], target)
            print(f"seed {seed} {order:>6}: " + " ".join(f"{p['accuracy']:.3f}" for p in curves[order][seed])
                  + f"  → target at {reached} labels", flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for order, by_seed in curves.items():
        acc = np.array([[p["accuracy"] for p in c] for c in by_seed.values()])
        per_seed = [labels_to_reach(c, target) for c in by_seed.values()]
        summary[order] = {
            "mean_accuracy_by_labels": dict(zip([p["labels"] for p in next(iter(by_seed.values()))],
                                                np.round(acc.mean(axis=0), 4).tolist(), strict=True)),
            "labels_to_target_per_seed": per_seed,
            "labels_to_target_median": _median_labels(per_seed),
            "mean_accuracy_area": round(float(acc.mean()), 4),
        }
    print(f"\nlabels to reach {target:.4f}: random {summary['random']['labels_to_target_per_seed']}, "
          f"active {summary['active']['labels_to_target_per_seed']}")
    print("mean accuracy by labels (random | active):")
    for n, a in summary["random"]["mean_accuracy_by_labels"].items():
        print(f"  {n:>4}  {a:.4f} | {summary['active']['mean_accuracy_by_labels'][n]:.4f}")
    path = write_result("active_learning", {
        "machine": machine(),
        "protocol": "ELPV train split as the unlabelled pool, test split scored; proxy model = frozen "
                    "EfficientNet-Lite0 trunk (160 px, average pooled) + calibrated logistic regression",
        "settings": {k: v for k, v in vars(args).items() if k != "data"},
        "feature_seconds": round(feature_seconds, 1), "all_labels_accuracy": round(full, 4), "target": target,
        "summary": summary, "curves": {o: {str(s): c for s, c in by.items()} for o, by in curves.items()},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
