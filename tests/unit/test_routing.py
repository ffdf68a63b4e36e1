"""The gateway's pure routing choices: traffic split by draw, and power-of-two-choices replicas."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from berth.errors import InvalidState, TemporarilyUnavailable
from berth.gateway.routing import EndpointRoute, EntityRoute, EntityStatus, choose_entity, choose_replica, failed

LAST_DRAW = math.nextafter(100.0, 0.0)  # the largest draw random.random() * 100 can give


def entity(name: str, pct: int, status: EntityStatus = EntityStatus.READY, message: str = "") -> EntityRoute:
    replicas = ((f"{name}-r0", f"unix:/tmp/{name}.sock"),) if status is EntityStatus.READY else ()
    return EntityRoute(name=name, percentage=pct, status=status, replicas=replicas, message=message)


def route(*entities: EntityRoute, creating: bool = False) -> EndpointRoute:
    return EndpointRoute("ep", tuple(entities), creating=creating)


def chosen(r: EndpointRoute, draw: float) -> str:
    result = choose_entity(r, draw)
    assert isinstance(result, EntityRoute), result
    return result.name


GRID = [i / 100 for i in range(10_000)] + [LAST_DRAW]  # every 0.01 over [0, 100)


class TestChooseEntity:
    def test_draw_boundaries_follow_cumulative_percentages(self) -> None:
        r = route(entity("a", 50), entity("b", 30), entity("c", 20))
        assert r.cumulative == (50, 80, 100)
        assert chosen(r, 0.0) == "a"
        assert chosen(r, 49.999) == "a"
        assert chosen(r, 50.0) == "b"
        assert chosen(r, 79.999) == "b"
        assert chosen(r, 80.0) == "c"
        assert chosen(r, LAST_DRAW) == "c"

    def test_share_of_a_uniform_grid_equals_percentages(self) -> None:
        r = route(entity("a", 50), entity("b", 30), entity("c", 20), entity("z", 0))
        counts = Counter(chosen(r, d) for d in GRID[:-1])
        assert counts == {"a": 5000, "b": 3000, "c": 2000}

    @pytest.mark.parametrize(
        "pcts",
        [
            [("z", 0), ("a", 100)],
            [("a", 100), ("z", 0)],
            [("a", 40), ("z", 0), ("b", 60)],
            [("z", 0), ("a", 50), ("y", 0), ("b", 50), ("x", 0)],
            [("a", 1), ("z", 0), ("b", 99)],
        ],
    )
    def test_zero_percent_route_is_never_chosen_on_the_grid(self, pcts: list[tuple[str, int]]) -> None:
        r = route(*(entity(n, p) for n, p in pcts))
        zero = {n for n, p in pcts if p == 0}
        seen = {chosen(r, d) for d in GRID}
        assert not seen & zero
        assert seen == {n for n, p in pcts if p > 0}

    @given(
        weights=st.lists(st.integers(0, 100), min_size=1, max_size=6).filter(lambda w: sum(w) > 0),
        draw=st.floats(min_value=0.0, max_value=100.0, exclude_max=True),
    )
    def test_zero_percent_never_chosen_for_any_draw(self, weights: list[int], draw: float) -> None:
        r = route(*(entity(f"e{i}", w) for i, w in enumerate(weights)))
        name = chosen(r, draw)
        assert weights[int(name[1:])] > 0

    def test_creating_endpoint_is_temporarily_unavailable_with_retry_after(self) -> None:
        result = choose_entity(route(creating=True), 10.0)
        assert isinstance(result, TemporarilyUnavailable)
        assert result.http_status == 503
        assert result.retry_after is not None
        assert result.retry_after >= 1

    def test_no_traffic_at_all_is_invalid_state(self) -> None:
        assert isinstance(choose_entity(route(), 10.0), InvalidState)
        assert isinstance(choose_entity(route(entity("a", 0), entity("b", 0)), 10.0), InvalidState)

    def test_failed_entity_is_invalid_state_400_with_its_message(self) -> None:
        r = route(entity("a", 100, EntityStatus.FAILED, message="Failed to load model /x: boom"))
        result = choose_entity(r, 3.0)
        assert isinstance(result, InvalidState)
        assert result.http_status == 400
        assert result.error_code == "INVALID_STATE"
        assert "boom" in result.message
        assert "'a'" in result.message

    def test_only_the_drawn_entity_matters(self) -> None:
        r = route(entity("ok", 50), entity("bad", 50, EntityStatus.FAILED))
        assert chosen(r, 10.0) == "ok"
        assert isinstance(choose_entity(r, 60.0), InvalidState)

    def test_entity_without_ready_replicas_is_still_chosen_for_the_gateway_to_hold(self) -> None:
        # Starting, restarting or at zero: the gateway holds the request until a replica is ready.
        r = route(entity("a", 50, EntityStatus.STARTING), EntityRoute("b", 50, EntityStatus.ZERO, ()))
        assert chosen(r, 0.0) == "a"
        assert chosen(r, 75.0) == "b"
        result = choose_entity(r, 75.0)
        assert isinstance(result, EntityRoute)
        assert result.replicas == ()

    def test_failed_answer_names_the_entity(self) -> None:
        result = failed("ep", EntityRoute("b", 50, EntityStatus.FAILED, (), "boom"))
        assert isinstance(result, InvalidState)
        assert "'ep'" in str(result)
        assert "'b'" in str(result)
        assert "boom" in str(result)


class TestChooseReplica:
    REPLICAS = tuple((f"r{i}", f"unix:/tmp/r{i}.sock") for i in range(4))

    def test_single_replica_needs_no_draw(self) -> None:
        def no_rand(n: int) -> int:
            raise AssertionError("rand must not be called for one replica")

        assert choose_replica(self.REPLICAS[:1], lambda rid: 99, no_rand) == self.REPLICAS[0]

    def test_prefers_the_lower_outstanding_count_for_every_pair(self) -> None:
        load = {"r0": 5, "r1": 0, "r2": 3, "r3": 7}
        n = len(self.REPLICAS)
        for i, j in itertools.product(range(n), range(n - 1)):
            draws = iter([i, j])
            pick = choose_replica(self.REPLICAS, load.__getitem__, lambda _n, d=draws: next(d))
            a = self.REPLICAS[i]
            b = self.REPLICAS[j + 1 if j >= i else j]
            assert a != b  # two distinct candidates
            assert pick in (a, b)
            assert load[pick[0]] == min(load[a[0]], load[b[0]])

    def test_ties_pick_the_first_candidate(self) -> None:
        draws = iter([2, 0])
        assert choose_replica(self.REPLICAS, lambda rid: 1, lambda _n: next(draws)) == self.REPLICAS[2]

    def test_most_loaded_replica_is_never_chosen_with_real_randomness(self) -> None:
        load = {"r0": 1, "r1": 1, "r2": 1, "r3": 9}
        picks = Counter(choose_replica(self.REPLICAS, load.__getitem__)[0] for _ in range(2000))
        assert "r3" not in picks
        assert set(picks) == {"r0", "r1", "r2"}

    def test_idle_replica_of_two_always_wins(self) -> None:
        load = {"r0": 4, "r1": 0}
        picks = {choose_replica(self.REPLICAS[:2], load.__getitem__)[0] for _ in range(200)}
        assert picks == {"r1"}
