"""The simulator's baseline autoscalers (HPA, KPA, Ray Serve) pinned to hand-computed cases (no clock, no I/O)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from berth.autoscaler.signals import Bounds, Sample, ScaleState
from berth.simulator.baselines import HPA, KPA, RayServe
from berth.simulator.baselines.hpa import ScalingPolicy, ScalingRules

BOUNDS = Bounds(min_concurrency=1, max_concurrency=1000)  # concurrency 1 per replica: 1..1000 replicas
TO_ZERO = Bounds(min_concurrency=0, max_concurrency=1000, scale_to_zero=True)


def at(t: float, demand: float = 0.0, *, ready: int = 1, starting: int = 0, queued: float = 0.0,
       arrived: int = 0) -> Sample:
    return Sample(t=t, in_flight=demand, queued=queued, arrived=arrived, ready=ready, starting=starting)


def history(until: int, demand: Callable[[int], float], *, ready: int) -> list[Sample]:
    """One sample per second for t = 1 .. until, in-flight demand(t)."""
    return [at(t, demand(t), ready=ready) for t in range(1, until + 1)]


def state(desired: int) -> ScaleState:
    return ScaleState(desired=desired, concurrency=1)


# --------------------------------------------------------------------------------------------- HPA


def test_hpa_scale_up_is_limited_to_max_of_plus_4_and_double_per_sync():
    hpa = HPA(target=10)
    # ratio = (1000 / 1) / 10 = 100 -> proposal ceil(100 × 1) = 100; limit max(1 + 4, ceil(1 × 2)) = 5
    d = hpa.decide(0, [at(0, 1000, ready=1)], state(1), BOUNDS)
    assert (d.desired, d.inputs["proposal"], d.inputs["scale_up_limit"]) == (5, 100, 5)
    assert (d.previous, d.axis, d.cycle) == (1, "horizontal", 1)
    # t = 15: the event at t = 0 is not strictly after the cutoff 0 -> start 5: max(5 + 4, 10) = 10
    assert hpa.decide(15, [at(15, 1000, ready=5)], state(5), BOUNDS).desired == 10
    # t = 30: start 10: max(14, 20) = 20
    assert hpa.decide(30, [at(30, 1000, ready=10)], state(10), BOUNDS).desired == 20


def test_hpa_from_ten_doubles_to_twenty():
    # ratio = (10000 / 10) / 10 = 100 -> proposal 1000; limit max(10 + 4, 2 × 10) = 20
    assert HPA(target=10).decide(0, [at(0, 10_000, ready=10)], state(10), BOUNDS).desired == 20


def test_hpa_rate_limit_counts_its_own_scale_events_within_the_policy_period():
    hpa = HPA(target=10, sync_period_s=5)  # policies still per 15 s
    assert hpa.decide(0, [at(0, 1000, ready=1)], state(1), BOUNDS).desired == 5  # max(1 + 4, 2)
    # t = 5 and 10: 4 added within 15 s -> start = 5 - 4 + 0 = 1 -> limit max(5, 2) = 5: stay at 5
    assert hpa.decide(5, [at(5, 1000, ready=5)], state(5), BOUNDS).desired == 5
    assert hpa.decide(10, [at(10, 1000, ready=5)], state(5), BOUNDS).desired == 5
    # t = 15: the t = 0 event has left the period -> start 5 -> max(9, 10) = 10
    assert hpa.decide(15, [at(15, 1000, ready=5)], state(5), BOUNDS).desired == 10


@pytest.mark.parametrize(
    ("demand", "expected"),
    [
        (105, 10),  # ratio 10.5 / 10 = 1.05: |1 - 1.05| <= 0.1 -> keep 10
        (95, 10),  # ratio 0.95: inside the dead band too (down is then held by the window anyway)
        (120, 12),  # ratio 1.2 -> ceil(1.2 × 10) = 12 (limit max(14, 20))
    ],
)
def test_hpa_tolerance_dead_band(demand, expected):
    d = HPA(target=10).decide(0, [at(0, demand, ready=10)], state(10), BOUNDS)
    assert d.desired == expected


def test_hpa_scale_down_follows_the_max_of_the_last_300_s():
    hpa = HPA(target=10)
    # t = 0: ratio (100 / 10) / 10 = 1 -> proposal 10, recorded
    assert hpa.decide(0, [at(0, 100, ready=10)], state(10), BOUNDS).desired == 10
    # from t = 15 demand is 5: ratio 0.05 -> proposal ceil(0.05 × 10) = 1, but the t = 0 record (10) is in
    # the window (t > now - 300) until now = 300
    for now in range(15, 300, 15):
        d = hpa.decide(now, [at(now, 5, ready=10)], state(10), BOUNDS)
        assert (d.desired, d.inputs["proposal"], d.inputs["down_recommendation"]) == (10, 1, 10), now
    # t = 300: the cutoff is 0 and the t = 0 record is not after it: window max = 1; Percent 100 gives
    # limit floor(10 × 0) = 0, so only minReplicas (1) bounds it: 10 -> 1 in one sync
    d = hpa.decide(300, [at(300, 5, ready=10)], state(10), BOUNDS)
    assert (d.desired, d.inputs["down_recommendation"], d.inputs["scale_down_limit"]) == (1, 1, 0)


def test_hpa_scale_down_limits_and_min_replicas():
    # No window (stabilisation 0): demand 0 -> proposal 0; Percent 100 -> limit 0 -> max(0, 0, min 3) = 3
    hpa = HPA(target=10, downscale_stabilization_s=0)
    assert hpa.decide(0, [at(0, 0, ready=10)], state(10), Bounds(3, 1000)).desired == 3
    # Percent 50 per 15 s: limit floor(10 × 0.5) = 5
    half = HPA(target=10, downscale_stabilization_s=0,
               scale_down_policies=ScalingRules((ScalingPolicy("Percent", 50, 15.0),)))
    assert half.decide(0, [at(0, 0, ready=10)], state(10), BOUNDS).desired == 5
    # Pods 1 per 15 s: 10 - 1 = 9
    one = HPA(target=10, downscale_stabilization_s=0,
              scale_down_policies=ScalingRules((ScalingPolicy("Pods", 1, 15.0),)))
    assert one.decide(0, [at(0, 0, ready=10)], state(10), BOUNDS).desired == 9


def test_hpa_never_goes_below_one_replica_even_when_bounds_allow_zero():
    hpa = HPA(target=10, downscale_stabilization_s=0)
    # demand 0 -> proposal 0 -> limit 0 -> max(0, 0, minReplicas max(1, 0)) = 1
    assert hpa.decide(0, [at(0, 0, ready=1)], state(1), TO_ZERO).desired == 1


def test_hpa_cold_start_and_zero():
    # at zero with demand waiting (no ready pod): max(1, min replicas)
    d = HPA(target=10).decide(0, [at(0, 0, ready=0, queued=3)], state(0), TO_ZERO)
    assert (d.desired, d.axis) == (1, "zero")
    assert HPA(target=10).decide(0, [at(0, 0, ready=0, queued=3)], state(0), Bounds(2, 10)).desired == 2
    # nothing waiting: HPA does not act at zero
    assert HPA(target=10).decide(0, [at(0, 0, ready=0)], state(0), TO_ZERO).desired == 0
    # replicas asked for but none ready yet: no metrics -> keep
    assert HPA(target=10).decide(0, [at(0, 50, ready=0, starting=3)], state(3), BOUNDS).desired == 3


def test_hpa_starting_pods_count_as_zero_on_a_scale_up():
    # ready 1, starting 4, demand 50: ratio 5; with the unready pods at 0: 50 / 5 / 10 = 1.0 -> keep 5
    assert HPA(target=10).decide(0, [at(0, 50, ready=1, starting=4)], state(5), BOUNDS).desired == 5
    # demand 80: 80 / 5 / 10 = 1.6 -> ceil(1.6 × 5) = 8 (limit max(9, 10))
    assert HPA(target=10).decide(0, [at(0, 80, ready=1, starting=4)], state(5), BOUNDS).desired == 8
    # demand 40: ratio 4 but 40 / 5 / 10 = 0.8 flips the direction -> keep 5
    assert HPA(target=10).decide(0, [at(0, 40, ready=1, starting=4)], state(5), BOUNDS).desired == 5


def test_hpa_clamps_to_max():
    # ratio 100 -> proposal 1000, limit 20, maxReplicas 12 -> 12
    assert HPA(target=10).decide(0, [at(0, 10_000, ready=10)], state(10), Bounds(1, 12)).desired == 12


# --------------------------------------------------------------------------------------------- KPA


def test_kpa_target_is_seventy_percent_of_container_concurrency():
    assert KPA(10).target == pytest.approx(7.0)
    assert KPA(0).target == pytest.approx(70.0)  # unlimited: 100 × 0.7
    assert (KPA(10).period_s, KPA(10).panic_window_s) == (2.0, 6.0)


def test_kpa_enters_panic_when_panic_pods_reach_twice_ready():
    kpa = KPA(10)  # target 7
    samples = history(60, lambda t: 30 if t > 54 else 0, ready=2)
    d = kpa.decide(60, samples, state(2), BOUNDS)
    # stable = 6 × 30 / 60 = 3 -> dspc 1 (max(1, floor(2 / 2) = 1)); panic = 30 -> dppc ceil(30 / 7) = 5;
    # 5 / 2 = 2.5 >= 2 -> panic: max(1, 5) = 5
    assert (d.inputs["dspc"], d.inputs["dppc"], d.inputs["panicking"]) == (1, 5, 1.0)
    assert d.desired == 5


@pytest.mark.parametrize(("panic_demand", "expected", "panicking"), [(28, 4, 1.0), (21, 1, 0.0)])
def test_kpa_panic_threshold_edge(panic_demand, expected, panicking):
    # 28 / 7 = 4 -> 4 / 2 = 2 >= 2: panic, 4 pods. 21 / 7 = 3 -> 1.5 < 2: stable, dspc ceil(2.1 / 7) = 1
    d = KPA(10).decide(60, history(60, lambda t: panic_demand if t > 54 else 0, ready=2), state(2), BOUNDS)
    assert (d.desired, d.inputs["panicking"]) == (expected, panicking)


def test_kpa_never_scales_down_in_panic_and_leaves_it_a_stable_window_after_the_last_over_threshold_tick():
    kpa = KPA(10)

    def demand(t: int) -> float:
        return 0 if t <= 54 else 30 if t <= 60 else 7

    assert kpa.decide(60, history(60, demand, ready=2), state(2), BOUNDS).desired == 5  # panic at t = 60
    # t = 62 .. 120 with 5 ready: the panic window falls (t = 62: (4 × 30 + 2 × 7) / 6 = 22.3 -> dppc 4,
    # 4 / 5 < 2), but 60 + 60 < now is false until now > 120: hold maxPanicPods = 5
    for now in range(62, 121, 2):
        d = kpa.decide(now, history(now, demand, ready=5), state(5), BOUNDS)
        assert (d.desired, d.inputs["panicking"], d.inputs["over_panic"]) == (5, 1.0, 0.0), now
    # t = 122 > 60 + 60: un-panic; stable = 7 (t = 63..122) -> dspc 1, halving floor(5 / 2) = 2 -> 2
    d = kpa.decide(122, history(122, demand, ready=5), state(5), BOUNDS)
    assert (d.desired, d.inputs["panicking"], d.inputs["max_scale_down"]) == (2, 0.0, 2)


def test_kpa_scale_down_is_at_most_halving_per_tick():
    # ready 10, stable 1 (non-zero) -> dspc ceil(1 / 7) = 1; maxScaleDown floor(10 / 2) = 5 -> 5
    d = KPA(10).decide(60, history(60, lambda t: 1, ready=10), state(10), BOUNDS)
    assert (d.desired, d.inputs["dspc"], d.inputs["max_scale_down"]) == (5, 1, 5)


def test_kpa_scales_to_zero_after_a_stable_window_of_zero_plus_the_grace_period():
    kpa = KPA(10)

    def demand(t: int) -> float:
        return 7 if t <= 10 else 0

    # The 60 s stable window (T - 60, T] holds a non-zero sample until T = 70 -> dspc 1 before that.
    # From T = 70 the stable average is 0 (dspc 0, maxScaleDown floor(1 / 2) = 0): keep 1 pod until 70 + 30.
    for now in range(2, 100, 2):
        d = kpa.decide(now, history(now, demand, ready=1), state(1), TO_ZERO)
        assert d.desired == 1, now
    d = kpa.decide(100, history(100, demand, ready=1), state(1), TO_ZERO)
    assert (d.desired, d.axis, d.inputs["idle_for_s"]) == (0, "zero", 30.0)
    # already at zero and nothing arrives: stay at zero
    assert kpa.decide(102, history(102, demand, ready=0), state(0), TO_ZERO).desired == 0


def test_kpa_without_scale_to_zero_keeps_one_pod():
    d = KPA(10).decide(120, history(120, lambda t: 0, ready=1), state(1), BOUNDS)
    assert d.desired == 1


def test_kpa_poke_from_zero():
    quiet = history(59, lambda t: 0, ready=0)
    # a request waiting in the activator: stable 1 / 60 -> dspc 1, dppc 1 (1 / 1 < 2: no panic) -> 1
    d = KPA(10).decide(60, [*quiet, at(60, queued=1, arrived=1, ready=0)], state(0), TO_ZERO)
    assert (d.desired, d.axis, d.inputs["poke"]) == (1, "zero", 1.0)
    # an arrival the decider does not see yet (demand 0 -> dspc 0) still pokes it to 1
    d = KPA(10).decide(60, [*quiet, at(60, arrived=1, ready=0)], state(0), TO_ZERO)
    assert (d.desired, d.inputs["dspc"]) == (1, 0)
    # nothing: stay at zero
    assert KPA(10).decide(60, [*quiet, at(60, ready=0)], state(0), TO_ZERO).desired == 0


def test_kpa_poke_restarts_the_scale_to_zero_grace():
    kpa = KPA(10)
    quiet = history(59, lambda t: 0, ready=0)
    assert kpa.decide(20, quiet[:20], state(0), TO_ZERO).desired == 0  # idle at zero since t = 20
    assert kpa.decide(60, [*quiet, at(60, arrived=1, ready=0)], state(0), TO_ZERO).desired == 1  # poke
    # t = 62, stable still 0: the grace counts from 62, not 20 (62 - 20 = 42 would already exceed 30)
    d = kpa.decide(62, [*quiet, at(60, arrived=1, ready=0), at(61), at(62)], state(1), TO_ZERO)
    assert (d.desired, d.inputs["idle_for_s"]) == (1, 0.0)
    d = kpa.decide(92, [*quiet, at(60, arrived=1, ready=0), *history(92, lambda t: 0, ready=1)[60:]],
                   state(1), TO_ZERO)
    assert d.desired == 0  # 92 - 62 = 30 >= 30


def test_kpa_scale_down_delay_holds_the_max_of_the_delay_window():
    kpa = KPA(10, scale_down_delay_s=4)

    def demand(t: int) -> float:
        return 70 if t <= 2 else 0

    # t = 2: stable 70 -> dspc 10
    assert kpa.decide(2, history(2, demand, ready=10), state(10), BOUNDS).desired == 10
    # t = 4: stable 140 / 4 = 35 -> 5 (= maxScaleDown 5), but the window (0, 4] still holds 10
    assert kpa.decide(4, history(4, demand, ready=10), state(10), BOUNDS).desired == 10
    # t = 6: window (2, 6] holds 5 (t = 4) and 5 (t = 6: 140 / 6 = 23.3 -> dspc 4, floor(10 / 2) = 5)
    assert kpa.decide(6, history(6, demand, ready=10), state(10), BOUNDS).desired == 5


# --------------------------------------------------------------------------------------------- Ray Serve


def test_ray_upscale_needs_more_than_300_consecutive_ticks():
    ray = RayServe(target_ongoing_requests=2)
    samples = history(30, lambda t: 4, ready=1)
    # total 4 -> error ratio 4 / (2 × 1) = 2 -> desired 2 > target 1: counter + 1 per 0.1 s tick;
    # applied only once the counter exceeds int(30 / 0.1) = 300, i.e. on tick 301 (t = 30.1 s)
    for i in range(1, 301):
        d = ray.decide(i / 10, samples, state(1), BOUNDS)
        assert (d.desired, d.inputs["decision_counter"]) == (1, i), i
    d = ray.decide(30.1, samples, state(1), BOUNDS)
    assert (d.desired, ray.decision_counter) == (2, 0)


def test_ray_counter_resets_when_the_decision_changes():
    ray = RayServe(target_ongoing_requests=2)
    up = history(30, lambda t: 4, ready=1)
    for i in range(1, 201):
        ray.decide(i / 10, up, state(1), BOUNDS)
    assert ray.decision_counter == 200
    # the deployment is asked for 2 elsewhere: desired 2 == target 2 -> counter 0
    ray.decide(20.1, up, state(2), BOUNDS)
    assert ray.decision_counter == 0


def test_ray_downscale_needs_more_than_6000_ticks():
    ray = RayServe(target_ongoing_requests=2)
    samples = history(30, lambda t: 2, ready=4)
    # total 2 -> error ratio 2 / (2 × 4) = 0.25 -> desired 1; counter -1 per tick; applied once it is below
    # -int(600 / 0.1) = -6000, i.e. on tick 6001 (t = 600.1 s)
    for i in range(1, 6001):
        assert ray.decide(i / 10, samples, state(4), BOUNDS).desired == 4
    assert ray.decision_counter == -6000
    assert ray.decide(600.1, samples, state(4), BOUNDS).desired == 1


def test_ray_downscale_to_zero_uses_its_own_delay():
    ray = RayServe(target_ongoing_requests=2, downscale_to_zero_delay_s=1.0)
    samples = history(30, lambda t: 0, ready=1)
    # total 0 -> desired ceil(1 + (0 - 1)) = 0, from 1 -> delay int(1.0 / 0.1) = 10: applied on tick 11
    for i in range(1, 11):
        assert ray.decide(i / 10, samples, state(1), TO_ZERO).desired == 1
    d = ray.decide(1.1, samples, state(1), TO_ZERO)
    assert (d.desired, d.axis) == (0, "zero")
    # without scale to zero the bound keeps 1 and no counter builds up
    assert RayServe(target_ongoing_requests=2).decide(0.1, samples, state(1), BOUNDS).desired == 1


def test_ray_cold_start_fast_path_skips_the_delay():
    ray = RayServe(target_ongoing_requests=2)
    quiet = history(29, lambda t: 0, ready=0)
    assert ray.decide(0.1, [*quiet, at(30, ready=0)], state(0), TO_ZERO).desired == 0  # nothing waiting
    # t = 5.0, mid-interval: a queued request at zero replicas pushes at once -> max(ceil(1 × 1), 0) = 1
    d = ray.decide(5.0, [*quiet, at(30, queued=3, ready=0)], state(0), TO_ZERO)
    assert (d.desired, d.axis, d.inputs["pushed"], ray.decision_counter) == (1, "zero", 1.0, 0)
    # replicas already asked for but none running: max(1, 3) = 3
    assert ray.decide(5.1, [*quiet, at(30, queued=3, ready=0)], state(3), TO_ZERO).desired == 3


def test_ray_metric_is_refreshed_only_every_10_s():
    ray = RayServe(target_ongoing_requests=2)
    low = history(30, lambda t: 4, ready=2)
    high = history(30, lambda t: 40, ready=2)
    # t = 0.1: first push, total 4 -> 4 / (2 × 2) = 1 -> desired 2 == target 2: on target
    d = ray.decide(0.1, low, state(2), BOUNDS)
    assert (d.inputs["total"], d.inputs["pushed"], d.desired) == (4, 1.0, 2)
    # t = 9.9: demand is now 40, but the last push (4) still holds
    d = ray.decide(9.9, high, state(2), BOUNDS)
    assert (d.inputs["total"], d.inputs["pushed"], ray.decision_counter) == (4, 0.0, 0)
    # t = 10.0: a new interval -> push: mean over the last 30 s = 40 -> 40 / 4 = 10 -> desired 20, counter 1
    d = ray.decide(10.0, high, state(2), BOUNDS)
    assert (d.inputs["total"], d.inputs["pushed"], d.inputs["bounded"], ray.decision_counter) == (40, 1.0, 20, 1)


def test_ray_look_back_is_the_mean_of_the_last_30_s():
    # 60 samples: 0 for t <= 30, then 6; look-back (30, 60] -> mean 6 -> 6 / (2 × 1) = 3 replicas wanted
    d = RayServe(target_ongoing_requests=2).decide(0.1, history(60, lambda t: 0 if t <= 30 else 6, ready=1),
                                                   state(1), BOUNDS)
    assert (d.inputs["total"], d.inputs["bounded"]) == (6, 3)


def test_ray_clamps_to_bounds():
    # total 40 -> 20 wanted, max 5
    d = RayServe(target_ongoing_requests=2).decide(0.1, history(30, lambda t: 40, ready=2), state(2), Bounds(1, 5))
    assert d.inputs["bounded"] == 5
