"""The autoscaler live, on real replica processes, judged from its own decision log.

A model whose predict sleeps 50 ms (no CPU) and a fixed per-replica concurrency of 4, so each added
replica adds 80 requests/s of real capacity on two cores. The time scale (0.05) shrinks every
autoscaler period at once: a scale-up cycle every 0.25 s over 1 s of samples, a 15 s scale-down
window; the scale-to-zero idle period is set directly. Assertions count decision cycles and
requests, never wall time.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.replica_tools import create_and_wait, poll, replicas_named

PER_REPLICA = 4
MAX_CONCURRENCY = 16  # at most 4 replicas
CLIENTS = 12  # demand 12 over a target of 0.7 x 4 = 2.8 per replica: more than the 4 allowed
BODY = b'{"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}'


def run_load(server, name: str, clients: int, seconds: float) -> list[int | str]:  # type: ignore[no-untyped-def]
    """Closed-loop clients, each on its own keep-alive connection; one outcome per request sent."""
    outcomes: list[int | str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}",
                                                        "Content-Type": "application/json"}, timeout=60.0) as c:
            while time.monotonic() < stop_at:
                try:
                    outcome: int | str = c.post(f"/serving-endpoints/{name}/invocations", content=BODY).status_code
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def decisions(server, name: str) -> list[dict]:  # type: ignore[no-untyped-def]
    response = server.api("GET", f"/{name}/autoscaler/decisions", params={"limit": 2000})
    assert response.status_code == 200, response.text
    return response.json()["decisions"]  # type: ignore[no-any-return]


def provisioned(server, name: str) -> float:  # type: ignore[no-untyped-def]
    response = server.api("GET", f"/{name}/metrics")
    assert response.status_code == 200, response.text
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families["provisioned_concurrent_requests_total"].type == "gauge"
    (sample,) = families["provisioned_concurrent_requests_total"].samples
    assert sample.labels == {"endpoint_name": name, "served_entity_name": "nap"}
    return sample.value


def ready_replicas(server, name: str) -> float:  # type: ignore[no-untyped-def]
    text = server.client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "berth_replicas":
            for sample in family.samples:
                if sample.labels.get("endpoint") == name and sample.labels.get("state") == "ready":
                    return sample.value
    return 0.0


@pytest.mark.slow
def test_load_step_scales_out_then_in_to_zero_and_the_first_request_at_zero_is_served(server_factory, model_zoo):
    server = server_factory(extra_env={"BERTH_AUTOSCALE_TIME_SCALE": "0.05",
                                       "BERTH_REPLICA_CONCURRENCY": str(PER_REPLICA),
                                       "BERTH_SCALE_TO_ZERO_IDLE_S": "20"})
    model = model_zoo("sleep_model", seconds=0.05)
    entity = {"name": "nap", "entity_name": str(model), "min_provisioned_concurrency": 0,
              "max_provisioned_concurrency": MAX_CONCURRENCY, "scale_to_zero_enabled": True}
    view = create_and_wait(server, "nap", [entity])
    assert view["state"]["ready"] == "READY", view
    assert len(replicas_named(server, "nap")) == 1  # min 0: one replica to start with

    step_at = time.time()
    result: list[list[int | str]] = []
    load = threading.Thread(target=lambda: result.append(run_load(server, "nap", CLIENTS, seconds=8.0)))
    load.start()
    # Ready replicas follow the decisions (the platform's own gauge, set from the reconciler's state).
    peak_ready = poll(lambda: ready_replicas(server, "nap") >= 4 and ready_replicas(server, "nap"), timeout=8,
                      what="4 ready replicas")
    serving = len(replicas_named(server, "nap"))
    load.join()
    (outcomes,) = result
    during = decisions(server, "nap")
    at_peak = provisioned(server, "nap")  # the export's mean over the last minute

    # Every request got an answer: a prediction, or (while the one replica's concurrency and queue were
    # full, before the new replicas were ready) an immediate 429 RESOURCE_EXHAUSTED; no error, none lost.
    assert len(outcomes) > 0
    assert all(isinstance(o, int) for o in outcomes), [o for o in outcomes if not isinstance(o, int)]
    assert set(outcomes) <= {200, 429}, {o: outcomes.count(o) for o in set(outcomes)}
    assert outcomes.count(200) > outcomes.count(429), {o: outcomes.count(o) for o in set(outcomes)}

    # Desired replicas rose within 3 scale-up cycles of the step, up to the 4 the maximum allows.
    # The step, as the autoscaler saw it: the first cycle after the load began whose samples show demand.
    first_cycle = next(d["cycle"] for d in during if d["t"] >= step_at and d["inputs"]["latest_demand"] > 0)
    rise = next(d for d in during if d["desired"] > 1)
    assert rise["cycle"] - first_cycle <= 3, [(d["cycle"], d["desired"], d["inputs"]) for d in during[-40:]]
    assert rise["axis"] == "horizontal"
    assert rise["inputs"]["demand"] > rise["inputs"]["target"]
    assert max(d["desired"] for d in during) == MAX_CONCURRENCY // PER_REPLICA
    assert all(d["concurrency"] == PER_REPLICA for d in during)  # fixed: the vertical axis is off
    assert at_peak > PER_REPLICA  # more than one replica's worth was provisioned in the last minute

    assert peak_ready == 4
    assert serving == 4  # four replica processes

    # After the load: replicas fall (to the one-replica floor after the down window), then reach zero.
    log = poll(lambda: (ds := decisions(server, "nap")) and ds[-1]["desired"] == 0 and ds, timeout=60,
               what="scale to zero")
    after = [d for d in log if d["cycle"] > during[-1]["cycle"]]
    fell = next(d for d in after if 0 < d["desired"] < d["previous"])
    zero = next(d for d in after if d["desired"] == 0)
    assert fell["cycle"] < zero["cycle"]
    assert zero["axis"] == "zero"
    assert "No request for" in zero["reason"]
    poll(lambda: not replicas_named(server, "nap"), timeout=30, what="no replica left")

    # The first request at zero is held, wakes the entity, and is answered.
    response = server.invoke("nap", content=BODY)
    assert response.status_code == 200, response.text
    assert len(replicas_named(server, "nap")) == 1
