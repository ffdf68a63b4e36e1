"""Zero-downtime updates under continuous load, and changes that touch no model."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.integration.replica_tools import X_BODY, alive, client_for, poll, replica_stats, replicas_named


class Load:
    """`threads` clients sending requests back to back until stopped; every answer is kept."""

    def __init__(self, server: ServerProcess, endpoint: str, threads: int = 6) -> None:
        self.server = server
        self.endpoint = endpoint
        self.answers: list[tuple[int, str]] = []  # (status, prediction or error text)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with client_for(self.server, timeout=60.0) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"/serving-endpoints/{self.endpoint}/invocations", json=X_BODY)
                    answer = (response.status_code, response.json()["predictions"][0]
                              if response.status_code == 200 else response.text)
                except Exception as exc:  # a broken connection counts as a failure too
                    answer = (0, repr(exc))
                with self._lock:
                    self.answers.append(answer)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def labels(self) -> Counter[str]:
        with self._lock:
            return Counter(str(a).split(":")[0] for s, a in self.answers if s == 200)

    def failures(self) -> list[tuple[int, str]]:
        with self._lock:
            return [a for a in self.answers if a[0] != 200]


def ids(server: ServerProcess, entity: str) -> set[str]:
    return {r.replica_id for r in replicas_named(server, entity)}


def entity(name: str, model: Path, **extra: object) -> dict[str, object]:
    return {"name": name, "entity_name": str(model), **extra}


def routes(**split: int) -> dict[str, object]:
    return {"routes": [{"served_model_name": k, "traffic_percentage": v} for k, v in split.items()]}


@pytest.mark.slow
def test_a_version_update_under_load_loses_no_request_and_restarts_only_that_entity(
    server_factory: Callable[..., ServerProcess], model_zoo: Callable[..., Path]
) -> None:
    server = server_factory(extra_env={"BERTH_CORES": "2"})
    v1 = model_zoo("version_model", label="v1", seconds=0.05)  # requests are in flight at every moment
    v2 = model_zoo("version_model", label="v2", seconds=0.05)
    other = model_zoo("version_model", label="other", seconds=0.05)
    config = {"served_entities": [entity("m", v1), entity("other", other)], "traffic_config": routes(m=50, other=50)}
    assert server.create("roll", config).status_code == 200
    server.wait_not_updating("roll")
    m_before, other_before = ids(server, "m"), ids(server, "other")
    old_pids = [r.pid for r in replicas_named(server, "m")]

    with Load(server, "roll") as load:
        poll(lambda: load.count() >= 50, what="load running")
        update = {"served_entities": [entity("m", v2), entity("other", other)],
                  "traffic_config": routes(m=50, other=50)}
        response = server.api("PUT", "/roll/config", json=update)
        assert response.status_code == 200, response.text
        view = response.json()
        assert view["state"]["config_update"] == "IN_PROGRESS"
        assert view["pending_config"]["served_entities"][0]["entity_name"] == str(v2)
        assert view["config"]["served_entities"][0]["entity_name"] == str(v1)
        server.wait_not_updating("roll")
        poll(lambda: not any(alive(pid) for pid in old_pids), timeout=60, what="old replicas stopped")
        seen = load.count()
        poll(lambda: load.count() >= seen + 50, what="load after the rollout")

    assert load.failures() == [], load.failures()[:5]
    labels = load.labels()
    assert min(labels["v1"], labels["v2"], labels["other"]) > 0, labels
    assert ids(server, "other") == other_before  # an unchanged entity keeps its replicas
    assert ids(server, "m").isdisjoint(m_before)  # the changed one got new replicas
    view = server.get("roll")
    assert view["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}, view
    assert view["config"]["served_entities"][0]["entity_name"] == str(v2)


@pytest.mark.slow
def test_a_version_that_fails_to_load_leaves_the_old_one_serving_under_load(
    server_factory: Callable[..., ServerProcess], model_zoo: Callable[..., Path]
) -> None:
    server = server_factory()
    v1 = model_zoo("version_model", label="v1", seconds=0.02)
    broken = model_zoo("broken_load_model")
    assert server.create("keep", {"served_entities": [entity("m", v1)]}).status_code == 200
    server.wait_not_updating("keep")
    before = ids(server, "m")

    with Load(server, "keep", threads=4) as load:
        poll(lambda: load.count() >= 20, what="load running")
        response = server.api("PUT", "/keep/config", json={"served_entities": [entity("m", broken)]})
        assert response.status_code == 200, response.text
        view = server.wait_not_updating("keep")
        seen = load.count()
        poll(lambda: load.count() >= seen + 20, what="load after the failed rollout")

    assert load.failures() == [], load.failures()[:5]
    assert set(load.labels()) == {"v1"}
    assert view["state"] == {"ready": "READY", "config_update": "UPDATE_FAILED"}, view
    failed = view["pending_config"]["served_entities"][0]["state"]
    assert failed["deployment"] == "DEPLOYMENT_FAILED"
    assert "weights file is corrupt" in failed["deployment_state_message"], failed
    assert view["config"]["served_entities"][0]["entity_name"] == str(v1)
    assert ids(server, "m") == before


def test_routes_scaling_bounds_and_tags_change_without_restarting_a_replica(
    server_factory: Callable[..., ServerProcess], model_zoo: Callable[..., Path]
) -> None:
    server = server_factory(extra_env={"BERTH_CORES": "2"})
    a = model_zoo("version_model", label="a")
    b = model_zoo("version_model", label="b")
    bounds = {"min_provisioned_concurrency": 0, "max_provisioned_concurrency": 4}
    config = {"served_entities": [entity("a", a, **bounds), entity("b", b, **bounds)],
              "traffic_config": routes(a=100, b=0)}
    assert server.create("steady", config).status_code == 200
    server.wait_not_updating("steady")
    before = {name: ids(server, name) for name in ("a", "b")}
    (replica_a,) = replicas_named(server, "a")
    assert replica_stats(replica_a.socket)["max_concurrency"] == 4

    # Traffic to b, a's bounds up (more concurrency per replica), scale to zero on for b.
    wider = {"min_provisioned_concurrency": 0, "max_provisioned_concurrency": 8}
    update = {"served_entities": [entity("a", a, **wider), entity("b", b, **bounds, scale_to_zero_enabled=True)],
              "traffic_config": routes(a=0, b=100)}
    assert server.api("PUT", "/steady/config", json=update).status_code == 200
    view = server.wait_not_updating("steady")
    assert view["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}, view
    served = view["config"]["served_entities"]
    assert (served[0]["max_provisioned_concurrency"], served[1]["scale_to_zero_enabled"]) == (8, True), served
    poll(lambda: replica_stats(replica_a.socket)["max_concurrency"] == 8, what="a's replica takes 8 at once")
    poll(lambda: str(server.invoke("steady", X_BODY).json()["predictions"][0]).startswith("b:"), what="b serves")

    response = server.api("PATCH", "/steady/tags", json={"add_tags": [{"key": "team", "value": "ads"}]})
    assert response.status_code == 200, response.text
    assert response.json() == {"tags": [{"key": "team", "value": "ads"}]}
    response = server.api("PATCH", "/steady/tags", json={"add_tags": [{"key": "tier", "value": "1"}],
                                                          "delete_tags": ["team"]})
    assert response.json() == {"tags": [{"key": "tier", "value": "1"}]}
    assert server.get("steady")["tags"] == [{"key": "tier", "value": "1"}]
    bad = server.api("PATCH", "/steady/tags", json={"add_tags": "nope"})
    assert bad.status_code == 400, bad.text
    assert bad.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert server.get("steady")["tags"] == [{"key": "tier", "value": "1"}]  # a bad patch changes nothing

    assert {name: ids(server, name) for name in ("a", "b")} == before
