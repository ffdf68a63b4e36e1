"""The exact sliding-window limiter: the pure ring over simulated hours, the host-shared files across
processes, and the Redis script against the same arrivals."""

from __future__ import annotations

import bisect
import multiprocessing
import random
import time
import uuid
from pathlib import Path

import pytest

from berth.access.permissions import Caller
from berth.errors import InvalidParameterValue
from berth.ratelimit import window
from berth.ratelimit.local import NS, HostLimiter
from berth.ratelimit.rules import RateLimit, parse_rate_limits, windows

MINUTE_NS = 60 * NS


def poisson(rng: random.Random, rate_per_s: float, hours: float) -> list[int]:
    t, out, end = 0.0, [], hours * 3600
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= end:
            return out
        out.append(int(t * NS))


def bursty(rng: random.Random, hours: float) -> list[int]:
    """Quiet stretches, then bursts of hundreds of requests within a second or two."""
    out: list[int] = []
    t = 0.0
    while t < hours * 3600:
        t += rng.uniform(1, 90)
        out += sorted(int((t + rng.uniform(0, 2)) * NS) for _ in range(rng.randint(1, 400)))
    return sorted(out)


def run(arrivals: list[int], calls: int) -> tuple[list[int], list[tuple[int, int]]]:
    ring = window.Ring(calls)
    admitted, refused = [], []
    for t in arrivals:
        waited = ring.admit(t, MINUTE_NS)
        if waited:
            refused.append((t, waited))
        else:
            admitted.append(t)
    return admitted, refused


def in_window(admitted: list[int], end: int) -> int:
    """Admissions in (end - 1 minute, end]."""
    return bisect.bisect_right(admitted, end) - bisect.bisect_right(admitted, end - MINUTE_NS)


@pytest.mark.parametrize(("calls", "shape"), [  # 100 and 1,000: rings that grow from 64 slots
    (1, "poisson"), (7, "poisson"), (100, "poisson"), (1, "bursty"), (7, "bursty"), (100, "bursty"), (1000, "bursty")])
def test_never_more_than_calls_in_any_window_and_nothing_refused_below_it(calls: int, shape: str) -> None:
    rng = random.Random(calls * 31 + len(shape))
    arrivals = poisson(rng, 3 * calls / 60, hours=3) if shape == "poisson" else bursty(rng, hours=3)
    admitted, refused = run(arrivals, calls)
    assert admitted  # the load stayed under the limit at times
    assert refused  # and crossed it
    # Any window's count is largest when it ends at an admission: check every such window.
    assert max(in_window(admitted, t) for t in admitted) == calls
    for t, waited in refused:
        assert in_window(admitted, t) == calls  # refused only when the window was full
        # Retry-After is exact: at t + waited one slot is free, a moment earlier none is.
        assert in_window(admitted[: bisect.bisect_right(admitted, t)], t + waited) == calls - 1
        assert in_window(admitted[: bisect.bisect_right(admitted, t)], t + waited - 1) == calls


def test_a_changed_limit_counts_what_the_window_already_admitted() -> None:
    ring = window.Ring(10)
    assert [ring.admit(i, MINUTE_NS) for i in range(8)] == [0] * 8
    ring.resize(5)
    assert ring.admit(9, MINUTE_NS) > 0  # 8 admitted already: over the new 5
    ring.resize(20)
    assert [ring.admit(10 + i, MINUTE_NS) for i in range(12)] == [0] * 12  # 8 + 12 = 20
    assert ring.admit(30, MINUTE_NS) == MINUTE_NS - 30  # the oldest (t=0) leaves the window at 1 minute


def test_a_ring_grows_with_the_traffic_not_with_the_limit(tmp_path: Path) -> None:
    ring = window.Ring(1_000_000)
    for i in range(1000):  # 1,000 a minute, spread out: the window never holds more than ~17 of them
        assert ring.admit(i * MINUTE_NS // 1000 * 60, MINUTE_NS) == 0
    assert len(ring.times) == window.INITIAL_SLOTS
    for i in range(300):  # a burst of 300 inside one window: every one admitted, the ring doubled to hold them
        assert ring.admit(61 * MINUTE_NS + i, MINUTE_NS) == 0
    assert len(ring.times) == 512
    limiter = HostLimiter(tmp_path)
    for i in range(300):
        assert limiter.admit_at([("endpoint/big", 1_000_000, 60)], 1 + i) == 0.0
    (ring_file,) = tmp_path.glob("*.ring")
    assert ring_file.stat().st_size < 512 * 8 + 64  # not the 8 MB a ring of a million slots would take
    limiter.close()


def test_a_ring_file_left_half_made_by_a_crash_starts_again(tmp_path: Path) -> None:
    limiter = HostLimiter(tmp_path)
    limiter.admit_at([("endpoint/c", 3, 60)], 1)
    (ring_file,) = tmp_path.glob("*.ring")
    limiter.close()
    ring_file.write_bytes(b"\0" * 4096)  # truncated and extended, but its ring never written
    limiter = HostLimiter(tmp_path)
    assert [limiter.admit_at([("endpoint/c", 3, 60)], 2 + i) for i in range(4)][:3] == [0.0] * 3
    assert limiter.admit_at([("endpoint/c", 3, 60)], 10) > 0  # counting again: the 4th (and 5th) refused
    limiter.close()


def test_host_limiter_agrees_with_the_ring_and_survives_limit_changes(tmp_path: Path) -> None:
    rng = random.Random(5)
    arrivals = bursty(rng, hours=0.5)
    limiter = HostLimiter(tmp_path)
    ring = window.Ring(50)
    for i, t in enumerate(arrivals):
        calls = 50 if i < len(arrivals) // 2 else 20
        ring.resize(calls)
        expected = ring.admit(t, MINUTE_NS) / NS
        assert limiter.admit_at([("endpoint/a", calls, 60)], t) == expected
    limiter.close()


def test_a_request_refused_by_one_window_counts_in_none(tmp_path: Path) -> None:
    limiter = HostLimiter(tmp_path)
    both = [("endpoint/e", 3, 60), ("user/e/u1", 2, 60)]
    other = [("endpoint/e", 3, 60), ("user/e/u2", 2, 60)]
    assert [limiter.admit_at(both, i) for i in range(3)] == [0, 0, (MINUTE_NS - 2) / NS]  # u1's is full
    assert limiter.admit_at(other, 3) == 0  # the refused one did not take an endpoint slot
    assert limiter.admit_at(other, 4) > 0  # now the endpoint window is full
    limiter.close()


def _hammer(directory: str, tries: int, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    limiter = HostLimiter(Path(directory))
    start.wait()
    admitted = 0
    for _ in range(tries):
        admitted += limiter.admit_at([("endpoint/shared", 500, 60)], time.monotonic_ns()) == 0
        time.sleep(0.0002)  # interleave with the others on a 2-core machine
    out.put(admitted)


def test_processes_sharing_the_files_admit_exactly_the_limit(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), 400, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(counts) == 500  # 1,600 tries inside one minute
    assert all(c > 0 for c in counts), counts  # every process took part


def test_redis_script_admits_what_the_ring_admits(redis_url: str) -> None:
    import asyncio

    from berth.ratelimit.redis import US, RedisLimiter

    rng = random.Random(11)
    arrivals_us = sorted({t // 1000 for t in bursty(rng, hours=0.25)})  # µs, distinct
    ring = window.Ring(40)

    async def compare() -> int:
        limiter = RedisLimiter(redis_url, prefix=f"berth:test:{uuid.uuid4().hex}:")
        try:
            refused = 0
            for t in arrivals_us:
                expected = ring.admit(t, 60 * US)
                got = await limiter.admit_at([("endpoint/x", 40, 60)], t)
                assert got == expected / US, t
                refused += expected > 0
            return refused
        finally:
            await limiter.aclose()

    assert asyncio.run(compare()) > 0


def test_parse_rate_limits() -> None:
    rules = parse_rate_limits([{"calls": 100, "key": "user", "renewal_period": "minute"}, {"calls": 5}])
    assert rules == (RateLimit(100, "user"), RateLimit(5, "endpoint"))
    for bad, words in [
        ([{"calls": 1, "key": "user_group"}], "groups are not supported"),
        ([{"calls": 0}], "calls must be an integer"),
        ([{"calls": True}], "calls must be an integer"),
        ([{"calls": 1, "renewal_period": "hour"}], "renewal_period"),
        ([{"calls": 1, "tokens": 10}], "token limits"),
        ([{"calls": 1}, {"calls": 2}], "same key"),
        ([{"calls": 1, "key": "endpoint", "principal": "a"}], "principal applies"),
        ({"calls": 1}, "must be a list"),
    ]:
        with pytest.raises(InvalidParameterValue, match=words):
            parse_rate_limits(bad)


def test_which_windows_a_request_counts_in() -> None:
    rules = parse_rate_limits([
        {"calls": 100, "key": "endpoint"}, {"calls": 10, "key": "user"},
        {"calls": 50, "key": "user", "principal": "vip"},
        {"calls": 20, "key": "service_principal"},
    ])
    alice, vip, robot = Caller("u1", "alice"), Caller("u2", "vip"), Caller("s1", "app-1", "service_principal")
    assert windows(rules, "e", alice) == [("endpoint/e", 100, 60), ("user/e/u1", 10, 60)]
    assert windows(rules, "e", vip) == [("endpoint/e", 100, 60), ("user/e/u2", 50, 60)]
    assert windows(rules, "e", robot) == [("endpoint/e", 100, 60), ("service_principal/e/s1", 20, 60)]
