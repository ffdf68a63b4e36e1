"""Instant replicas: forks from a loaded template, the warm pool, and requests held at zero."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import httpx
import mlflow.pyfunc
import pandas as pd
import psutil
import pytest

from berth.backends.warmpool import PoolPolicy, WarmPool
from berth.process import child_setup
from tests.integration.replica_tools import (
    X_BODY,
    alive,
    create_and_wait,
    metric_samples,
    poll,
    replica_stats,
    replicas_named,
)


class OrphanMakerModel(mlflow.pyfunc.PythonModel):
    """Starts a short-lived child process per call and answers its pid (the child outlives a killed replica)."""

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import subprocess

        child = subprocess.Popen(["sleep", "0.5"], start_new_session=True)
        return [child.pid] * len(model_input)


cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROBE_ROWS = {"dataframe_split": {"columns": list("abcd"), "data": [[0.1, -0.2, 0.3, 0.4], [1.0, 1.0, -1.0, 2.0]]}}
_SO_ACCEPTCON = 0x10000  # /proc/net/unix flag of a listening socket


def listening_unix_sockets(pid: int) -> list[str]:
    """Paths of the listening Unix sockets process `pid` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & _SO_ACCEPTCON and fields[6] in inodes:
            out.append(fields[7] if len(fields) > 7 else "")
    return out


def invoke_replica(socket_path: str, body: object) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), timeout=30.0) as client:
        return client.post("http://replica/invocations", json=body)


def cmdline(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline())


def children_with(server, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    """Live children of the server whose command line contains `text` (zombies and the gone skipped)."""
    out = []
    for child in psutil.Process(server.proc.pid).children():
        try:
            if text in " ".join(child.cmdline()):
                out.append(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def standbys_of(server) -> list[int]:  # type: ignore[no-untyped-def]
    """Warm-pool processes that finished their imports (they retitle themselves then)."""
    return children_with(server, "--standby --state ready")


def templates_of(server) -> list[int]:  # type: ignore[no-untyped-def]
    return children_with(server, "--template")


@pytest.mark.slow
def test_forked_replicas_predict_like_the_model_with_their_own_randomness_threads_and_sockets(
    server_factory, model_zoo
):
    server = server_factory(extra_env={"BERTH_CORES": "2"})
    model = model_zoo("fork_probe_model")
    entity = {"name": "probe", "entity_name": str(model), "min_provisioned_concurrency": 32,
              "max_provisioned_concurrency": 32,
              "environment_vars": {"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}}
    view = create_and_wait(server, "probe", [entity])
    assert view["state"]["ready"] == "READY", view
    replicas = poll(lambda: len(replicas_named(server, "probe")) == 2 and replicas_named(server, "probe"),
                    what="two replicas")
    (template,) = templates_of(server)

    # Both were forked from the template (which loaded the model once) and adopted by the server.
    logs = server.data_dir / "logs" / "replicas"
    for replica in replicas:
        assert replica.ppid == server.proc.pid
        assert "--forked" in cmdline(replica.pid)
        text = (logs / f"{replica.replica_id}.log").read_text()
        assert f"forked from template {template}" in text, text
        assert "warmed up on the model's serving example" in text, text  # the template used BLAS and OpenMP

    # Predictions equal the model's own (loaded here); the thread pools are the entity's (2 each),
    # so the matmul and the OpenMP predict ran multi-threaded in a child forked after the template used
    # both; each fork has its own random streams.
    expected = mlflow.pyfunc.load_model(str(model)).predict(pd.DataFrame(PROBE_ROWS["dataframe_split"]["data"],
                                                                         columns=list("abcd")))
    answers = []
    for replica in replicas:
        response = invoke_replica(replica.socket, PROBE_ROWS)  # under the client's 30 s timeout
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        assert [r["pid"] for r in rows] == [replica.pid] * 2
        assert [r["hgb"] for r in rows] == pytest.approx(list(expected["hgb"]), abs=1e-12)
        assert rows[0]["trace"] == pytest.approx(float(expected["trace"][0]), rel=1e-9)
        assert (rows[0]["openmp_threads"], rows[0]["blas_threads"]) == (2, 2), rows[0]
        answers.append(rows)
    assert answers[0][0]["py_random"] != answers[1][0]["py_random"]
    assert answers[0][0]["np_random"] != answers[1][0]["np_random"]

    # No inherited listening socket: each replica listens on its own socket only, the template on
    # none, and no TCP port (the gateway's) is open in any of them.
    for replica in replicas:
        assert listening_unix_sockets(replica.pid) == [replica.socket]
        assert not [c for c in psutil.Process(replica.pid).net_connections("inet") if c.status == "LISTEN"]
    assert listening_unix_sockets(template) == []

    # A killed fork is replaced by a new fork with a new id: ids are never reused.
    seen = {r.replica_id for r in replicas}
    victim = replicas[0]
    os.kill(victim.pid, signal.SIGKILL)
    poll(lambda: not alive(victim.pid), what="the killed replica gone")
    fresh = poll(lambda: (ids := {r.replica_id for r in replicas_named(server, "probe")}) - seen and len(ids) == 2
                 and replicas_named(server, "probe"), what="a replacement")
    (replacement,) = [r for r in fresh if r.replica_id not in seen]
    assert "--forked" in cmdline(replacement.pid)
    assert templates_of(server) == [template]
    assert invoke_replica(replacement.socket, PROBE_ROWS).status_code == 200


def test_a_model_that_starts_threads_is_not_forked_its_replicas_come_from_the_warm_pool(server_factory, model_zoo):
    server = server_factory(extra_env={"BERTH_CORES": "2", "BERTH_WARM_POOL_MIN": "2"})
    model = model_zoo("thread_at_load_model")
    poll(lambda: len(standbys_of(server)) == 2, timeout=60, what="two ready standbys")
    view = create_and_wait(server, "threads", [{"name": "threads", "entity_name": str(model),
                                                "min_provisioned_concurrency": 32,
                                                "max_provisioned_concurrency": 32}])
    assert view["state"]["ready"] == "READY", view
    replicas = poll(lambda: len(replicas_named(server, "threads")) == 2 and replicas_named(server, "threads"),
                    what="two replicas")
    paths = sorted(cmdline(r.pid).split()[1] for r in replicas)
    assert all(p in ("--warm", "-m") for p in paths), paths  # warm-pool standbys (or fresh), never forks
    assert "--warm" in paths, paths
    assert "start without forking: the model started Python threads (model-ticker)" in server.log_tail(200)
    assert templates_of(server) == []  # the unsafe template is gone
    for _replica in replicas:
        response = server.invoke("threads", X_BODY)
        assert response.status_code == 200, response.text


@pytest.mark.slow
def test_warm_pool_grows_after_a_burst_shrinks_when_idle_and_stays_under_its_memory_cap(tmp_path):
    policy = PoolPolicy(floor=0, memory_cap_mb=800, window_s=20.0, burst_s=2.0, tick_s=0.1)

    async def scenario() -> dict[str, object]:
        pool = WarmPool(sys.executable, tmp_path, policy, env={**os.environ, "OMP_NUM_THREADS": "1"},
                        preexec=child_setup(os.getpid()))
        peak_rss = 0.0
        sizes = []

        async def watch(seconds: float) -> None:
            nonlocal peak_rss
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                total = 0.0
                for standby in pool.standbys:
                    with contextlib.suppress(psutil.Error):
                        total += psutil.Process(standby.child.pid).memory_info().rss / 2**20
                peak_rss = max(peak_rss, total)
                sizes.append(len(pool.standbys))
                await asyncio.sleep(0.05)

        pool.start()
        await watch(1.0)
        idle = len(pool.standbys)
        for _ in range(6):  # a burst of six scale-ups within 2 s
            pool.note_demand()
        deadline = time.monotonic() + 90
        while not (pool.standbys and len(pool.standbys) == pool.target and all(s.ready for s in pool.standbys)):
            assert time.monotonic() < deadline, "the pool did not fill"
            await watch(0.2)
        grown = len(pool.standbys)
        target_after_burst = pool.target
        fits = int(policy.memory_cap_mb // pool.standby_mb)
        taken = pool.take()
        assert taken is not None
        await taken.child.stop(2.0)
        await watch(1.0)  # refilled while the burst is remembered
        refilled = len(pool.standbys)
        deadline = time.monotonic() + 60
        while pool.standbys:  # the burst falls out of the window: back to the floor
            assert time.monotonic() < deadline, "the pool did not shrink"
            await watch(0.2)
        await pool.close()
        return {"idle": idle, "grown": grown, "target": target_after_burst, "refilled": refilled,
                "peak_rss": peak_rss, "spawned": pool.spawned, "fits": fits}

    result = asyncio.run(scenario())
    assert result["idle"] == 0  # floor 0 and no demand: no standby
    # Six were asked for; the cap holds two or three standbys (~250-300 MB each, by environment), so
    # the pool stopped there.
    assert 2 <= result["fits"] < 6, result
    assert result["grown"] == result["target"] == result["fits"], result
    assert result["refilled"] == result["fits"], result
    assert result["spawned"] == result["fits"] + 1, result
    assert result["peak_rss"] <= 800, result


def test_scaled_to_zero_after_idle_then_a_request_waits_for_a_forked_replica(server_factory, model_zoo):
    server = server_factory(extra_env={"BERTH_SCALE_TO_ZERO_IDLE_S": "2"})
    model = model_zoo("slow_load_model", seconds=1.0)
    view = create_and_wait(server, "napper", [{"name": "napper", "entity_name": str(model),
                                               "workload_size": "Small", "scale_to_zero_enabled": True}])
    assert view["state"]["ready"] == "READY", view
    (first,) = replicas_named(server, "napper")
    assert server.invoke("napper", X_BODY).status_code == 200

    poll(lambda: not replicas_named(server, "napper"), timeout=60, what="scale to zero")
    view = server.get("napper")
    state = view["config"]["served_entities"][0]["state"]
    assert view["state"]["ready"] == "READY", view  # ready to serve: the next request starts a replica
    assert state["deployment"] == "DEPLOYMENT_READY", state
    assert "Scaled to zero after 2 s without requests" in state["deployment_state_message"], state
    assert templates_of(server), "the template stays at zero: the next replica is a fork"

    response = server.invoke("napper", X_BODY)  # held while a replica is forked
    assert response.status_code == 200, response.text
    (second,) = replicas_named(server, "napper")
    assert response.json()["predictions"] == [second.pid]
    assert second.replica_id != first.replica_id
    assert "--forked" in cmdline(second.pid)
    assert sum(metric_samples(server, "berth_held_request_wait_seconds_count", endpoint="napper")) == 1
    assert replica_stats(second.socket)["requests"] == 1


@pytest.mark.slow
def test_a_held_request_is_answered_503_at_its_deadline(server_factory, model_zoo):
    # Fresh processes only, and a model that takes 3 s to load: longer than the 1 s hold.
    server = server_factory(extra_env={"BERTH_SCALE_TO_ZERO_IDLE_S": "1", "BERTH_HOLD_TIMEOUT_S": "1",
                                       "BERTH_REPLICA_FORK": "0", "BERTH_WARM_POOL_MEMORY_MB": "0"})
    model = model_zoo("slow_load_model", seconds=3.0)
    create_and_wait(server, "late", [{"name": "late", "entity_name": str(model), "workload_size": "Small",
                                      "scale_to_zero_enabled": True}])
    poll(lambda: not replicas_named(server, "late"), timeout=60, what="scale to zero")

    response = server.invoke("late", X_BODY)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert "had no ready replica for 1 s" in body["message"], body
    assert response.headers["retry-after"] == "1"
    # The request woke it anyway: a replica is loading, and it serves once ready.
    poll(lambda: replicas_named(server, "late"), what="the woken replica")
    poll(lambda: server.invoke("late", X_BODY).status_code == 200, timeout=60, interval=0.5, what="served")


def test_orphans_of_a_killed_replica_are_reaped_by_the_server(server_factory, tmp_path):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    model = tmp_path / "orphan-maker"
    mlflow.pyfunc.save_model(str(model), python_model=OrphanMakerModel(), pip_requirements=[],
                             signature=ModelSignature(inputs=Schema([ColSpec("double", "x")])))
    server = server_factory()
    create_and_wait(server, "orphans", [{"name": "orphans", "entity_name": str(model)}])
    (replica,) = replicas_named(server, "orphans")
    response = server.invoke("orphans", X_BODY)
    assert response.status_code == 200, response.text
    (orphan,) = response.json()["predictions"]
    os.kill(replica.pid, signal.SIGKILL)
    # The replica's child is re-parented to the server (a child subreaper); once it exits, the
    # server collects it instead of leaving a zombie behind.
    poll(lambda: psutil.Process(orphan).ppid() == server.proc.pid if psutil.pid_exists(orphan) else True,
         what="the orphan adopted by the server")

    def gone() -> bool:
        try:
            return psutil.Process(orphan).ppid() != server.proc.pid
        except psutil.NoSuchProcess:
            return True

    poll(gone, timeout=30, interval=0.2, what="the exited orphan reaped")
