"""An exact per-request discrete-event simulation, to check the tick model against (traces ≤ 200 qps).

Same semantics as `engine.py`, without ticks: continuous arrival times (each arrival of the trace's tick
t is placed uniformly at random in [t·dt, (t+1)·dt)), S = replicas × concurrency slots served FCFS, a front
queue bounded at ceil(S × queue_budget) beyond which an arrival is refused (429), and the same service
time rule: request j starting at time τ takes median × cost factor × x_j × slowdown(level), with x_j the
engine's per-request stream (`RequestStream`, so both simulations see the same request costs) and level =
min(time-averaged in flight over the previous whole second, S) ÷ replicas. Replicas are fixed (the check
runs both simulators with a fixed policy), so there is no lifecycle here.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from berth.simulator.engine import RequestStream
from berth.simulator.traces import Trace


@dataclass
class ExactResult:
    latencies: np.ndarray  # of the requests that started, in arrival order
    rejected: int
    arrived: int

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies.size else math.nan


def simulate_exact(trace: Trace, replicas: int, concurrency: int, *, queue_budget: float = 1.0,
                   max_qps: float = 200.0, seed: int = 0) -> ExactResult:
    """Per-request simulation of `trace` with a fixed `replicas` × `concurrency`."""
    per_second = trace.per_second
    if per_second.size and per_second.max() > 3 * max_qps:
        raise ValueError(f"the exact simulation is meant for traces of at most ~{max_qps:g} qps")
    dt = trace.dt
    ticks = np.repeat(np.arange(trace.n_ticks, dtype=np.int64), trace.arrivals.astype(np.int64))
    offsets = np.random.default_rng(np.random.SeedSequence([trace.seed, 21, seed])).random(ticks.size)
    # arrivals within one tick keep their index order: sort the offsets within each tick
    order = np.lexsort((offsets, ticks))
    times = (ticks[order] + offsets[order]) * dt
    n = times.size
    stream = RequestStream(trace.seed, trace.model.sigma, trace.cost)
    x, _ = stream.take(0, n) if n else (np.empty(0), np.empty(0))
    model = trace.model
    base = model.median_s * model.cost_factor
    slots = replicas * concurrency
    bound = math.ceil(slots * queue_budget)
    n_sec = trace.duration_s + 2
    area = np.zeros(n_sec + 1)  # ∫ in-flight dt over each second

    busy = 0
    last = 0.0
    done: list[float] = []  # heap of completion times
    queue: deque[int] = deque()
    latency = np.full(n, np.nan)
    rejected = 0

    def advance(to: float) -> None:
        nonlocal last
        if busy:
            t = last
            while t < to:
                s = int(t)
                edge = min(to, s + 1.0)
                area[min(s, n_sec)] += busy * (edge - t)
                t = edge
        last = to

    def start(j: int, at: float) -> None:
        nonlocal busy
        s = int(at)
        mean_prev = area[s - 1] if s >= 1 else 0.0
        level = min(mean_prev, slots) / replicas
        service = base * float(x[j]) * model.slowdown(level)
        latency[j] = at - times[j] + service
        heapq.heappush(done, at + service)
        busy += 1

    for j in range(n):
        ta = float(times[j])
        while done and done[0] <= ta:
            tc = heapq.heappop(done)
            advance(tc)
            busy -= 1
            while queue and busy < slots:
                start(queue.popleft(), tc)
        advance(ta)
        if busy < slots and not queue:
            start(j, ta)
        elif len(queue) < bound:
            queue.append(j)
        else:
            rejected += 1
    while done:  # drain (the queue empties as slots free)
        tc = heapq.heappop(done)
        advance(tc)
        busy -= 1
        while queue and busy < slots:
            start(queue.popleft(), tc)
    started = latency[~np.isnan(latency)]
    return ExactResult(started, rejected, n)
