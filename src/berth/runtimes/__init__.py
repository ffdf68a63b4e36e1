"""How a replica runs a kind of model. Each runtime has documented defaults the platform plans with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeProfile:
    """Defaults for a runtime: how many requests one replica admits, and whether it is CPU-bound."""

    name: str
    per_replica_concurrency: int
    cpu_bound: bool


# pyfunc (classic ML): one predict thread per replica, concurrent requests wait for it; a replica
# admits 16 at once, and more when the one-replica-per-core cap bites.
PYFUNC = RuntimeProfile(name="pyfunc", per_replica_concurrency=16, cpu_bound=True)

RUNTIMES = {PYFUNC.name: PYFUNC}
