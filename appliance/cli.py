"""The ``appliance`` command line.  User mistakes print one clear message and exit 2, no traceback."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from appliance.config import AppConfig, load_config
from appliance.errors import UserError

app = typer.Typer(
    name="appliance", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Edge appliance for visual defect classification: camera → model → disposition → PLC.",
)

T = TypeVar("T")
DEFAULT_CONFIG = Path("configs/default.yaml")
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")]


def _user_errors(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except UserError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _need_training_extra() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError("training needs the [train] extra: pip install -e '.[train]'") from None


@app.command("check-config")
def check_config(file: Annotated[Path, typer.Argument(help="The YAML file to validate.")]) -> None:
    """Validate a configuration file without starting anything: the folders it names must exist, and
    the disposition table must fit the model the line would serve (the registry's champion, else
    model.path)."""
    config = _user_errors(lambda: load_config(file))
    _user_errors(lambda: _folders_exist(file, config))
    model = _user_errors(lambda: _table_fits_model(file, config))
    typer.echo(f"{file}: OK (line {config.line.line_id}, camera '{config.camera.view}' "
               f"from {config.camera.source}, state in {config.state_dir}; {model})")


def _folders_exist(file: Path, config: AppConfig) -> None:
    """The folders `run` opens (replay images) or the gate and retraining read (holdout, base dataset)."""
    from appliance.yamlio import line_of, load_yaml_with_lines

    named: list[tuple[tuple[str, ...], Path | None]] = [(("registry", "holdout"), config.registry.holdout),
                                                         (("registry", "base_dataset"), config.registry.base_dataset)]
    if config.camera.source == "replay" and config.camera.replay is not None:
        named.insert(0, (("camera", "replay", "path"), config.camera.replay.path))
    resolved = [(loc, config.resolve(path)) for loc, path in named if path is not None]
    missing = [(loc, path) for loc, path in resolved if not path.exists()]
    if missing:
        _, lines = load_yaml_with_lines(file)
        raise UserError("\n".join(f"{file}:{line_of(loc, lines) or '?'}: {'.'.join(loc)}: {path} does not exist"
                                   for loc, path in missing))


def _table_fits_model(file: Path, config: AppConfig) -> str:
    """Check the disposition table against the model to be served; what was checked, in words."""
    from appliance.disposition import Disposer
    from appliance.model_package import read_card
    from appliance.registry import ModelRegistry
    from appliance.yamlio import line_of, load_yaml_with_lines

    path = ModelRegistry(config.models_dir).champion_path() or (
        config.resolve(config.model.path) if config.model.path else None)  # as the daemon chooses
    if path is None:
        return f"no model in {config.models_dir} yet: the disposition table is checked against it at start"
    card = read_card(path)
    if problems := Disposer(config.disposition).misfits(card):
        _, lines = load_yaml_with_lines(file)
        raise UserError("\n".join(f"{file}:{line_of(loc, lines) or '?'}: {'.'.join(map(str, loc))}: {problem} "
                                   f"(model {card.version})" for loc, problem in problems))
    return f"the disposition table fits model {card.version}"


@app.command("config-reference")
def config_reference() -> None:
    """Print every configuration key with its type, default, limits and meaning (Markdown)."""
    from appliance.config_reference import render

    typer.echo(render(), nl=False)


@app.command("systemd-network")
def systemd_network(file: Annotated[Path, typer.Argument(help="The line's configuration file.")]) -> None:
    """Print the appliance.service drop-in that lets the config's PLC networks through systemd's IP
    firewall (the unit allows localhost only): IPAddressAllow= for modbus.allowed_clients, and what
    to add by hand for OPC UA, API and GigE camera hosts."""
    from appliance.systemd_network import drop_in

    config = _user_errors(lambda: load_config(file))
    typer.echo(drop_in(config, file), nl=False)


@app.command()
def run(config: Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")] = DEFAULT_CONFIG,
        ) -> None:
    """Run the line: acquire, classify, decide, store and publish until SIGTERM/SIGINT."""
    cfg = _user_errors(lambda: load_config(config))
    _user_errors(lambda: asyncio.run(_serve(cfg)))


async def _serve(cfg: AppConfig, duration: float | None = None,
                 announce: Callable[[Any], None] | None = None,
                 beside: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
    """Run the daemon; ``beside`` is started once it serves and cancelled before it stops."""
    from appliance.daemon import Daemon
    from appliance.logs import setup_logging

    setup_logging(cfg.logging.level, cfg.logging.format)
    daemon = Daemon(cfg)
    await daemon.start()
    companion = asyncio.create_task(beside()) if beside is not None else None
    try:
        if announce is not None:
            announce(daemon)
        if duration is None:
            await daemon.run_until_signalled()
        else:
            stopper = asyncio.create_task(daemon.run_until_signalled())
            await asyncio.wait([stopper], timeout=duration)
            stopper.cancel()
    finally:
        if companion is not None:
            companion.cancel()
            await asyncio.gather(companion, return_exceptions=True)
        await daemon.stop()


@app.command()
def demo(
    config: Annotated[Path, typer.Option("--config", "-c", help="Demo line configuration.")] = DEFAULT_CONFIG,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: run "
                                                        "until Ctrl+C).")] = None,
    dashboard_port: Annotated[int, typer.Option(help="Port of the dashboard.")] = 8501,
    simulated_plc: Annotated[bool, typer.Option(help="Run a simulated PLC that writes a lot and process "
                                                     "values for every part over Modbus (off: drive "
                                                     "Modbus yourself).")] = True,
) -> None:
    """Train the demo model from ELPV if there is none, then run the simulated line."""
    from appliance.demo import CREDENTIALS_FILE, demo_credentials, prepare_demo, start_dashboard
    from appliance.demo_plc import SimulatedProcess, run_simulated_plc
    from appliance.plc.modbus_map import load_register_map

    cfg = _user_errors(lambda: load_config(config))
    _user_errors(lambda: prepare_demo(cfg))
    creds = _user_errors(lambda: demo_credentials(cfg))
    dashboard: Any = None

    def announce(daemon: Any) -> None:
        nonlocal dashboard
        base = f"http://{cfg.api.host}:{daemon.api_port}"
        dashboard = start_dashboard(base, dashboard_port)
        logins = ", ".join(f"{role} / {pw}" for role, pw in creds["dashboard"].items())
        typer.secho("\nline running — the simulated line replays held-out ELPV solar cells", bold=True)
        typer.echo(f"  model      {daemon.classifier.version}  (registry: {cfg.models_dir})")
        if dashboard is not None:
            typer.echo(f"  dashboard  http://127.0.0.1:{dashboard_port}   log in: {logins}")
        typer.echo(f"  HTTP API   {base}/api/v1/health   docs: {base}/docs")
        if cfg.opcua.enabled:
            typer.echo(f"  OPC UA     opc.tcp://{cfg.opcua.host}:{cfg.opcua.port}   SignAndEncrypt, user "
                       f"{os.environ['APPLIANCE_OPCUA_USER']} / {os.environ['APPLIANCE_OPCUA_PASSWORD']}"
                       f"   (trust your client's certificate: README, PLC guide)")
        if cfg.modbus.enabled:
            typer.echo(f"  Modbus TCP {cfg.modbus.host}:{cfg.modbus.port}   unit {cfg.modbus.unit_id}, "
                       "register map: configs/modbus_map.yaml")
        if plc is not None:
            typer.echo(f"  PLC        simulated Modbus client: {process.describe()}")
        typer.echo(f"  metrics    {base}/api/v1/metrics")
        typer.echo(f"  database   {cfg.resolve(cfg.store.path)}  (owned by the daemon; query via the API)")
        typer.echo(f"  logins     {cfg.state_dir / CREDENTIALS_FILE}")
        typer.echo("  stop       Ctrl+C\n")

    plc, process = None, SimulatedProcess()
    if simulated_plc and cfg.modbus.enabled:
        path = cfg.modbus.register_map
        regmap = _user_errors(lambda: load_register_map(cfg.resolve(path) if path else None, cfg.modbus.word_order))
        _user_errors(lambda: process.registers(regmap))  # a map it cannot drive stops the demo here
        plc = functools.partial(run_simulated_plc, cfg.modbus.host, cfg.modbus.port, cfg.modbus.unit_id, regmap,
                                process)

    try:
        _user_errors(lambda: asyncio.run(_serve(cfg, duration, announce, plc)))
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(10)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Dataset folder (labels.csv [+ dataset.yaml]).")],
    out: Annotated[Path, typer.Option(help="Model package folder to write.")],
    recipe: Annotated[Path | None, typer.Option(help="YAML file with TrainRecipe settings: fixes every setting by "
                                                     "hand and skips the search.")] = None,
    budget: Annotated[str, typer.Option(help="Time for the whole recipe search and export, e.g. 90s, 10m, 1h.")]
        = "10m",
    max_latency_ms: Annotated[float, typer.Option(
        min=0.1, help="Largest bs1 p99 latency per part (ms, measured on this machine with the line's threads) "
                      "of a recipe the search may choose.")] = 10.0,
    register: Annotated[Path | None, typer.Option(help="Also register the model in this state "
                                                       "directory's registry.")] = None,
) -> None:
    """Train a multi-head classifier by transfer learning and export the model package.

    Without --recipe, candidate recipes (resolution, method, balance, views) derived from the data
    are tried within --budget, scored on the validation rows (never the test split), and the best
    one within --max-latency-ms is kept; the card's training.search lists them all."""
    started = time.perf_counter()  # the budget covers the whole command
    _user_errors(_need_training_extra)
    from appliance.training.candidates import parse_budget
    from appliance.training.train import TrainRecipe, train_model
    from appliance.yamlio import load_validated

    seconds = _user_errors(lambda: parse_budget(budget))

    def go() -> None:
        if recipe:
            card = train_model(data, out, load_validated(recipe, TrainRecipe))
        else:
            from appliance.training.search import search_and_train

            card = search_and_train(data, out, seconds, max_latency_ms, started=started,
                                    say=lambda line: typer.echo(line, err=True))
        typer.echo(f"model {card.version} written to {out}")
        if register is not None:
            from appliance.registry import ModelRegistry

            ModelRegistry(register / "models").register(out)
            typer.echo(f"registered in {register / 'models'}")

    _user_errors(go)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Model package folder.")],
    data: Annotated[Path, typer.Option(help="Dataset folder; its test split is used when it has one.")],
    split: Annotated[str | None, typer.Option(help="Evaluate this split instead.")] = None,
) -> None:
    """Per-head accuracy, macro-F1 and confusion matrix; last line is JSON."""
    from appliance.training.evaluate import evaluate_model

    def go() -> None:
        report = evaluate_model(model, data, split)
        typer.echo(report.to_text())
        typer.echo(json.dumps(report.summary()))

    _user_errors(go)


@app.command("learning-curve")
def learning_curve_cmd(
    data: Annotated[Path, typer.Option(help="Dataset folder with a train and a test split.")],
    head: Annotated[str | None, typer.Option(help="Head to measure (default: the dataset's first).")] = None,
    per_class: Annotated[list[int] | None, typer.Option(
        help="Labelled images per class; repeat for more budgets (default 25, 50, 100, 200).")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Seed; repeat for more (default 0 and 1).")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML file with TrainRecipe settings.")] = None,
    line_mix: Annotated[bool, typer.Option(
        help="Give the head the class mix of the whole training split as its line frequencies.")] = True,
    out: Annotated[Path | None, typer.Option(help="Also write the whole report here as JSON.")] = None,
) -> None:
    """How many labels a head needs: train on 25/50/100/200 per class, score the test split; last line is JSON."""
    _user_errors(_need_training_extra)
    from appliance.training import learning_curve
    from appliance.training.recipe import TrainRecipe
    from appliance.yamlio import load_validated

    def progress(p: dict[str, Any]) -> None:
        typer.echo(f"{p['per_class']}/class seed {p['seed']}: {p['labelled_images']} images, "
                   f"accuracy {p['accuracy']:.4f}, macro-F1 {p['macro_f1']:.4f} ({p['training_seconds']:.0f} s)")

    def go() -> None:
        report = learning_curve.measure(
            data, head, tuple(per_class or learning_curve.BUDGETS), tuple(seed or learning_curve.SEEDS),
            load_validated(recipe, TrainRecipe) if recipe else None, line_mix, progress)
        typer.echo(learning_curve.to_text(report["head"], report["summary"]))
        if out is not None:
            out.write_text(json.dumps(report, indent=2))
        typer.echo(json.dumps({"head": report["head"], "summary": report["summary"]}))

    _user_errors(go)


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="Model package folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
) -> None:
    """One JSON line per image with each head's class and confidence."""
    from appliance.training.predict import predict_images

    def go() -> int:
        failed = 0
        for line in predict_images(model, images):
            failed += "error" in line
            typer.echo(json.dumps(line))
        return failed

    if _user_errors(go):
        raise typer.Exit(1)


@app.command("retrain-worker", hidden=True)
def retrain_worker(job: Annotated[Path, typer.Option(help="Job folder written by the daemon.")]) -> None:
    """(Started by the daemon) train a candidate from a retraining job folder."""
    _user_errors(_need_training_extra)
    from appliance.retrain import run_worker

    _user_errors(lambda: run_worker(job))


@app.command("retrain-service", hidden=True)
def retrain_service(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """(appliance-retrain.service) run retraining jobs the daemon queues, one at a time."""
    import signal

    from appliance.logs import setup_logging
    from appliance.retrain import serve_jobs

    _user_errors(_need_training_extra)
    cfg = _user_errors(lambda: load_config(config))
    setup_logging(cfg.logging.level, cfg.logging.format)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    _user_errors(lambda: serve_jobs(cfg.state_dir / "retrain", lambda: stopping))


@app.command("import-elpv")
def import_elpv_cmd(out: Annotated[Path, typer.Argument(help="Dataset folder to create.")],
                    seed: int = 0) -> None:
    """Turn the ELPV solar-cell dataset (PyPI elpv-dataset) into the dataset format."""
    from appliance.datasets.elpv import import_elpv

    ds = _user_errors(lambda: import_elpv(out, seed=seed))
    typer.echo(f"{out}: {len(ds.samples)} cells, {len(ds.split('train'))} train / "
               f"{len(ds.split('test'))} test")


users_app = typer.Typer(help="Users and roles (operator < engineer < admin) of the dashboard and API.",
                        no_args_is_help=True)
app.add_typer(users_app, name="user")


def _users(config: Path) -> Any:
    from appliance.auth import UserStore

    cfg = _user_errors(lambda: load_config(config))
    return UserStore(cfg.state_dir / "users.json")


@users_app.command("set")
def user_set(name: str, role: Annotated[str, typer.Option(help="operator, engineer or admin")],
             config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Create a user or change its role and password (asked for, or $APPLIANCE_PASSWORD)."""
    password = os.environ.get("APPLIANCE_PASSWORD") or typer.prompt(
        f"password for {name}", hide_input=True, confirmation_prompt=True)
    store = _users(config)
    _user_errors(lambda: store.set(name, role, password))
    typer.echo(f"user {name}: {role}")


@users_app.command("list")
def user_list(config: ConfigOption = DEFAULT_CONFIG) -> None:
    for u in _users(config).list():
        typer.echo(f"{u.name:<24} {u.role}")


@users_app.command("remove")
def user_remove(name: str, config: ConfigOption = DEFAULT_CONFIG) -> None:
    store = _users(config)
    _user_errors(lambda: store.remove(name))
    typer.echo(f"removed {name}")


@users_app.command("unlock")
def user_unlock(name: str, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Lift a user's log-in lock (after repeated failed log-ins) before it expires."""
    from appliance.login_guard import request_unlock

    cfg = _user_errors(lambda: load_config(config))
    _user_errors(lambda: request_unlock(cfg.state_dir, name))
    typer.echo(f"unlock of {name} requested: the running daemon lifts the lock at {name}'s next log-in "
               "and records it in the audit trail")


ApiOption = Annotated[str, typer.Option(help="The daemon's API base URL.")]
UserOption = Annotated[str | None, typer.Option(help="Log in as this user (password asked for, or "
                                                     "$APPLIANCE_PASSWORD); or set APPLIANCE_API_TOKEN.")]
API_DEFAULT = "http://127.0.0.1:8080"


def _client(api: str, user: str | None) -> Any:
    from appliance.client import ApiClient

    password = None
    if user is not None:
        password = os.environ.get("APPLIANCE_PASSWORD") or typer.prompt("password", hide_input=True)
    return _user_errors(lambda: ApiClient(api, user, password))


@app.command()
def results(api: ApiOption = API_DEFAULT, user: UserOption = None, disposition: str | None = None,
            batch: str | None = None, limit: int = 20) -> None:
    """List recent results through the daemon's API (the daemon alone opens the database)."""
    client = _client(api, user)
    page = _user_errors(lambda: client.get("/results", disposition=disposition, batch=batch, limit=limit))
    for r in page["results"]:
        heads = " ".join(f"{p['head']}={p['label']}({p['confidence']:.2f})" for p in r["predictions"])
        typer.echo(f"{r['seq']:>8} {r['acquired_at'][:23]} {r['part_id'] or '-':<14} "
                   f"{r['disposition']:<7} {r['rule']:<28} {heads or r['error']}")


models_app = typer.Typer(help="Model versions: list, promote (through the gate), roll back.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(api: ApiOption = API_DEFAULT, user: UserOption = None) -> None:
    client = _client(api, user)
    listing = _user_errors(lambda: client.get("/models"))
    for m in listing["models"]:
        flags = ("serving " if m["serving"] else "") + ("shadow " if m["shadow"] else "")
        gate = m["gate"]
        verdict = "-" if gate is None else ("gate passed" if gate["passed"] else "gate FAILED")
        typer.echo(f"{m['version']:<26} {m['created_at'][:19]} {verdict:<12} {flags}")
    if listing["rollback_to"]:
        typer.echo(f"rollback would return to {listing['rollback_to']}")


@models_app.command("promote")
def models_promote(version: str, api: ApiOption = API_DEFAULT, user: UserOption = None,
                   force: Annotated[bool, typer.Option(help="Skip the gate (admin).")] = False) -> None:
    """Load, gate and hot-swap a registered version into the running line."""
    client = _client(api, user)
    out = _user_errors(lambda: client.post(f"/models/{version}/promote", {"force": force}))
    typer.echo(f"now serving {out['serving']}")


@models_app.command("rollback")
def models_rollback(api: ApiOption = API_DEFAULT, user: UserOption = None) -> None:
    client = _client(api, user)
    out = _user_errors(lambda: client.post("/models/rollback"))
    typer.echo(f"now serving {out['serving']} (rolled back from {out['rolled_back_from']})")


line_app = typer.Typer(help="The line's state machine (engineers): halt, and reset whichever channel halted it.",
                       no_args_is_help=True)
app.add_typer(line_app, name="line")


@line_app.command("halt")
def line_halt(api: ApiOption = API_DEFAULT, user: UserOption = None) -> None:
    """Stop acquiring (vision state Halted) until a reset; parts already acquired are finished."""
    out = _user_errors(lambda: _client(api, user).post("/line/halt"))
    typer.echo(f"line {out['state']} (halt held by {out['halted_by']})")


@line_app.command("reset")
def line_reset(api: ApiOption = API_DEFAULT, user: UserOption = None) -> None:
    """Leave Halted/Error, even when OPC UA or Modbus halted the line (audited under your name)."""
    out = _user_errors(lambda: _client(api, user).post("/line/reset"))
    typer.echo(f"line {out['state']}")


@app.command()
def retrain(api: ApiOption = API_DEFAULT, user: UserOption = None,
            wait: Annotated[bool, typer.Option(help="Follow progress until done.")] = True) -> None:
    """Start retraining on the base dataset plus verified review labels (runs in the daemon's job)."""
    import time

    from tqdm import tqdm

    client = _client(api, user)
    status = _user_errors(lambda: client.post("/retrain"))
    typer.echo(f"retraining {status['job_id']}: {status['training_set']}")
    if not wait:
        return
    with tqdm(total=100, unit="%", bar_format="{desc} {bar} {n:.0f}%") as bar:
        while status["state"] == "running":
            time.sleep(1)
            status = _user_errors(lambda: client.get("/retrain"))
            bar.set_description_str(status["phase"])
            bar.n = round(100 * float(status["progress"]))
            bar.refresh()
    typer.echo(f"{status['state']}: {status['message']}")
    if status["state"] != "done":
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="appliance")


if __name__ == "__main__":  # pragma: no cover
    main()
