"""The backend interface: start, watch and stop replicas, reported by id and address."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

# Exit code a replica uses when its model cannot be loaded: deterministic, so never retried.
EXIT_MODEL_LOAD_FAILED = 3


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a backend needs to start one replica of a served entity."""

    endpoint_name: str
    entity_name: str
    model_uri: str
    runtime: str = "pyfunc"
    max_concurrency: int = 16
    environment_vars: dict[str, str] = field(default_factory=dict)
    memory_limit_mb: int = 4096
    entity_uid: str = ""  # one served entity of one config lineage: replicas with the same uid may share a template


@dataclass(frozen=True)
class ReplicaHandle:
    """A started replica: an id and where to reach it (`unix:/path` or `tcp:host:port`)."""

    id: str
    address: str
    pid: int | None = None


@dataclass(frozen=True)
class ReplicaExit:
    """How a replica ended: its exit code (negative: killed by that signal) and last log lines."""

    returncode: int
    log_tail: str

    @property
    def model_load_failed(self) -> bool:
        return self.returncode == EXIT_MODEL_LOAD_FAILED

    def describe(self) -> str:
        if self.returncode < 0:
            how = f"was killed by signal {-self.returncode}"
        else:
            how = f"exited with code {self.returncode}"
        return how


class Backend(Protocol):
    """What the reconciler needs from a place that runs replicas."""

    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Start a replica; returns at once, before the model is loaded."""
        ...

    async def is_ready(self, replica_id: str) -> bool:
        """True once the replica answers its health check."""
        ...

    async def stats(self, replica_id: str) -> dict[str, Any] | None:
        """The replica's own counters (`requests`, `in_flight`, ...), or None if it does not answer."""
        ...

    async def configure(self, replica_id: str, max_concurrency: int) -> bool:
        """Change how many requests a running replica admits at once; False if it did not take it."""
        ...

    def usage(self, replica_id: str) -> tuple[float, int] | None:
        """CPU seconds the replica has used so far and its resident memory in bytes, or None."""
        ...

    def exited(self, replica_id: str) -> ReplicaExit | None:
        """The replica's exit, or None while it runs."""
        ...

    async def stop(self, replica_id: str, grace_s: float = 10.0) -> None:
        """Stop a replica: terminate, then kill after the grace period."""
        ...

    async def release(self, spec: ReplicaSpec) -> None:
        """The entity `spec` belongs to is gone: drop what the backend kept for it (a template)."""
        ...

    def logs(self, replica_id: str, max_lines: int = 200) -> str:
        """The most recent output lines of a replica."""
        ...

    def cleanup_orphans(self, records: list[tuple[str, int | None]]) -> list[str]:
        """Kill replicas a previous server run recorded and left behind; returns their ids."""
        ...

    async def close(self) -> None:
        """Stop every replica this backend started."""
        ...
