"""The warm pool's sizing: a pure function of recent demand and the memory cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from berth.backends.warmpool import PoolPolicy, pool_target

POLICY = PoolPolicy(floor=1, memory_cap_mb=1000, window_s=300.0, burst_s=10.0)


def test_no_demand_keeps_the_floor():
    assert pool_target([], 1000.0, POLICY, standby_mb=250) == 1
    assert pool_target([], 1000.0, PoolPolicy(floor=0), standby_mb=250) == 0


def test_a_burst_sets_the_size_for_the_whole_window_then_it_falls_back():
    burst = [100.0, 101.0, 102.5, 104.0]  # four scale-ups within 10 s
    assert pool_target(burst, 110.0, POLICY, standby_mb=200) == 4
    assert pool_target(burst, 100.0 + 299.0, POLICY, standby_mb=200) == 4  # still remembered
    assert pool_target(burst, 104.0 + 301.0, POLICY, standby_mb=200) == 1  # forgotten: the floor


def test_spread_out_demand_needs_fewer_than_its_count():
    spread = [0.0, 20.0, 40.0, 60.0, 80.0]  # five scale-ups, never two within 10 s
    assert pool_target(spread, 90.0, POLICY, standby_mb=200) == 1


def test_the_memory_cap_bounds_the_size_and_the_floor():
    burst = [0.0] * 10
    assert pool_target(burst, 1.0, POLICY, standby_mb=300) == 3  # 1000 // 300
    assert pool_target([], 1.0, POLICY, standby_mb=2000) == 0  # not even the floor fits


@given(
    times=st.lists(st.floats(0, 1000, allow_nan=False), max_size=40).map(sorted),
    now=st.floats(0, 1400, allow_nan=False),
    standby_mb=st.floats(50, 1500, allow_nan=False),
)
def test_target_is_within_floor_cap_and_demand(times, now, standby_mb):
    target = pool_target(times, now, POLICY, standby_mb)
    fits = int(POLICY.memory_cap_mb // standby_mb)
    assert 0 <= target <= fits
    recent = [t for t in times if now - POLICY.window_s <= t]
    assert target <= max(POLICY.floor, len(recent))
    assert target >= min(POLICY.floor, fits)
