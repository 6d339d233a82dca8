import re
from pathlib import Path
from typing import get_args, get_origin

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from appliance.cli import app
from appliance.config import AppConfig, load_config
from appliance.errors import UserError
from appliance.training.recipe import TrainRecipe
from appliance.yamlio import load_validated
from tests.brightness_model import make_brightness_model

REPO = Path(__file__).resolve().parents[2]
GOOD = """\
camera:
  view: top
  source: replay
  replay:
    path: /data/images
    rate_hz: 5
disposition:
  rules:
    - name: ok
      when: {grade: ["0"]}
      disposition: pass
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_are_valid() -> None:
    for path in (REPO / "configs").glob("*.yaml"):
        if path.name != "modbus_map.yaml":
            load_config(path)
    recipes = list((REPO / "configs" / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert load_validated(path, TrainRecipe).model_dump() != TrainRecipe().model_dump()


def test_good_file_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.camera.replay is not None and cfg.camera.replay.rate_hz == 5
    assert cfg.disposition.min_confidence == 0.6
    assert cfg.store.retention.share("pass") == 0.05


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        (GOOD.replace("rate_hz: 5", "rate_hz: -1"), 6, "camera.replay.rate_hz", "greater than 0"),
        (GOOD.replace("    rate_hz: 5", "    rate_hz: 5\n    speed: 3"), 7, "camera.replay.speed",
         "unknown key"),
        (GOOD.replace("disposition: pass", "disposition: maybe"), 11, "disposition.rules.0.disposition",
         "'pass', 'rework' or 'reject'"),
        (GOOD.replace("  source: replay", "  source: genicam"), 1, "camera", "'genicam' section is missing"),
        (GOOD + "api:\n  port: 99999\n", 13, "api.port", "less than or equal to 65535"),
    ],
)
def test_errors_name_key_and_line(tmp_path: Path, text: str, line: int, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:{line}: {key}:" in message
    assert words in message


def test_missing_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cfg.yaml: disposition: Field required"):
        load_config(write(tmp_path, GOOD.split("disposition:")[0]))


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cfg.yaml:3: invalid YAML"):
        load_config(write(tmp_path, "camera:\n  view: top\n\tsource: replay\n"))


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["check-config", str(write(tmp_path, f"state_dir: {tmp_path}\n"
                                                              + GOOD.replace("/data/images", str(tmp_path))))])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output and "no model in" in ok.output
    no_images = runner.invoke(app, ["check-config", str(write(tmp_path, f"state_dir: {tmp_path}\n{GOOD}"))])
    assert no_images.exit_code == 2
    assert "cfg.yaml:6: camera.replay.path: /data/images does not exist" in no_images.output
    bad = runner.invoke(app, ["check-config", str(write(tmp_path, GOOD.replace("rate_hz: 5", "rate_hz: x")))])
    assert bad.exit_code == 2
    assert "cfg.yaml:6: camera.replay.rate_hz" in bad.output
    assert "Traceback" not in bad.output


def test_check_config_checks_the_table_against_the_model_to_be_served(tmp_path: Path) -> None:
    """The same misfit `appliance run` refuses to start with, found offline, with its line."""
    card = make_brightness_model(tmp_path / "model")  # heads defect_grade (0, 1/3, 2/3, 1) and cell_type
    line = (f"state_dir: {tmp_path}\nmodel: {{path: {tmp_path / 'model'}}}\n"
            + GOOD.replace("grade:", "defect_grade:").replace("/data/images", str(tmp_path)))
    runner = CliRunner()
    fits = runner.invoke(app, ["check-config", str(write(tmp_path, line))])
    misfit = runner.invoke(app, ["check-config", str(write(tmp_path, line.replace('["0"]', '["0", "one"]')
                                                          + "  class_min_confidence: {cell_typ: {mono: 0.9}}\n"))])
    assert fits.exit_code == 0 and f"the disposition table fits model {card.version}" in fits.output, fits.output
    assert misfit.exit_code == 2, misfit.output
    assert ("cfg.yaml:12: disposition.rules.0.when.defect_grade: rule 'ok': head 'defect_grade' has no class "
            "['one']") in misfit.output
    assert ("cfg.yaml:14: disposition.class_min_confidence.cell_typ: head 'cell_typ' is not in the model"
            in misfit.output)


def test_duckdb_limits_default_and_bounds(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    store = cfg.store
    assert (store.duckdb_memory_limit_mb, store.duckdb_threads, store.duckdb_max_spill_mb) == (1024, 2, 2048)
    with pytest.raises(UserError, match=r"store\.duckdb_memory_limit_mb"):
        load_config(write(tmp_path, GOOD + "store:\n  duckdb_memory_limit_mb: 16\n"))


def test_opcua_connection_limits_default_and_bounds(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert (cfg.opcua.max_connections, cfg.opcua.activation_timeout_s) == (32, 10)
    with pytest.raises(UserError, match=r"opcua\.activation_timeout_s"):
        load_config(write(tmp_path, GOOD + "opcua:\n  activation_timeout_s: 0\n"))


def test_train_recipe_errors_name_the_key_and_line(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("image_size: 160\nepochz: 3\nflip_horizontal: false\nflip_vertical: false\n"
                      "inference_flips: true\n")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "pkg"),
                                      "--recipe", str(recipe)])
    assert result.exit_code == 2, result.output
    assert f"{recipe}:2: epochz: unknown key" in result.output
    assert f"{recipe}:5: inference_flips:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pkg").exists(), "nothing trained"


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(section, key) for every key of the config tree, lists of sections as ``name[]``."""
    out = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        out.append((prefix.rstrip("."), key))
        for t in (info.annotation, *get_args(info.annotation)):
            many = get_origin(t) is list
            item = get_args(t)[0] if many else t
            if isinstance(item, type) and issubclass(item, BaseModel):
                out += _key_paths(item, f"{prefix}{key}{'[]' if many else ''}.")
                break
    return out


def test_configuration_reference_is_current_and_names_every_key(monkeypatch) -> None:
    """docs/configuration.md is what `appliance config-reference` prints (whatever the machine's
    environment), and lists every key of every section with its real default and limits."""
    monkeypatch.setenv("STATE_DIRECTORY", "/somewhere/else")
    printed = CliRunner().invoke(app, ["config-reference"])
    assert printed.exit_code == 0, printed.output
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert printed.output == committed, "run: appliance config-reference > docs/configuration.md"

    sections = {title: body for title, body in
                re.findall(r"^## (?:`([^`]+)`|Top level)\n(.*?)(?=^## |\Z)", committed, re.S | re.M)}
    paths = _key_paths(AppConfig)
    assert len(paths) > 90
    for section, key in paths:
        assert section in sections, f"no section for {section}"
        assert f"| `{key}` |" in sections[section], f"{section}.{key} missing"
    assert "| `queue_size` | int | `8` | 1 ≤ x ≤ 1024 |" in sections["camera"]
    assert "| `inference_workers` | int | `2` | 1 ≤ x ≤ 16 |" in sections["model"]
    assert "| `name` | str | **required** | 1–64 characters |" in sections["disposition.rules[]"]
    recipe = committed.split("\n# Training recipe\n", 1)[1]
    for key in TrainRecipe.model_fields:
        assert f"| `{key}` |" in recipe, f"recipe key {key} missing"
    assert "| `frozen_blocks` | int | `13` | 0 ≤ x ≤ 16 |" in recipe
    assert "| `brightness_gains` | list of float | empty | at most 8 entries |" in recipe
    assert "Without this section: `enabled: false`." in sections["modbus"]


@pytest.mark.parametrize(("modbus", "words"), [
    ("{host: 0.0.0.0}", "host 0.0.0.0 listens beyond this machine: set allowed_clients"),
    ("{host: 10.1.2.3}", "host 10.1.2.3 listens beyond this machine"),
    ("{host: plc-nic.plant}", "host plc-nic.plant listens beyond this machine"),
    ("{host: 0.0.0.0, allowed_clients: [10.1.2.3/24]}", "10.1.2.3/24 has host bits set"),
    ("{allowed_clients: []}", "at least 1 item"),
    ("{allowed_clients: [plc-1]}", "'plc-1' does not appear to be an IPv4 or IPv6 network"),
    ("{unit_id: 0}", "greater than or equal to 1"),
])
def test_modbus_clients_must_be_listed_when_it_listens_beyond_loopback(tmp_path: Path, modbus: str,
                                                                       words: str) -> None:
    with pytest.raises(UserError, match=re.escape(words)) as refused:
        load_config(write(tmp_path, GOOD + f"modbus: {modbus}\n"))
    assert "modbus" in str(refused.value)


def test_modbus_defaults_to_this_machine_and_takes_networks(tmp_path: Path) -> None:
    local = load_config(write(tmp_path, GOOD + "modbus: {enabled: true}\n")).modbus
    plant = load_config(write(tmp_path, GOOD + "modbus: {host: 0.0.0.0, allowed_clients: [10.1.2.3, fd00::/64]}\n"))
    off = load_config(write(tmp_path, GOOD + "modbus: {enabled: false, host: 0.0.0.0}\n"))
    assert [str(n) for n in local.allowed_clients] == ["127.0.0.1/32", "::1/128"]
    assert [str(n) for n in plant.modbus.allowed_clients] == ["10.1.2.3/32", "fd00::/64"]
    assert local.allow_control and local.max_connections_per_client == 4
    assert not off.modbus.enabled  # nothing listens, nothing to list
