"""Platform settings: one frozen object, built once from flags and `BERTH_*` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_REPLICA_MEMORY_LIMIT_MB = 4096
# A request's deadline, queueing included (Databricks' model execution limit): past it, 504 DEADLINE_EXCEEDED.
DEFAULT_REQUEST_TIMEOUT_S = 297.0
DEFAULT_REPLICA_START_TIMEOUT_S = 300.0
DEFAULT_CRASH_LIMIT = 5
DEFAULT_CRASH_BACKOFF_S = 0.5
DEFAULT_CRASH_BACKOFF_MAX_S = 30.0
DEFAULT_STABLE_AFTER_S = 60.0
# One gateway process proxies ~5,000 small requests/s on one core (BENCHMARKS.md); on a big host the
# replicas need the other cores more, so the gateway takes one core in eight.
CORES_PER_GATEWAY = 8


def default_data_dir() -> Path:
    return Path.home() / ".berth"


def host_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    """Server settings. Every field can be set as `BERTH_<FIELD>` in the environment."""

    bind_host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=default_data_dir)
    store_url: str | None = None
    admin_token: str | None = None
    replica_memory_limit_mb: int = DEFAULT_REPLICA_MEMORY_LIMIT_MB
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    replica_start_timeout_s: float = DEFAULT_REPLICA_START_TIMEOUT_S
    crash_limit: int = DEFAULT_CRASH_LIMIT
    crash_backoff_s: float = DEFAULT_CRASH_BACKOFF_S
    crash_backoff_max_s: float = DEFAULT_CRASH_BACKOFF_MAX_S
    stable_after_s: float = DEFAULT_STABLE_AFTER_S
    cores: int = field(default_factory=host_cores)
    gateway_workers: int = 0  # gateway processes on this host; 0: one per CORES_PER_GATEWAY cores
    # Instant replicas (berth.backends.local): fork from a loaded template, else take a warm-pool standby.
    replica_fork: bool = True
    warm_pool_min: int = 1  # standbys kept even without demand
    warm_pool_memory_mb: int = 1024  # the standbys' total RSS stays under this
    warm_pool_window_s: float = 300.0  # demand is remembered this long
    # A request to an entity with no ready replica (starting, restarting, at zero) waits this long for one.
    hold_timeout_s: float = 60.0
    # The admission queue's wait budget (berth.gateway.admission); 0: one observed service time, so the queue
    # holds about the provisioned concurrency. Longer: more requests wait instead of a 429, and wait longer.
    queue_wait_s: float = 0.0
    # An endpoint with scale_to_zero_enabled stops its replicas after this long without a request.
    scale_to_zero_idle_s: float = 1800.0
    # Every other autoscaler period and window (berth.autoscaler.settings) times this: < 1 for tests and demos.
    autoscale_time_scale: float = 1.0
    # > 0: every replica admits exactly this many requests (the vertical axis is off); 0: the model-aware default.
    replica_concurrency: int = 0
    # A replica leaves the routing table this long before it is sent SIGTERM (all gateways stop using it).
    drain_settle_s: float = 1.0
    # What one request may carry (berth.payload): the gateway answers 413 and 431, the control plane and the
    # replicas 400. Sizes in MiB and KiB.
    max_body_mb: float = 16.0
    max_header_kb: float = 64.0  # all request headers together
    max_header_field_kb: float = 16.0  # one request header
    max_json_depth: int = 64  # nested arrays and objects of a JSON body (4 to 1024)
    max_rows: int = 100_000  # rows of one invocation
    # Rate limits shared across gateway hosts through this Redis server; unset: shared by this host's processes.
    redis_url: str | None = None
    # The platform's log on stderr (berth.observability.logs): text or json, and from which level.
    log_format: str = "text"
    log_level: str = "info"
    # Inference tables (berth.observability.inference): where they live (a path or a deltalake URI; unset:
    # DATA_DIR/inference), and how much each gateway process buffers for them before it drops rows.
    inference_tables_uri: str | None = None
    inference_buffer_mb: float = 64.0
    # Models from an MLflow registry (berth.registry): the tracking server that resolves `models:/…`, `runs:/…`
    # and registered names (unset: MLFLOW_TRACKING_URI), and the artifact cache's bound (DATA_DIR/artifacts).
    mlflow_tracking_uri: str | None = None
    artifact_cache_mb: float = 20480.0
    # Secrets (berth.store.secrets): the Fernet key(s) that encrypt them, comma-separated (the first encrypts);
    # unset: DATA_DIR/secrets.key, made with mode 0600. Servers sharing a PostgreSQL store must share it.
    secrets_key: str | None = field(default=None, repr=False)

    @property
    def gateway_processes(self) -> int:
        """How many processes serve the gateway (the main process is one of them)."""
        if self.gateway_workers > 0:
            return self.gateway_workers
        return max(1, self.cores // CORES_PER_GATEWAY)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `BERTH_*` variables, then explicit overrides (CLI flags) that are not None."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"BERTH_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"]).expanduser()
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def resolved_inference_uri(self) -> str:
        return self.inference_tables_uri or str(self.data_dir / "inference")

    @property
    def resolved_tracking_uri(self) -> str | None:
        return self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.data_dir / 'berth.db'}"


def _convert(type_name: Any, raw: str) -> Any:
    t = str(type_name)
    if t == "bool":
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"not a boolean: {raw!r}")
        return raw.lower() in ("1", "true", "yes", "on")
    if t.startswith("int"):
        return int(raw)
    if t.startswith("float"):
        return float(raw)
    if t == "Path":
        return Path(raw)
    return raw
