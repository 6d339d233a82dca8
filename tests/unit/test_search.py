"""The recipe search of ``appliance train``: it never reads the test split, keeps to its time budget,
never ships a recipe over the latency limit, and ``--recipe`` still bypasses it."""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from appliance.cli import app
from appliance.dataset import HeadSpec, Sample, write_dataset
from appliance.errors import UserError
from appliance.model_package import read_card
from appliance.training import search
from appliance.training.candidates import (
    Candidate,
    DataProfile,
    decided_accuracy,
    parse_budget,
    plan,
    refinements,
    sides,
)
from appliance.training.recipe import TrainRecipe
from appliance.training.search import OutOfBudget, _Watch, search_and_train
from appliance.training.search_cost import CostModel, calibrate
from tests.drawn_parts import draw_part

PER_CLASS = 24
HEADS = [HeadSpec(name="defect_type", classes=["none", "scratch", "spot"]),
         HeadSpec(name="severity", classes=["minor", "major"], ordinal=True)]
FINE = TrainRecipe(image_size=64, frozen_blocks=12, epochs=4, patience=4, min_steps=1, batch_size=16, lr=3e-3,
                   flip_vertical=False)
POOLED = TrainRecipe(method="pooled_features", image_size=64, pooled_blocks=[5, 10, 13], hidden_units=32,
                     epochs=6, min_steps=1, batch_size=16, lr=3e-3, flip_vertical=False)
TINY = [Candidate("fine", FINE, "top blocks"), Candidate("pooled", POOLED, "pooled maps"),
        Candidate("pooled balanced", POOLED.model_copy(update={"class_balance": 1.0}), "cached features again")]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Correctness, not speed: one torch thread keeps these runs short on a machine shared with other
    jobs (two OpenMP threads that compete for two busy cores run several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    (root / "img").mkdir()
    rng = np.random.default_rng(3)
    samples = []
    for kind in HEADS[0].classes:
        for i in range(PER_CLASS):
            path = root / "img" / f"{kind}_{i:03d}.png"
            draw_part(kind, i % 2 == 1, rng).save(path)
            labels = {"defect_type": kind}
            if kind != "none":
                labels["severity"] = "major" if i % 2 else "minor"
            samples.append(Sample(image=path, labels=labels, split="test" if i % 4 == 3 else "train"))
    write_dataset(root, HEADS, samples, name="search")
    return root


def _poisoned(dataset: Path, into: Path) -> Path:
    """A copy whose test rows carry shuffled labels and whose test images are not images at all:
    reading either would change the search or make it fail."""
    shutil.copytree(dataset, into)
    with (into / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    test = [r for r in rows if r["split"] == "test"]
    rng = np.random.default_rng(0)
    for r, kind in zip(test, rng.permutation([r["defect_type"] for r in test]), strict=True):
        r["defect_type"], r["severity"] = str(kind), "major" if r["severity"] != "major" else "minor"
        (into / r["image"]).write_bytes(b"not an image")
    with (into / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return into


def _quiet(_: str) -> None:
    pass


@pytest.mark.slow
def test_poisoned_test_rows_change_nothing(dataset: Path, tmp_path: Path) -> None:
    clean = search_and_train(dataset, tmp_path / "clean", 300, 1000, candidates=TINY, say=_quiet)
    poisoned = search_and_train(_poisoned(dataset, tmp_path / "poisoned"), tmp_path / "m2", 300, 1000,
                                candidates=TINY, say=_quiet)
    a, b = clean.training["search"], poisoned.training["search"]
    assert a["winner"] == b["winner"]
    assert [r["status"] for r in a["candidates"]] == ["done"] * len(TINY)
    scores = {r["name"]: (r["score"], r["val"]) for r in a["candidates"]}
    assert scores == {r["name"]: (r["score"], r["val"]) for r in b["candidates"]}
    assert clean.metrics == poisoned.metrics
    # The balanced variant ran on the pooled candidate's cached features: nothing new to extract.
    assert {r["name"]: r["views_to_extract"] for r in a["candidates"]}["pooled balanced"] == {"train": 0, "val": 0}
    assert a["test_rows_untouched"] == b["test_rows_untouched"] == 3 * PER_CLASS // 4
    # The package is the winner's, with its measured latency in the card.
    card = read_card(tmp_path / "clean")
    assert card.training["recipe"] == next(c.recipe for c in TINY if c.name == a["winner"]).model_dump()
    assert 0 < card.training["latency"]["p50_ms"] <= card.training["latency"]["p99_ms"]
    assert card.training["latency"]["p99_ms"] <= card.training["latency"]["p99_unfiltered_ms"]
    assert card.training["latency"]["runs"] >= 100 and card.training["latency"]["batch"] == 1


def _optimistic(*args: object, **kwargs: object) -> CostModel:
    """The real calibration with rates 100× too low: every candidate looks as if it fits."""
    cost = calibrate(*args, **kwargs)  # type: ignore[arg-type]
    cost.extract_s_per_mac /= 100
    cost.train_s_per_mac /= 100
    return cost


SLOW = [Candidate(f"slow{k}", FINE.model_copy(update={"epochs": 60, "patience": 60, "min_steps": 600,
                                                      "lr": 1e-3 * k}), "too many epochs for the budget")
        for k in (1, 2, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("estimates", ["measured", "far too optimistic"])
def test_budget_is_kept(estimates: str, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates that cannot fit are skipped; with estimates 100× too low they start, and are stopped."""
    if estimates != "measured":
        monkeypatch.setattr(search, "calibrate", _optimistic)
    slow = SLOW
    budget = 30.0
    t = time.perf_counter()
    card = search_and_train(dataset, tmp_path / "m", budget, 1000, candidates=[TINY[1], *slow], say=_quiet)
    wall = time.perf_counter() - t
    assert wall <= 1.1 * budget
    records = card.training["search"]["candidates"]
    statuses = {r["name"]: r["status"] for r in records}
    assert statuses["pooled"] == "done" and card.training["search"]["winner"] == "pooled"
    left = {statuses[c.name] for c in slow}
    assert left <= {"skipped", "stopped", "done"} and left != {"done"}, records
    if estimates != "measured":
        assert "stopped" in left, records


@pytest.mark.slow
def test_a_first_candidate_that_cannot_finish_is_shortened_to_fit(dataset: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "calibrate", _optimistic)
    budget = 30.0
    t = time.perf_counter()
    card = search_and_train(dataset, tmp_path / "m", budget, 1000, candidates=SLOW[:1], say=_quiet)
    assert time.perf_counter() - t <= 1.1 * budget
    records = card.training["search"]["candidates"]
    assert [r["status"] for r in records] == ["stopped", "done"], records
    short = records[1]
    assert short["name"].startswith("slow1 shortened to") and short["views_to_extract"] == {"train": 0, "val": 0}
    assert 1 <= card.training["recipe"]["epochs"] < SLOW[0].recipe.epochs
    assert card.training["search"]["winner"] == short["name"]


@pytest.mark.slow
def test_a_recipe_over_the_latency_limit_is_never_chosen(dataset: Path, tmp_path: Path) -> None:
    weak = Candidate("weak", FINE.model_copy(update={"epochs": 1, "lr": 1e-6}), "barely trained, fast")
    strong = Candidate("strong", POOLED.model_copy(update={"image_size": 96}), "better, slower")

    def latency(package: Path, images: list[np.ndarray]) -> dict[str, float]:
        ms = 50.0 if read_card(package).input.height == 96 else 2.0
        return {"p50_ms": ms, "p99_ms": ms, "runs": 100, "batch": 1, "threads": 1}

    card = search_and_train(dataset, tmp_path / "m", 300, 10, candidates=[weak, strong], say=_quiet,
                            latency=latency)
    records = {r["name"]: r for r in card.training["search"]["candidates"]}
    assert records["strong"]["score"] > records["weak"]["score"]  # it would have won
    assert records["strong"]["status"] == "over latency"
    assert card.training["search"]["winner"] == "weak" and card.training["latency"]["p99_ms"] == 2.0
    with pytest.raises(UserError, match="no recipe meets --max-latency-ms 1: the fastest, strong"):
        search_and_train(dataset, tmp_path / "none", 300, 1, candidates=[strong], say=_quiet, latency=latency)


def test_the_cli_recipe_skips_the_search(dataset: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("image_size: 64\nframe_blocks: 12\n")
    typo = CliRunner().invoke(app, ["train", "--data", str(dataset), "--out", str(tmp_path / "x"),
                                    "--recipe", str(recipe)])
    assert typo.exit_code == 2 and "frame_blocks" in typo.output  # a recipe is validated, not searched
    recipe.write_text("image_size: 64\nfrozen_blocks: 14\nepochs: 1\nmin_steps: 1\nbatch_size: 16\n")
    result = CliRunner().invoke(app, ["train", "--data", str(dataset), "--out", str(tmp_path / "m"),
                                      "--recipe", str(recipe), "--budget", "1s"])
    assert result.exit_code == 0, result.output
    card = read_card(tmp_path / "m")
    assert "search" not in card.training and card.training["recipe"]["frozen_blocks"] == 14


@pytest.mark.parametrize("budget", ["10x", "0", "-5m", "", "m", "25h"])
def test_a_bad_budget_is_refused_by_name(budget: str, dataset: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--data", str(dataset), "--out", str(tmp_path / "m"),
                                      "--budget", budget])
    assert result.exit_code == 2 and "--budget" in result.output
    assert not (tmp_path / "m").exists()


def test_a_budget_too_small_for_any_recipe_says_so(dataset: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--data", str(dataset), "--out", str(tmp_path / "m"),
                                      "--budget", "2s"])
    assert result.exit_code == 2 and "too small" in result.output, result.output


def test_budget_units() -> None:
    assert [parse_budget(t) for t in ("90", "90s", "10m", "1.5h")] == [90, 90, 600, 5400]


def test_candidates_follow_the_data() -> None:
    small = DataProfile(train_images=120, val_images=20, side=96, square=True, classes=4, uneven=1.0)
    large = DataProfile(train_images=1600, val_images=300, side=300, square=False, classes=4, uneven=5.0)
    assert sides(small) == [96] and sides(large) == [160, 224, 300]
    names = [c.name for c in plan(small)]
    assert names == ["pooled-96", "finetune2-96"]  # 30 images per class: two blocks, no upsampling
    big = plan(large)
    assert {c.recipe.image_size for c in big} == {160, 224, 300}
    assert "finetune5-160" in [c.name for c in big]
    native = next(c for c in big if c.name == "pooled-300")
    assert 4 in native.recipe.pooled_blocks  # a stride-8 map where the images have the detail
    refined = [c.name for c in refinements(big[0], large)]
    assert refined == ["pooled-160 balance 0.7", "pooled-160 balance 0.0"]  # uneven classes, not square
    assert [c.name for c in refinements(plan(small)[0], small)] == ["pooled-96 linear", "pooled-96 rot90"]



def test_a_run_predicted_to_end_past_the_deadline_is_stopped() -> None:
    start = time.perf_counter()
    slow = _Watch(deadline=start + 60, tail=5, say=_quiet)
    slow("train", 0.0)
    slow.since = start - 40  # 40 % took 40 s: 60 s more ends past the deadline
    with pytest.raises(OutOfBudget, match="train would end"):
        slow("train", 0.4)
    on_time = _Watch(deadline=start + 60, tail=5, say=_quiet)
    on_time("train", 0.0)
    on_time.since = start - 10  # 10 s for 40 %: 15 s more fits
    on_time("train", 0.4)
    with pytest.raises(OutOfBudget):
        _Watch(deadline=start - 1, tail=0, say=_quiet)("features (train)", 0.0)


def test_the_score_is_the_accuracy_of_the_parts_the_line_decides() -> None:
    confidence = np.array([0.9, 0.2, 0.8, 0.3])
    correct = np.array([True, True, True, False])
    assert decided_accuracy(confidence, correct, share=0.25) == pytest.approx(2 / 3)  # 0.2 held
    assert decided_accuracy(confidence, correct, share=0.5) == 1.0
    assert decided_accuracy(confidence, correct, share=0.0) == 0.75
