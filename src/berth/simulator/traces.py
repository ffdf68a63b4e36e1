"""Seeded synthetic traces, one generator per family (reference §c.1), each returning a `Trace`.

A trace is per-tick arrival counts (a numpy int array; the tick is the replica model's, 1–10 ms), the
per-request cost-multiplier sampler, the model-profile schedule, the bounds, warm pool and starting
replicas every policy gets, and the generator's parameters (stored with every result).

Families and their defaults (`smoke=True` gives the short variants the test suite runs):

- **step** (T1): 10 qps for 300 s → 10,000 qps for 600 s → 10 qps for 300 s, Poisson within each level,
  `cpu` model. The warm pool holds 1.25× the replicas the high level needs (the reference's "warm pool ≥
  needed nodes" case), so the 60 s time-to-capacity claim is testable. The tail after the step is the
  full 300 s (enough to see every policy's scale-down window start).
- **diurnal** (T2): a compressed day (1 day → 2 h, compression 12): rate(t) = base·(1 + A·sin(2πt/P − φ)),
  base 2,500 qps, A 0.8 (peak/mean 1.8), φ = 5π/6 (trough at 04:00, peak at 16:00), `cpu` model with its
  cold start and warm attach compressed alike. The simulated day is a Wednesday; `history(days=7)` gives
  per-minute counts (minutes of simulated, i.e. compressed, time: 60 s buckets) of the 7 preceding days,
  with the reference's weekly factor 0.7 on Saturday and Sunday, starting at t = −7·P. The morning ramp
  (06:00–12:00, simulated 1,800–3,600 s) is where the predictive-minimum check counts misses.
  Policy periods and windows are *not* compressed (they are the policies' own constants); the trace simply
  changes 12× faster than a real day. Tick 4 ms (the only long trace: 2 h at up to 4,500 qps); against the
  exact simulation a 4 ms tick keeps p50/p99 within 6 % even on one replica at 95 % load, and within
  0.2 % at the multi-replica loads the policies run at (`tests/unit/test_simulator.py`).
- **bursty** (T3): 2-state MMPP with the reference defaults (λ_on 500/s, λ_off 1/s, mean on 5 s, mean off
  120 s: IAT CV ≈ 6), exponential on/off durations, 1,800 s, `io` model (200 ms requests, so a burst needs
  several replicas; bursts are shorter than a cold start: the warm pool and the queue decide the outcome).
- **heavy_tail** (T4): constant Poisson 1,500 qps for 600 s, per-request cost LogNormal(0, σ = 1.0)
  (p99/median ≈ 10), `gpu` model (batching curve).
- **profile_change** (T5): constant Poisson 4,000 qps for 900 s on the `cpu8` model (57 % of the CPU
  capacity of the replicas the 0.7 target provisions); at T/2 the concurrency knee moves from 8 to 2 and
  the per-request memory doubles (a memory-bound new version). `kind="cost"` instead multiplies every
  request's cost by `cost_after` (×2..4) at T/2. The SLO stays the original model's.
- **sparse** (T6): 4 h of sessions separated by idle gaps drawn log-uniform in [2 min, 1 h] (not
  compressed); a session is a single request (timer-like, 30 %), a Poisson trickle of 1 + Poisson(5)
  requests over Exp(30 s) (40 %), or a burst of 1 + Poisson(30) requests over Exp(5 s) (30 %). `cpu` model
  with a 10 ms tick (load is far below any queueing), bounds allow scale to zero.

Every family starts with the replicas its initial rate needs at the 0.7 target (the same for every
policy), and bounds generous enough never to bind: min one replica (zero for sparse), max 4× the peak need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import numpy as np

from berth.autoscaler.signals import Bounds
from berth.simulator.replica_model import MODELS, CostSampler, ReplicaModel

FAMILIES = ("step", "diurnal", "diurnal-cpu", "bursty", "heavy_tail", "profile_change", "sparse")
TARGET = 0.7  # the utilisation every policy aims at; used here only to size pools, bounds and the start
DAY_S = 86_400.0


@dataclass(frozen=True)
class ProfileChange:
    """At `t`, the model's fields in `changes` take new values (ReplicaModel.with_)."""

    t: float
    changes: Mapping[str, Any]


@dataclass
class Trace:
    """One seeded trace: everything a run needs besides the policy."""

    family: str
    seed: int
    dt: float  # tick length, s
    arrivals: np.ndarray  # arrivals per tick (uint16/int32)
    model: ReplicaModel  # in force at t = 0
    cost: CostSampler
    bounds: Bounds
    warm_pool: int
    initial_replicas: int
    params: dict[str, Any]
    profile: tuple[ProfileChange, ...] = ()
    history_fn: Callable[[int], np.ndarray] | None = field(default=None, repr=False)
    history_bucket_s: float = 60.0
    day_s: float = DAY_S

    @property
    def ticks_per_s(self) -> int:
        return round(1.0 / self.dt)

    @property
    def n_ticks(self) -> int:
        return int(self.arrivals.shape[0])

    @property
    def duration_s(self) -> int:
        return self.n_ticks // self.ticks_per_s

    @cached_property
    def per_second(self) -> np.ndarray:
        """Arrivals per second (int64)."""
        return self.arrivals.reshape(self.duration_s, self.ticks_per_s).sum(axis=1, dtype=np.int64)

    @property
    def slo_base_s(self) -> float:
        """The model's median service time at concurrency 1: SLOs are multiples of it."""
        return self.model.median_s * self.model.cost_factor

    def model_at(self, t: float) -> ReplicaModel:
        model = self.model
        for change in self.profile:
            if change.t <= t:
                model = model.with_(**change.changes)
        return model

    def history(self, days: int = 7) -> np.ndarray:
        """Per-bucket (`history_bucket_s`) arrival counts of the `days` days before t = 0 (starting at −days·day_s)."""
        if self.history_fn is None:
            raise ValueError(f"the {self.family} trace has no history")
        return self.history_fn(days)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _counts(rates_per_tick: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    counts = rng.poisson(rates_per_tick)
    return counts.astype(np.uint16 if counts.max(initial=0) < 65_535 else np.int32)


def _bin(times: np.ndarray, n_ticks: int, dt: float) -> np.ndarray:
    ticks = np.floor(times / dt).astype(np.int64)
    ticks = ticks[(ticks >= 0) & (ticks < n_ticks)]
    return np.bincount(ticks, minlength=n_ticks).astype(np.uint16)


def _bounds(model: ReplicaModel, peak_rate: float, cost_mean: float, *, scale_to_zero: bool = False) -> Bounds:
    peak = model.needed_replicas(peak_rate, model.concurrency, TARGET, cost_mean)
    return Bounds(min_concurrency=0 if scale_to_zero else model.concurrency,
                  max_concurrency=max(8, 4 * peak) * model.concurrency, scale_to_zero=scale_to_zero)


def _base_params(family: str, seed: int, model: ReplicaModel, dt: float, smoke: bool) -> dict[str, Any]:
    return {"family": family, "seed": seed, "smoke": smoke, "tick_ms": dt * 1e3, **model.describe()}


# --- T1 step ------------------------------------------------------------------------------------------------
def step(seed: int, *, smoke: bool = False, low: float = 10.0, high: float | None = None,
         before_s: int | None = None, during_s: int | None = None, after_s: int | None = None,
         model: str = "cpu", warm_pool: int | None = None) -> Trace:
    m = MODELS[model]
    high = high if high is not None else (2_000.0 if smoke else 10_000.0)
    before_s = before_s if before_s is not None else (30 if smoke else 300)
    during_s = during_s if during_s is not None else (90 if smoke else 600)
    after_s = after_s if after_s is not None else (30 if smoke else 300)
    dt = m.tick_s
    tps = round(1 / dt)
    rate = np.concatenate([np.full(before_s * tps, low), np.full(during_s * tps, high), np.full(after_s * tps, low)])
    arrivals = _counts(rate * dt, _rng(seed, 1))
    need = m.needed_replicas(high, m.concurrency, TARGET)
    pool = warm_pool if warm_pool is not None else math.ceil(1.25 * need)
    params = _base_params("step", seed, m, dt, smoke) | {
        "low_qps": low, "high_qps": high, "before_s": before_s, "during_s": during_s, "after_s": after_s,
        "step_t": float(before_s), "step_end_t": float(before_s + during_s), "warm_pool": pool,
        "needed_at_high": need}
    return Trace("step", seed, dt, arrivals, m, CostSampler(), _bounds(m, high, 1.0), pool,
                 m.needed_replicas(low, m.concurrency, TARGET), params)


# --- T2 diurnal ---------------------------------------------------------------------------------------------
WEEKDAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def diurnal(seed: int, *, smoke: bool = False, base: float | None = None, amplitude: float = 0.8,
            compression: float | None = None, phase: float = 5 * math.pi / 6, weekend: float = 0.7,
            weekday: int = 2, model: str = "io", warm_pool: int = 8, tick_s: float | None = None,
            family: str = "diurnal") -> Trace:
    compression = compression if compression is not None else (288.0 if smoke else 12.0)
    base = base if base is not None else (500.0 if smoke else 2_500.0)
    m = MODELS[model].compressed(compression)
    dt = tick_s if tick_s is not None else max(m.tick_s, 0.004)  # 4 ms for the CPU type: the time budget
    tps = round(1 / dt)
    day = DAY_S / compression
    n_s = round(day)

    def factor(day_index: int) -> float:
        return weekend if (weekday + day_index) % 7 >= 5 else 1.0

    def rate_at(t: np.ndarray) -> np.ndarray:
        day_index = np.floor(t / day).astype(np.int64)
        f = np.where(((weekday + day_index) % 7) >= 5, weekend, 1.0)
        return base * f * (1.0 + amplitude * np.sin(2 * math.pi * t / day - phase))

    t = (np.arange(n_s * tps) + 0.5) * dt
    arrivals = _counts(rate_at(t) * dt, _rng(seed, 2))
    bucket = 60.0

    def history(days: int) -> np.ndarray:
        n = round(days * day / bucket)
        mid = -days * day + (np.arange(n) + 0.5) * bucket
        return _rng(seed, 3).poisson(rate_at(mid) * bucket).astype(np.int64)

    peak = base * (1 + amplitude)
    params = _base_params(family, seed, m, dt, smoke) | {
        "base_qps": base, "amplitude": amplitude, "compression": compression, "day_s": day, "phase": phase,
        "weekend_factor": weekend, "weekday": WEEKDAY_NAMES[weekday], "warm_pool": warm_pool,
        "ramp_t0": day * 6 / 24, "ramp_t1": day * 12 / 24, "peak_qps": peak}
    initial = m.needed_replicas(float(rate_at(np.array([0.0]))[0]), m.concurrency, TARGET)
    return Trace(family, seed, dt, arrivals, m, CostSampler(), _bounds(m, peak, 1.0), warm_pool, initial,
                 params, history_fn=history, history_bucket_s=bucket, day_s=day)


# --- T3 bursty ----------------------------------------------------------------------------------------------
def bursty(seed: int, *, smoke: bool = False, rate_on: float = 500.0, rate_off: float = 1.0, mean_on_s: float = 5.0,
           mean_off_s: float = 120.0, duration_s: int | None = None, model: str = "io",
           warm_pool: int = 8) -> Trace:
    duration_s = duration_s if duration_s is not None else (600 if smoke else 1_800)
    m = MODELS[model]
    dt = m.tick_s
    tps = round(1 / dt)
    n = duration_s * tps
    rng = _rng(seed, 4)
    rate = np.empty(n)
    on = bool(rng.random() < mean_on_s / (mean_on_s + mean_off_s))
    i = 0
    while i < n:
        length = max(1, round(rng.exponential(mean_on_s if on else mean_off_s) / dt))
        rate[i:i + length] = rate_on if on else rate_off
        i += length
        on = not on
    arrivals = _counts(rate * dt, rng)
    params = _base_params("bursty", seed, m, dt, smoke) | {
        "rate_on": rate_on, "rate_off": rate_off, "mean_on_s": mean_on_s, "mean_off_s": mean_off_s,
        "duration_s": duration_s, "warm_pool": warm_pool}
    return Trace("bursty", seed, dt, arrivals, m, CostSampler(), _bounds(m, rate_on, 1.0), warm_pool,
                 m.needed_replicas(rate_off, m.concurrency, TARGET), params)


# --- T4 heavy-tailed cost -----------------------------------------------------------------------------------
def heavy_tail(seed: int, *, smoke: bool = False, rate: float | None = None, sigma: float = 1.0,
               duration_s: int | None = None, model: str = "gpu", warm_pool: int = 8) -> Trace:
    rate = rate if rate is not None else (300.0 if smoke else 1_500.0)
    duration_s = duration_s if duration_s is not None else (120 if smoke else 600)
    m = MODELS[model]
    dt = m.tick_s
    cost = CostSampler(sigma)
    arrivals = _counts(np.full(duration_s * round(1 / dt), rate * dt), _rng(seed, 5))
    params = _base_params("heavy_tail", seed, m, dt, smoke) | {
        "rate_qps": rate, "cost_sigma": sigma, "duration_s": duration_s, "warm_pool": warm_pool}
    return Trace("heavy_tail", seed, dt, arrivals, m, cost, _bounds(m, rate, cost.mean), warm_pool,
                 m.needed_replicas(rate, m.concurrency, TARGET, cost.mean), params)


# --- T5 model-profile change --------------------------------------------------------------------------------
def profile_change(seed: int, *, smoke: bool = False, kind: str = "knee", rate: float | None = None,
                   duration_s: int | None = None, knee_after: float = 2.0, cost_after: float = 3.0,
                   model: str = "cpu8", warm_pool: int = 8) -> Trace:
    rate = rate if rate is not None else (1_000.0 if smoke else 4_000.0)
    duration_s = duration_s if duration_s is not None else (240 if smoke else 900)
    m = MODELS[model]
    dt = m.tick_s
    change_t = duration_s / 2
    if kind == "knee":
        changes: dict[str, Any] = {"knee": knee_after, "mem_per_request": 2 * m.mem_per_request}
    elif kind == "cost":
        changes = {"cost_factor": cost_after}
    else:
        raise ValueError(f"unknown profile change {kind!r}")
    arrivals = _counts(np.full(duration_s * round(1 / dt), rate * dt), _rng(seed, 6))
    after = m.with_(**changes)
    peak_need = max(m.needed_replicas(rate, m.concurrency, TARGET), after.needed_replicas(rate, m.concurrency, TARGET))
    bounds = Bounds(min_concurrency=m.concurrency, max_concurrency=max(8, 4 * peak_need) * m.concurrency)
    params = _base_params("profile_change", seed, m, dt, smoke) | {
        "kind": kind, "rate_qps": rate, "duration_s": duration_s, "change_t": change_t,
        "changes": dict(changes), "warm_pool": warm_pool}
    return Trace("profile_change", seed, dt, arrivals, m, CostSampler(), bounds, warm_pool,
                 m.needed_replicas(rate, m.concurrency, TARGET), params,
                 profile=(ProfileChange(change_t, changes),))


# --- T6 sparse / scale to zero ------------------------------------------------------------------------------
def sparse(seed: int, *, smoke: bool = False, duration_s: int | None = None, gap_min_s: float = 120.0,
           gap_max_s: float = 3_600.0, model: str = "cpu", tick_s: float = 0.01, warm_pool: int = 2) -> Trace:
    duration_s = duration_s if duration_s is not None else (3_600 if smoke else 14_400)
    m = MODELS[model]
    dt = tick_s
    rng = _rng(seed, 7)
    times: list[np.ndarray] = []
    t = float(rng.uniform(0, 600))
    sessions = 0
    while t < duration_s:
        kind = rng.choice(3, p=[0.3, 0.4, 0.3])
        if kind == 0:
            length, events = 0.0, np.array([t])
        elif kind == 1:
            length = float(rng.exponential(30.0))
            events = t + np.sort(rng.uniform(0, length, 1 + rng.poisson(5)))
        else:
            length = float(rng.exponential(5.0))
            events = t + np.sort(rng.uniform(0, length, 1 + rng.poisson(30)))
        times.append(events)
        sessions += 1
        t += length + math.exp(rng.uniform(math.log(gap_min_s), math.log(gap_max_s)))
    n = duration_s * round(1 / dt)
    arrivals = _bin(np.concatenate(times) if times else np.empty(0), n, dt)
    params = _base_params("sparse", seed, m, dt, smoke) | {
        "duration_s": duration_s, "gap_min_s": gap_min_s, "gap_max_s": gap_max_s, "sessions": sessions,
        "warm_pool": warm_pool}
    return Trace("sparse", seed, dt, arrivals, m, CostSampler(), _bounds(m, 50.0, 1.0, scale_to_zero=True),
                 warm_pool, 0, params)


# --- a plain Poisson trace (tests and the tick-vs-exact check) -------------------------------------------------
def constant(seed: int, *, smoke: bool = False, rate: float = 150.0, duration_s: int = 300, model: str = "cpu",
             tick_s: float | None = None, cost_sigma: float = 0.0, replicas: int = 1, warm_pool: int = 0,
             model_overrides: Mapping[str, Any] | None = None) -> Trace:
    """Constant-rate Poisson arrivals (not a bake-off family)."""
    m = MODELS[model].with_(**(model_overrides or {}))
    dt = tick_s if tick_s is not None else m.tick_s
    cost = CostSampler(cost_sigma)
    arrivals = _counts(np.full(duration_s * round(1 / dt), rate * dt), _rng(seed, 8))
    params = _base_params("constant", seed, m, dt, smoke) | {"rate_qps": rate, "duration_s": duration_s}
    bounds = Bounds(min_concurrency=1, max_concurrency=_bounds(m, rate, cost.mean).max_concurrency)
    return Trace("constant", seed, dt, arrivals, m, cost, bounds, warm_pool, replicas, params)


GENERATORS: dict[str, Callable[..., Trace]] = {
    "step": step, "diurnal": diurnal, "diurnal-cpu": partial(diurnal, model="cpu", family="diurnal-cpu"),
    "bursty": bursty, "heavy_tail": heavy_tail,
    "profile_change": profile_change, "sparse": sparse, "constant": constant,
}


def make(family: str, seed: int, *, smoke: bool = False, **overrides: Any) -> Trace:
    """The seeded trace of `family`."""
    try:
        generator = GENERATORS[family]
    except KeyError:
        raise ValueError(f"unknown trace family {family!r}; choose from {', '.join(FAMILIES)}") from None
    return generator(seed, smoke=smoke, **overrides)


def inter_arrival_cv(trace: Trace, seed: int = 0) -> float:
    """Coefficient of variation of the inter-arrival times (arrivals spread uniformly within their tick)."""
    ticks = np.repeat(np.arange(trace.n_ticks), trace.arrivals.astype(np.int64))
    times = np.sort((ticks + np.random.default_rng(seed).random(ticks.size)) * trace.dt)
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean()) if gaps.size > 1 else 0.0
