"""What one replica does with concurrent requests: service times, the concurrency-vs-latency curve, start-up.

The model types are the reference's §c.2 table (`/work/shared/reference/autoscaling.md`), with its defaults:

| name | base service at c=1 | curve: slowdown(level) | initial / hard cap | cold start | warm |
|------|---------------------|------------------------|--------------------|------------|------|
| cpu  | LogNormal (LN)(5 ms, σ 0.5) | processor sharing on k=2 cores: max(1, c/k) | 2 / 16 | LN(8 s, σ 0.4) | 2 s |
| cpu8 | as cpu on 8 cores (profile change: knee 8 → 2) | max(1, c/8) | 8 / 32 | LN(8 s, σ 0.4) | 2 s |
| io   | LN(200 ms, σ 1.0) | flat until c≈100, then linear: max(1, c/100) | 32 / 256 | LN(8 s, σ 0.4) | 2 s |
| gpu  | LN(15 ms, σ 0.3) | batching (1 + α(min(c,b)−1))·max(1, c/b), α 0.1, b 32 | 16 / 64 | LN(45 s, σ 0.5) | 5 s |

Choices the reference leaves open, and why:
- *Initial per-replica concurrency* (what the operator configured, and what every baseline's target is
  derived from): one request per core for the CPU types, so the common 0.7 target keeps the cores 70 %
  busy (two per core would put every policy's in-flight target above the knee, where a replica is
  CPU-saturated and every policy hovers on a knife edge); a third of the knee for the IO type (it admits
  far less than it could: the onboarding case the vertical axis exists for); half the batch size for the
  GPU type. Every policy starts from the same value; only the full autoscaler may change it.
- *GPU σ*: the reference gives no spread for the GPU type; 0.3 (batched inference is regular).
- *Mean-field slowdown*: a request's service time is fixed when it starts, as base × cost multiplier ×
  slowdown(level), where level is the per-replica mean in flight over the previous second (requests are
  spread evenly over the ready replicas; a power-of-two router is close to that). Using the previous
  second's mean, not the instantaneous count, is what lets the engine vectorise a whole second exactly;
  the exact per-request simulation (`exact.py`) uses the same rule.
- *CPU / GPU utilisation signal*: min(1, level / knee) (cores for the CPU types, the I/O knee for the IO
  type, the batch size for the GPU type) plus N(0, 0.03) noise added by the engine.
- *Memory signal*: a fraction of the memory limit, base + per-request × level (the profile-change family's
  memory-bound version doubles the per-request part).
- *Cold start / warm attach*: cold is LogNormal(median, σ); warm attach is LogNormal(median, 0.1). The
  diurnal family compresses both by its time compression (`compressed`).
- *Tick*: 2 ms for the CPU and GPU types, 10 ms for the IO type. A request occupies whole ticks with
  stochastic rounding (unbiased occupancy), so the tick only coarsens queue waits; against the exact
  per-request simulation a 2 ms tick gives the same p50/p99 as a 1 ms one on the CPU type (within 2 %;
  `tests/unit/test_simulator.py`) at half the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

_Z95 = 1.6448536269514722


@dataclass(frozen=True)
class ReplicaModel:
    """One model type. Times in seconds; `knee` is cores (ps curve) or the batch size (batch curve)."""

    name: str
    median_s: float  # base service time at concurrency 1 (median)
    sigma: float  # log-space spread of the base service time
    curve: str  # "ps" (processor sharing / flat-then-linear) | "batch"
    knee: float
    concurrency: int  # initial per-replica concurrency (the operator's setting)
    max_concurrency: int  # hard per-replica cap: no policy may set more
    cold_median_s: float
    cold_sigma: float
    warm_s: float
    alpha: float = 0.0  # batch curve: extra latency per extra request in a batch
    mem_base: float = 0.25
    mem_per_request: float = 0.02
    cost_factor: float = 1.0  # a new model version's per-request cost relative to the original
    tick_s: float = 0.002  # the simulation tick this model needs (≤ 10 ms, at most ~40 % of the median)

    # --- the concurrency-vs-latency curve -------------------------------------------------------------
    def slowdown(self, level: float) -> float:
        """Service-time multiplier at `level` requests in flight per replica."""
        if self.curve == "batch":
            batch = min(level, self.knee)
            return (1.0 + self.alpha * max(0.0, batch - 1.0)) * max(1.0, level / self.knee)
        return max(1.0, level / self.knee)

    def cpu(self, level: float) -> float:
        """Utilisation signal (CPU for the CPU/IO types, GPU for the GPU type) at `level`, without noise."""
        return min(1.0, level / self.knee)

    def cpu_array(self, level: np.ndarray) -> np.ndarray:
        return np.minimum(1.0, level / self.knee)

    def memory(self, level: float) -> float:
        """Mean resident memory as a fraction of the limit at `level`."""
        return min(1.0, self.mem_base + self.mem_per_request * level)

    # --- service times ------------------------------------------------------------------------------------
    @property
    def mean_base_s(self) -> float:
        """Mean base service time at concurrency 1 (the cost multiplier not included)."""
        return self.median_s * self.cost_factor * math.exp(self.sigma**2 / 2)

    def mean_service_s(self, level: float, cost_mean: float = 1.0) -> float:
        return self.mean_base_s * cost_mean * self.slowdown(level)

    # --- start-up ---------------------------------------------------------------------------------------
    def cold_start(self, rng: np.random.Generator) -> float:
        return float(self.cold_median_s * math.exp(self.cold_sigma * rng.standard_normal()))

    def warm_attach(self, rng: np.random.Generator) -> float:
        return float(self.warm_s * math.exp(0.1 * rng.standard_normal()))

    def cold_start_p95(self) -> float:
        return self.cold_median_s * math.exp(_Z95 * self.cold_sigma)

    # --- sizing helpers (the references and the report use them; no policy does) -------------------------
    def operating_level(self, concurrency: int, target: float) -> float:
        return max(1e-9, target * concurrency)

    def needed_replicas(self, rate: float, concurrency: int, target: float = 0.7, cost_mean: float = 1.0) -> int:
        """Replicas that carry `rate` req/s at `target` × concurrency in flight each (Little's law)."""
        if rate <= 0:
            return 0
        level = self.operating_level(concurrency, target)
        in_flight = rate * self.mean_service_s(level, cost_mean)
        return max(1, math.ceil(in_flight / level - 1e-9))

    def capacity_rps(self, replicas: int, concurrency: int, cost_mean: float = 1.0) -> float:
        """Throughput of `replicas` replicas with every slot busy (concurrency in flight each)."""
        if replicas <= 0 or concurrency <= 0:
            return 0.0
        return replicas * concurrency / self.mean_service_s(concurrency, cost_mean)

    def best_concurrency(self) -> int:
        """The largest per-replica concurrency whose slowdown at the cap is at most 2 (the oracle's choice)."""
        best = 1
        for c in range(1, self.max_concurrency + 1):
            if self.slowdown(c) <= 2.0 + 1e-9:
                best = c
        return best

    # --- variants -------------------------------------------------------------------------------------------
    def compressed(self, factor: float) -> ReplicaModel:
        """Cold start and warm attach divided by `factor` (a compressed-time trace)."""
        if factor == 1.0:
            return self
        return replace(self, cold_median_s=self.cold_median_s / factor, warm_s=self.warm_s / factor)

    def with_(self, **changes: object) -> ReplicaModel:
        return replace(self, **changes)  # type: ignore[arg-type]

    def describe(self) -> dict[str, object]:
        return {"model": self.name, "median_ms": self.median_s * 1e3, "sigma": self.sigma, "curve": self.curve,
                "knee": self.knee, "alpha": self.alpha, "concurrency": self.concurrency,
                "max_concurrency": self.max_concurrency, "cold_median_s": round(self.cold_median_s, 4),
                "cold_sigma": self.cold_sigma, "warm_s": round(self.warm_s, 4), "tick_ms": self.tick_s * 1e3}


MODELS: dict[str, ReplicaModel] = {
    "cpu": ReplicaModel("cpu", median_s=0.005, sigma=0.5, curve="ps", knee=2, concurrency=2, max_concurrency=16,
                        cold_median_s=8.0, cold_sigma=0.4, warm_s=2.0, mem_base=0.25, mem_per_request=0.02,
                        tick_s=0.002),
    "cpu8": ReplicaModel("cpu8", median_s=0.005, sigma=0.5, curve="ps", knee=8, concurrency=8, max_concurrency=32,
                         cold_median_s=8.0, cold_sigma=0.4, warm_s=2.0, mem_base=0.25, mem_per_request=0.01,
                         tick_s=0.002),
    "io": ReplicaModel("io", median_s=0.200, sigma=1.0, curve="ps", knee=100, concurrency=32, max_concurrency=256,
                       cold_median_s=8.0, cold_sigma=0.4, warm_s=2.0, mem_base=0.2, mem_per_request=0.0025,
                       tick_s=0.010),
    "gpu": ReplicaModel("gpu", median_s=0.015, sigma=0.3, curve="batch", knee=32, alpha=0.1, concurrency=16,
                        max_concurrency=64, cold_median_s=45.0, cold_sigma=0.5, warm_s=5.0, mem_base=0.4,
                        mem_per_request=0.008, tick_s=0.002),
}


@dataclass(frozen=True)
class CostSampler:
    """Per-request cost multiplier: LogNormal(0, sigma) (sigma 0: every request costs 1)."""

    sigma: float = 0.0

    def __call__(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.sigma <= 0:
            return np.ones(n)
        return np.exp(self.sigma * rng.standard_normal(n))

    @property
    def mean(self) -> float:
        return math.exp(self.sigma**2 / 2)
