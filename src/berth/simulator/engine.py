"""The tick-based simulation: one trace, one policy, one seed → a `RunResult`.

Semantics (the exact per-request simulation in `exact.py` implements the same ones without ticks):

- **Ticks.** The trace's tick (2 ms for the CPU and GPU models, 4 ms for the 2 h diurnal trace, 10 ms for
  the IO model and the sparse trace). Arrivals are the trace's per-tick counts; request j (in arrival
  order) has an intrinsic cost x_j = LogNormal(0, σ_model) × the trace's cost multiplier, drawn from a
  per-seed stream in blocks, so the same request costs the same under every policy (paired seeds).
- **Admission.** Slots = ready replicas × per-replica concurrency (the hard cap). Requests start FCFS
  (queued cohorts first, then the tick's arrivals) while slots are free. The rest wait in a bounded front
  queue of cohorts (arrival tick, first request, count) whose bound is ceil(slots × `queue_budget`): a
  queue-wait budget of one median service time is about one provisioned concurrency (budget 1.0). An
  arrival beyond the bound is answered 429 at once (the tick's last arrivals are the refused ones).
  While no replica is ready the gateway holds every arrival (no bound, no 429: the activator / interceptor
  behaviour); an arrival while ready == 0 and desired == 0 also calls the policy at once (a "poke", the
  same for every policy) with a fresh, undelayed sample showing the waiting request, and the held
  requests' latency includes the start-up.
- **Service.** Fixed at start: median × cost factor × x_j × slowdown(level), level = min(mean in flight
  over the previous second, slots) ÷ ready replicas (mean field, see `replica_model`). A request holds
  its slot for floor(service / tick + u_j) ticks (stochastic rounding, u_j uniform from the same stream, so
  the mean in flight is unbiased at any tick; 0 means done within its tick: it held a slot for that tick's
  admissions only) and its latency is queue wait (whole ticks) + service time (exact).
- **Replicas.** start → starting (warm attach if the warm pool has one, which is then refilled after a
  cold start; else a cold start) → ready → draining → gone. A scale-down cancels replicas still starting
  first (newest first), then drains ready ones; a draining replica is gone when the in-flight requests no
  longer exceed the remaining slots (its own requests have finished), at most `drain_grace_s` later.
  Replica-seconds count starting + ready + draining; warm-pool standbys are not counted (the same pool of
  the same size for every policy). Per-replica concurrency changes take effect at once for new requests.
- **Signals.** Every 1 s one `Sample`: mean in flight and mean queue over the second, 429s, arrivals,
  completions (by finishing tick) and their mean service time, ready/starting at the end, the concurrency in
  force, CPU = mean over ticks of min(1, level/knee) + N(0, 0.03), memory from the mean level.
- **Policies.** The policy sees the samples delayed by its integer metric lag (samples with t ≤ now − lag)
  and is called every `policy.period_s` from t = period. Samples only change at whole seconds, so the calls
  falling in one second are made at its start, in order, and their effects applied at their own ticks
  (identical results, far fewer segment splits for a 0.1 s loop); while the entity is at zero they are made
  exactly in time order, interleaved with pokes. A policy's `surge` check, if it has one, is made at every
  whole second that is not a call time (not at zero). Decisions are clamped to the bounds (replica range at the
  new concurrency) and to the model's hard concurrency cap, for every policy alike.
- **Speed.** Within a second, between lifecycle events, the engine vectorises a segment when no queue
  exists: it assumes every arrival starts at once, computes busy = cumsum(arrivals − completions) and
  checks busy ≤ slots; at the first tick where that fails it commits what came before and runs tick by
  tick until the queue has been empty for a while (16–512 ticks, adapted to how soon the vectorised path
  failed last time). Both paths index the same per-segment arrays of service times and occupancies,
  computed once per segment. A second with no arrival, no request in flight and no queue is not ticked at
  all (sparse traffic). A typical run takes 0.1–2 s; a 2 h diurnal run 3–10 s.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from berth.autoscaler.signals import Bounds, Decision, Policy, Sample, ScaleState
from berth.simulator.replica_model import CostSampler
from berth.simulator.traces import Trace

# Latency histogram: 0.5 % log bins from 10 µs to 100,000 s (percentiles to ±0.25 %).
_FINE_LO, _FINE_RATIO = 1e-5, 1.005
_FINE_LOG_LO, _FINE_LOG_R = math.log(_FINE_LO), math.log(_FINE_RATIO)
FINE_BINS = math.ceil(math.log(1e10) / _FINE_LOG_R) + 1
# Per-second histogram for the rolling p99 plot: 20 bins a decade, 0.1 ms .. 1,000 s.
_COARSE_LO, _COARSE_PER_DECADE, COARSE_BINS = 1e-4, 20, 140
_COARSE_LOG_LO, _COARSE_SCALE = math.log(_COARSE_LO), _COARSE_PER_DECADE / math.log(10)
SLO_MULTIPLES = (2, 5, 10)
_BLOCK = 1 << 16
_STREAM_REQUESTS, _STREAM_LIFECYCLE, _STREAM_NOISE = 11, 12, 13


def fine_value(index: np.ndarray | int) -> np.ndarray | float:
    """Geometric centre of a fine bin."""
    return np.exp(_FINE_LOG_LO + (np.asarray(index) + 0.5) * _FINE_LOG_R)


def coarse_value(index: np.ndarray) -> np.ndarray:
    return _COARSE_LO * 10 ** ((np.asarray(index) + 0.5) / _COARSE_PER_DECADE)


def percentile_from_hist(hist: np.ndarray, q: float) -> float:
    total = int(hist.sum())
    if total == 0:
        return math.nan
    rank = q / 100 * total
    idx = int(np.searchsorted(np.cumsum(hist), max(rank, 1e-9)))
    return float(fine_value(min(idx, FINE_BINS - 1)))


class RequestStream:
    """Per-arrival intrinsic costs x_j and rounding uniforms u_j, drawn in seeded blocks (random access)."""

    def __init__(self, seed: int, sigma: float, cost: CostSampler) -> None:
        self.seed, self.sigma, self.cost = seed, sigma, cost
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        block = self._blocks.get(b)
        if block is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, _STREAM_REQUESTS, b]))
            x = np.exp(self.sigma * rng.standard_normal(_BLOCK)) * self.cost(rng, _BLOCK)
            u = rng.random(_BLOCK)
            if len(self._blocks) >= 6:
                del self._blocks[min(self._blocks)]
            block = self._blocks[b] = (x, u)
        return block

    def take(self, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
        b0, b1 = j0 // _BLOCK, (j1 - 1) // _BLOCK
        if b0 == b1:
            x, u = self._block(b0)
            o = b0 * _BLOCK
            return x[j0 - o:j1 - o], u[j0 - o:j1 - o]
        xs, us = [], []
        for b in range(b0, b1 + 1):
            x, u = self._block(b)
            o = b * _BLOCK
            lo, hi = max(j0, o) - o, min(j1, o + _BLOCK) - o
            xs.append(x[lo:hi])
            us.append(u[lo:hi])
        return np.concatenate(xs), np.concatenate(us)


@dataclass
class RunResult:
    """One run's figures (`metrics`), its identity and trace parameters, and per-second series (optional)."""

    family: str
    policy: str
    seed: int
    lag_s: int
    params: dict[str, Any]
    metrics: dict[str, float]
    series: dict[str, np.ndarray] | None = None
    decisions: list[tuple[float, int, int, str]] = field(default_factory=list)  # changed ones: (t, desired, conc, axis)
    error: str | None = None


class Engine:
    """Simulate `trace` under `policy`. `lag_s` delays the samples the policy sees (whole seconds)."""

    def __init__(self, trace: Trace, policy: Policy, *, lag_s: int = 1, queue_budget: float = 1.0,
                 history_s: float = 2_400.0, drain_grace_s: float = 30.0, keep_series: bool = True,
                 policy_name: str | None = None) -> None:
        self.trace, self.policy = trace, policy
        self.name = policy_name or getattr(policy, "name", type(policy).__name__)
        self.lag_s = int(lag_s)
        self.queue_budget = queue_budget
        self.history_s = history_s
        self.keep_series = keep_series
        self.dt = trace.dt
        self.tps = trace.ticks_per_s
        self.inv_dt = float(self.tps)
        self.n_sec = trace.duration_s
        self.n_ticks = self.n_sec * self.tps
        self.drain_grace_ticks = round(drain_grace_s * self.tps)
        self.bounds: Bounds = trace.bounds
        self.stream = RequestStream(trace.seed, trace.model.sigma, trace.cost)
        self.rng_life = np.random.default_rng(np.random.SeedSequence([trace.seed, _STREAM_LIFECYCLE]))
        self.noise = np.random.default_rng(np.random.SeedSequence([trace.seed, _STREAM_NOISE])).normal(
            0.0, 0.03, self.n_sec)
        self.slo = [k * trace.slo_base_s for k in SLO_MULTIPLES]
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

        self.arr = trace.arrivals
        # completions freeing a slot at tick t (ahead of the simulation: those scheduled; behind it: all of them)
        self.comp = np.zeros(self.n_ticks + 1, dtype=np.int32)
        self.svc_tick = np.zeros(self.n_ticks + 1)  # summed service time of the completions at tick t
        n = self.n_sec + 1
        self.started_sec = np.zeros(n, dtype=np.int64)  # by arrival second
        self.ok_sec = np.zeros((len(SLO_MULTIPLES), n), dtype=np.int64)  # within k × SLO, by arrival second
        self.rej_sec = np.zeros(n, dtype=np.int64)
        self.held_sec = np.zeros(n, dtype=np.int64)  # arrived while no replica was ready
        self.fine = np.zeros(FINE_BINS, dtype=np.int64)
        self.coarse = np.zeros((n, COARSE_BINS), dtype=np.int32) if keep_series else None
        self.ready_s = np.zeros(self.n_sec, dtype=np.int32)
        self.starting_s = np.zeros(self.n_sec, dtype=np.int32)
        self.conc_s = np.zeros(self.n_sec, dtype=np.int32)
        self.busy_s = np.zeros(self.n_sec)
        self.queue_s = np.zeros(self.n_sec)

        # state
        self.model = trace.model
        self.B = 0
        self.q = 0
        self.queue: deque[list[int]] = deque()
        self.j = 0
        self.R = trace.initial_replicas
        self.C = trace.model.concurrency
        self.desired = self.R
        self.pool = trace.warm_pool
        self.starting: dict[int, int] = {}  # replica id -> ready tick (insertion order = start order)
        self.n_drain = 0
        self.drain_gen = 0
        self._rid = 0
        self.heap: list[tuple[int, int, str, Any]] = []
        self._seq = 0
        self.prev_mean_B = 0.0
        self.slow = 1.0
        self.base_s = self.model.median_s * self.model.cost_factor
        # per-second accumulators
        self.acc_B = 0.0
        self.acc_q = 0.0
        self.acc_cpu = 0.0
        self.acc_cpu_ticks = 0
        self.rej_now = 0
        # replica-seconds (in ticks)
        self._last_acct = 0
        self.rs_ready = self.rs_starting = self.rs_draining = 0.0
        # decisions
        self.visible: list[Sample] = []
        self.pending: deque[Sample] = deque()
        self._next_k = 1
        self.period = max(float(getattr(policy, "period_s", 1.0)), self.dt)
        self._surge = getattr(policy, "surge", None)  # checked at every whole second between calls
        self.calls = 0
        self.actions = 0
        self.reversals = 0
        self.vertical_changes = 0
        self._last_dir = 0
        self._last_dir_t = -math.inf
        self.decision_log: list[tuple[float, int, int, str]] = []
        self._poke = False
        self._force_ticks = False
        self.calm_limit = 16
        self.refills: list[int] = []  # ticks at which a used warm-pool slot is back

        for change in trace.profile:
            self._push(round(change.t * self.tps), "profile", dict(change.changes))

    # --- events ---------------------------------------------------------------------------------------------
    def _push(self, tick: int, kind: str, payload: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (tick, self._seq, kind, payload))

    def _account(self, tick: int) -> None:
        span = tick - self._last_acct
        if span > 0:
            self.rs_ready += self.R * span
            self.rs_starting += len(self.starting) * span
            self.rs_draining += self.n_drain * span
            self._last_acct = tick

    def _apply_events(self, t: int) -> None:
        heap = self.heap
        while heap and heap[0][0] <= t:
            _, _, kind, payload = heapq.heappop(heap)
            if kind == "ready":
                if payload in self.starting:
                    self._account(t)
                    del self.starting[payload]
                    self.R += 1
            elif kind == "apply":
                self._apply(payload, t)
            elif kind == "decide":
                self._call(payload, t)
            elif kind == "drain_grace":
                if payload == self.drain_gen and self.n_drain:
                    self._account(t)
                    self.n_drain = 0
            elif kind == "profile":
                self.model = self.model.with_(**payload)
                self.base_s = self.model.median_s * self.model.cost_factor

    # --- decisions ------------------------------------------------------------------------------------------
    def _clamp(self, decision: Decision) -> tuple[int, int]:
        conc = min(max(1, int(decision.concurrency)), self.model.max_concurrency)
        low, high = self.bounds.replica_range(conc)
        return min(max(int(decision.desired), low), high), conc

    def _decide(self, now: float, desired: int, conc: int, extra: Sample | None = None) -> Decision:
        self.calls += 1
        samples: Sequence[Sample] = self.visible
        if extra is not None:
            samples = [*self.visible, extra]
        return self.policy.decide(now, samples, ScaleState(desired=desired, concurrency=conc), self.bounds)

    def _plan(self, s: int) -> None:
        """Make the policy calls that fall in second s (see the module docstring)."""
        desired, conc = self.desired, self.C
        exact = desired == 0
        if self._surge is not None and not exact and abs(self._next_k * self.period - s) > 1e-9 and s > 0:
            decision = self._surge(float(s), self.visible, ScaleState(desired=desired, concurrency=conc), self.bounds)
            if decision is not None:
                self.calls += 1
                new = self._clamp(decision)
                if new != (desired, conc):
                    self._push(s * self.tps, "apply", decision)
                desired, conc = new
        while self._next_k * self.period < s + 1 - 1e-9:
            now = self._next_k * self.period
            self._next_k += 1
            tick = min(max(round(now * self.tps), s * self.tps), (s + 1) * self.tps - 1)
            if exact:
                self._push(tick, "decide", now)
                continue
            decision = self._decide(now, desired, conc)
            new = self._clamp(decision)
            if new != (desired, conc):  # a call that changes nothing needs no event (nor a segment split)
                self._push(tick, "apply", decision)
            desired, conc = new
            if desired == 0:
                exact = True

    def _call(self, now: float, tick: int, extra: Sample | None = None) -> None:
        self._apply(self._decide(now, self.desired, self.C, extra), tick)

    def _apply(self, decision: Decision, tick: int) -> None:
        desired, conc = self._clamp(decision)
        now = tick * self.dt
        changed = False
        if conc != self.C:
            self.vertical_changes += 1
            self.C = conc
            changed = True
        if desired != self.desired:
            direction = 1 if desired > self.desired else -1
            if self._last_dir and direction != self._last_dir and now - self._last_dir_t <= 300.0:
                self.reversals += 1
            self._last_dir, self._last_dir_t = direction, now
            self.actions += 1
            self._resize(desired, tick)
            changed = True
        if changed:
            self.decision_log.append((round(now, 3), self.desired, self.C, decision.axis))
        if self.n_drain and self.B <= self.R * self.C:
            self._account(tick)
            self.n_drain = 0

    def _resize(self, desired: int, tick: int) -> None:
        self._account(tick)
        current = self.R + len(self.starting)
        if desired > current:
            for _ in range(desired - current):
                while self.refills and self.refills[0] <= tick:
                    heapq.heappop(self.refills)
                    self.pool += 1
                if self.pool > 0:
                    self.pool -= 1
                    delay = self.model.warm_attach(self.rng_life)
                    refill = tick + max(1, math.ceil(self.model.cold_start(self.rng_life) * self.tps))
                    heapq.heappush(self.refills, refill)
                else:
                    delay = self.model.cold_start(self.rng_life)
                self._rid += 1
                ready_tick = tick + max(1, math.ceil(delay * self.tps))
                self.starting[self._rid] = ready_tick
                self._push(ready_tick, "ready", self._rid)
        elif desired < current:
            remove = current - desired
            while remove and self.starting:
                del self.starting[next(reversed(self.starting))]
                remove -= 1
            if remove:
                self.R -= remove
                self.n_drain += remove
                self.drain_gen += 1
                self._push(tick + self.drain_grace_ticks, "drain_grace", self.drain_gen)
        self.desired = desired

    # --- recording ------------------------------------------------------------------------------------------
    def _record(self, latency: np.ndarray, arr_tick: np.ndarray | int, finish: np.ndarray, service: np.ndarray) -> None:
        """Buffer started requests; `_flush` accounts them (once a second: fewer, larger numpy calls)."""
        if isinstance(arr_tick, (int, np.integer)):
            arr_tick = np.full(latency.size, int(arr_tick) * self.tps, dtype=np.int64)
        self._buf.append((latency, arr_tick, finish, service))

    def _flush(self) -> None:
        if not self._buf:
            return
        if len(self._buf) == 1:
            latency, arr_tick, finish, service = self._buf[0]
        else:
            latency, arr_tick, finish, service = (np.concatenate(p) for p in zip(*self._buf, strict=True))
        self._buf.clear()
        self._account_started(latency, arr_tick, finish, service)

    def _account_started(self, latency: np.ndarray, arr_tick: np.ndarray, finish: np.ndarray,
                         service: np.ndarray) -> None:
        """Latency histograms and SLO counts by arrival second, completions by finishing second."""
        ln = np.log(np.maximum(latency, _FINE_LO).astype(np.float32))  # float32: ample for 0.5 % bins, faster
        fidx = ((ln - np.float32(_FINE_LOG_LO)) * np.float32(1 / _FINE_LOG_R)).astype(np.int64)
        np.minimum(fidx, FINE_BINS - 1, out=fidx)
        self.fine += np.bincount(fidx, minlength=FINE_BINS)
        self._scatter(finish, service, self.svc_tick)
        asec = arr_tick // self.tps
        lo = int(asec.min())
        s2, s5, s10 = self.slo
        if lo == int(asec.max()):  # the common case: one arrival second
            self.started_sec[lo] += latency.size
            self.ok_sec[0, lo] += int(np.count_nonzero(latency <= s2))
            self.ok_sec[1, lo] += int(np.count_nonzero(latency <= s5))
            self.ok_sec[2, lo] += int(np.count_nonzero(latency <= s10))
            if self.coarse is not None:
                cidx = ((ln - _COARSE_LOG_LO) * _COARSE_SCALE).astype(np.int64)
                np.clip(cidx, 0, COARSE_BINS - 1, out=cidx)
                self.coarse[lo] += np.bincount(cidx, minlength=COARSE_BINS).astype(np.int32)
            return
        off = asec - lo
        level = (latency <= s2).astype(np.int64)  # 0: over 10×, 1: within 10×, 2: within 5×, 3: within 2×
        level += latency <= s5
        level += latency <= s10
        nsec = int(off.max()) + 1
        by = np.bincount(off * 4 + level, minlength=nsec * 4).reshape(nsec, 4)
        self.started_sec[lo:lo + nsec] += by.sum(axis=1)
        within = np.cumsum(by[:, ::-1], axis=1)[:, ::-1]  # within[:, k] = requests at level ≥ k
        self.ok_sec[0, lo:lo + nsec] += within[:, 3]
        self.ok_sec[1, lo:lo + nsec] += within[:, 2]
        self.ok_sec[2, lo:lo + nsec] += within[:, 1]
        if self.coarse is not None:
            cidx = ((ln - _COARSE_LOG_LO) * _COARSE_SCALE).astype(np.int64)
            np.clip(cidx, 0, COARSE_BINS - 1, out=cidx)
            comb = np.bincount(off * COARSE_BINS + cidx, minlength=nsec * COARSE_BINS)
            self.coarse[lo:lo + nsec] += comb.reshape(nsec, COARSE_BINS).astype(np.int32)

    def _scatter(self, ft: np.ndarray, weights: np.ndarray | None = None, into: np.ndarray | None = None) -> None:
        """Add one (or `weights`) at each tick of `ft` into `comp` (or `into`); ticks past the end pile up there."""
        if ft.size == 0:
            return
        target = self.comp if into is None else into
        ft = np.minimum(ft, self.n_ticks)
        lo, hi = int(ft.min()), int(ft.max())
        if hi - lo <= 4 * ft.size + 4096:
            counts = np.bincount(ft - lo, weights=weights, minlength=hi - lo + 1)
            target[lo:hi + 1] += counts if weights is not None else counts.astype(np.int32)
        elif weights is None:
            np.add.at(target, ft, 1)
        else:
            np.add.at(target, ft, weights)

    def _acc(self, busy: np.ndarray, slots: int, ready: int) -> None:
        self.acc_B += float(busy.sum())
        if ready > 0:
            cap = min(slots, ready * self.model.knee)  # min(1, min(busy, slots) / ready / knee) summed
            self.acc_cpu += float(np.minimum(busy, cap).sum()) / (ready * self.model.knee)
            self.acc_cpu_ticks += busy.size

    # --- the two ways through a segment --------------------------------------------------------------------
    # A segment is [t0, t1) with no lifecycle event inside: replicas, concurrency, model and slowdown are
    # constant, so every request that may start in it (those queued at t0 and those arriving) has its service
    # time and occupancy known up front. `_segment` computes them once; both paths index into them.
    def _segment(self, t0: int, t1: int) -> None:
        a = self.arr[t0:t1].astype(np.int64)
        self.seg_t0 = t0
        self.seg_a = a
        self.seg_ca = np.concatenate([[0], np.cumsum(a)])  # arrivals before each tick of the segment
        self.seg_j0 = self.j  # index of the segment's first arrival
        self.seg_lo = self.queue[0][1] if self.queue else self.j  # first request the segment may start
        hi = self.j + int(self.seg_ca[-1])
        if hi > self.seg_lo:
            x, u = self.stream.take(self.seg_lo, hi)
            self.seg_svc = (self.base_s * self.slow) * x
            self.seg_m = (self.seg_svc * self.inv_dt + u).astype(np.int64)  # ticks held; 0: done within its tick
        else:
            self.seg_svc = np.empty(0)
            self.seg_m = np.empty(0, dtype=np.int64)
        pre = self.seg_j0 - self.seg_lo  # queued requests ahead of the segment's arrivals
        # finishing tick of each arrival if it starts on arrival (the vectorised hypothesis)
        m_new = self.seg_m[pre:]
        ticks = np.repeat(np.arange(t0, t1, dtype=np.int64), a)
        self.seg_ft = ticks + m_new
        self.seg_z = np.bincount(ticks[m_new == 0] - t0, minlength=t1 - t0)  # arrivals done within their tick
        self.seg_ml: list[int] | None = None
        self.seg_al: list[int] | None = None
        self.seg_rr: list[int] = []  # the tick-by-tick path's starts, flat (first request, count, arrived, started)

    def _segment_done(self) -> None:
        """Account the requests the tick-by-tick path started in this segment (one batch per segment)."""
        rr = self.seg_rr
        if not rr:
            return
        flat = np.array(rr, dtype=np.int64).reshape(-1, 4)
        rr.clear()
        first, counts, arrived, started = flat[:, 0] - self.seg_lo, flat[:, 1], flat[:, 2], flat[:, 3]
        total = int(counts.sum())
        offsets = np.cumsum(counts) - counts
        idx = np.arange(total) - np.repeat(offsets - first, counts)
        at = np.repeat(arrived, counts)
        st = np.repeat(started, counts)
        svc = self.seg_svc[idx]
        self._record(svc + (st - at) * self.dt, at, st + self.seg_m[idx], svc)

    def _vector(self, t0: int, t1: int) -> int:
        """Ticks [t0, t1) assuming no queue forms; returns the first tick not simulated."""
        R, S, B = self.R, self.R * self.C, self.B
        o = t0 - self.seg_t0
        a = self.seg_a[o:o + t1 - t0]
        d_pre = self.comp[t0:t1]
        k0 = int(self.seg_ca[o]) + self.seg_j0 - self.seg_lo  # this tick's first arrival in the segment arrays
        n = int(self.seg_ca[o + t1 - t0]) - int(self.seg_ca[o])
        if n == 0:
            if B == 0:
                if R > 0:
                    self.acc_cpu_ticks += t1 - t0
                return t1
            busy = B - np.cumsum(d_pre, dtype=np.int64)
            self._acc(busy, S, R)
            self._drain_check(busy, S, t0)
            self.B = int(busy[-1])
            return t1
        svc = self.seg_svc[k0:k0 + n]
        ft = self.seg_ft[k0 - (self.seg_j0 - self.seg_lo):][:n]
        inside = ft < t1
        d_new = np.bincount(ft[inside] - t0, minlength=t1 - t0)
        busy = B + np.cumsum(a - d_pre - d_new)  # after each tick (same-tick completions gone)
        # a request done within its tick still held a slot while that tick's arrivals were admitted
        bad = (busy + self.seg_z[o:o + t1 - t0] > S) & (a > 0)
        if bad.any():
            v = int(bad.argmax())
            k = int(self.seg_ca[o + v]) - int(self.seg_ca[o])
            t_end = t0 + v
            self._force_ticks = True
        else:
            v, k, t_end = t1 - t0, n, t1
        if k:
            ftk, svck = ft[:k], svc[:k]
            self._scatter(ftk[ftk >= t_end])
            self._record(svck, t0 // self.tps, ftk, svck)  # a segment never crosses a second
            self.j += k
        if v:
            part = busy[:v]
            self.comp[t0:t_end] += d_new[:v].astype(np.int32)  # keep every completion on record (counts)
            self._acc(part, S, R)
            self._drain_check(part, S, t0)
            self.B = int(part[-1])
        return t_end

    def _drain_check(self, busy: np.ndarray, slots: int, t0: int) -> None:
        if self.n_drain:
            ok = np.flatnonzero(busy <= slots)
            if ok.size:
                self._account(t0 + int(ok[0]))
                self.n_drain = 0

    def _ticks(self, t0: int, t1: int) -> int:
        """Ticks [t0, t1) one by one (a queue exists, or no replica is ready); returns the first tick not done.

        Works on at most 512 ticks per call and leaves once the queue has been empty for `calm_limit` ticks
        (adapted: doubled when the vectorised path soon fails again, halved when it runs long); the loop
        itself only moves counts (occupancies come from the segment arrays).
        """
        t1 = min(t1, t0 + 512)
        span = t1 - t0
        o = t0 - self.seg_t0
        if self.seg_ml is None:
            self.seg_ml = self.seg_m.tolist()
            self.seg_al = self.seg_a.tolist()
        ml = self.seg_ml
        a_list = self.seg_al[o:o + span]  # type: ignore[index]
        jlo = self.seg_lo
        comp, queue = self.comp, self.queue
        cl = comp[t0:t1].tolist()
        R, C = self.R, self.C
        S = R * C
        knee = self.model.knee
        hold = R == 0
        bound = math.inf if hold else math.ceil(S * self.queue_budget)
        poke_ok = hold and self.desired == 0
        B, q, j = self.B, self.q, self.j
        far: list[int] = []
        rr = self.seg_rr  # flat (first request, count, arrival tick, start tick) per start
        calm_limit = self.calm_limit
        draining = self.n_drain > 0
        poke = False
        tps = self.tps
        held = self.held_sec
        cap = min(S, R * knee) if R else 0  # min(busy, slots, ready × knee): the CPU numerator
        sum_b = sum_q = sum_cpu = 0
        calm = 0
        end = t1
        t = t0
        for i in range(span):
            d = cl[i]
            if d:
                B -= d
            a = a_list[i]
            if q:
                free = S - B
                while free > 0 and q:
                    c = queue[0]
                    take = c[2] if c[2] <= free else free
                    rr += (c[1], take, c[0], t)
                    for k in range(c[1] - jlo, c[1] - jlo + take):
                        f = i + ml[k]
                        if f == i:  # done within its tick: took a slot for this tick's admissions only
                            cl[i] += 1
                            B -= 1
                        elif f < span:
                            cl[f] += 1
                        else:
                            far.append(t0 + f)
                    B += take
                    c[1] += take
                    c[2] -= take
                    q -= take
                    free -= take
                    if c[2] == 0:
                        queue.popleft()
            if a:
                jt = j
                j += a
                n2 = S - B
                if n2 > 0 and not q:
                    if n2 > a:
                        n2 = a
                    rr += (jt, n2, t, t)
                    for k in range(jt - jlo, jt - jlo + n2):
                        f = i + ml[k]
                        if f == i:
                            cl[i] += 1
                            B -= 1
                        elif f < span:
                            cl[f] += 1
                        else:
                            far.append(t0 + f)
                    B += n2
                else:
                    n2 = 0
                rest = a - n2
                if rest:
                    if hold:
                        held[t // tps] += rest
                    room = bound - q
                    join = rest if rest <= room else (int(room) if room > 0 else 0)
                    if join:
                        queue.append([t, jt + n2, join])
                        q += join
                    if rest > join:
                        self.rej_now += rest - join
                        self.rej_sec[t // tps] += rest - join
                    if poke_ok:
                        poke = True
            sum_b += B
            sum_q += q
            sum_cpu += B if cap > B else cap
            if draining and B <= S:
                self._account(t)
                self.n_drain = 0
                draining = False
            t += 1
            if poke:
                end = t
                self._poke = True
                break
            if q == 0 and not hold:
                calm += 1
                if calm >= calm_limit:
                    end = t
                    break
            else:
                calm = 0
        comp[t0:t1] = cl  # the window's completions: on record behind, scheduled ahead
        if far:
            self._scatter(np.array(far, dtype=np.int64))
        self.B, self.q, self.j = B, q, j
        self.acc_B += sum_b
        self.acc_q += sum_q
        if R:
            self.acc_cpu += sum_cpu / (R * knee)
            self.acc_cpu_ticks += end - t0
        return end

    def _advance(self, t0: int, t1: int) -> int:
        """Ticks [t0, t1) with no lifecycle event inside; stops early after a poke."""
        if self.R > 0:
            level = min(self.prev_mean_B, self.R * self.C) / self.R
            self.slow = self.model.slowdown(level)
        self._segment(t0, t1)
        t = t0
        while t < t1:
            if self.R == 0 or self.q > 0 or self._force_ticks:
                self._force_ticks = False
                t = self._ticks(t, t1)
            else:
                start = t
                t = self._vector(t, t1)
                if t < t1:  # it failed: stay tick by tick longer next time if it ran only briefly
                    self.calm_limit = min(512, self.calm_limit * 2) if t - start < 128 else max(
                        8, self.calm_limit // 2)
            if self._poke:
                break
        self._segment_done()
        return t

    # --- seconds ------------------------------------------------------------------------------------------
    def _end_second(self, s: int) -> None:
        tps = self.tps
        self._flush()
        mean_B = self.acc_B / tps
        cpu = memory = None
        if self.R > 0:
            if self.acc_cpu_ticks:
                cpu = min(1.0, max(0.0, self.acc_cpu / self.acc_cpu_ticks + float(self.noise[s])))
            memory = self.model.memory(mean_B / self.R)
        lo, hi = s * tps, (s + 1) * tps
        done = int(self.comp[lo:hi].sum())
        sample = Sample(t=float(s + 1), in_flight=mean_B, queued=self.acc_q / tps, rejected=self.rej_now,
                        arrived=int(self.trace.per_second[s]), completed=done,
                        latency_s=float(self.svc_tick[lo:hi].sum()) / done if done else None, ready=self.R,
                        starting=len(self.starting), concurrency=self.C, cpu=cpu, memory=memory)
        self.ready_s[s], self.starting_s[s], self.conc_s[s] = self.R, len(self.starting), self.C
        self.busy_s[s], self.queue_s[s] = mean_B, sample.queued
        self.prev_mean_B = mean_B
        self.acc_B = self.acc_q = self.acc_cpu = 0.0
        self.acc_cpu_ticks = 0
        self.rej_now = 0
        self.pending.append(sample)
        horizon = s + 1 - self.lag_s
        while self.pending and self.pending[0].t <= horizon + 1e-9:
            self.visible.append(self.pending.popleft())
        if len(self.visible) > self.history_s + 600:
            del self.visible[:len(self.visible) - int(self.history_s)]

    def _poke_now(self, tick: int) -> None:
        self._poke = False
        held = sum(c[2] for c in self.queue)
        extra = Sample(t=tick * self.dt, in_flight=0.0, queued=float(held), arrived=held, ready=0,
                       starting=len(self.starting), concurrency=self.C)
        self._call(tick * self.dt, tick, extra)

    def run(self) -> RunResult:
        wall = time.perf_counter()
        per_second = self.trace.per_second
        tps = self.tps
        for s in range(self.n_sec):
            if s:
                self._end_second(s - 1)
            self._plan(s)
            t, end = s * tps, (s + 1) * tps
            idle = per_second[s] == 0 and self.B == 0 and self.q == 0
            while t < end:
                self._apply_events(t)
                nxt = min(self.heap[0][0], end) if self.heap else end
                if nxt <= t:
                    continue
                if idle:
                    if self.R > 0:
                        self.acc_cpu_ticks += nxt - t
                    t = nxt
                    continue
                t = self._advance(t, nxt)
                if self._poke:
                    self._poke_now(t)
        self._end_second(self.n_sec - 1)
        self._account(self.n_ticks)
        return self._result(time.perf_counter() - wall)

    # --- results ---------------------------------------------------------------------------------------------
    def _result(self, wall_s: float) -> RunResult:
        tr = self.trace
        arrived = int(tr.per_second.sum())
        rejected = int(self.rej_sec.sum())
        completed = int(self.comp[:self.n_ticks].sum())
        started = int(self.started_sec.sum())
        in_system = self.B + self.q
        to_s = self.dt
        metrics: dict[str, float] = {
            "arrived": arrived, "completed": completed, "started": started, "rejected": rejected,
            "in_system": in_system, "in_service_end": self.B, "queued_end": self.q,
            "held": int(self.held_sec.sum()),
            "p50_ms": percentile_from_hist(self.fine, 50) * 1e3,
            "p99_ms": percentile_from_hist(self.fine, 99) * 1e3,
            "p999_ms": percentile_from_hist(self.fine, 99.9) * 1e3,
            "replica_s": (self.rs_ready + self.rs_starting + self.rs_draining) * to_s,
            "replica_s_ready": self.rs_ready * to_s, "replica_s_starting": self.rs_starting * to_s,
            "replica_s_draining": self.rs_draining * to_s,
            "actions": self.actions, "reversals": self.reversals, "vertical_changes": self.vertical_changes,
            "policy_calls": self.calls, "wall_s": wall_s, "slo_ms": self.slo[1] * 1e3,
        }
        for i, k in enumerate(SLO_MULTIPLES):
            metrics[f"attain_{k}x"] = 100.0 * float(self.ok_sec[i].sum()) / arrived if arrived else 100.0
        metrics["cold_pct"] = 100.0 * metrics["held"] / arrived if arrived else 0.0
        misses = tr.per_second - self.ok_sec[1, :self.n_sec]
        metrics.update(self._family_metrics(misses))
        series = None
        if self.keep_series:
            series = {"arrivals": tr.per_second.astype(np.int64), "ready": self.ready_s.copy(),
                      "starting": self.starting_s.copy(), "concurrency": self.conc_s.copy(),
                      "busy": self.busy_s.copy(), "queued": self.queue_s.copy(),
                      "rejected": self.rej_sec[:self.n_sec].copy(), "misses": misses.astype(np.int64),
                      "p99_rolling_ms": self._rolling_p99(10) * 1e3}
        return RunResult(tr.family, self.name, tr.seed, self.lag_s, dict(tr.params), metrics, series,
                         self.decision_log)

    def _rolling_p99(self, window: int) -> np.ndarray:
        if self.coarse is None:
            return np.full(self.n_sec, np.nan)
        h = np.cumsum(self.coarse[:self.n_sec].astype(np.int64), axis=0)
        h = np.vstack([np.zeros((1, COARSE_BINS), dtype=np.int64), h])
        ends = np.arange(1, self.n_sec + 1)
        w = h[ends] - h[np.maximum(0, ends - window)]
        total = w.sum(axis=1)
        idx = (np.cumsum(w, axis=1) < 0.99 * total[:, None]).sum(axis=1)
        out = coarse_value(np.minimum(idx, COARSE_BINS - 1)).astype(float)
        out[total == 0] = np.nan
        return out

    def _family_metrics(self, misses: np.ndarray) -> dict[str, float]:
        tr, p = self.trace, self.trace.params
        out: dict[str, float] = {}
        if tr.family == "step":
            s0, s1 = int(p["step_t"]), int(p["step_end_t"])
            out["misses_120s"] = float(misses[s0:s0 + 120].sum())
            out["ttc_s"] = self._time_to_capacity(s0, s1, float(p["high_qps"]))
        elif tr.family.startswith("diurnal"):
            r0, r1 = int(p["ramp_t0"]), int(p["ramp_t1"])
            out["ramp_misses"] = float(misses[r0:r1].sum())
            out["ramp_arrived"] = float(tr.per_second[r0:r1].sum())
        elif tr.family == "profile_change":
            c = int(p["change_t"])
            out["recovery_s"] = self._recovery(misses, c)
            pre = slice(max(0, c - 120), c)
            out["pre_change_attain_5x"] = 100.0 * (1 - misses[pre].sum() / max(1, tr.per_second[pre].sum()))
            post = slice(c, self.n_sec)
            out["post_change_attain_5x"] = 100.0 * (1 - misses[post].sum() / max(1, tr.per_second[post].sum()))
            out["min_concurrency_after"] = float(self.conc_s[c:].min()) if self.n_sec > c else math.nan
        elif tr.family == "sparse":
            out["idle_replica_s"] = float(np.sum((self.busy_s < 0.1 * np.maximum(1, self.ready_s * self.conc_s))
                                                 * (self.ready_s + self.starting_s)))
        return out

    def _time_to_capacity(self, s0: int, s1: int, rate: float) -> float:
        for s in range(s0, s1):
            model = self.trace.model_at(s)
            if model.capacity_rps(int(self.ready_s[s]), int(self.conc_s[s]), self.trace.cost.mean) >= rate:
                return float(s + 1 - s0)
        return math.inf

    def _recovery(self, misses: np.ndarray, change: int, window: int = 10, hold: int = 60) -> float:
        """Seconds from the change until the rolling `window` s p99 (429s count as misses) is within the SLO
        and stays there for `hold` s (or to the end of the trace)."""
        arr = self.trace.per_second.astype(np.int64)
        cm = np.concatenate([[0], np.cumsum(misses)])
        ca = np.concatenate([[0], np.cumsum(arr)])
        n = self.n_sec
        ends = np.arange(1, n + 1)
        starts = np.maximum(0, ends - window)
        total = ca[ends] - ca[starts]
        ok = (total == 0) | ((cm[ends] - cm[starts]) <= 0.01 * total)
        for s in range(change, n):
            if ok[s:min(n, s + hold)].all():
                return float(s - change)
        return math.inf


def simulate(trace: Trace, policy: Policy, **kwargs: Any) -> RunResult:
    """Run `policy` over `trace` (keyword arguments as for `Engine`)."""
    return Engine(trace, policy, **kwargs).run()
