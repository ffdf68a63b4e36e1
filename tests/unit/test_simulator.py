"""The trace-driven simulator: traces, the tick engine against an exact simulation, and its invariants."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from berth.autoscaler.signals import Bounds, Decision, Sample, ScaleState
from berth.simulator import report, traces
from berth.simulator.engine import Engine, simulate
from berth.simulator.exact import simulate_exact
from berth.simulator.references import Fixed, FixedPeak, Oracle
from berth.simulator.replica_model import MODELS


class Zigzag:
    """Scales up and down and changes per-replica concurrency every call: stresses the lifecycle."""

    name = "zigzag"

    def __init__(self, counts: list[int], concs: list[int], period_s: float = 1.0) -> None:
        self.counts, self.concs, self.period_s, self.i = counts, concs, period_s, 0

    def decide(self, now: float, samples, state: ScaleState, bounds: Bounds) -> Decision:  # type: ignore[no-untyped-def]
        self.i += 1
        desired, conc = self.counts[self.i % len(self.counts)], self.concs[self.i % len(self.concs)]
        return Decision(t=now, policy=self.name, desired=desired, concurrency=conc, previous=state.desired,
                        previous_concurrency=state.concurrency, reason="zigzag")


class Recorder:
    """Fixed at `replicas`; remembers what it was shown."""

    name = "recorder"

    def __init__(self, replicas: int, period_s: float = 1.0) -> None:
        self.replicas, self.period_s = replicas, period_s
        self.calls: list[tuple[float, float | None, int]] = []  # (now, newest sample t, samples)

    def decide(self, now: float, samples, state: ScaleState, bounds: Bounds) -> Decision:  # type: ignore[no-untyped-def]
        self.calls.append((now, samples[-1].t if samples else None, len(samples)))
        return Decision(t=now, policy=self.name, desired=self.replicas, concurrency=state.concurrency,
                        previous=state.desired, previous_concurrency=state.concurrency, reason="")


def with_arrivals(trace: traces.Trace, per_tick: np.ndarray, **changes: object) -> traces.Trace:
    trace = dataclasses.replace(trace, arrivals=per_tick.astype(np.int32), **changes)  # type: ignore[arg-type]
    trace.__dict__.pop("per_second", None)
    return trace


def conserved(result) -> bool:  # type: ignore[no-untyped-def]
    m = result.metrics
    return m["arrived"] == m["completed"] + m["rejected"] + m["in_system"]


# --- traces ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bursty_inter_arrival_cv_is_over_4(seed):
    trace = traces.bursty(seed)
    assert traces.inter_arrival_cv(trace) > 4.0
    per_s = trace.per_second
    assert per_s.max() / per_s.mean() > 10  # on/off: bursts far above the mean


def test_step_levels():
    trace = traces.step(0)
    per_s = trace.per_second
    assert per_s.size == 1200
    assert per_s[:300].mean() == pytest.approx(10, rel=0.1)
    assert per_s[300:900].mean() == pytest.approx(10_000, rel=0.01)
    assert per_s[900:].mean() == pytest.approx(10, rel=0.1)
    assert per_s[300] > 9_000
    assert per_s[299] < 100
    assert trace.dt <= 0.010
    assert trace.warm_pool >= trace.params["needed_at_high"]


def test_diurnal_peak_over_mean_and_its_history():
    trace = traces.diurnal(0)
    assert trace.duration_s == 7200  # one day compressed 12×
    minute = trace.per_second.reshape(-1, 60).mean(axis=1)
    assert minute.max() / minute.mean() == pytest.approx(1.8, rel=0.03)
    assert np.argmin(minute) * 60 == pytest.approx(7200 * 4 / 24, abs=120)  # trough at 04:00
    assert trace.model.cold_median_s == pytest.approx(MODELS["cpu"].cold_median_s / 12)
    history = trace.history(7)
    assert history.shape == (7 * 120,)  # per-minute counts of 7 compressed days
    days = history.reshape(7, 120).sum(axis=1)
    # the day simulated is a Wednesday: the history runs Wed..Tue, Saturday and Sunday at 0.7
    weekday = days[[0, 1, 2, 5, 6]].mean()
    assert days[3] / weekday == pytest.approx(0.7, rel=0.03)
    assert days[4] / weekday == pytest.approx(0.7, rel=0.03)
    assert days[0] == pytest.approx(trace.per_second.sum(), rel=0.02)


def test_sparse_has_long_idle_gaps_and_few_requests():
    trace = traces.sparse(0)
    busy = np.flatnonzero(trace.per_second)
    assert busy.size > 0
    gaps = np.diff(busy)
    assert gaps.max() >= 120  # minutes without a request
    assert trace.per_second.sum() < 0.05 * trace.duration_s * 10
    assert trace.bounds.scale_to_zero
    assert trace.initial_replicas == 0


def test_profile_change_schedule():
    trace = traces.profile_change(0)
    change = trace.params["change_t"]
    assert trace.model_at(change - 1).knee == 8
    assert trace.model_at(change).knee == 2
    cost = traces.profile_change(0, kind="cost", cost_after=3.0)
    assert cost.model_at(change).cost_factor == 3.0
    assert cost.slo_base_s == trace.slo_base_s  # the SLO stays the original model's


def test_traces_are_seeded():
    a, b, c = traces.bursty(3, smoke=True), traces.bursty(3, smoke=True), traces.bursty(4, smoke=True)
    assert np.array_equal(a.arrivals, b.arrivals)
    assert not np.array_equal(a.arrivals, c.arrivals)


# --- the tick model against the exact per-request simulation ------------------------------------------
@pytest.mark.parametrize(("model", "rate", "replicas", "conc", "tick"), [
    ("cpu", 150.0, 1, 2, None),  # queueing at 43 % of the slots, 429s at the bound (2 ms tick)
    ("cpu", 190.0, 1, 2, 0.004),  # the diurnal family's 4 ms tick, one replica at 95 % load
    ("cpu", 180.0, 3, 2, 0.004),  # ... and at a multi-replica operating point
    ("gpu", 190.0, 1, 6, None),  # the batching curve: slowdown ~1.3 at this load
    ("io", 150.0, 1, 64, None),  # 10 ms ticks, σ = 1 service times
])
def test_tick_model_percentiles_within_10_percent_of_exact(model, rate, replicas, conc, tick):
    trace = traces.constant(0, rate=rate, duration_s=300, model=model, replicas=replicas, tick_s=tick)
    assert trace.per_second.mean() <= 200
    tick = simulate(trace, Fixed(replicas, conc), lag_s=0)
    exact = simulate_exact(trace, replicas, conc)
    for q, key in ((50, "p50_ms"), (99, "p99_ms")):
        assert tick.metrics[key] == pytest.approx(exact.percentile(q) * 1e3, rel=0.10), (q, model)


def test_tick_model_tracks_exact_rejections_under_overload():
    trace = traces.constant(1, rate=180.0, duration_s=120, model="cpu", replicas=1)  # ρ ≈ 1 on one slot
    tick = simulate(trace, Fixed(1, 1), lag_s=0)
    exact = simulate_exact(trace, 1, 1)
    assert tick.metrics["rejected"] == pytest.approx(exact.rejected, rel=0.15)
    assert tick.metrics["p99_ms"] == pytest.approx(exact.percentile(99) * 1e3, rel=0.10)


# --- invariants -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", traces.FAMILIES)
def test_requests_are_conserved(family):
    trace = traces.make(family, 0, smoke=True)
    for policy in (Oracle(trace), FixedPeak(trace), Zigzag([1, 5, 2, 8, 0, 3], [1, 4, 2, 8])):
        result = simulate(trace, policy, lag_s=1)
        m = result.metrics
        assert conserved(result), (family, policy.name, m)
        assert m["started"] == m["arrived"] - m["rejected"] - m["queued_end"]
        assert m["in_service_end"] >= 0
        assert m["queued_end"] >= 0
        assert result.series is not None
        assert int(result.series["rejected"].sum()) == m["rejected"]


def test_429_only_when_the_queue_bound_is_exceeded():
    base = traces.constant(0, rate=1.0, duration_s=5, replicas=1)
    arrivals = np.zeros(base.n_ticks, dtype=np.int64)
    arrivals[base.ticks_per_s + 10] = 10  # a burst of 10 in one tick, 1 replica × 2 slots, bound 2
    trace = with_arrivals(base, arrivals)
    m = simulate(trace, Fixed(1, 2), lag_s=0).metrics
    assert m["rejected"] == 10 - 2 - 2  # 2 start, 2 wait in the queue, 6 refused
    assert m["completed"] == 4
    m = Engine(trace, Fixed(1, 2), lag_s=0, queue_budget=3.0).run().metrics
    assert m["rejected"] == 10 - 2 - 6  # bound ceil(2 × 3) = 6
    m = Engine(trace, Fixed(1, 2), lag_s=0, queue_budget=0.0).run().metrics
    assert m["rejected"] == 8  # no queue: everything beyond the slots is refused
    # a steady load well under the slots never fills the queue: no 429 at all
    calm = traces.constant(0, rate=100.0, duration_s=60, replicas=4)
    m = simulate(calm, Fixed(4, 2), lag_s=0).metrics
    assert m["rejected"] == 0


def test_at_zero_requests_are_held_and_poke_the_policy():
    base = traces.constant(0, rate=1.0, duration_s=40, replicas=0, warm_pool=0)
    arrivals = np.zeros(base.n_ticks, dtype=np.int64)
    arrivals[5 * base.ticks_per_s] = 50  # a burst while scaled to zero
    trace = with_arrivals(base, arrivals, bounds=Bounds(0, 32, scale_to_zero=True))

    class UpOnPoke(Recorder):
        def decide(self, now, samples, state, bounds):  # type: ignore[no-untyped-def]
            super().decide(now, samples, state, bounds)
            waiting = bool(samples) and samples[-1].queued > 0 and samples[-1].ready == 0
            desired = 1 if (waiting or state.desired) else 0
            return dataclasses.replace(Decision(t=now, policy="up", desired=desired, concurrency=state.concurrency,
                                                previous=state.desired, previous_concurrency=state.concurrency,
                                                reason=""))

    policy = UpOnPoke(0, period_s=10.0)
    result = simulate(trace, policy, lag_s=15)  # the poke bypasses the metric lag
    m = result.metrics
    assert m["rejected"] == 0
    assert m["held"] == 50
    assert m["completed"] == 50
    poke = [c for c in policy.calls if 5.0 <= c[0] < 6.0]
    assert poke
    assert poke[0][1] == pytest.approx(poke[0][0])
    assert m["p50_ms"] / 1e3 >= trace.model.cold_median_s * 0.5  # latency includes the cold start


def test_the_warm_pool_turns_a_cold_start_into_a_warm_attach():
    base = traces.constant(0, rate=50.0, duration_s=40, replicas=1)

    def ready_after(pool: int) -> np.ndarray:
        trace = dataclasses.replace(base, warm_pool=pool)
        series = simulate(trace, Fixed(6), lag_s=0).series
        assert series is not None
        return series["ready"]

    warm, cold = ready_after(8), ready_after(0)
    # the policy asks for 6 at t = 1 s: warm attach (2 s) has them by t ≈ 3-4 s, a cold start (8 s) does not
    assert warm[4] == 6
    assert cold[4] == 1
    assert cold[25] == 6
    partial = ready_after(2)  # two warm, four cold
    assert partial[4] == 3
    assert partial[25] == 6


def test_replica_seconds_count_starting_ready_and_draining():
    trace = dataclasses.replace(traces.constant(0, rate=50.0, duration_s=100, replicas=3), warm_pool=8)
    m = simulate(trace, Fixed(3), lag_s=0).metrics
    assert m["replica_s"] == pytest.approx(300.0)
    m = simulate(trace, Fixed(5), lag_s=0).metrics  # +2 from t = 1 s, starting ~2 s then ready
    assert m["replica_s"] == pytest.approx(300.0 + 2 * 99.0)
    assert m["replica_s_starting"] == pytest.approx(2 * 2.0, rel=0.2)
    m = simulate(trace, Fixed(1), lag_s=0).metrics  # −2 at t = 1 s: drained at once (nothing to finish)
    assert m["replica_s"] == pytest.approx(100.0 + 2 * 1.0, abs=0.1)


def test_fixed_peak_on_the_step_trace_has_no_429_after_warm_up():
    trace = traces.step(0, before_s=60, during_s=120, after_s=30)
    result = simulate(trace, FixedPeak(trace), lag_s=0)
    assert result.series is not None
    rejected = result.series["rejected"]
    assert rejected[30:].sum() == 0
    assert result.metrics["attain_5x"] > 99.5


def test_same_seed_same_result():
    trace = traces.bursty(5, smoke=True)
    a = simulate(trace, Zigzag([1, 4, 9, 2], [16, 32, 8]), lag_s=1)
    b = simulate(traces.bursty(5, smoke=True), Zigzag([1, 4, 9, 2], [16, 32, 8]), lag_s=1)
    strip = {"wall_s"}
    assert {k: v for k, v in a.metrics.items() if k not in strip} == {
        k: v for k, v in b.metrics.items() if k not in strip}
    assert a.decisions == b.decisions
    c = simulate(traces.bursty(6, smoke=True), Zigzag([1, 4, 9, 2], [16, 32, 8]), lag_s=1)
    assert c.metrics["arrived"] != a.metrics["arrived"]


def test_policies_see_samples_delayed_by_their_lag_and_are_called_on_their_period():
    trace = traces.constant(0, rate=20.0, duration_s=30, replicas=1)
    slow = Recorder(1, period_s=5.0)
    simulate(trace, slow, lag_s=15)
    assert [c[0] for c in slow.calls] == [5.0, 10.0, 15.0, 20.0, 25.0]
    for now, newest, _ in slow.calls:
        assert newest is None or newest <= now - 15
    fast = Recorder(1, period_s=0.1)
    simulate(trace, fast, lag_s=1)
    times = [c[0] for c in fast.calls]
    assert len(times) == 299
    assert times == sorted(times)
    assert all(newest is None or newest <= now - 1 + 1e-9 for now, newest, _ in fast.calls)


def test_samples_describe_the_second():
    trace = traces.constant(0, rate=200.0, duration_s=20, replicas=2)
    seen: list[Sample] = []

    class Keep(Recorder):
        def decide(self, now, samples, state, bounds):  # type: ignore[no-untyped-def]
            if samples:
                seen.append(samples[-1])
            return super().decide(now, samples, state, bounds)

    simulate(trace, Keep(2), lag_s=0)
    last = seen[-1]
    assert last.ready == 2
    assert last.concurrency == MODELS["cpu"].concurrency
    assert last.arrived == int(trace.per_second[int(last.t) - 1])
    assert last.latency_s == pytest.approx(MODELS["cpu"].mean_base_s, rel=0.3)
    assert 0.0 <= last.cpu <= 1.0
    assert 0.0 < last.memory < 1.0
    assert last.in_flight == pytest.approx(200 * MODELS["cpu"].mean_base_s, rel=0.4)


# --- report statistics ----------------------------------------------------------------------------------
def test_paired_ci_and_dominance():
    ci = report.paired_ci([10, 12, 14], [11, 13, 15])  # differences all −1
    assert ci.mean == -1
    assert ci.lo == ci.hi == -1
    ci = report.paired_ci([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert ci.mean == 2.0
    assert ci.lo == pytest.approx(2.0 - 4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    cheaper, same = report.PairedCI(3, -5, -8, -2), report.PairedCI(3, 0.1, -0.2, 0.4)
    worse = report.PairedCI(3, -1, -2, -0.5)
    assert report.Dominance("f", "hpa", cheaper, same).dominates
    assert not report.Dominance("f", "hpa", cheaper, worse).dominates
    assert not report.Dominance("f", "hpa", same, same).dominates


def test_hpa_curve_interpolation():
    curve = [(99.0, 100.0, "a"), (99.5, 150.0, "b"), (99.9, 300.0, "c")]
    assert report.interpolate_cost(curve, 99.25)[0] == pytest.approx(125.0)
    assert report.interpolate_cost(curve, 99.95)[0] == 300.0  # beyond the sweep: its best point
    assert report.interpolate_cost(curve, 98.0)[0] == 100.0  # below it: its cheapest point does better
    # a thrashing setting (lower attainment at a higher cost) is off the frontier
    thrash = [*curve, (98.5, 120.0, "z")]
    assert [p[2] for p in report.frontier(thrash)] == ["a", "b", "c"]
    assert report.interpolate_cost(thrash, 98.0)[0] == 100.0
