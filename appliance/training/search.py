"""``appliance train`` without ``--recipe``: try candidate recipes within a time budget and ship
the best one the line can afford.

1. The rows are chosen once, by :func:`select_rows` like every training run: the ``test`` split
   is counted and never read; candidates train on the training rows and are scored on the
   validation rows (the ``val`` split, else a stratified share of ``train``).
2. A short calibration measures this machine's rates (:mod:`search_cost`); each candidate's
   cost and bs1 latency are estimated before it runs.  The cheapest candidate left runs next; one
   whose estimate does not fit the time left, or whose latency estimate is far over the limit, is
   skipped; one that would run past the budget is stopped.
3. Candidates share the frozen trunk's cached features (:class:`FeatureCache`) when they share a
   trunk, resolution and views.  Stage one tries representations (:func:`plan`), stage two refines
   the best one (:func:`refinements`).
4. Every finished candidate is a complete package: its validation score comes from its card and
   its latency is measured on the exported ONNX through the line's classifier.  The winner is the
   best score among those within ``max_latency_ms`` (ties: the earlier, simpler candidate).
5. The winner's package is shipped as trained, not retrained on train + val: its early stopping
   and its temperature calibration need rows it did not train on, and a retrain would cost the
   budget a second fit.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from appliance.dataset import load_dataset
from appliance.errors import UserError
from appliance.inference import Classifier
from appliance.model_package import ModelCard, new_version, write_card
from appliance.training.candidates import SCORE, Candidate, decided_accuracy, plan, profile, refinements
from appliance.training.data import Layout, check_trainable, detect_layout, label_matrix, loader, select_rows
from appliance.training.features import FeatureCache, inference_views, trunk_key, views
from appliance.training.recipe import TrainRecipe
from appliance.training.search_cost import CLOCK_NAME, DAEMON_THREADS, CostModel, LatencyFn, calibrate, measure_latency
from appliance.training.train import train_model

LATENCY_SKIP = 1.0
"""A candidate whose estimated (median) latency is this many times the limit is not trained."""
FINISH_S = 1.0
"""Kept back for moving the winner into place."""
LATENCY_IMAGES = 20
SCORE_CHUNK = 32
SHORTENED_FILL = 0.7
"""A shortened candidate plans its training for this share of the time left."""
Say = Callable[[str], None]


class OutOfBudget(Exception):
    """Raised from the progress callback to stop a candidate that would run past the budget."""

    def __init__(self, message: str, stage: str, stage_s: float | None) -> None:
        super().__init__(message)
        self.stage, self.stage_s = stage, stage_s
        """The stage, and what all of it was predicted to take (None: too early to tell)."""


class _Watch:
    """Progress callback: stops the run once it is predicted to end after ``deadline``."""

    def __init__(self, deadline: float, tail: float, say: Say) -> None:
        self.deadline, self.tail, self.say = deadline, tail, say
        self.stage = ""
        self.since = self.first = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self.since, self.first = stage, now, fraction
            self.say(f"      {stage} …")
        left, whole = 0.0, None
        if fraction - self.first >= 0.1:
            whole = (now - self.since) / (fraction - self.first)
            left = whole * (1 - fraction)
        if now + left + self.tail > self.deadline:
            raise OutOfBudget(f"{stage} would end {now + left + self.tail - self.deadline:.0f} s past the budget",
                              stage, whole)


def search_and_train(data: Path, out: Path, budget_s: float = 600.0, max_latency_ms: float = 10.0, *,
                     parent_version: str | None = None, say: Say = print,
                     candidates: Sequence[Candidate] | None = None,
                     latency: LatencyFn = measure_latency, started: float | None = None) -> ModelCard:
    """Search recipes for the dataset ``data`` within ``budget_s`` seconds (all of this call) and
    write the best package whose bs1 p99 latency is within ``max_latency_ms`` into ``out``.

    ``candidates`` replaces the derived list and its refinements (tests); ``latency`` measures a
    package (tests inject their own); ``started`` (``time.perf_counter()``) is when the budget began,
    if before this call."""
    started = time.perf_counter() if started is None else started
    deadline = started + budget_s - FINISH_S
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new package folder")
    dataset = load_dataset(data)
    base = TrainRecipe()
    rows = select_rows(dataset, base.val_fraction, base.seed)
    check_trainable(dataset, rows, label_matrix(rows.train, dataset.heads), label_matrix(rows.val, dataset.heads))
    if candidates and any((c.recipe.val_fraction, c.recipe.seed) != (base.val_fraction, base.seed)
                          for c in candidates):
        raise ValueError("every candidate must validate on the same rows (default val_fraction and seed)")
    prof = profile(dataset, rows)
    train_paths, val_paths = [s.image for s in rows.train], [s.image for s in rows.val]
    layout = detect_layout(train_paths + val_paths)
    load = loader(layout)
    stage_one = list(candidates) if candidates is not None else plan(prof)
    say(f"search: budget {budget_s:.0f} s, latency ≤ {max_latency_ms:g} ms (bs1 p99 {CLOCK_NAME}, {DAEMON_THREADS} "
        "thread); "
        f"{prof.train_images} training / {prof.val_images} validation images ({rows.val_source}), "
        f"{rows.held_out} test images not read; short side {prof.side} px, {prof.classes} classes at most")
    threads = torch.get_num_threads()
    try:  # the calibration picks the threads for the search
        search = _calibrated(data, parent_version, say, layout, load, (train_paths, val_paths),
                             label_matrix(rows.val, dataset.heads), stage_one, latency, max_latency_ms, deadline,
                             budget_s - (time.perf_counter() - started))
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".search-", dir=out.parent) as tmp:
            search.run(stage_one, Path(tmp))
            if candidates is None and search.best is not None:
                search.run(refinements(search.best[0], prof), Path(tmp), rank=len(stage_one))
            if search.best is None:
                raise UserError(search.nothing_chosen())
            winner, package, card = search.best
            out.mkdir(parents=True, exist_ok=True)
            for item in package.iterdir():
                shutil.move(item, out / item.name)
    finally:
        torch.set_num_threads(threads)
    card.version = new_version(salt=str(out.resolve()))
    total = time.perf_counter() - started
    card.training["latency"] = {**search.latencies[winner.name], "clock": CLOCK_NAME}
    card.training["search"] = {
        "budget_s": budget_s, "max_latency_ms": max_latency_ms, "score": SCORE, "validation": rows.val_source,
        "test_rows_untouched": rows.held_out, "profile": asdict(prof),
        "calibration": {"seconds": round(search.cost.calibration_s, 1), "threads": search.cost.threads},
        "candidates": search.records, "winner": winner.name, "seconds": round(total, 1),
    }
    write_card(out, card)
    say(f"winner: {winner.name} (validation score {search.scores[winner.name]:.4f}, "
        f"p99 {card.training['latency']['p99_ms']} ms); search took {total:.0f} s of {budget_s:.0f}")
    return card


def _calibrated(data: Path, parent_version: str | None, say: Say, layout: Layout, load: Callable[[Path], np.ndarray],
                paths: tuple[list[Path], list[Path]], y_val: np.ndarray, stage_one: list[Candidate],
                latency: LatencyFn, limit_ms: float, deadline: float, left: float) -> _Search:
    """Calibrate the cost model; refuse a budget that cannot fit the cheapest candidate."""
    cost = calibrate(layout, load, paths[0], side=min(c.recipe.image_size for c in stage_one))
    say(f"calibration: {cost.calibration_s:.1f} s, {cost.threads} training thread(s)")
    need = cost.calibration_s + _cheapest(cost, stage_one, len(paths[0]), len(paths[1]))
    if left < need:
        raise UserError(f"--budget is too small for this dataset: the cheapest recipe needs about {need:.0f} s "
                        "here; give a larger --budget or a --recipe")
    return _Search(data, parent_version, say, cost, FeatureCache(), latency, limit_ms, deadline,
                   [load(p) for p in paths[1][:LATENCY_IMAGES]], layout, paths, load, y_val)


def _cheapest(cost: CostModel, candidates: Sequence[Candidate], n_train: int, n_val: int) -> float:
    return min(sum(cost.stages(c.recipe, n_train, n_val, (len(views(c.recipe)), 1)).values()) for c in candidates)


class _Search:
    """The candidates' loop and its record (one dict per candidate, in the order they were decided)."""

    def __init__(self, data: Path, parent_version: str | None, say: Say, cost: CostModel, cache: FeatureCache,
                 latency: LatencyFn, limit_ms: float, deadline: float, images: list, layout: str,
                 paths: tuple[list[Path], list[Path]], load: Callable[[Path], np.ndarray], y_val: np.ndarray) -> None:
        self.data, self.parent_version, self.say, self.cost, self.cache = data, parent_version, say, cost, cache
        self.latency, self.limit_ms, self.deadline, self.images = latency, limit_ms, deadline, images
        self.layout, self.paths, self.load, self.y_val = layout, paths, load, y_val
        self.scores: dict[str, float] = {}
        self.records: list[dict] = []
        self.latencies: dict[str, dict[str, float]] = {}
        self.best: tuple[Candidate, Path, ModelCard] | None = None
        self._best_key: tuple[float, int] | None = None
        self._count = 0

    def missing(self, r: TrainRecipe) -> tuple[int, int]:
        """Views of the training and validation images that are not cached for ``r``'s trunk."""
        key = trunk_key(r, self.layout)
        return (len(self.cache.missing(key, self.paths[0], views(r))),
                len(self.cache.missing(key, self.paths[1], inference_views(r))))

    def estimate(self, r: TrainRecipe) -> dict[str, float]:
        return self.cost.stages(r, len(self.paths[0]), len(self.paths[1]), self.missing(r))

    def run(self, candidates: list[Candidate], tmp: Path, rank: int = 0) -> None:
        """Run ``candidates`` cheapest first (estimates change as features get cached); a tie in
        score goes to the one listed first (``rank`` counts from the earlier lists)."""
        pending = list(enumerate(candidates, start=rank))
        while pending:
            estimates = [self.estimate(c.recipe) for _, c in pending]
            i = min(range(len(pending)), key=lambda k: sum(estimates[k].values()))
            (order, candidate), estimate = pending.pop(i), estimates[i]
            self._count += 1
            self._try(candidate, estimate, self._record(candidate, estimate), tmp / f"c{self._count}", order)
            if self.best is not None:  # later candidates that can reuse features refine the best
                self.cache.keep_only(trunk_key(self.best[0].recipe, self.layout))

    def _record(self, candidate: Candidate, estimate: dict[str, float]) -> dict:
        """The candidate's entry in the card, appended before it runs and completed as it goes."""
        record = {"name": candidate.name, "why": candidate.why,
                  "recipe": candidate.recipe.model_dump(exclude_defaults=True),
                  "views_to_extract": dict(zip(("train", "val"), self.missing(candidate.recipe), strict=True)),
                  "estimated_s": round(sum(estimate.values()), 1),
                  "estimated_latency_ms": round(self.cost.latency_ms(candidate.recipe), 2)}
        self.records.append(record)
        return record

    def _skip(self, record: dict, status: str, reason: str) -> None:
        record.update(status=status, reason=reason)
        self.say(f"  [{record['name']}] {status}: {reason}")

    def _try(self, candidate: Candidate, estimate: dict[str, float], record: dict, package: Path, order: int,
             retry: bool = True) -> None:
        left = self.deadline - time.perf_counter()
        if record["estimated_latency_ms"] > LATENCY_SKIP * self.limit_ms:
            return self._skip(record, "over latency", f"estimated {record['estimated_latency_ms']} ms, over "
                                                      f"the {self.limit_ms:g} ms limit: not trained")
        if record["estimated_s"] > left:
            return self._skip(record, "skipped",
                              f"needs about {record['estimated_s']:.0f} s, {max(left, 0):.0f} s left")
        self.say(f"  [{candidate.name}] {candidate.why}; about {record['estimated_s']:.0f} s")
        started = time.perf_counter()
        try:
            card = train_model(self.data, package, candidate.recipe, parent_version=self.parent_version,
                               progress=_Watch(self.deadline, estimate["export"], self.say), features=self.cache)
        except OutOfBudget as exc:
            shutil.rmtree(package, ignore_errors=True)
            record["seconds"] = round(time.perf_counter() - started, 1)
            self._skip(record, "stopped", f"{exc} (after {record['seconds']:.0f} s)")
            if retry and self.best is None and exc.stage == "train" and exc.stage_s:
                self._shortened(candidate, exc.stage_s, estimate, package, order)
            return None
        lat = self.latency(package, self.images)
        seconds = time.perf_counter() - started
        stages = dict(card.training["seconds"])
        stages["export"] = stages.get("export", 0.0) + seconds - stages["total"]  # + loading and latency runs
        self.cost.learn(estimate, stages)
        self.cost.learn_latency(candidate.recipe, lat["p50_ms"])
        decided = self.decided(package, [h.name for h in card.heads])
        score = self.scores[candidate.name] = round(float(np.mean(list(decided.values()))), 4)
        record.update(seconds=round(seconds, 1), stage_seconds={k: round(v, 1) for k, v in stages.items()},
                      score=score, latency_ms=lat,
                      val={h: {"decided_accuracy": round(decided[h], 4), "accuracy": m["accuracy"],
                               "macro_f1": m["macro_f1"]} for h, m in card.metrics["heads"].items()})
        self.latencies[candidate.name] = lat
        heads = ", ".join(f"{h} decided {m['decided_accuracy']:.3f} acc {m['accuracy']:.3f} F1 {m['macro_f1']:.3f}"
                          for h, m in record["val"].items())
        if lat["p99_ms"] > self.limit_ms:
            shutil.rmtree(package)
            return self._skip(record, "over latency", f"score {score:.4f} ({heads}) but p99 {lat['p99_ms']} ms > "
                                                      f"{self.limit_ms:g} ms; {seconds:.0f} s")
        record["status"] = "done"
        self.say(f"  [{candidate.name}] score {score:.4f} ({heads}), p99 {lat['p99_ms']} ms, {seconds:.0f} s "
                 f"({', '.join(f'{k} {v:.0f}' for k, v in record['stage_seconds'].items())})")
        key = (score, -order)
        if self._best_key is None or key > self._best_key:
            if self.best is not None:
                shutil.rmtree(self.best[1])
            self.best, self._best_key = (candidate, package, card), key
        else:
            shutil.rmtree(package)
        return None

    def _shortened(self, candidate: Candidate, train_s: float, estimate: dict[str, float], package: Path,
                   order: int) -> None:
        """Nothing has finished and ``candidate``'s training would not: train it again on its cached
        features with the share of its epochs that fits the time left (the machine may have become
        busier than the calibration saw), so that the search still ships a model."""
        r = candidate.recipe
        share = SHORTENED_FILL * (self.deadline - time.perf_counter() - estimate["export"]) / train_s
        epochs = int(r.epochs * share)
        if epochs < 1:
            return
        recipe = r.model_copy(update={"epochs": epochs, "patience": min(r.patience, epochs),
                                      "min_steps": max(1, int(r.min_steps * share))})
        short = Candidate(f"{candidate.name} shortened to {epochs} epochs", recipe,
                          f"{candidate.name} did not fit the time left")
        estimate = {**estimate, "features": 0.0, "train": train_s * share}
        self._try(short, estimate, self._record(short, estimate), package, order, retry=False)

    def decided(self, package: Path, heads: list[str]) -> dict[str, float]:
        """Per head, :func:`decided_accuracy` of the exported package on the validation images."""
        classifier = Classifier(package, intra_op_threads=torch.get_num_threads())
        paths = self.paths[1]
        confidence, correct = np.zeros((len(paths), len(heads))), np.zeros((len(paths), len(heads)), bool)
        for start in range(0, len(paths), SCORE_CHUNK):
            by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
            images = {i: self.load(paths[i]) for i in range(start, min(start + SCORE_CHUNK, len(paths)))}
            for i, image in images.items():
                by_shape[image.shape].append(i)
            for rows in by_shape.values():
                for i, pred in zip(rows, classifier.classify_batch([images[i] for i in rows]), strict=True):
                    for j, head in enumerate(heads):
                        confidence[i, j] = pred[head].confidence
                        correct[i, j] = pred[head].index == self.y_val[i, j]
        known = self.y_val >= 0
        return {h: decided_accuracy(confidence[known[:, j], j], correct[known[:, j], j]) for j, h in enumerate(heads)}

    def nothing_chosen(self) -> str:
        over = [(r["latency_ms"]["p99_ms"] if "latency_ms" in r else r["estimated_latency_ms"], r["name"])
                for r in self.records if r.get("status") == "over latency"]
        if len(over) == len(self.records):
            ms, name = min(over)
            return (f"no recipe meets --max-latency-ms {self.limit_ms:g}: the fastest, {name}, needs {ms} ms "
                    "(bs1 p99, measured or estimated); allow more latency or give a --recipe")
        reasons = "; ".join(f"{r['name']}: {r.get('reason', '?')}" for r in self.records)
        return f"no recipe finished within the budget ({reasons}); give a larger --budget or a --recipe"
