"""What `appliance demo` prepares and starts: ELPV, a trained model, demo logins, the dashboard."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

from appliance.config import AppConfig, DispositionConfig
from appliance.errors import UserError
from appliance.registry import ModelRegistry
from appliance.training.metrics import hold_at

CREDENTIALS_FILE = "demo-credentials.json"
DEMO_ROLES = ("operator", "engineer", "admin")
DASHBOARD_APP = Path(__file__).resolve().parents[1] / "dashboard" / "serve.py"  # app.py with security headers


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
        from appliance.gate import run_gate
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
    # the gate with no champion yet: the held-out evaluation is stored with the model (gate.json),
    # so the dashboard's Models page shows the same test figures as printed here
    holdout = cfg.resolve(cfg.registry.holdout) if cfg.registry.holdout else dataset
    verdict = run_gate(staging, None, holdout, cfg.registry.gate_margin)
    for head, metrics in verdict.candidate_metrics.items():
        typer.echo(held_out_summary(head, metrics, cfg.disposition))
    registry.register(staging)
    registry.set_champion(card.version)
    shutil.rmtree(staging, ignore_errors=True)


def held_out_summary(head: str, metrics: dict[str, Any], policy: DispositionConfig) -> str:
    """One head's held-out figures and, for a head that can hold parts, what the line's
    ``min_confidence`` makes of them (from the hold curve)."""
    line = f"  held-out test {head}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    if policy.heads is None or head in policy.heads:
        threshold, held, right = hold_at(metrics["hold_curve"], policy.min_confidence)
        line += (f"; at min_confidence {threshold:.2f} the line holds {held:.0%} for review"
                 + (f" and decides {right:.1%} of the rest right" if right is not None else ""))
    return line


def demo_credentials(cfg: AppConfig) -> dict[str, dict[str, str]]:
    """Logins for the demo: one user per role and an OPC UA operator, made once and kept 0600.

    Nothing here is a default password: each is random, written only to the state directory.
    """
    from appliance.auth import UserStore, write_private

    path = cfg.state_dir / CREDENTIALS_FILE
    users = UserStore(cfg.state_dir / "users.json")
    try:
        creds: dict[str, dict[str, str]] = json.loads(path.read_text())
    except FileNotFoundError:
        creds = {"dashboard": {role: secrets.token_urlsafe(9) for role in DEMO_ROLES},
                 "opcua": {"user": "plc", "password": secrets.token_urlsafe(12)}}
        write_private(path, json.dumps(creds, indent=2).encode())
    known = {u.name for u in users.list()}
    for role, password in creds["dashboard"].items():
        if role not in known:
            users.set(role, role, password)
    os.environ.setdefault("APPLIANCE_OPCUA_USER", creds["opcua"]["user"])
    os.environ.setdefault("APPLIANCE_OPCUA_PASSWORD", creds["opcua"]["password"])
    return creds


def start_dashboard(api_url: str, port: int = 8501) -> subprocess.Popen[bytes] | None:
    """The Streamlit dashboard as a child process (it talks only to the API)."""
    if not DASHBOARD_APP.is_file():
        return None
    env = {**os.environ, "APPLIANCE_API_URL": api_url}
    return subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(DASHBOARD_APP), "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
