"""The appliance configuration: one YAML file, one pydantic model tree.

Every field has a description and bounds; unknown keys are errors (``extra="forbid"``); errors
name the key path and the YAML line.  Secrets never live here: they come from the environment or
systemd credentials (see :mod:`appliance.secrets`).  Relative paths are resolved against
``state_dir``, which itself defaults to ``$STATE_DIRECTORY`` (set by systemd) or ``./var``.
"""

from __future__ import annotations

import ipaddress
import os
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.errors import UserError
from appliance.yamlio import load_yaml_with_lines, validation_message

Disposition = Literal["pass", "rework", "reject", "hold"]
DISPOSITIONS: tuple[str, ...] = ("pass", "rework", "reject", "hold")
DUCKDB_MEMORY_LIMIT_MB = 1024
DUCKDB_THREADS = 2
DUCKDB_MAX_SPILL_MB = 2048


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LineConfig(Strict):
    line_id: str = Field(default="line-1", min_length=1, max_length=64, description="Production line id.")
    asset_id: str = Field(default="station-1", min_length=1, max_length=64,
                          description="The inspection station (asset) on that line.")
    batch: str | None = Field(default=None, max_length=64,
                              description="Batch to record until a PLC writes another.")


class ReplayConfig(Strict):
    path: Path = Field(description="A folder of images, or a dataset folder (with labels.csv).")
    split: Literal["train", "val", "test"] | None = Field(
        default=None, description="For a dataset folder: replay only this split.")
    rate_hz: float = Field(default=10.0, gt=0, le=10000, description="Frames per second when free-running.")
    triggered: bool = Field(default=False, description="Wait for a trigger (PLC or API) for each frame.")
    loop: bool = Field(default=True, description="Start again at the first image after the last.")
    shuffle_seed: int | None = Field(default=None, description="Shuffle the order with this seed.")


class RoiConfig(Strict):
    offset_x: int = Field(default=0, ge=0, description="Left edge of the region of interest, pixels.")
    offset_y: int = Field(default=0, ge=0, description="Top edge of the region of interest, pixels.")
    width: int = Field(ge=1, le=65535, description="Width of the region of interest, pixels.")
    height: int = Field(ge=1, le=65535, description="Height of the region of interest, pixels.")


class GenICamConfig(Strict):
    cti: Path = Field(description="Path of the GenTL producer (.cti) to load.")
    device: str | int = Field(default=0, description="Device serial number, or index in the device list.")
    pixel_format: str | None = Field(default=None, description="GenICam PixelFormat, e.g. Mono8.")
    roi: RoiConfig | None = Field(default=None, description="Region of interest; full sensor if absent.")
    frame_rate: float | None = Field(default=None, gt=0, le=10000,
                                     description="AcquisitionFrameRate for free-running devices.")
    triggered: bool = Field(default=False, description="Use TriggerMode=On with TriggerSoftware.")
    fetch_timeout_s: float = Field(default=2.0, gt=0, le=60, description="Give up on one fetch after this.")


class ImageHealthConfig(Strict):
    enabled: bool = Field(default=True, description="Watch brightness, sharpness and scene for drift.")
    baseline_frames: int = Field(default=200, ge=10, le=100_000, description="Frames that set the baseline.")
    brightness_tolerance: float = Field(default=0.25, gt=0, le=1,
                                        description="Allowed relative change of mean brightness.")
    min_sharpness_share: float = Field(default=0.5, gt=0, le=1,
                                       description="Alarm when sharpness falls below this share of baseline.")
    min_scene_correlation: float = Field(default=0.7, ge=-1, le=1,
                                         description="Alarm when the average picture no longer correlates "
                                                     "with the baseline (camera or fixture moved).")


class CameraConfig(Strict):
    view: str = Field(default="top", min_length=1, max_length=64, description="Camera view name.")
    source: Literal["replay", "genicam"] = Field(default="replay", description="Which frame source.")
    replay: ReplayConfig | None = Field(default=None, description="Settings of the replay source.")
    genicam: GenICamConfig | None = Field(default=None, description="Settings of the GenICam source.")
    stall_timeout_s: float = Field(
        default=5.0, gt=0, le=3600,
        description="A free-running camera silent this long counts as stalled and is reconnected.")
    health: ImageHealthConfig = Field(
        default_factory=ImageHealthConfig,
        description="Image health: an alarm when the picture drifts from its baseline (parts are still judged).")
    queue_size: int = Field(default=8, ge=1, le=1024,
                            description="Frames waiting for the classifier; newer frames are dropped "
                                        "(and counted) when it is full.")

    @model_validator(mode="after")
    def _source_settings_present(self) -> CameraConfig:
        if getattr(self, self.source) is None:
            raise ValueError(f"camera.source is '{self.source}' but the '{self.source}' section is missing")
        return self


class ModelConfig(Strict):
    path: Path | None = Field(
        default=None,
        description="The model package the line starts with. Once a model has been promoted (or rolled "
                    "back to), the registry's champion is served instead, also after a restart.")
    inference_workers: int = Field(
        default=2, ge=1, le=16,
        description="Frames classified at the same time, each on its own thread; results are still "
                    "stored and published in camera order. On 2 cores, 2 workers of 1 thread judge "
                    "10-35 % more parts per second than 1 worker of 2 threads, at the same latency.")
    intra_op_threads: int = Field(default=1, ge=1, le=64,
                                  description="onnxruntime threads per inference (per worker).")
    warmup_runs: int = Field(default=3, ge=0, le=100, description="Inferences run at load, before serving.")
    spin_wait: bool = Field(
        default=False,
        description="Let onnxruntime's threads spin between inferences: a little lower latency on an "
                    "otherwise idle machine, but on 2 cores it steals the CPU the camera, journal and "
                    "API threads need.")


class Rule(Strict):
    name: str = Field(min_length=1, max_length=64, description="Recorded with each result it decides.")
    when: dict[str, list[str]] = Field(
        default_factory=dict,
        description="head -> the classes that match; a head not named matches any class.")
    disposition: Literal["pass", "rework", "reject"] = Field(description="What a match means.")


class DispositionConfig(Strict):
    rules: list[Rule] = Field(min_length=1, description="Tried in order; the first match decides.")
    min_confidence: float = Field(default=0.6, ge=0, le=1,
                                  description="Below this calibrated confidence a result is held.")
    class_min_confidence: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="head -> class -> threshold overriding min_confidence.")
    heads: list[str] | None = Field(
        default=None, description="Heads whose confidence can hold a part; all heads if absent.")
    audit_rate: float = Field(default=0.02, ge=0, le=1,
                              description="Share of confident passes also sent to review (escape rate).")

    @field_validator("class_min_confidence")
    @classmethod
    def _thresholds_in_range(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for head, classes in value.items():
            for name, threshold in classes.items():
                if not 0 <= threshold <= 1:
                    raise ValueError(f"{head}.{name}: threshold {threshold} is not within 0..1")
        return value


class RetentionConfig(Strict):
    """Which images to keep: a share per disposition (1 = all, 0 = none)."""

    pass_: float = Field(default=0.05, ge=0, le=1, alias="pass", description="Share of passes archived.")
    rework: float = Field(default=1.0, ge=0, le=1, description="Share of reworks archived.")
    reject: float = Field(default=1.0, ge=0, le=1, description="Share of rejects archived.")
    hold: float = Field(default=1.0, ge=0, le=1, description="Share of holds archived (review needs them).")
    max_age_days: int = Field(default=30, ge=1, le=3650, description="Images older than this are deleted.")
    min_free_mb: int = Field(default=1024, ge=0, description="Stop archiving below this much free disk.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def share(self, disposition: str) -> float:
        return self.pass_ if disposition == "pass" else float(getattr(self, disposition))


class StoreConfig(Strict):
    path: Path = Field(default=Path("results.duckdb"), description="The DuckDB file (daemon-owned).")
    archive_dir: Path = Field(default=Path("images"), description="Where retained images are written.")
    group_commit_ms: float = Field(
        default=2.0, ge=0, le=1000,
        description="Results arriving within this window share one commit. Power loss can lose at "
                    "most this window; results are never published before they are committed.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig,
                                       description="Which part images are kept, and for how long.")
    duckdb_memory_limit_mb: int = Field(
        default=DUCKDB_MEMORY_LIMIT_MB, ge=64, le=65536,
        description="Most memory DuckDB may use for the result database (its cache of table blocks and "
                    "query working memory; larger queries spill to <path>.tmp), and again for the "
                    "dashboard's in-memory rollup. DuckDB's own default is 80 % of the host's RAM.")
    duckdb_threads: int = Field(
        default=DUCKDB_THREADS, ge=1, le=64,
        description="Threads DuckDB may use for a query (its default: every core, which inference needs).")
    duckdb_max_spill_mb: int = Field(
        default=DUCKDB_MAX_SPILL_MB, ge=0, le=1_048_576,
        description="Most disk a DuckDB query may spill to (beside the result database) when it needs more than "
                    "duckdb_memory_limit_mb; a query that needs more fails alone (a dashboard export, say) "
                    "instead of filling the disk the journal and the image archive need. DuckDB's own "
                    "default is 90 % of the free disk.")


class ApiConfig(Strict):
    host: str = Field(default="127.0.0.1", description="Listen address of the HTTP API.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port of the HTTP API (0 = any free).")


class PlcReportConfig(Strict):
    """How model heads map onto the fields a PLC reads (codes are class index + 1; 0 = none)."""

    type_head: str | None = Field(default=None, description="Head reported as the defect type.")
    severity_head: str | None = Field(default=None, description="Head reported as the severity grade.")


class OpcUaUser(Strict):
    name: str = Field(min_length=1, max_length=64, description="User name the PLC/SCADA client logs in with.")
    role: Literal["reader", "operator"] = Field(
        description="reader: browse, read, subscribe; operator: also trigger and write part inputs.")
    password_env: str | None = Field(
        default=None, description="Environment variable holding the password (never the password itself).")
    password_credential: str | None = Field(
        default=None, description="systemd credential name ($CREDENTIALS_DIRECTORY/<name>) holding it.")


class OpcUaConfig(Strict):
    enabled: bool = Field(default=True, description="Serve OPC UA.")
    host: str = Field(default="127.0.0.1", description="Listen address (0.0.0.0 for the plant network).")
    port: int = Field(default=4840, ge=1, le=65535, description="OPC UA port (4840 is the standard one).")
    users: list[OpcUaUser] = Field(
        default_factory=list,
        description="Users and roles. APPLIANCE_OPCUA_USER/APPLIANCE_OPCUA_PASSWORD add an operator.")
    insecure_commissioning: bool = Field(
        default=False,
        description="DANGER: also open a None-security endpoint with anonymous read access, for "
                    "commissioning only. Logged loudly at every start.")
    max_connections: int = Field(
        default=32, ge=1, le=1000,
        description="Further TCP clients are refused (counting those still opening a session).")
    activation_timeout_s: float = Field(
        default=10, gt=0, le=300,
        description="Close a connection that has not activated a session this long after connecting.")


LOOPBACK: tuple[IPv4Network | IPv6Network, ...] = (IPv4Network("127.0.0.1/32"), IPv6Network("::1/128"))


class ModbusConfig(Strict):
    """Modbus TCP has no authentication: who may connect is decided by address (docs/plc-modbus.md, Security)."""

    enabled: bool = Field(default=True, description="Serve Modbus TCP.")
    host: str = Field(default="127.0.0.1", description="Listen address (0.0.0.0 for the plant network; then "
                                                       "allowed_clients must be set).")
    port: int = Field(default=502, ge=1, le=65535, description="Modbus TCP port (502 is the standard one).")
    unit_id: int = Field(default=1, ge=1, le=247, description="Unit (slave) id the appliance answers as (also "
                                                              "255; unit 0, serial broadcast, is refused).")
    word_order: Literal["big", "little"] = Field(
        default="big", description="32-bit values: 'big' = high word first (Modicon), 'little' = low first.")
    allowed_clients: list[IPv4Network | IPv6Network] = Field(
        default_factory=lambda: list(LOOPBACK), min_length=1,
        description="Addresses or networks (10.1.2.3, 10.1.2.0/24, fd00::/64) that may connect; any other "
                    "peer is disconnected before it is served. Required when host is not a loopback address; "
                    "0.0.0.0/0 or ::/0 (everyone) is accepted with a warning at every start.",
        json_schema_extra={"shown_default": "`127.0.0.1`, `::1` (this machine only)"})
    allow_control: bool = Field(
        default=True, description="The PLC may write the control coils (trigger, result_ack, reset) and "
                                  "control_word; false refuses those writes with exception 02, keeping control "
                                  "on OPC UA while Modbus still serves inputs and results.")
    max_connections: int = Field(default=8, ge=1, le=256, description="Further TCP clients are refused.")
    max_connections_per_client: int = Field(
        default=4, ge=1, le=256,
        description="Connections one client address may hold at once, so one host cannot take every slot.")
    idle_timeout_s: float = Field(default=60, gt=0, le=3600, description="Close a silent connection after.")
    register_map: Path | None = Field(
        default=None, description="Register map YAML (relative to state_dir); the shipped "
                                  "configs/modbus_map.yaml if absent. Validated at start.")

    @field_validator("allowed_clients", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        """``ipaddress`` parses strictly and says why (``10.1.2.3/24 has host bits set``)."""
        if isinstance(value, list):
            return [ip_network(v) if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _listed_when_listening_beyond_loopback(self) -> ModbusConfig:
        if self.enabled and "allowed_clients" not in self.model_fields_set and not loopback_host(self.host):
            raise ValueError(f"host {self.host} listens beyond this machine: set allowed_clients to the PLC "
                             "addresses or networks that may connect (Modbus has no login; anyone who can reach "
                             "the port could write)")
        return self


def loopback_host(host: str) -> bool:
    """Whether a listen address is this machine only (a host name may resolve to anything: no)."""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to a plant address
        return False


class RegistryConfig(Strict):
    holdout: Path | None = Field(
        default=None,
        description="Dataset folder whose test split is the fixed held-out set of the validation gate.")
    gate_margin: float = Field(
        default=0.02, ge=0, le=1,
        description="A candidate fails the gate if any head's accuracy or any class's recall is more "
                    "than this below the champion's.")
    base_dataset: Path | None = Field(
        default=None,
        description="Dataset folder that retraining starts from; verified review labels are added.")
    retrain_runner: Literal["subprocess", "service"] = Field(
        default="subprocess",
        description="subprocess: the daemon starts the worker (nice 10); service: the daemon queues the "
                    "job for appliance-retrain.service (its own cgroup, CPUWeight and idle I/O).")
    retrain_recipe: Path | None = Field(
        default=None, description="YAML file of training-recipe settings for retraining (see the training "
                                  "recipe below; defaults if absent).")
    shadow_max_pending: int = Field(
        default=4, ge=1, le=1024,
        description="Frames waiting for the shadow model; more are skipped (the line never waits).")


class ReviewConfig(Strict):
    two_person: bool = Field(
        default=False,
        description="A second person must verify a label before it counts for training.")
    queue_max_age_s: float = Field(
        default=2.0, ge=0, le=60,
        description="The ranked review queue is served from its last ranking for up to this long while "
                    "nobody labels (a label always re-ranks it): a ranking takes the daemon about 40 ms "
                    "of CPU, which many dashboards refreshing at once would take from the line over and "
                    "over.  A newly held part appears in the queue within this time; 0 ranks on every "
                    "request.")


class LoginConfig(Strict):
    """Throttling of password log-ins, the same for the HTTP API and OPC UA (see docs/security.md)."""

    max_failures: int = Field(
        default=10, ge=2, le=1000,
        description="Failed log-ins within window_s that lock the user name, and separately the source "
                    "address, for lockout_s. A locked log-in is refused at once, without checking the "
                    "password (HTTP 429 with Retry-After, OPC UA BadUserAccessDenied).")
    window_s: float = Field(default=900, gt=0, le=86400,
                            description="Failures older than this no longer count.")
    lockout_s: float = Field(
        default=900, gt=0, le=86400,
        description="How long a lock lasts. An admin lifts a user's lock sooner: POST "
                    "/api/v1/users/{name}/unlock, or `appliance user unlock NAME` on the appliance.")
    backoff_after: int = Field(
        default=3, ge=1, le=1000,
        description="After this many failures, each further attempt must wait backoff_base_s, doubling "
                    "with every failure up to backoff_max_s; earlier attempts are refused like locked ones.")
    backoff_base_s: float = Field(default=1.0, ge=0, le=60, description="The first wait (0: no waits).")
    backoff_max_s: float = Field(default=30, ge=0, le=3600, description="The longest wait.")
    relay_sources: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="Addresses or networks that relay other people's log-ins (the dashboard, on this "
                    "host): their failures count against the user names tried, never lock the address "
                    "itself, so one person's typos cannot lock everybody out of the dashboard.")
    max_tracked: int = Field(
        default=4096, ge=16, le=1_000_000,
        description="User names, and separately addresses, whose failures are remembered; beyond this the "
                    "longest-quiet entries that are not locked are forgotten first.")
    parallel_checks: int = Field(
        default=1, ge=1, le=16,
        description="API password checks (argon2: slow by design) run at the same time, on threads that "
                    "get a core only when the line leaves one idle (Linux SCHED_IDLE); the rest wait "
                    "their turn, so an attack cannot take the line's cores.")
    max_waiting: int = Field(
        default=16, ge=0, le=10000,
        description="API log-ins waiting for a password check; beyond this they are answered 503 with "
                    "Retry-After at once.")

    @field_validator("relay_sources")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"'{entry}' is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8)") from None
        return value


class LoggingConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info",
                                                                description="Least severe level logged.")
    format: Literal["console", "json"] = Field(default="console", description="json for journald/Loki.")


class AppConfig(Strict):
    state_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("STATE_DIRECTORY", "var")),
        description="Where the database, images, models and certificates live.",
        json_schema_extra={"shown_default": "`$STATE_DIRECTORY` (set by systemd), else `var`"})
    line: LineConfig = Field(default_factory=LineConfig,
                             description="Which line and station this is; recorded with every result.")
    camera: CameraConfig = Field(description="Where the frames come from.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model served and how it runs.")
    disposition: DispositionConfig = Field(
        description="From a prediction to pass / rework / reject / hold (human review).")
    store: StoreConfig = Field(default_factory=StoreConfig,
                               description="The result database, its journal and the image archive.")
    api: ApiConfig = Field(default_factory=ApiConfig,
                           description="The HTTP API (dashboard, CLI queries, metrics).")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="Human review of held parts.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig,
                                     description="Model versions: the validation gate, shadow and retraining.")
    plc: PlcReportConfig = Field(default_factory=PlcReportConfig,
                                 description="Which heads the PLC interfaces report as type and severity.")
    opcua: OpcUaConfig = Field(default_factory=lambda: OpcUaConfig(enabled=False),
                               description="The OPC UA server (Machine Vision companion specification).")
    modbus: ModbusConfig = Field(default_factory=lambda: ModbusConfig(enabled=False),
                                 description="The Modbus TCP server (register map in its own YAML file).")
    login: LoginConfig = Field(default_factory=LoginConfig,
                               description="Backoff and lockout after failed log-ins (HTTP API and OPC UA).")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="What the daemon logs, and how.")

    def resolve(self, path: Path) -> Path:
        """A configured path, relative ones taken from ``state_dir``."""
        return path if path.is_absolute() else self.state_dir / path

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"


def load_config(path: Path | str, overrides: dict | None = None) -> AppConfig:
    """Load and validate ``path``; raises :class:`UserError` with ``file:line: key: message`` lines."""
    path = Path(path)
    data, lines = load_yaml_with_lines(path)
    if data is None:
        raise UserError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: the top level must be a mapping of keys, not {type(data).__name__}")
    if overrides:
        data = _merge(data, overrides)
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(validation_message(path, exc, lines)) from exc


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out
