"""The daemon's configuration: one typed dataclass tree, read from TOML, overridable by flags.

Every section is a frozen dataclass; every field has a type, a default and a docstring. Loading is
strict: an unknown key, a wrong type or an invalid value is a ``ConfigError`` naming the dotted key
(``sidecar.tick_s``), never a silent default. ``--set section.key=VALUE`` on the command line
overrides any field (VALUE is a TOML literal, or a bare string).

No I/O beyond reading the one file: parsing and validation are pure and tested without a daemon.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import socket
import ssl
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sidecar.core.grid import ResourceGrid
from sidecar.core.policy import RULES
from sidecar.core.record import NODE_ID_RULE, is_node_id
from sidecar.core.reward import RewardConfig
from sidecar.core.safeguard import SafeguardConfig
from sidecar.units import MIN_USER_CORES, min_user_mem_mb


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


V1_MEMORY_HARVEST = ("hard", "hold", "soft")
"""The values of ``[actuation] v1_memory_harvest``."""

MAX_SOCKET_PATH = 107
"""Longest unix socket path the kernel takes (sun_path holds 108 bytes with the final NUL)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address, or a URL's host) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every interface)
        return False


def read_token(key: str, token_file: str, fallback: str) -> str:
    """A bearer token: the contents of ``token_file`` when set (an empty file is an error, not
    "no token"), else ``fallback``."""
    if not token_file:
        return fallback
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key}.token_file {token_file}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{key}.token_file {token_file} is empty")
    return token


@dataclass(frozen=True)
class ServerConfig:
    socket: str = "/run/faasrm/sidecar.sock"
    """Unix socket serving the whole API, hooks included (mode 0660; its directory is created);
    empty = none."""
    socket_group: str = ""
    """Group owning the socket, whose members (the invoker) may call the hooks; empty = root's.
    A group that does not exist is a start-up error."""
    host: str = "127.0.0.1"
    """TCP listen address of the read-only endpoints (health, metrics, debug views)."""
    port: int = 9477
    """TCP listen port."""
    tcp_hooks: bool = False
    """Also accept the hooks (every POST) over TCP, each with ``Authorization: Bearer <token>``;
    off: a POST over TCP gets 403."""
    token_file: str = ""
    """File holding the bearer token of hooks over TCP (else ``token``)."""
    token: str = ""
    """The bearer token itself (prefer token_file)."""
    allow_plaintext: bool = False
    """Let ``tcp_hooks`` listen on a host that is not loopback (a trusted private network only):
    the TCP listener has no TLS, so the token and the hooks then cross the network in clear
    text."""

    def resolve_token(self) -> str:
        return read_token("server", self.token_file, self.token)


@dataclass(frozen=True)
class SamplerConfig:
    tick_s: float = 0.1
    """Sampling period, seconds (monotonic deadlines, no drift)."""
    discover_every_s: float = 2.0
    """How often runtimes are re-listed as a safety net for missed events."""
    slow_every: int = 10
    """Ticks between reads of the slowly-changing files (memory peak, PSI; the OOM counter of
    containers without a running invocation). Usage and CPU are read every tick."""


@dataclass(frozen=True)
class HarvestPeriod:
    function: str
    """Function name, as the hooks or the runtime name it."""
    cpu_period_us: int
    """CFS period written with this function's harvested quotas (1000..1000000)."""


@dataclass(frozen=True)
class ActuationConfig:
    cpu_period_us: int = 100_000
    """CFS period written with every quota (the period is part of the actuation)."""
    harvest_periods: list[HarvestPeriod] = field(default_factory=list)
    """Per-function CFS periods for harvested quotas ([[actuation.harvest_periods]] tables): a
    burst of up to quota x period CPU-seconds then runs unthrottled, so a function whose short
    multi-threaded bursts a 100 ms period throttles at a harvested quota can keep its speed
    (docs/duration-model.md, "CFS period per function")."""
    scale_weight: bool = True
    """Scale cpu weight/shares with the allocated cores (user weight x cores / user cores)."""
    harvest_memory: bool = True
    """Lower memory below the user's size (v2: memory.high; v1: see v1_memory_harvest)."""
    v1_memory_harvest: str = "hold"
    """How cgroup v1 harvests memory: ``hold`` lowers memory.limit_in_bytes (above the floor), and
    a task that outgrows it waits (memory.oom_control's oom_kill_disable, set only while the limit
    is harvested and a decision watches) until the daemon, woken by the kernel's OOM
    notification, gives the user's memory back; ``hard`` (the reference's) lowers it without the
    hold: an invocation that outgrows it is OOM-killed unless a usage give-back comes first;
    ``soft`` keeps the hard limit at the user's size and lowers memory.soft_limit_in_bytes, which
    the kernel enforces only under host-wide memory pressure (docs/sidecar.md, "Memory
    harvesting on cgroup v1")."""
    throttle_target: float = 0.25
    """Throttle give-back: a harvested CPU quota returns to the user's size at once when more than
    this share of the CFS periods since the last tick were throttled (cpu.stat nr_throttled /
    nr_periods, read every tick for harvested quotas); 1 = off. With the default 100 ms period a
    tick holds one period, so any value below 1 acts on the first throttled one; 0.25 was chosen
    with 20 ms periods (docs/sidecar.md, "Two-timescale control")."""
    restore_on_end: bool = True
    """Return a container to its user's size when its invocation ends (the safe default)."""
    state_file: str = "/var/lib/faasrm/state.json"
    """Crash-safety state: managed containers and their user limits (atomic write-rename)."""
    profiles_file: str = "profiles.json"
    """What the node learned about each function (the safeguard's remembered peaks, the
    policy's statistics), kept across restarts so a restart forgets no memory spike
    (``sidecar.profiles``). A relative path is taken beside ``state_file``; empty = forget on
    restart, as the reference does."""
    profiles_save_s: float = 60.0
    """Seconds between saves of ``profiles_file`` (also saved at shutdown); a SIGKILL loses at most
    this much of it."""

    @property
    def oom_hold(self) -> bool:
        """A harvested hard memory limit holds a task rather than kill it (``hold``)."""
        return self.v1_memory_harvest == "hold"

    @property
    def profiles_path(self) -> Path | None:
        if not self.profiles_file:
            return None
        return Path(self.state_file).parent / self.profiles_file

    def harvest_period_us(self, function: str) -> int | None:
        """The CFS period of ``function``'s harvested quotas; None = ``cpu_period_us``."""
        for hp in self.harvest_periods:
            if hp.function == function:
                return hp.cpu_period_us
        return None


@dataclass(frozen=True)
class BoundaryConfig:
    infer: bool = False
    """Infer invocation boundaries from CPU activity for containers that no hook reports."""
    busy_cores: float = 0.05
    """CPU rate (cores) above which an idle container is taken to start an invocation."""
    idle_ticks: int = 3
    """Consecutive ticks below busy_cores that end an inferred invocation."""


@dataclass(frozen=True)
class ContainerConfig:
    path: str
    """cgroup path relative to each v1 hierarchy (or to the v2 mount), e.g. ``faasrm/fn-a``."""
    function: str = ""
    """Function name (default: the last path component up to an '@')."""
    cpu_cores: float = 0.0
    """The user's CPU (cores); 0 = take the cgroup's limits at first sight."""
    mem_mb: float = 0.0
    """The user's memory (MB); 0 = take the cgroup's limits at first sight."""
    cpu_weight: int = 100
    """The user's cpu weight (v2 scale 1..10000)."""


@dataclass(frozen=True)
class CgroupfsConfig:
    enabled: bool = True
    """Manage plain cgroups (the catch-all runtime)."""
    root: str = "/sys/fs/cgroup"
    """cgroupfs mount root."""
    version: int = 0
    """1 or 2; 0 = detect."""
    parent: str = ""
    """Manage every child cgroup of this parent (empty = only the listed containers)."""
    default_cpu_cores: float = 0.0
    """User CPU of discovered children (0 = their limits at first sight)."""
    default_mem_mb: float = 0.0
    """User memory of discovered children (0 = their limits at first sight)."""
    containers: list[ContainerConfig] = field(default_factory=list)
    """Explicitly listed containers ([[cgroupfs.containers]] tables)."""


@dataclass(frozen=True)
class DockerConfig:
    enabled: bool = False
    """Manage OpenWhisk action containers through the Docker Engine (tried before cgroupfs)."""
    base_url: str = ""
    """Engine API address, e.g. ``unix:///var/run/docker.sock``; empty = $DOCKER_HOST or the
    default socket."""
    cores_per_share: float = 0.0
    """User cores per CPU share for containers sized by ``--cpu-shares`` (OpenWhisk); 0 = host
    cores / 1024 (a container holding the invoker's whole memory pool gets every core)."""
    namespaces: list[str] = field(default_factory=list)
    """Known OpenWhisk namespaces (as sanitised in container names), for names whose namespace
    contains ``_``; empty = the namespace is the first ``_``-separated token."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """ONNX policy; empty = models/default.onnx of the installation (rule fallback if absent)."""
    sha256: str = ""
    """Expected sha256 of the file (empty = take it from <path>.json when present)."""
    max_runtime_failures: int = 3
    """Consecutive non-finite decisions after which the previous model is rolled back."""
    rule: str = "user"
    """The model-free rule that decides when no model is loaded or the model fails: ``user`` (the
    allowed candidate closest to the user's size) or ``smallest`` (the fewest resources the
    safeguard allows)."""


@dataclass(frozen=True)
class SpoolConfig:
    dir: str = "/var/lib/faasrm/spool"
    """Trajectory spool directory."""
    max_bytes: int = 256 * 2**20
    """Bound on the spool's size; the oldest segment is dropped (and counted) beyond it (256 MiB:
    hours of records at a busy host's rate, so a trainer outage of minutes loses nothing)."""
    segment_bytes: int = 2**20
    """Size at which a new segment file is started."""


@dataclass(frozen=True)
class ShipperConfig:
    enabled: bool = False
    """Ship spooled trajectory records to the trainer service."""
    url: str = ""
    """Trainer base URL, e.g. https://trainer:9480 (http only for a trainer on this host or one
    that sets allow_plaintext: the token and the records would cross the network in clear)."""
    token_file: str = ""
    """File holding the trainer's bearer token (else ``token``, else $FAASRM_TRAINER_TOKEN)."""
    token: str = ""
    """The bearer token itself (prefer token_file)."""
    ca_file: str = ""
    """CA certificate(s), PEM, that the trainer's https certificate must chain to (e.g. the
    ``ca.crt`` of ``systemd/trainer-tls.sh``); empty = the system's CAs."""
    allow_plaintext: bool = False
    """Let the shipper and the model poller use an http:// url to a host that is not loopback
    (a trainer with its own allow_plaintext, on a trusted private network): the token, the
    records and the models then cross the network in clear text."""
    state_file: str = "/var/lib/faasrm/shipper.json"
    """Acknowledged spool position, next batch seq and the in-flight batch (fsynced)."""
    batch_records: int = 2000
    """Most records per batch."""
    max_batch_bytes: int = 4 * 2**20
    """Most bytes per batch body (keep below the trainer's max_body_bytes)."""
    interval_s: float = 1.0
    """Pause between looks at the spool when everything is shipped."""
    backoff_initial_s: float = 0.5
    """First retry delay; doubled per failure (with jitter) up to backoff_max_s."""
    backoff_max_s: float = 30.0
    """Longest retry delay."""
    timeout_s: float = 10.0
    """Per-request timeout."""

    def resolve_token(self) -> str:
        return read_token(
            "shipper", self.token_file, self.token or os.environ.get("FAASRM_TRAINER_TOKEN", "")
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context for the trainer (https urls): ``ca_file`` or the system's CAs."""
        return tls_client_context(self.ca_file, "shipper.ca_file")


def tls_client_context(ca_file: str, key: str) -> ssl.SSLContext:
    """A client context that verifies servers against ``ca_file`` (PEM; empty = the system's
    CAs) and their host names; an unreadable file is a ConfigError naming ``key``."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key} {ca_file}: {exc}") from None


@dataclass(frozen=True)
class ModelPollerConfig:
    enabled: bool = False
    """Long-poll the trainer's registry for new models and hot-swap them."""
    url: str = ""
    """Trainer base URL (empty = shipper.url); it uses [shipper]'s token, ca_file and
    allow_plaintext."""
    dir: str = "/var/lib/faasrm/models"
    """Where downloaded models are kept (the active one is reloaded after a restart)."""
    wait_s: float = 30.0
    """Long-poll duration per request."""
    backoff_initial_s: float = 0.5
    """First retry delay after an error (doubled, jittered, up to backoff_max_s)."""
    backoff_max_s: float = 30.0
    """Longest retry delay."""
    slowdown_rfet: float = 1.2
    """An invocation slower than this times its baseline counts as slowed down (failures too)."""
    max_slowdown_rate: float = 0.3
    """Roll back a new model if more than this share of its invocations are slowed down."""
    min_invocations: int = 20
    """Invocations under a new model before the rollback check applies."""
    watch_invocations: int = 200
    """Invocations after which a new model is confirmed and no longer watched."""
    max_model_bytes: int = 64 * 2**20
    """Largest model download (the trainer's own ``max_model_bytes`` default): a larger one is
    refused before or while it is read, so a broken trainer cannot make the node hold more."""


@dataclass(frozen=True)
class DebugConfig:
    trace_size: int = 2000
    """Entries kept in the /debug/allocations ring buffer."""
    max_function_labels: int = 50
    """Functions with their own metric label; the rest are counted as 'other'."""


@dataclass(frozen=True)
class Config:
    node_id: str = ""
    """This host's id in trajectory records (default: the hostname)."""
    log_level: str = "info"
    """debug, info, warning or error."""
    server: ServerConfig = field(default_factory=ServerConfig)
    grid: ResourceGrid = field(default_factory=ResourceGrid)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    safeguard: SafeguardConfig = field(default_factory=SafeguardConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    actuation: ActuationConfig = field(default_factory=ActuationConfig)
    boundaries: BoundaryConfig = field(default_factory=BoundaryConfig)
    cgroupfs: CgroupfsConfig = field(default_factory=CgroupfsConfig)
    docker: DockerConfig = field(default_factory=DockerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    shipper: ShipperConfig = field(default_factory=ShipperConfig)
    model_poller: ModelPollerConfig = field(default_factory=ModelPollerConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def node(self) -> str:
        return self.node_id or socket.gethostname()


# ------------------------------------------------------------------------------------ building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported type {tp}")  # not used by the schema
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: Any, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in [{prefix}]" if prefix else ""
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{where}; "
            f"known: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"missing required key{'s' if len(missing) > 1 else ''} "
            f"{', '.join(f'{prefix}.{m}' if prefix else m for m in missing)}"
        )
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section's own validation (e.g. ResourceGrid's unit sizes)
        raise ConfigError(f"{prefix}: {exc}" if prefix else str(exc)) from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"bad override key {dotted!r}")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a table")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=VALUE`` -> (key, value); VALUE is a TOML literal, else taken as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


HARD_MEM_MARGIN_UNITS = 1.0
"""``safeguard.mem_margin_units`` when ``v1_memory_harvest = "hard"`` and the margin is not set:
under the hard limit every miss of the margin is an OOM kill, and a quarter unit was killed
about twice as often as the reference's whole one (docs/learning.md, "A quarter-unit margin by
default")."""


def _margin_follows_memory_mode(data: dict) -> None:
    """Give a ``hard`` host the reference's whole-unit margin unless its margin is set."""
    actuation = data.get("actuation")
    if isinstance(actuation, dict) and actuation.get("v1_memory_harvest") == "hard":
        safeguard = data.setdefault("safeguard", {})
        if isinstance(safeguard, dict):
            safeguard.setdefault("mem_margin_units", HARD_MEM_MARGIN_UNITS)


def from_dict(data: dict, overrides: dict[str, Any] | None = None) -> Config:
    data = _deep_copy(data)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    _margin_follows_memory_mode(data)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def read_toml(path: str | Path | None) -> dict:
    """The TOML file's table (empty for None); unreadable or malformed -> ConfigError."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (TOML; None = all defaults) and apply dotted ``overrides``."""
    data = read_toml(path)
    try:
        return from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


REWARD_WEIGHTS = (
    "slowdown_weight",
    "tolerance",
    "delay_weight",
    "delay_floor_s",
    "failure_penalty",
    "efficiency_weight",
)
"""The ``[reward]`` keys that may not be negative (a negative one rewards what it punishes)."""


def validate(cfg: Config) -> None:
    """Value checks the type system does not express."""
    problems = []
    if not 1 <= cfg.server.port <= 65535 and cfg.server.port != 0:
        problems.append(f"server.port {cfg.server.port} outside 0..65535")
    if len(os.fsencode(cfg.server.socket)) > MAX_SOCKET_PATH:
        problems.append(f"server.socket is longer than {MAX_SOCKET_PATH} bytes (a kernel limit)")
    if cfg.server.tcp_hooks and not (cfg.server.token_file or cfg.server.token):
        problems.append("server.tcp_hooks needs server.token_file or server.token")
    if cfg.server.tcp_hooks and not is_loopback(cfg.server.host) and not cfg.server.allow_plaintext:
        problems.append(
            f"server.tcp_hooks on server.host {cfg.server.host!r}, not a loopback address: the "
            "hooks' token would cross the network in clear text (the TCP listener has no TLS); "
            "use the unix socket, a loopback host, or server.allow_plaintext = true on a trusted "
            "private network"
        )
    if not 0.005 <= cfg.sampler.tick_s <= 10:
        problems.append(f"sampler.tick_s {cfg.sampler.tick_s} outside 0.005..10")
    if cfg.sampler.discover_every_s < cfg.sampler.tick_s:
        problems.append("sampler.discover_every_s must be at least sampler.tick_s")
    if cfg.sampler.slow_every < 1:
        problems.append("sampler.slow_every must be >= 1")
    for name in ("threshold", "give_back_threshold"):
        v = getattr(cfg.safeguard, name)
        if not 0 < v <= 1:
            problems.append(f"safeguard.{name} {v} outside (0, 1]")
    for name in REWARD_WEIGHTS:
        if getattr(cfg.reward, name) < 0:
            problems.append(f"reward.{name} {getattr(cfg.reward, name)} must be >= 0")
    if cfg.reward.clip <= 0:
        problems.append(f"reward.clip {cfg.reward.clip} must be > 0")
    if cfg.model.max_runtime_failures < 1:
        problems.append(f"model.max_runtime_failures {cfg.model.max_runtime_failures} must be >= 1")
    if cfg.model.rule not in RULES:
        problems.append(f"model.rule {cfg.model.rule!r} is not one of {', '.join(RULES)}")
    if cfg.safeguard.mem_headroom_mb < 0:
        problems.append("safeguard.mem_headroom_mb must be >= 0")
    margin = cfg.safeguard.mem_margin_units
    if not 0 <= margin <= 1:
        problems.append(f"safeguard.mem_margin_units {margin} outside [0, 1]")
    if not cfg.safeguard.mem_margin_sd >= 0:
        problems.append("safeguard.mem_margin_sd must be >= 0")
    if cfg.safeguard.mem_harvest_after < 0:
        problems.append("safeguard.mem_harvest_after must be >= 0")
    if not 1000 <= cfg.actuation.cpu_period_us <= 1_000_000:
        problems.append(
            f"actuation.cpu_period_us {cfg.actuation.cpu_period_us} outside 1000..1000000"
        )
    named = set()
    for i, hp in enumerate(cfg.actuation.harvest_periods):
        key = f"actuation.harvest_periods[{i}]"
        if not hp.function or hp.function in named:
            problems.append(f"{key}.function must be set, once per function")
        named.add(hp.function)
        if not 1000 <= hp.cpu_period_us <= 1_000_000:
            problems.append(f"{key}.cpu_period_us {hp.cpu_period_us} outside 1000..1000000")
    if not cfg.actuation.state_file:
        problems.append("actuation.state_file must be set")
    if not cfg.actuation.profiles_save_s >= 1:
        problems.append(f"actuation.profiles_save_s {cfg.actuation.profiles_save_s} must be >= 1")
    if cfg.actuation.v1_memory_harvest not in V1_MEMORY_HARVEST:
        problems.append(
            f"actuation.v1_memory_harvest {cfg.actuation.v1_memory_harvest!r} is not one of "
            f"{', '.join(V1_MEMORY_HARVEST)}"
        )
    if not 0 <= cfg.actuation.throttle_target <= 1:
        problems.append(f"actuation.throttle_target {cfg.actuation.throttle_target} outside [0, 1]")
    if cfg.boundaries.busy_cores <= 0 or cfg.boundaries.idle_ticks < 1:
        problems.append("boundaries.busy_cores must be > 0 and boundaries.idle_ticks >= 1")
    if cfg.docker.cores_per_share < 0:
        problems.append("docker.cores_per_share must be >= 0 (0 = host cores / 1024)")
    if cfg.docker.base_url and "://" not in cfg.docker.base_url:
        problems.append(f"docker.base_url {cfg.docker.base_url!r} needs a scheme (unix://, tcp://)")
    if cfg.cgroupfs.version not in (0, 1, 2):
        problems.append(f"cgroupfs.version {cfg.cgroupfs.version} is not 0, 1 or 2")
    mem_floor = min_user_mem_mb(cfg.safeguard.mem_headroom_mb)  # what a hook may report
    sizes = [("cgroupfs.default_", cfg.cgroupfs.default_cpu_cores, cfg.cgroupfs.default_mem_mb)]
    sizes += [
        (f"cgroupfs.containers[{i}].", c.cpu_cores, c.mem_mb)
        for i, c in enumerate(cfg.cgroupfs.containers)
    ]
    for key, cores, mem_mb in sizes:
        if cores != 0 and cores < MIN_USER_CORES:
            problems.append(
                f"{key}cpu_cores {cores} must be 0 (the cgroup's own) or >= {MIN_USER_CORES}"
            )
        if mem_mb != 0 and mem_mb < mem_floor:
            problems.append(f"{key}mem_mb {mem_mb} must be 0 (the cgroup's own) or >= {mem_floor}")
    seen = set()
    for i, c in enumerate(cfg.cgroupfs.containers):
        if not c.path.strip("/"):
            problems.append(f"cgroupfs.containers[{i}].path is empty")
        if c.path.strip("/") in seen:
            problems.append(f"cgroupfs.containers[{i}].path {c.path!r} listed twice")
        seen.add(c.path.strip("/"))
        key = f"cgroupfs.containers[{i}]"
        if not 1 <= c.cpu_weight <= 10000:
            problems.append(f"{key}.cpu_weight {c.cpu_weight} outside 1..10000")
    if cfg.spool.max_bytes < cfg.spool.segment_bytes or cfg.spool.segment_bytes < 4096:
        problems.append("spool.segment_bytes must be >= 4096 and <= spool.max_bytes")
    sh, mp = cfg.shipper, cfg.model_poller
    if sh.enabled and not sh.url.startswith(("http://", "https://")):
        problems.append("shipper.url must be an http(s) URL when the shipper is enabled")
    if mp.enabled and not (mp.url or sh.url).startswith(("http://", "https://")):
        problems.append("model_poller.url (or shipper.url) must be an http(s) URL")
    plain = {
        name: url
        for name, on, url in (
            ("shipper", sh.enabled, sh.url),
            ("model_poller", mp.enabled, mp.url or sh.url),
        )
        if on and url.startswith("http://")
    }
    if sh.ca_file and plain:
        problems.append(
            f"shipper.ca_file is set but the {' and '.join(plain)} url is http://: use https://"
        )
    exposed = [n for n, url in plain.items() if not is_loopback(urlsplit(url).hostname or "")]
    if exposed and not sh.allow_plaintext:
        problems.append(
            f"the {' and '.join(exposed)} url is plain http to a host that is not loopback: the "
            "trainer's token would cross the network in clear text; use https:// (or "
            "shipper.allow_plaintext = true on a trusted private network)"
        )
    if sh.batch_records < 1 or sh.max_batch_bytes < 4096 or sh.interval_s <= 0:
        problems.append("shipper: batch_records >= 1, max_batch_bytes >= 4096, interval_s > 0")
    if sh.timeout_s <= 0:
        problems.append(f"shipper.timeout_s {sh.timeout_s} must be > 0")
    for name, sec in (("shipper", sh), ("model_poller", mp)):
        if not 0 < sec.backoff_initial_s <= sec.backoff_max_s:
            problems.append(f"{name}: need 0 < backoff_initial_s <= backoff_max_s")
    if not 0 < mp.wait_s <= 300 or not 0 <= mp.max_slowdown_rate <= 1:
        problems.append("model_poller: wait_s in (0, 300], max_slowdown_rate in [0, 1]")
    if mp.min_invocations < 1 or mp.watch_invocations < mp.min_invocations:
        problems.append("model_poller: 1 <= min_invocations <= watch_invocations")
    if mp.slowdown_rfet < 1:
        problems.append(
            f"model_poller.slowdown_rfet {mp.slowdown_rfet} must be >= 1 (below 1 an invocation "
            "faster than its baseline counts as slowed down)"
        )
    if mp.max_model_bytes < 1:
        problems.append("model_poller.max_model_bytes must be >= 1")
    if cfg.debug.trace_size < 1 or cfg.debug.max_function_labels < 0:
        problems.append("debug.trace_size must be >= 1, debug.max_function_labels >= 0")
    if not is_node_id(cfg.node):
        source = "" if cfg.node_id else " (the hostname: set node_id)"
        problems.append(
            f"node_id {cfg.node!r}{source} is not {NODE_ID_RULE}: the trainer refuses its batches"
        )
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        problems.append(f"log_level {cfg.log_level!r} is not debug, info, warning or error")
    if problems:
        raise ConfigError("; ".join(problems))


def load_tree(
    cls: Any,
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    removed: dict[str, str] | None = None,
) -> Any:
    """Strictly build any dataclass tree ``cls`` from a TOML file plus dotted overrides.

    The same rules as ``load`` (unknown keys, wrong types and non-finite numbers are errors naming
    the key); used by the trainer's config, which has its own schema. ``removed`` maps a dotted
    key that no longer exists to what replaced it: an old file that sets one is refused with that
    message instead of the generic unknown-key one.
    """
    data = read_toml(path)
    data = _deep_copy(data)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    for dotted, replacement in (removed or {}).items():
        *tables, name = dotted.split(".")
        node: Any = data
        for t in tables:
            node = node.get(t) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            raise ConfigError(f"{path or 'config'}: {dotted} was removed: {replacement}")
    try:
        return _build(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
