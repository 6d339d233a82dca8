"""What `appliance demo` prepares before the line starts: the ELPV dataset and a trained model."""

from __future__ import annotations

import shutil
import time

import typer

from appliance.config import AppConfig
from appliance.errors import UserError
from appliance.registry import ModelRegistry


def prepare_demo(cfg: AppConfig) -> None:
    """Import ELPV into the state directory and train + register the demo model if none exists."""
    if cfg.camera.source != "replay" or cfg.camera.replay is None:
        raise UserError("the demo needs a replay camera (camera.source: replay)")
    dataset = cfg.resolve(cfg.camera.replay.path)
    if not (dataset / "labels.csv").is_file():
        from appliance.datasets.elpv import import_elpv

        typer.echo(f"importing the ELPV solar-cell dataset into {dataset} …")
        import_elpv(dataset)
    registry = ModelRegistry(cfg.models_dir)
    if cfg.model.path is not None or registry.champion() is not None:
        return
    try:
        from appliance.training.evaluate import evaluate_model
        from appliance.training.train import train_model
    except ImportError as exc:
        raise UserError(f"no model yet, and training needs the [train] extra ({exc.name} is missing): "
                        "pip install -e '.[train]'") from None
    typer.secho("no model yet: training the demo model from ELPV on this CPU "
                "(transfer learning from ImageNet EfficientNet-Lite0; a few minutes) …", bold=True)
    staging = cfg.models_dir / ".training"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    card = train_model(dataset, staging)
    typer.echo(f"trained model {card.version} in {time.monotonic() - started:.0f} s")
    report = evaluate_model(staging, dataset, "test")
    for head, metrics in report.summary()["heads"].items():
        typer.echo(f"  held-out test {head}: accuracy {metrics['accuracy']:.3f}, "
                   f"macro-F1 {metrics['macro_f1']:.3f}")
    registry.register(staging)
    registry.set_champion(card.version)
    shutil.rmtree(staging, ignore_errors=True)
