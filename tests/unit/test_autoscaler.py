"""Berth's autoscaler pinned to hand-computed cases (no clock, no I/O)."""

from __future__ import annotations

import itertools
import math

import pytest

from berth.autoscaler import (
    Autoscaler,
    AutoscalerSettings,
    Bounds,
    Forecaster,
    Sample,
    ScaleState,
    horizontal,
    vertical,
)
from berth.autoscaler.forecast import predicted_minimum

S = AutoscalerSettings()
BOUNDS = Bounds(min_concurrency=4, max_concurrency=400)


def flat(t0: float, t1: float, demand: float, *, ready: int = 1, conc: int = 4, latency: float = 0.05,
         arrived: int | None = None, step: float = 1.0) -> list[Sample]:
    """One sample per `step` s in (t0, t1] with the given in-flight demand."""
    n = round((t1 - t0) / step)
    arrivals = round(demand / latency * step) if arrived is None else arrived
    return [Sample(t=t0 + (i + 1) * step, in_flight=demand, arrived=arrivals, completed=arrivals,
                   latency_s=latency if arrivals else None, ready=ready, concurrency=conc) for i in range(n)]


def test_replicas_for_is_the_hpa_formula_against_a_utilisation_target():
    # target = 0.7 × 4 = 2.8 per replica; 10 / 2.8 = 3.57 -> 4
    assert horizontal.replicas_for(10, 4, S) == 4
    assert horizontal.replicas_for(2.8, 4, S) == 1
    assert horizontal.replicas_for(0, 4, S) == 0


def test_demand_counts_queued_and_refused_requests():
    # 3 in flight + 2 queued + 40 refusals/s × 0.05 s = 7
    assert Sample(t=1, in_flight=3, queued=2, rejected=40, latency_s=0.05).demand == pytest.approx(7.0)


def test_scale_up_is_capped_relative_to_the_current_load():
    # window mean 100 needs ceil(100/2.8) = 36; latest 100 allows 2 × 36 = 72 -> 36
    assert horizontal.scale_up(1, 100, 100, 4, S) == 36
    # a stale window mean: latest demand 5 needs 2, limit max(2 × 2, 1 + 4) = 5
    assert horizontal.scale_up(1, 100, 5, 4, S) == 5


def test_scale_up_has_a_tolerance_band():
    # 4 replicas carry 11.2 at target; 12 / 11.2 = 1.07 <= 1.1: stay; 12.5 / 11.2 = 1.12: ceil(12.5/2.8) = 5
    assert horizontal.scale_up(4, 12, 12, 4, S) == 4
    assert horizontal.scale_up(4, 12.5, 12.5, 4, S) == 5


def test_replica_range_from_provisioned_concurrency():
    assert Bounds(4, 400).replica_range(4) == (1, 100)
    assert Bounds(0, 16, scale_to_zero=True).replica_range(4) == (0, 4)
    assert Bounds(0, 16).replica_range(4) == (1, 4)
    assert Bounds(10, 16).replica_range(4) == (3, 4)


def run(policy: Autoscaler, samples: list[Sample], state: ScaleState, until: float, bounds: Bounds = BOUNDS,
        start: float | None = None) -> list:
    """Call decide every period up to `until`, applying each decision; returns the decisions."""
    out = []
    t = start if start is not None else policy.period_s
    while t <= until + 1e-9:
        seen = [s for s in samples if s.t <= t]
        d = policy.decide(t, seen, state, bounds)
        state = ScaleState(d.desired, d.concurrency)
        out.append(d)
        t += policy.period_s
    return out


def test_a_step_reaches_capacity_within_the_window():
    # 1 replica at demand 1, then demand 100 from t=60 (needs ceil(100/2.8) = 36).
    samples = flat(0, 60, 1.0) + flat(60, 120, 100.0, ready=1)
    d = run(Autoscaler(S, vertical=False), samples, ScaleState(1, 4), 120)
    by_t = {x.t: x.desired for x in d}
    assert by_t[60] == 1
    # t=65: the last cycle's mean (60, 65] is 100 (over the 20 s mean, 25.75): ceil(100 / 2.8) = 36,
    # within the limit max(2 × 36, 1 + 4) = 72
    assert by_t[65] == 36
    assert by_t[120] == 36
    assert d[-1].reason
    assert d[-1].inputs["target"] == pytest.approx(2.8)


def test_surge_needs_twice_the_replicas_and_four_more():
    # 2 replicas: a sample needing ceil(20 / 2.8) = 8 >= max(2 × 2, 2 + 4) = 6 surges to 8
    assert horizontal.surge(2, 20, 4, S) == 8
    # needing ceil(16 / 2.8) = 6 >= 6: surges; needing 5 does not (the cycle handles it)
    assert horizontal.surge(2, 16, 4, S) == 6
    assert horizontal.surge(2, 14, 4, S) == 2
    # 10 replicas: needing 19 < 20 waits for the cycle; needing 20 surges
    assert horizontal.surge(10, 53, 4, S) == 10
    assert horizontal.surge(10, 56, 4, S) == 20
    assert horizontal.surge(0, 100, 4, S) == 0  # from zero is the wake path's


def test_a_surge_between_cycles_acts_at_the_next_sample_and_is_kept():
    # 1 replica at demand 1; demand 100 from t=61 (needs 36). The cycle at t=60 sees nothing; the
    # surge check at t=61 does: ceil(100 / 2.8) = 36 >= max(2, 5), capped at 2 × 36 -> 36 at t=61.
    samples = flat(0, 60, 1.0) + flat(60, 400, 100.0, ready=36)
    policy = Autoscaler(S, vertical=False)
    state = ScaleState(1, 4)
    log = []
    for t in range(1, 401):
        seen = [x for x in samples if x.t <= t]
        check = policy.decide if t % 5 == 0 else policy.surge
        d = check(float(t), seen, state, BOUNDS)
        if d is not None:
            state = ScaleState(d.desired, d.concurrency)
            log.append(d)
    surged = [d for d in log if d.reason.startswith("surge")]
    assert [(d.t, d.previous, d.desired) for d in surged] == [(61.0, 1, 36)]
    assert surged[0].cycle == 12  # decided between cycles 12 (t=60) and 13
    assert all(d.desired == 36 for d in log if d.t > 61)  # the cycles that follow keep it
    assert policy.surge(400.0, samples, state, BOUNDS) is None  # at capacity: nothing to decide


def test_scale_down_sheds_a_peak_over_the_window():
    # Demand 100 until t=100 (36 replicas), then 10 (needs 4). Nothing goes down before the policy has a
    # full 300 s window of its own; then each cycle's load counts, weighted down linearly with its age.
    samples = flat(0, 100, 100.0, ready=36) + flat(100, 800, 10.0, ready=36)
    d = run(Autoscaler(S, vertical=False), samples, ScaleState(36, 4), 800)
    by_t = {x.t: x.desired for x in d}
    assert by_t[300] == 36  # first decision at t=5: no full window yet
    # t=305: the cycle at t=100 (load 100) is 205 s old: 100 × (1 - 205/300) = 31.7 -> ceil(31.7 / 2.8) = 12
    assert by_t[305] == 12
    # t=370: 100 × (1 - 270/300) = 10 and t=105's 77.5 × (1 - 265/300) = 9.0; the live load is 10 -> 4
    assert by_t[370] == 4
    assert all(a.desired >= b.desired for a, b in itertools.pairwise(d))  # never up again


def test_stabilised_load_weights_older_cycles_down():
    assert horizontal.stabilised_load([(0.0, 100.0), (150.0, 50.0), (290.0, 10.0)], 300.0, 300.0) == pytest.approx(25.0)
    assert horizontal.stabilised_load([], 300.0, 300.0) == 0.0


def test_vertical_cuts_fast_when_latency_doubles_and_raises_cautiously():
    s = S
    def sig_(**kw):  # type: ignore[no-untyped-def]
        base = {"latency_s": 0.2, "uncontended_s": 0.05, "cpu": 0.5, "memory": 0.2, "utilisation": 0.7, "queued": 0,
                "in_flight": 5, "rejected": 0, "completed": 100, "per_replica": 2.8}
        return vertical.VerticalSignals(**{**base, **kw})

    sig = sig_()
    assert vertical.classify(sig, s) == "stressed"
    assert vertical.next_concurrency(8, "stressed", 1, 1, 64, s) == 4  # 8 × (1 - 0.5)
    relaxed = sig_(latency_s=0.055, cpu=0.3)  # CPU per busy slot 0.3 / 0.7 = 0.43: a model that waits
    assert vertical.classify(relaxed, s) == "relaxed"
    assert vertical.next_concurrency(4, "relaxed", 1, 1, 64, s) == 4  # one period is not enough
    assert vertical.next_concurrency(4, "relaxed", 2, 1, 64, s) == 5  # max(4 + 1, floor(4 × 1.25))
    assert vertical.next_concurrency(16, "relaxed", 2, 1, 64, s) == 20
    assert vertical.next_concurrency(16, "relaxed", 2, 1, 18, s) == 18  # never above the ceiling
    assert vertical.next_concurrency(16, "relaxed", 2, 1, 8, s) == 16  # ... and a raise never lowers it
    assert vertical.next_concurrency(1, "stressed", 1, 1, 64, s) == 1  # never below the floor
    assert vertical.next_concurrency(32, "stressed", 1, 32, 32, s) == 32  # the minimum must stay reachable
    assert vertical.next_concurrency(8, "steady", 5, 1, 4, s) == 8
    # min 64 on at most 2 replicas: each must admit 32; max 64 on 2 replicas: no raise above 32
    assert vertical.concurrency_range(Bounds(64, 64, max_replicas=2), 2) == (32, 32)
    assert vertical.concurrency_range(Bounds(0, 64), 1) == (1, 64)
    assert vertical.classify(sig_(latency_s=0.055, cpu=0.5), s) == "steady"  # 0.5 / 0.7 per slot: CPU-bound
    assert vertical.classify(sig_(latency_s=0.05, cpu=0.05, utilisation=0.1), s) == "steady"  # unused: tells nothing
    assert vertical.classify(sig_(completed=5), s) == "steady"  # too few requests to judge the latency
    assert vertical.classify(sig_(per_replica=1.0), s) == "steady"  # one at a time: slow, not contended
    assert vertical.classify(sig_(latency_s=0.07, cpu=0.95), s) == "stressed"  # 1.4× with the CPU saturated
    assert vertical.classify(sig_(latency_s=0.05, memory=0.9), s) == "stressed"  # memory near the limit


def test_uncontended_latency_is_a_mean_of_single_request_samples():
    one = [Sample(t=float(t), in_flight=1, completed=10, latency_s=lat, ready=2, concurrency=4)
           for t, lat in enumerate([0.02, 0.3, 0.1, 0.2], start=1)]
    busy = [Sample(t=9.0, in_flight=8, completed=50, latency_s=0.5, ready=2, concurrency=4)]
    assert vertical.uncontended(None, one + busy, S) == pytest.approx(0.155)  # (0.02+0.3+0.1+0.2)/4; busy ignored
    assert vertical.uncontended(0.1, one, S) == pytest.approx(0.1275)  # 0.5 × 0.1 + 0.5 × 0.155
    # busy only: the period's mean (0.5) is no lower, so the estimate only drifts up by 2 %
    assert vertical.uncontended(0.1, busy, S) == pytest.approx(0.102)
    assert vertical.uncontended(0.1, [*busy[:0], Sample(t=9.0, in_flight=8, completed=50, latency_s=0.08, ready=2,
                                                           concurrency=4)], S) == pytest.approx(0.08)  # lower: taken


def test_vertical_change_keeps_provisioned_concurrency_then_scales():
    # 4 replicas × 8 with latency 4× the uncontended one (the model's knee moved): concurrency 8 -> 4
    # and the replicas double at once so provisioned concurrency stays 32.
    policy = Autoscaler(S)
    policy.uncontended_s = 0.05
    policy._last_vertical = 0.0
    samples = [Sample(t=float(t), in_flight=16, arrived=80, completed=80, latency_s=0.2, ready=4, concurrency=8,
                      cpu=0.9) for t in range(1, 31)]
    d = policy.decide(30.0, samples, ScaleState(4, 8), Bounds(4, 400))
    assert (d.axis, d.concurrency, d.desired) == ("vertical", 4, 8)
    assert "stressed" in d.reason


def test_scale_to_zero_after_the_idle_period_and_back_on_a_request():
    s = S.with_(scale_to_zero_idle=60.0)
    policy = Autoscaler(s)
    bounds = Bounds(0, 16, scale_to_zero=True)
    samples = flat(0, 10, 1.0) + flat(10, 100, 0.0, arrived=0)
    d = run(policy, samples, ScaleState(1, 4), 100, bounds=bounds)
    zero = [x for x in d if x.desired == 0]
    assert zero[0].t == 70  # last activity at t=10, idle 60 s
    assert zero[0].axis == "zero"
    waiting = [*samples, Sample(t=101, in_flight=0, queued=1, arrived=1)]
    back = policy.decide(101, waiting, ScaleState(0, 4), bounds)
    assert (back.desired, back.axis) == (1, "zero")


def test_the_same_decisions_at_any_time_scale():
    fast = AutoscalerSettings(time_scale=0.1)
    assert fast.up_period_s == pytest.approx(0.5)
    assert fast.down_window_s == pytest.approx(30.0)
    assert fast.vertical_period_s == pytest.approx(3.0)
    assert fast.scale_to_zero_idle_s == pytest.approx(180.0)
    samples = flat(0, 60, 1.0) + flat(60, 120, 100.0)
    slow_d = run(Autoscaler(S, vertical=False), samples, ScaleState(1, 4), 120)
    scaled = [Sample(**{**{f: getattr(x, f) for f in x.__slots__}, "t": x.t * 0.1}) for x in samples]
    fast_d = run(Autoscaler(fast, vertical=False), scaled, ScaleState(1, 4), 12.0)
    assert [x.desired for x in slow_d] == [x.desired for x in fast_d]


def weekly_counts(days: int, per_day: int, ramp_at: int) -> list[int]:
    """Per-minute counts: quiet (10/min) except business hours from `ramp_at` for 8 h on weekdays (600/min)."""
    out = []
    for day in range(days):
        for minute in range(per_day):
            busy = day % 7 < 5 and ramp_at <= minute < ramp_at + 480
            out.append(600 if busy else 10)
    return out


def test_the_forecast_raises_the_minimum_a_cold_start_before_the_ramp():
    per_day, ramp = 1440, 9 * 60
    f = Forecaster(bucket_s=60.0, day_s=86_400.0)
    f.learn(0.0, weekly_counts(14, per_day, ramp))
    week2 = 14 * 86_400.0  # day 14 is a Monday (day % 7 == 0)
    ramp_t = week2 + ramp * 60.0
    latency, target = 0.05, 2.8
    # 600/min = 10/s × 0.05 s = 0.5 concurrent -> 1 replica; quiet 10/min -> 0.0083 -> 1 replica as well,
    # so read the raw rate: the forecast must show the ramp's rate before the ramp.
    cold_start = 8.0 * 60  # generous: eight minutes
    s = AutoscalerSettings(forecast_lead=cold_start + 120)
    policy = Autoscaler(s, forecast=f)
    d = policy.decide(ramp_t - cold_start - 60, [], ScaleState(1, 4), BOUNDS)
    assert d.inputs["forecast_rate"] == pytest.approx(10.0)  # the ramp is seen ahead
    assert f.expected(ramp_t - 3 * 3600) == pytest.approx(10 / 60)  # hours before: quiet
    assert f.expected(week2 + 5 * 86_400 + ramp * 60 + 60) == pytest.approx(10 / 60)  # Saturday stays quiet
    assert predicted_minimum(100.0, latency, target) == math.ceil(100 * 0.05 / 2.8)


def test_predictive_minimum_is_in_force_before_the_ramp_and_never_below_the_floor():
    per_day, ramp = 1440, 9 * 60
    f = Forecaster()
    # 60,000 / min = 1,000 /s × 0.05 s = 50 concurrent -> ceil(50 / 2.8) = 18 replicas
    f.learn(0.0, [60_000 if (d % 7 < 5 and ramp <= m < ramp + 480) else 10 for d in range(14) for m in range(per_day)])
    policy = Autoscaler(AutoscalerSettings(forecast_lead=600.0), forecast=f)
    policy.latency_s = 0.05
    ramp_t = 14 * 86_400.0 + ramp * 60.0
    before = policy.decide(ramp_t - 600, flat(ramp_t - 660, ramp_t - 600, 0.1), ScaleState(1, 4), BOUNDS)
    assert before.desired == 18
    assert "forecast" in before.reason
    quiet = Autoscaler(AutoscalerSettings(forecast_lead=600.0), forecast=f)
    quiet.latency_s = 0.05
    night = quiet.decide(ramp_t - 5 * 3600, flat(ramp_t - 5 * 3600 - 60, ramp_t - 5 * 3600, 0.1), ScaleState(3, 4),
                         Bounds(12, 400))
    assert night.desired == 3  # the floor (ceil(12 / 4)) holds when the forecast is lower


def test_forecaster_round_trips_through_plain_data():
    f = Forecaster()
    f.learn(0.0, weekly_counts(8, 1440, 540))
    g = Forecaster.from_dict(f.to_dict())
    for t in (0.0, 9 * 3600.0, 30 * 3600.0):
        assert g.expected(t) == f.expected(t)


def test_the_simulator_and_the_live_loop_run_the_same_decision_code():
    """No copy: both build `berth.autoscaler.apa.Autoscaler`, and the decision package does no I/O."""
    import ast
    from pathlib import Path

    import berth.autoscaler.apa as apa
    from berth.control import autoscaling as live
    from berth.simulator import matrix, traces

    assert live.Autoscaler is apa.Autoscaler
    trace = traces.make("constant", 0, smoke=True)
    for name in ("apa-full", "apa-horizontal"):
        built = matrix.policy_specs()[name].build(trace)
        assert type(built) is apa.Autoscaler
    package = Path(apa.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("berth"):
                assert node.module.startswith("berth.autoscaler"), (source.name, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name in ("math", "itertools") for a in node.names), (source.name, ast.dump(node))
