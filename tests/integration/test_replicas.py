"""Replicas as real OS processes: isolation, readiness, crashes, backoff, parent death, limits."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from berth.backends.local import MODEL_NICE
from berth.store import ReplicaRecord, Store
from tests.conftest import REPO
from tests.integration.replica_tools import (
    X_BODY,
    address_space_limit,
    alive,
    assert_temporarily_unavailable,
    client_for,
    create_and_wait,
    entity_state,
    metric_samples,
    poll,
    replica_stats,
    replicas_named,
    replicas_of,
    started_at,
)

MB = 1024 * 1024


def replica_logs(server) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Replica id -> its log text, from the data dir's logs/replicas/*.log."""
    log_dir = server.data_dir / "logs" / "replicas"
    return {p.stem: p.read_text(errors="replace") for p in log_dir.glob("*.log")}


def test_each_entity_runs_in_its_own_processes_and_loads_once(server_factory, model_zoo):
    server = server_factory()
    for endpoint, entity, model in (
        ("proc-a", "ent-a", model_zoo("sleep_model", seconds=0.01)),
        ("proc-b", "ent-b", model_zoo("sklearn_classifier")),
    ):
        view = create_and_wait(server, endpoint, [{"name": entity, "entity_name": str(model)}])
        assert view["state"]["ready"] == "READY", view

    replicas = replicas_of(server)
    assert sorted(r.name for r in replicas) == ["ent-a", "ent-b"], replicas  # Small: one replica each
    pids = {r.pid for r in replicas}
    assert len(pids) == 2
    assert server.proc.pid not in pids
    assert all(r.ppid == server.proc.pid for r in replicas), replicas

    b_body = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}
    for _ in range(10):
        assert server.invoke("proc-a", X_BODY).status_code == 200
        response = server.invoke("proc-b", b_body)
        assert response.status_code == 200, response.text
        assert response.headers["served-model-name"] == "ent-b"

    # The same two processes served every request, and each loaded its model exactly once.
    assert {r.pid for r in replicas_of(server)} == pids
    logs = replica_logs(server)
    for replica in replicas:
        stats = replica_stats(replica.socket)
        assert stats["pid"] == replica.pid
        assert stats["requests"] == 10, stats
        assert logs[replica.replica_id].count(": loading ") == 1, logs[replica.replica_id]
        assert logs[replica.replica_id].count("model loaded, serving on") == 1, logs[replica.replica_id]
        # Default memory limit: 4096 MB of address space.
        assert address_space_limit(replica.pid) == (str(4096 * MB), str(4096 * MB))
        # Nicer than the gateway, which must never wait for a core behind the models.
        assert psutil.Process(replica.pid).nice() == min(19, psutil.Process(server.proc.pid).nice() + MODEL_NICE)


def test_gateway_routes_only_to_ready_replicas(server_factory, model_zoo):
    server = server_factory()
    model = model_zoo("slow_load_model", seconds=4.0)
    response = server.create("slow", {"served_entities": [{"name": "slow", "entity_name": str(model)}]})
    assert response.status_code == 200, response.text
    assert response.json()["state"] == {"ready": "NOT_READY", "config_update": "IN_PROGRESS"}

    # While the entity is not ready before and after a request, that request must be a 503.
    unavailable = 0
    deadline = time.monotonic() + 90
    while True:
        before = server.get("slow")
        response = server.invoke("slow", X_BODY)
        after = server.get("slow")
        if before["state"]["ready"] == "NOT_READY" and after["state"]["ready"] == "NOT_READY":
            body = assert_temporarily_unavailable(response)
            assert "slow" in body["message"]
            assert after["state"]["config_update"] == "IN_PROGRESS", after
            pending = after["pending_config"]["served_entities"][0]["state"]
            assert pending["deployment"] == "DEPLOYMENT_CREATING", pending
            unavailable += 1
        if after["state"]["ready"] == "READY":
            break
        assert time.monotonic() < deadline, (after, server.log_tail())
        time.sleep(0.1)
    assert unavailable >= 1

    (replica,) = replicas_of(server)
    response = server.invoke("slow", X_BODY)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == [replica.pid]  # the model answers with its own pid


def test_killed_replica_is_replaced_and_requests_wait_for_the_replacement(server_factory, model_zoo):
    server = server_factory()
    model = model_zoo("slow_load_model", seconds=2.0)
    view = create_and_wait(server, "phoenix", [{"name": "phoenix", "entity_name": str(model)}])
    assert view["state"]["ready"] == "READY", view
    (old,) = replicas_of(server)
    assert server.invoke("phoenix", X_BODY).json()["predictions"] == [old.pid]

    os.kill(old.pid, signal.SIGKILL)
    poll(lambda: not alive(old.pid), what="the killed replica gone")
    # With its only replica dead, a request waits for the replacement instead of failing.
    response = server.invoke("phoenix", X_BODY)
    assert response.status_code == 200, response.text
    (new,) = replicas_of(server)
    assert response.json()["predictions"] == [new.pid]
    assert new.pid != old.pid
    assert new.replica_id != old.replica_id
    assert f"Replica {old.replica_id} was killed by signal 9" in server.log_tail(200)
    assert server.get("phoenix")["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    held = metric_samples(server, "berth_held_request_wait_seconds_count", endpoint="phoenix")
    assert sum(held) == 1, held


@pytest.mark.slow
def test_a_replacement_gets_no_traffic_until_it_is_ready(server_factory, model_zoo):
    server = server_factory(extra_env={"BERTH_CORES": "2"})
    model = model_zoo("slow_load_model", seconds=4.0)
    entity = {"name": "pair", "entity_name": str(model), "min_provisioned_concurrency": 32,
              "max_provisioned_concurrency": 32}
    assert create_and_wait(server, "pair", [entity])["state"]["ready"] == "READY"
    victim, survivor = replicas_of(server)  # 32 provisioned on 2 cores: 2 replicas x 16

    os.kill(victim.pid, signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):  # gone, or a zombie its server has not reaped
        psutil.wait_procs([psutil.Process(victim.pid)], timeout=10)
    # At once, before the reconciler notices: a request that cannot reach the dead replica was never
    # delivered, so the gateway gives it to the survivor instead of answering 503.
    for _ in range(20):
        response = server.invoke("pair", X_BODY)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == [survivor.pid]
    server.wait_until("pair", lambda v: entity_state(v)["deployment"] == "DEPLOYMENT_RECOVERING", timeout=20)
    # The replacement is loading for seconds: every request meanwhile goes to the survivor.
    served_while_recovering = 0
    deadline = time.monotonic() + 90
    while True:
        response = server.invoke("pair", X_BODY)
        view = server.get("pair")
        if entity_state(view)["deployment"] != "DEPLOYMENT_RECOVERING":
            break
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == [survivor.pid]
        assert view["state"]["ready"] == "READY", view  # one ready replica keeps the endpoint ready
        served_while_recovering += 1
        assert time.monotonic() < deadline, server.log_tail()
    assert served_while_recovering >= 1
    assert entity_state(view)["deployment"] == "DEPLOYMENT_READY", view

    pids = {r.pid for r in replicas_of(server)}
    assert len(pids) == 2
    assert survivor.pid in pids
    assert victim.pid not in pids
    answered_by = {server.invoke("pair", X_BODY).json()["predictions"][0] for _ in range(40)}
    assert answered_by == pids  # both replicas take traffic once ready


def test_in_flight_requests_on_a_dying_replica_get_503(server_factory, model_zoo):
    server = server_factory()
    model = model_zoo("sleep_model", seconds=5.0)
    create_and_wait(server, "doomed", [{"name": "doomed", "entity_name": str(model)}])
    (replica,) = replicas_of(server)

    n = 4
    clients = [client_for(server, timeout=30.0) for _ in range(n)]

    def call(i: int):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        response = clients[i].post("/serving-endpoints/doomed/invocations", json=X_BODY)
        return response, time.monotonic() - started

    try:
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(call, i) for i in range(n)]
            poll(lambda: replica_stats(replica.socket)["in_flight"] == n, timeout=20, what="all in flight")
            os.kill(replica.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # A hang would surface as httpx.ReadTimeout (30 s) here, not as a response.
            results = [f.result(timeout=60) for f in futures]
            answered_after_kill = time.monotonic() - killed_at
    finally:
        for client in clients:
            client.close()

    for response, _ in results:
        body = assert_temporarily_unavailable(response)
        assert "doomed" in body["message"], body
    # Unkilled, these would have answered 200 after 5, 10, 15 and 20 s (one predict thread).
    print(f"in-flight requests answered {answered_after_kill:.2f} s after the kill")

    server.wait_until(
        "doomed",
        lambda v: v["state"]["ready"] == "READY" and any(r.pid != replica.pid for r in replicas_of(server)),
    )
    response = server.invoke("doomed", {**X_BODY, "params": {"sleep": 0.0}})
    assert response.status_code == 200, response.text


def test_crash_inside_predict_gives_503_and_the_replica_is_replaced(server_factory, model_zoo):
    server = server_factory()
    create_and_wait(server, "crashy", [{"name": "crashy", "entity_name": str(model_zoo("crash_model"))}])
    (replica,) = replicas_of(server)

    response = server.invoke("crashy", X_BODY)
    assert_temporarily_unavailable(response)
    poll(lambda: not alive(replica.pid), timeout=10, what="the crashed replica to be gone")
    assert "crash model: about to die" in replica_logs(server)[replica.replica_id]

    # GET explains the crash while the replacement loads, then the entity is ready again.
    recovering = server.wait_until(
        "crashy", lambda v: "exited with code 17" in entity_state(v)["deployment_state_message"], timeout=20
    )
    assert f"Replica {replica.replica_id} exited with code 17 (crash 1 of 5)" in str(recovering)
    assert entity_state(recovering)["deployment"] == "DEPLOYMENT_RECOVERING", recovering
    view = server.wait_until("crashy", lambda v: entity_state(v)["deployment"] == "DEPLOYMENT_READY")
    assert view["state"]["ready"] == "READY"
    (new,) = replicas_of(server)
    assert new.replica_id != replica.replica_id


@pytest.mark.slow
def test_crash_loop_backs_off_exponentially_then_fails(server_factory, model_zoo):
    # Restart times are read from process start times: fresh processes only (a warm-pool standby
    # starts long before it is assigned). The backoff itself is the reconciler's, whatever the path.
    server = server_factory(extra_env={"BERTH_REPLICA_FORK": "0", "BERTH_WARM_POOL_MEMORY_MB": "0"})
    model = model_zoo("crash_on_start_model")
    response = server.create(
        "crashloop", {"served_entities": [{"name": "crashloop", "entity_name": str(model)}]}
    )
    assert response.status_code == 200, response.text

    restart_re = re.compile(r"\(crash (\d+) of 5\); restarting in ([\d.]+) s\.")
    seen_delays: dict[int, float] = {}
    started: dict[str, float] = {}  # replica id -> process create time
    deadline = time.monotonic() + 150
    while True:
        for replica in replicas_named(server, "crashloop"):
            if replica.replica_id not in started:
                with contextlib.suppress(OSError):
                    started[replica.replica_id] = started_at(replica.pid)
        view = server.get("crashloop")
        cfg = view.get("config") or view["pending_config"]
        state = cfg["served_entities"][0]["state"]
        for n, delay in restart_re.findall(state["deployment_state_message"]):
            seen_delays[int(n)] = float(delay)
        if state["deployment"] == "DEPLOYMENT_FAILED":
            break
        assert time.monotonic() < deadline, (view, server.log_tail())
        time.sleep(0.05)

    # The restart delays double per crash (base 0.2 s from start_server); the server log has them all.
    for n, delay in restart_re.findall(server.log_tail(500)):
        seen_delays[int(n)] = float(delay)
    assert seen_delays == {1: 0.2, 2: 0.4, 3: 0.8, 4: 1.6}, seen_delays

    message = state["deployment_state_message"]
    assert "Replica crashed 5 times in a row" in message, message
    assert "exited with code 9" in message, message
    assert "crash-on-start model: dying now" in message, message  # the replica's last output lines
    assert view["state"]["ready"] == "NOT_READY"
    assert view["state"]["config_update"] != "IN_PROGRESS", view

    # Exactly five replicas ran, each died, and none is left running.
    logs = replica_logs(server)
    assert len(logs) == 5, sorted(logs)
    assert all("crash-on-start model: dying now" in text for text in logs.values())
    poll(lambda: not replicas_named(server, "crashloop"), timeout=10, what="no replica left")

    # Measured gaps between a replica's death (its log's last write) and the next start.
    assert set(started) == set(logs), (sorted(started), sorted(logs))
    order = sorted(started, key=started.__getitem__)
    deaths = {rid: (server.data_dir / "logs" / "replicas" / f"{rid}.log").stat().st_mtime for rid in order}
    gaps = [started[b] - deaths[a] for a, b in itertools.pairwise(order)]
    print("restart gaps (s):", [round(g, 2) for g in gaps])
    for gap, delay in zip(gaps, (0.2, 0.4, 0.8, 1.6), strict=True):
        assert gap >= 0.75 * delay, gaps  # never restarted before its backoff (clock slack)
    assert gaps[-1] > gaps[0] + 1.0, gaps

    response = server.invoke("crashloop", X_BODY)
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "INVALID_STATE"
    assert "crashed 5 times" in response.json()["message"]
    assert len(replica_logs(server)) == 5  # a failed entity is not restarted


def test_unloadable_model_fails_at_once_and_the_server_keeps_serving(server_factory, model_zoo):
    server = server_factory()
    good = model_zoo("sleep_model", seconds=0.01)
    create_and_wait(server, "good", [{"name": "good", "entity_name": str(good)}])

    broken = model_zoo("broken_load_model")
    view = create_and_wait(server, "broken", [{"name": "broken", "entity_name": str(broken)}])
    assert view["state"] == {"ready": "NOT_READY", "config_update": "UPDATE_FAILED"}, view
    state = entity_state(view)
    assert state["deployment"] == "DEPLOYMENT_FAILED", state
    assert "weights file is corrupt" in state["deployment_state_message"], state
    assert f"Failed to load model {broken}" in state["deployment_state_message"], state

    response = server.invoke("broken", X_BODY)
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "INVALID_STATE"
    assert "weights file is corrupt" in response.json()["message"]

    # A load failure is deterministic: one attempt, no restarts, no process left.
    failed = [rid for rid, text in replica_logs(server).items() if "weights file is corrupt" in text]
    assert len(failed) == 1, failed
    assert not replicas_named(server, "broken")

    assert server.proc.poll() is None
    assert server.get("good")["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    assert server.invoke("good", X_BODY).status_code == 200


@pytest.mark.slow
def test_replicas_die_with_the_server_and_a_restart_reconciles(server_factory, model_zoo):
    first = server_factory()
    models = {"alpha": model_zoo("sleep_model", seconds=0.01), "beta": model_zoo("params_model")}
    for name, model in models.items():
        view = create_and_wait(first, name, [{"name": f"{name}-ent", "entity_name": str(model)}])
        assert view["state"]["ready"] == "READY", view
    old = replicas_of(first)
    assert len(old) == 2
    db_url = f"sqlite:///{first.data_dir / 'berth.db'}"

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    poll(lambda: not any(alive(r.pid) for r in old), timeout=10, what="replicas to die with their server")

    # A replica that survived its server (recorded in the store), and a recorded pid that now
    # belongs to an unrelated process: the restart kills the first and leaves the second alone.
    socket_dir = tempfile.mkdtemp(prefix="berth-test-")
    socket_path = os.path.join(socket_dir, "leftover.sock")
    leftover_log = open(first.data_dir / "leftover.log", "wb")  # noqa: SIM115
    leftover = subprocess.Popen(
        [sys.executable, "-m", "berth.replica", "--model-uri", str(models["alpha"]), "--socket", socket_path,
         "--replica-id", "leftover0001", "--name", "x"],
        stdout=leftover_log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True,
    )
    unrelated = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        poll(lambda: os.path.exists(socket_path) or leftover.poll() is not None, timeout=60, what="leftover")
        assert leftover.poll() is None, (first.data_dir / "leftover.log").read_text()
        store = Store(db_url)
        stale_ids = {r.id for r in store.list_replicas()}
        assert stale_ids == {r.replica_id for r in old}  # the SIGKILLed server left its records
        for rid, proc in (("leftover0001", leftover), ("unrelated001", unrelated)):
            store.add_replica(ReplicaRecord(rid, "alpha", "x", proc.pid, f"unix:{socket_path}", time.time()))
        store.close()

        second = server_factory(data_dir=first.data_dir)
        assert leftover.wait(timeout=30) == -signal.SIGKILL
        assert unrelated.poll() is None, "a recorded pid whose cmdline is not that replica must survive"
        assert "leftover0001" in second.log_tail(), "the server reports the leftover replica it killed"

        for name in models:
            view = second.wait_until(name, lambda v: v["state"]["ready"] == "READY", timeout=90)
            assert entity_state(view)["deployment"] == "DEPLOYMENT_READY", view
            assert view["state"]["config_update"] == "NOT_UPDATING", view
        assert second.invoke("alpha", X_BODY).status_code == 200
        response = second.invoke("beta", {**X_BODY, "params": {"scale": 3.0}})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == [3.0]

        new = replicas_of(second)
        assert sorted(r.name for r in new) == ["alpha-ent", "beta-ent"]
        assert not {r.pid for r in new} & {r.pid for r in old}
        store = Store(db_url)
        recorded = {r.id for r in store.list_replicas()}
        store.close()
        assert recorded == {r.replica_id for r in new}, recorded  # stale and leftover records removed
    finally:
        for proc in (leftover, unrelated):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        leftover_log.close()


def test_memory_limit_fails_big_allocations_cleanly(server_factory, model_zoo):
    limit_mb = 1024
    server = server_factory(extra_env={"BERTH_REPLICA_MEMORY_LIMIT_MB": str(limit_mb)})
    create_and_wait(server, "alloc", [{"name": "alloc", "entity_name": str(model_zoo("alloc_model"))}])
    (replica,) = replicas_of(server)
    assert address_space_limit(replica.pid) == (str(limit_mb * MB), str(limit_mb * MB))

    small = server.invoke("alloc", {**X_BODY, "params": {"mb": 16}})
    assert small.status_code == 200, small.text
    assert small.json()["predictions"] == [16]

    big = server.invoke("alloc", {**X_BODY, "params": {"mb": 2 * limit_mb}})
    assert big.status_code == 400, big.text
    error = big.json()
    assert error["error_code"] == "BAD_REQUEST", error
    assert "MemoryError" in error["stack_trace"], error

    # The replica survived its failed allocation and keeps serving.
    again = server.invoke("alloc", {**X_BODY, "params": {"mb": 16}})
    assert again.status_code == 200, again.text
    assert [r.pid for r in replicas_of(server)] == [replica.pid]
    assert entity_state(server.get("alloc"))["deployment"] == "DEPLOYMENT_READY"
