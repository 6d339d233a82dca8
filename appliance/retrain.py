"""Retraining from verified labels, in its own low-priority process.

The daemon (sole owner of DuckDB) writes a job folder: ``dataset/`` = the base dataset's rows
plus every verified review label whose image was archived (as extra ``train`` rows), and
``job.json``.  It then starts ``appliance retrain-worker --job DIR`` at nice 10 / idle I/O
priority, so the line keeps its latency while the worker trains.  The worker reports progress
in ``progress.json`` and leaves the candidate package in ``candidate/``; the daemon registers
it and runs the validation gate.  Promotion stays a person's decision.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.dataset import load_dataset
from appliance.errors import UserError
from appliance.gate import run_gate

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)
PROGRESS_FILE = "progress.json"
NICE = 10
PROGRESS_EVERY_S = 0.5


def build_training_set(job: Path, base: Path, labels: list[dict[str, Any]], archive: Path,
                       image_refs: dict[str, str | None], holdout: Path | None = None) -> dict[str, int]:
    """Write ``job/dataset``: the base rows plus verified labels as extra training rows.

    ``labels`` are current, verified label rows (result_id, head, label); ``image_refs`` maps each
    result to its archived image.  Labels of results whose image was not kept are skipped, and so
    are images identical to one of ``holdout``'s test images: the gate judges the candidate on
    those, so it must not have trained on them (a line replaying the holdout, as the demo does).
    """
    base_ds = load_dataset(base)
    root = job / "dataset"
    root.mkdir(parents=True, exist_ok=True)
    for name, target in (("base", base.resolve()), ("archive", archive.resolve())):
        link = root / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    if (base / "dataset.yaml").is_file():
        shutil.copy(base / "dataset.yaml", root / "dataset.yaml")
    heads = [h.name for h in base_ds.heads]
    by_result: dict[str, dict[str, str]] = defaultdict(dict)
    for row in labels:
        if row["head"] in heads:
            by_result[row["result_id"]][row["head"]] = row["label"]
    counts = {"base_rows": len(base_ds.samples), "verified_parts": 0, "skipped_no_image": 0,
              "skipped_in_holdout": 0}
    held_out: set[str] = set()
    if holdout is not None:  # the rows the gate evaluates: the test split, or every row without splits
        gate_ds = load_dataset(holdout)
        held_out = {_sha256(s.image) for s in (gate_ds.split("test") if gate_ds.has_splits else gate_ds.samples)}
    with (root / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", *heads, "split"])
        for s in base_ds.samples:
            rel = s.image.relative_to(base)  # not resolved: dataset images may be symlinks elsewhere
            writer.writerow([f"base/{rel.as_posix()}", *(s.labels.get(h, "") for h in heads), s.split or ""])
        for result_id, head_labels in sorted(by_result.items()):
            ref = image_refs.get(result_id)
            if not ref or not (archive / ref).is_file():
                counts["skipped_no_image"] += 1
                continue
            if _sha256(archive / ref) in held_out:
                counts["skipped_in_holdout"] += 1
                continue
            writer.writerow([f"archive/{ref}", *(head_labels.get(h, "") for h in heads), "train"])
            counts["verified_parts"] += 1
    return counts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_progress(job: Path, **state: Any) -> None:
    tmp = job / f".{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps({**state, "updated_at": datetime.now(UTC).isoformat()}))
    os.replace(tmp, job / PROGRESS_FILE)


def read_progress(job: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((job / PROGRESS_FILE).read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def run_worker(job: Path) -> None:
    """The worker process: train on ``job/dataset`` and leave the package in ``job/candidate``."""
    from appliance.training.recipe import TrainRecipe
    from appliance.training.train import train_model

    spec = json.loads((job / "job.json").read_text())
    recipe = TrainRecipe.model_validate(spec.get("recipe") or {})
    write_progress(job, phase="training", progress=0.0, message="extracting features and training")

    last = 0.0

    def report(phase: str, fraction: float) -> None:
        nonlocal last
        if time.monotonic() - last >= PROGRESS_EVERY_S or fraction >= 1.0:
            last = time.monotonic()
            write_progress(job, phase=phase, progress=round(fraction, 4), message=phase)

    card = train_model(job / "dataset", job / "candidate", recipe, parent_version=spec.get("parent_version"),
                       progress=report)
    write_progress(job, phase=TRAINED, progress=1.0, message=f"candidate {card.version}",
                   candidate_version=card.version)


QUEUED, CLAIMED, TRAINED, FAILED = "queued", "claimed", "trained", "failed"
SERVICE_POLL_S = 2.0


def serve_jobs(retrain_dir: Path, stop: Callable[[], bool]) -> None:
    """The retraining service: run queued jobs one at a time until ``stop()``."""
    while not stop():
        for job in sorted(retrain_dir.glob("*/job.json")):
            folder = job.parent
            if read_progress(folder).get("phase") != QUEUED:
                continue
            write_progress(folder, phase=CLAIMED, progress=0.0, message="picked up by the retraining service")
            log.info("retraining job %s started", folder.name)
            try:
                run_worker(folder)
            except Exception as exc:  # report any failure to the daemon instead of dying with it
                log.exception("retraining job %s failed", folder.name)
                write_progress(folder, phase=FAILED, progress=0.0, message=f"{type(exc).__name__}: {exc}")
        time.sleep(SERVICE_POLL_S)


def lower_priority() -> None:
    """In the child before exec: CPU nice 10 and, on Linux, the idle I/O class."""
    os.nice(NICE)
    if sys.platform == "linux":
        import ctypes

        ioprio_class_idle, ioprio_who_process = 3, 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(251, ioprio_who_process, 0, ioprio_class_idle << 13)  # ioprio_set on x86-64


@dataclass(slots=True)
class RetrainJob:
    job_id: str
    folder: Path
    started_by: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    state: str = "running"
    message: str = ""
    candidate_version: str | None = None
    gate: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None

    def status(self) -> dict[str, Any]:
        progress = read_progress(self.folder)
        return {"job_id": self.job_id, "state": self.state, "phase": progress.get("phase", "starting"),
                "progress": 1.0 if self.state == "done" else progress.get("progress", 0.0),
                "message": self.message or progress.get("message", ""), "started_by": self.started_by,
                "started_at": self.started_at.isoformat(), "training_set": self.counts,
                "candidate_version": self.candidate_version, "gate": self.gate}


class Retrainer:
    """At most one retraining job at a time, owned by the daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.job: RetrainJob | None = None
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        return self.job.status() if self.job else {"state": "idle"}

    async def start(self, by: str) -> RetrainJob:
        cfg = self.daemon.config
        if self.job is not None and self.job.state == "running":
            raise UserError(f"retraining {self.job.job_id} is still running")
        base = cfg.registry.base_dataset
        if base is None:
            raise UserError("registry.base_dataset is not set: retraining needs the base dataset")
        store = self.daemon.store
        await asyncio.to_thread(store.flush)
        labels = await asyncio.to_thread(store.labels, verified=True)
        refs = await asyncio.to_thread(store.image_refs, sorted({row["result_id"] for row in labels}))
        job_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        folder = cfg.state_dir / "retrain" / job_id
        holdout = cfg.resolve(cfg.registry.holdout) if cfg.registry.holdout is not None else None
        counts = await asyncio.to_thread(build_training_set, folder, cfg.resolve(base), labels,
                                         self.daemon.archive.root, refs, holdout)
        champion = self.daemon.classifier.version if self.daemon.classifier else None
        recipe: dict[str, Any] = {}
        if cfg.registry.retrain_recipe is not None:
            from appliance.yamlio import load_yaml_with_lines

            recipe, _ = load_yaml_with_lines(cfg.resolve(cfg.registry.retrain_recipe))
        (folder / "job.json").write_text(json.dumps({"parent_version": champion, "recipe": recipe or {}}))
        self.job = RetrainJob(job_id, folder, by, counts=counts)
        if cfg.registry.retrain_runner == "service":
            write_progress(folder, phase=QUEUED, progress=0.0,
                           message="waiting for appliance-retrain.service")
        else:
            write_progress(folder, phase="starting", progress=0.0, message="starting the training process")
            with (folder / "worker.log").open("wb") as log_file:
                self.job.process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "appliance", "retrain-worker", "--job", str(folder),
                    stdout=log_file, stderr=asyncio.subprocess.STDOUT, preexec_fn=lower_priority)
        self._task = asyncio.create_task(self._follow(self.job), name="retrain")
        log.info("retraining %s started by %s: %s", job_id, by, counts)
        return self.job

    async def _follow(self, job: RetrainJob) -> None:
        started = time.monotonic()
        if job.process is not None:
            code = await job.process.wait()
            failure = None
            if code != 0:
                tail = (job.folder / "worker.log").read_text(errors="replace").strip().splitlines()[-3:]
                failure = f"training process exited with {code}: " + " | ".join(tail)
        else:  # queued for the retraining service
            while (phase := read_progress(job.folder).get("phase")) not in (TRAINED, FAILED):
                await asyncio.sleep(1.0)
            failure = read_progress(job.folder).get("message") if phase == FAILED else None
        if failure is not None:
            job.state, job.message = "failed", failure
            log.error("retraining %s failed: %s", job.job_id, job.message)
            return
        try:
            card = await asyncio.to_thread(self.daemon.registry.register, job.folder / "candidate")
            job.candidate_version = card.version
            cfg = self.daemon.config
            if cfg.registry.holdout is not None and self.daemon.classifier is not None:
                write_progress(job.folder, phase="gate", progress=1.0, message="running the validation gate")
                verdict = await asyncio.to_thread(
                    run_gate, self.daemon.registry.path(card.version), self.daemon.classifier.package_dir,
                    cfg.resolve(cfg.registry.holdout), cfg.registry.gate_margin)
                job.gate = verdict.to_dict()
            job.state = "done"
            job.message = (f"candidate {card.version} registered after {time.monotonic() - started:.0f} s"
                           + ("" if job.gate is None else
                              f"; gate {'passed' if job.gate['passed'] else 'failed'}"))
            log.info("retraining %s: %s", job.job_id, job.message)
        except UserError as exc:
            job.state = "failed"
            job.message = str(exc)

    async def stop(self) -> None:
        if self.job is not None and self.job.process is not None and self.job.process.returncode is None:
            self.job.process.terminate()
            try:
                await asyncio.wait_for(self.job.process.wait(), 10)
            except TimeoutError:
                self.job.process.kill()
        if self._task is not None:
            self._task.cancel()
