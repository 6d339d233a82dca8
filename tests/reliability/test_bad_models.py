"""Bad model packages: refused with a clear message at start, refused at promote while the old one serves.

The packages are real files: a bit flip in model.onnx, ONNX graphs built with onnx.helper whose
outputs have the wrong names or sizes, NaN outputs, a float input, a pickle renamed model.onnx
(which would leave a marker folder behind if anything unpickled it), an empty and a truncated
model.onnx, a card that is not JSON — and, where it matters, a card whose sha256 was "fixed" to
match the tampered graph, so only the output contract and the warm-up run can catch it.

* At start, the daemon refuses each of them (ModelRejected naming the problem); ``python -m
  appliance run`` (for a representative five) exits 2 with one ``error:`` line and no traceback.
* At promote (through the API, on a running line), the answer is 422 with the reason, the champion
  keeps serving: results keep arriving, judged by the old version.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.daemon import Daemon
from appliance.errors import ModelRejected
from appliance.model_package import CARD_FILE, INPUT_NAME, ONNX_FILE, ModelCard, sha256_file, write_card
from appliance.registry import ModelRegistry
from appliance.store import ResultFilter
from tests.brightness_model import GRADES, make_brightness_model
from tests.conftest import auth_headers, write_grade_images
from tests.reliability.conftest import REPO, config_file, record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

HEADS = {"defect_grade_probs": len(GRADES), "cell_type_probs": 2}
CLI_SUBSET = ("bad-bit-flip", "bad-output-names", "bad-tampered-nan", "bad-pickle", "bad-empty")


class _Payload:
    """Unpickling this creates a folder: proof that somebody unpickled a file they did not write."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


def graph(path: Path, outputs: dict[str, int], declared: dict[str, int | str] | None = None,
          input_dims: tuple[int | str, ...] = ("N", "H", "W"), input_type: int = TensorProto.UINT8,
          nan: bool = False) -> None:
    """A small valid ONNX graph: mean brightness → one softmax per output, of the sizes given."""
    declared = declared or {}
    inits = [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [helper.make_node("Cast", [INPUT_NAME], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f", "axes"], ["mean"], keepdims=0),
             helper.make_node("Unsqueeze", ["mean", "one"], ["m"])]
    for name, width in outputs.items():
        weights = np.linspace(-0.05, 0.05, width, dtype=np.float32).reshape(1, width)
        if nan:
            weights[0, 0] = np.nan
        inits.append(numpy_helper.from_array(weights, f"{name}_w"))
        nodes += [helper.make_node("Mul", ["m", f"{name}_w"], [f"{name}_logits"]),
                  helper.make_node("Softmax", [f"{name}_logits"], [name], axis=1)]
    model = helper.make_model(helper.make_graph(
        nodes, "reliability", [helper.make_tensor_value_info(INPUT_NAME, input_type, list(input_dims))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", declared.get(n, w)]) for n, w in outputs.items()],
        inits), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)


def fix_card(package: Path, version: str) -> None:
    """Give the package its own version and a card sha256 that matches whatever model.onnx now is."""
    card = ModelCard.model_validate_json((package / CARD_FILE).read_bytes())
    card.version = version
    card.onnx_sha256 = sha256_file(package / ONNX_FILE)
    write_card(package, card)


def bad_packages(root: Path, marker: Path) -> dict[str, str]:
    """Build the bad packages under ``root``; returns version → the message expected for it."""
    expected: dict[str, str] = {}

    def package(version: str, message: str) -> Path:
        path = root / version
        make_brightness_model(path, version=version)
        expected[version] = message
        return path

    p = package("bad-bit-flip", r"sha256 .* does not match the card")
    data = bytearray((p / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0x04
    (p / ONNX_FILE).write_bytes(bytes(data))  # the card is left as it was: the checksum catches it

    p = package("bad-output-names", r"no output 'defect_grade_probs' for head 'defect_grade'")
    graph(p / ONNX_FILE, {"grade_probs": 4, "type_probs": 2})
    fix_card(p, "bad-output-names")

    p = package("bad-output-width", r"output 'defect_grade_probs' has 3 classes, the card lists 4")
    graph(p / ONNX_FILE, {"defect_grade_probs": 3, "cell_type_probs": 2})
    fix_card(p, "bad-output-width")

    p = package("bad-output-undeclared", r"has 3 classes, the card lists 4|head 'defect_grade' has shape \(1, 3\)")
    graph(p / ONNX_FILE, {"defect_grade_probs": 3, "cell_type_probs": 2}, declared={"defect_grade_probs": "K"})
    fix_card(p, "bad-output-undeclared")

    p = package("bad-tampered-nan", r"non-finite values")
    graph(p / ONNX_FILE, HEADS, nan=True)
    fix_card(p, "bad-tampered-nan")

    p = package("bad-float-input", r"expected one uint8 input 'image', got image:tensor\(float\)")
    graph(p / ONNX_FILE, HEADS, input_type=TensorProto.FLOAT)
    fix_card(p, "bad-float-input")

    p = package("bad-pickle", r"onnxruntime cannot load the model")
    (p / ONNX_FILE).write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    fix_card(p, "bad-pickle")

    p = package("bad-empty", r"onnxruntime cannot load the model")
    (p / ONNX_FILE).write_bytes(b"")
    fix_card(p, "bad-empty")

    p = package("bad-truncated", r"onnxruntime cannot load the model")
    (p / ONNX_FILE).write_bytes((p / ONNX_FILE).read_bytes()[:300])
    fix_card(p, "bad-truncated")

    p = package("bad-card", r"invalid model card")
    (p / CARD_FILE).write_bytes(b'{"version": "bad-card", "heads": [}\x00')
    expected["bad-card"] = r"invalid model card"
    return expected


def _run_cli(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_bad_models_are_refused_at_start_with_one_clear_line(tmp_path: Path, line_config) -> None:
    images = tmp_path / "images"
    write_grade_images(images, GRADES)
    marker = tmp_path / "UNPICKLED"
    expected = bad_packages(tmp_path / "packages", marker)
    in_process: dict[str, str] = {}
    procs = {}
    for version in expected:
        cfg = line_config(images, model={"path": str(tmp_path / "packages" / version), "warmup_runs": 1})
        if version in CLI_SUBSET:  # each is a full Python start-up: a representative few, in parallel
            procs[version] = _run_cli(config_file(tmp_path / f"{version}.yaml", cfg))
        try:
            asyncio.run(Daemon(cfg).start())
            in_process[version] = "STARTED"
        except ModelRejected as exc:
            in_process[version] = str(exc)
    outputs: dict[str, tuple[int, str]] = {}
    for version, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        outputs[version] = (proc.returncode, out.decode(errors="replace"))
    record("bad_models_start", refused={v: m.split(": ", 1)[-1][:120] for v, m in in_process.items()},
           cli_exit_codes={v: c for v, (c, _) in outputs.items()})
    for version, message in in_process.items():
        assert re.search(expected[version], message), f"{version}: {message}"
    for version, (code, output) in outputs.items():
        assert code == 2, f"{version}: exit {code}\n{output}"
        assert "Traceback" not in output, f"{version}: a traceback instead of a message\n{output}"
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and re.search(expected[version], errors[0]), f"{version}: {output}"
    assert not marker.exists(), "somebody unpickled the fake model.onnx"


async def test_bad_models_are_refused_at_promote_and_the_champion_keeps_serving(
        tmp_path: Path, line_config, state_dir: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    expected = bad_packages(tmp_path / "packages", marker)
    registry = ModelRegistry(state_dir / "models")
    make_brightness_model(tmp_path / "v1", version="v1")
    registry.register(tmp_path / "v1")
    registry.set_champion("v1")
    admitted = {}
    for version in expected:
        try:
            registry.register(tmp_path / "packages" / version)
            admitted[version] = "admitted"
        except ModelRejected:
            admitted[version] = "refused"
        # the damaged package lands in the registry anyway (a disk error, a hand copy): promote must check
        (state_dir / "models" / version).mkdir(exist_ok=True)
        for name in (ONNX_FILE, CARD_FILE):
            (state_dir / "models" / version / name).write_bytes((tmp_path / "packages" / version / name).read_bytes())
    images = tmp_path / "line"
    write_grade_images(images, GRADES * 8)
    cfg = line_config(images, model={"path": None, "warmup_runs": 1},
                      camera={"view": "top", "source": "replay", "queue_size": 64,
                              "replay": {"path": str(images), "rate_hz": 40, "loop": True}})
    daemon = Daemon(cfg)
    await daemon.start()
    answers: dict[str, tuple[int, str]] = {}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}/api/v1", timeout=60,
                                     headers=auth_headers(daemon, "engineer")) as api:
            for version in expected:
                before = daemon.stats.judged
                reply = await api.post(f"/models/{version}/promote", json={})
                answers[version] = (reply.status_code, reply.text)
                await daemon.wait_for_results(before + 5, timeout=30)  # the line never paused
            judged_at_end = daemon.stats.judged
            await daemon.wait_for_results(judged_at_end + 20, timeout=30)
            latest = (await api.get("/results/latest")).json()
        daemon.store.flush()
        versions = {r["model_version"] for r in daemon.store.query(ResultFilter(limit=10_000))}
        serving = daemon.classifier.version if daemon.classifier else None
    finally:
        await daemon.stop()
    record("bad_models_promote", answers={v: a[0] for v, a in answers.items()}, admission=admitted,
           judged=daemon.stats.judged, versions_in_store=sorted(versions))
    for version, (status, text) in answers.items():
        assert status == 422 and re.search(expected[version], text), f"{version}: {status} {text}"
    assert set(admitted.values()) == {"refused"}, f"registry.register admitted a bad package: {admitted}"
    assert serving == "v1" and registry.champion() == "v1" and latest["model_version"] == "v1"
    assert versions == {"v1"}, f"results judged by a refused model: {versions}"
    assert not marker.exists(), "somebody unpickled the fake model.onnx"


async def test_a_model_that_cannot_run_on_the_line_frames_never_silently_stops_the_line(
        tmp_path: Path, line_config, state_dir: Path) -> None:
    """A graph with a fixed input size (64×64) passes every check at load — the warm-up runs on the
    card's 64×64 — but onnxruntime raises on the line's 48×64 frames.  Today that exception ends the
    daemon's judge task: no part is judged again, frames are dropped, and health still says
    "running"/"operational".  Expected: refused at promote (the champion keeps serving), or every
    such frame a failed part while the line keeps going.
    """
    registry = ModelRegistry(state_dir / "models")
    make_brightness_model(tmp_path / "v1", version="v1")
    registry.register(tmp_path / "v1")
    registry.set_champion("v1")
    fixed = tmp_path / "v-fixed-input"
    make_brightness_model(fixed, version="v-fixed-input")
    model = onnx.load(fixed / ONNX_FILE)
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, 64, 64), strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = value
    onnx.save(model, fixed / ONNX_FILE)
    fix_card(fixed, "v-fixed-input")
    registry.register(fixed)  # admitted today: it loads and runs on the card's size
    images = tmp_path / "line"
    write_grade_images(images, GRADES * 4)  # 48×64 px
    cfg = line_config(images, model={"path": None, "warmup_runs": 1},
                      camera={"view": "top", "source": "replay",
                              "replay": {"path": str(images), "rate_hz": 40, "loop": True}})
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await daemon.wait_for_results(10, timeout=30)
        try:
            await daemon.promote("v-fixed-input", "reliability-test")
            refused = None
        except ModelRejected as exc:
            refused = str(exc)
        before = daemon.stats.judged
        await asyncio.sleep(3)
        after = daemon.stats.judged
        health = daemon.health()
        judge_ended = [t.done() for t in daemon._tasks if t.get_name() == "judge"]
    finally:
        stop_hung = False
        try:
            await asyncio.wait_for(daemon.stop(), 10)
        except TimeoutError:  # stop() waits to queue its sentinel for a judge task that is gone
            stop_hung = True
            while not daemon._queue.empty():  # cleanup only, so the rest of the session runs clean
                daemon._queue.get_nowait()
            await daemon.stop()
    record("model_fails_on_line_frames", refused=refused, judged_in_3s=after - before, dropped=health["dropped"],
           state=health["state"], judge_task_ended=judge_ended, stop_hung=stop_hung)
    assert after - before >= 20, (f"the line stopped judging after the promote (refused: {refused}); "
                                  f"health says {health['status']}/{health['state']}, dropped {health['dropped']}")
    assert judge_ended == [False], "the judge task ended"
    assert not stop_hung, "Daemon.stop() hung"
