"""The figures of bench/results/README.md, drawn from the benchmarks' JSON files (matplotlib, PNG).

Each function returns the file it wrote, or None when its benchmark has not run yet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on an edge PC or in CI
import matplotlib.pyplot as plt

Loader = Callable[[str], dict[str, Any] | None]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curve(load: Loader, out: Path) -> Path | None:
    lc = load("learning_curve")
    if not lc:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x: list[int] = []
    for setting, run in lc["settings"].items():
        s = run["summary"]
        x = [p["per_class"] for p in s]
        (mean,) = ax.plot(x, [p["accuracy_4level_mean"] for p in s], "o-",
                          label=f"accuracy, {setting.replace('_', ' ')}")
        ax.fill_between(x, [p["accuracy_4level_min"] for p in s], [p["accuracy_4level_max"] for p in s],
                        alpha=0.15, color=mean.get_color())  # the seeds' range, in the line's colour
        ax.plot(x, [p["balanced_accuracy_mean"] for p in s], "s--",
                label=f"balanced accuracy, {setting.replace('_', ' ')}")
    if elpv := load("elpv"):
        ax.axhline(elpv["accuracy_4level"], color="grey", ls=":",
                   label=f"all 1,968 training cells: {elpv['accuracy_4level']:.3f}")
        recalls = [r for r in elpv["recall"].values() if r is not None]
        ax.axhline(sum(recalls) / len(recalls), color="grey", ls="-.",
                   label=f"all cells, balanced: {sum(recalls) / len(recalls):.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(v) for v in x])
    ax.set(xlabel="labelled training images per grade", ylabel="ELPV test split", ylim=(0.2, 1.0),
           title="Learning curve (default recipe, 2 CPU cores)")
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, out / "learning_curve.png")


def active_learning(load: Loader, out: Path) -> Path | None:
    al = load("active_learning")
    if not al:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for order, style in (("random", "o--"), ("active", "o-")):
        curve = al["summary"][order]["mean_accuracy_by_labels"]
        ax.plot([int(n) for n in curve], list(curve.values()), style, ms=3,
                label=f"{order} order (median {al['summary'][order]['labels_to_target_median']} labels to target)")
    ax.axhline(al["target"], color="grey", ls=":", label=f"target {al['target']:.3f}")
    ax.set(xlabel="labelled cells", ylabel="4-level accuracy (proxy model)",
           title="Active learning vs random labelling on ELPV")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, out / "active_learning.png")


def latency(load: Loader, out: Path) -> Path | None:
    """p50/p99 of the line's frame → stored latency in each benchmark's conditions."""
    bars: list[tuple[str, float, float]] = []
    if p := load("pipeline"):
        paced = p["paced"]
        bars += [("bare model", p["bare_model_ms"]["p50"], p["bare_model_ms"]["p99"]),
                 (f"line {paced['rate_hz']:.0f}/s", paced["stored_ms"]["p50"], paced["stored_ms"]["p99"])]
    if p := load("swap"):
        bars += [(f"steady {p['rate_hz']:.0f}/s", p["stored_ms_steady"]["p50"], p["stored_ms_steady"]["p99"]),
                 ("during swaps", p["stored_ms_during_swaps"]["p50"], p["stored_ms_during_swaps"]["p99"])]
    if p := load("retrain_load"):
        bars += [(f"idle {p['rate_hz']:.0f}/s", p["stored_ms_idle"]["p50"], p["stored_ms_idle"]["p99"]),
                 ("retraining", p["stored_ms_while_retraining"]["p50"], p["stored_ms_while_retraining"]["p99"])]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 3.8))
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [b[2] for b in bars], 0.4, label="p99")
    ax.set_xticks(list(xs), [b[0] for b in bars], rotation=20, fontsize=8)
    ax.set(ylabel="ms", title="Frame → stored result latency")
    ax.legend()
    return _save(fig, out / "latency.png")


FIGURES = (latency, learning_curve, active_learning)
