"""How fast a new replica serves, how long the first request to an endpoint at zero takes, and what a
model-version rollout under load costs.

    python -m bench.instant_replicas [--reps N] [--smoke] [--json-out FILE]

1. **Scale-up → first served response**, per path, on the benchmark's `lr` model: from the
   backend's `start()` (what the reconciler calls on a scale-up decision) to the new replica's
   first 200 answer to `/invocations` on its own socket, polled every 2 ms. The same `LocalBackend`
   the server uses, in this process: **fork** (from the entity's loaded template), **warm** (a
   warm-pool standby loads the model), and **fresh** (a new process, as every peer starts one).
   Also the model's load time (load + warm-up, in a process that has the runtime imported), which
   bounds the warm path.
2. **First request at zero**: a real `berth server` whose endpoint scales to zero after 2 s idle;
   the latency of one request sent once it is at zero (held by the gateway while a replica starts),
   fork path (the default) and warm-pool path (`BERTH_REPLICA_FORK=0`).
3. **Rollout under load**: `berth loadtest` at a fixed open-loop rate through a model-version update
   (lr seed 0 → seed 1); failed requests and p99 against the same load with no rollout, same run.

Only one server or backend runs at a time. Medians over `--reps` (this machine is noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.models import build_lr, request_body
from bench.procs import BenchError, BerthServer, clean_env
from berth.backends.base import ReplicaSpec
from berth.backends.local import LocalBackend
from berth.backends.warmpool import PoolPolicy

POLL_S = 0.002


@dataclass
class Report:
    reps: int
    start_ms: dict[str, list[float]] = field(default_factory=dict)  # path -> samples
    load_ms: list[float] = field(default_factory=list)
    at_zero_ms: dict[str, list[float]] = field(default_factory=dict)
    rollout: dict[str, dict[str, Any]] = field(default_factory=dict)  # "steady" | "rollout" -> loadtest summary


def log(message: str) -> None:
    print(f"[instant] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# 1. Scale-up to first served response
async def first_answer(backend: LocalBackend, replica_id: str, body: bytes, timeout_s: float = 120.0) -> float:
    """Seconds until the replica answers an invocation with 200 (polling its socket)."""
    started = time.perf_counter()
    while True:
        if backend.exited(replica_id) is not None:
            raise BenchError(f"replica {replica_id} exited: {backend.logs(replica_id)}")
        status, payload = await backend.request(replica_id, "POST", "/invocations", body, timeout_s=5.0)
        if status == 200:
            return time.perf_counter() - started
        if status not in (0,):
            raise BenchError(f"replica {replica_id} answered {status}: {payload[:300]!r}")
        if time.perf_counter() - started > timeout_s:
            raise BenchError(f"replica {replica_id} did not answer within {timeout_s} s")
        await asyncio.sleep(POLL_S)


async def measure_path(path: str, model: Path, reps: int, workdir: Path) -> list[float]:
    fork = path == "fork"
    pool = PoolPolicy(floor=1, memory_cap_mb=2048) if path == "warm" else None
    backend = LocalBackend(workdir / path, fork=fork, pool=pool)
    backend.activate()
    spec = ReplicaSpec("bench", "lr", str(model), max_concurrency=4)
    body = request_body()
    samples = []
    try:
        if fork:  # the template: loaded once, by the entity's first replica (not measured)
            first = await backend.start(spec)
            await first_answer(backend, first.id, body)
        for _ in range(reps):
            if pool is not None:
                await wait_for_standby(backend)
            started = time.perf_counter()
            handle = await backend.start(spec)
            await first_answer(backend, handle.id, body)
            samples.append((time.perf_counter() - started) * 1e3)
            if backend.path_of(handle.id) != path:
                raise BenchError(f"a {path} start took the {backend.path_of(handle.id)} path")
            await backend.stop(handle.id, grace_s=5.0)
    finally:
        await backend.close()
    return samples


async def wait_for_standby(backend: LocalBackend, timeout_s: float = 120.0) -> None:
    assert backend.pool is not None
    deadline = time.monotonic() + timeout_s
    while not any(s.ready for s in backend.pool.standbys):
        if time.monotonic() > deadline:
            raise BenchError("the warm pool did not refill")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # let the standby's import settle (its last page faults) off the clock


def measure_load(model: Path, reps: int) -> list[float]:
    """The model's load + warm-up in a fresh process that has the runtime imported (median of reps)."""
    code = (
        "import time, json\n"
        "from berth.replica.launch import import_runtime\n"
        "import_runtime()\n"
        "from berth.replica.scoring import Scorer\n"
        f"t = time.perf_counter(); s = Scorer({str(model)!r}); s.warm_up()\n"
        "print(json.dumps((time.perf_counter() - t) * 1e3))\n"
    )
    out = []
    for _ in range(reps):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(),
                              timeout=120)
        if proc.returncode != 0:
            raise BenchError(f"load measurement failed: {proc.stderr[-2000:]}")
        out.append(float(proc.stdout.strip().splitlines()[-1]))
    return out


# 2. First request at zero
def measure_at_zero(path: str, model: Path, reps: int, workdir: Path) -> list[float]:
    server = BerthServer(workdir / f"zero-{path}")
    settings = {"BERTH_SCALE_TO_ZERO_IDLE_S": "2"}
    if path == "warm":
        settings.update(BERTH_REPLICA_FORK="0", BERTH_WARM_POOL_MIN="1")
    server.start(**settings)
    samples = []
    try:
        entity = {"entity_name": str(model), "min_provisioned_concurrency": 0, "max_provisioned_concurrency": 4,
                  "scale_to_zero_enabled": True}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                          timeout=120.0) as client:
            response = client.post("/api/2.0/serving-endpoints",
                                   json={"name": "zero", "config": {"served_entities": [entity]}})
            if response.status_code != 200:
                raise BenchError(f"create: {response.status_code} {response.text}")
            server.wait_ready("zero")
            target = server.target("zero")
            headers = dict(target.headers)
            for _ in range(reps):
                deadline = time.monotonic() + 120
                while server.replicas() or (path == "warm" and not standby_ready(server)):
                    if time.monotonic() > deadline:
                        raise BenchError("the endpoint did not scale to zero")
                    time.sleep(0.1)
                time.sleep(0.5)
                started = time.perf_counter()
                response = client.post(target.url, content=request_body(), headers=headers)
                elapsed = (time.perf_counter() - started) * 1e3
                if response.status_code != 200:
                    raise BenchError(f"first request at zero: {response.status_code} {response.text}")
                samples.append(elapsed)
    finally:
        server.stop()
    return samples


def standby_ready(server: BerthServer) -> bool:
    for proc in server.processes()[1:]:
        try:
            if "--state ready" in " ".join(proc.cmdline()):
                return True
        except psutil.Error:  # gone, or a zombie not yet collected
            continue
    return False


# 3. Rollout under load
def loadtest(server: BerthServer, name: str, rate: float, duration_s: float) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "berth", "loadtest", name, "--rate", str(rate), "--duration", str(duration_s),
           "--body", request_body().decode(), "--json", "--host", server.url, "--token", server.token]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())


def summarize(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise BenchError(f"loadtest failed: {err[-2000:]}")
    result = json.loads(out)
    ok = result["status_codes"].get("200", 0)
    return {"requests": result["requests"], "ok": ok, "failed": result["requests"] - ok,
            "status_codes": result["status_codes"], "errors": result["errors"],
            "p50_ms": result["latency_ms"]["p50"], "p99_ms": result["latency_ms"]["p99"],
            "max_ms": result["latency_ms"]["max"]}


def measure_rollout(v1: Path, v2: Path, rate: float, duration_s: float, workdir: Path) -> dict[str, dict[str, Any]]:
    server = BerthServer(workdir / "rollout")
    server.start()
    out: dict[str, dict[str, Any]] = {}
    try:
        server.create_endpoint("roll", v1, 4)
        server.wait_ready("roll")
        log(f"steady load: {rate:g} req/s for {duration_s:g} s")
        out["steady"] = summarize(loadtest(server, "roll", rate, duration_s))
        log("the same load through a rollout to a new model version")
        proc = loadtest(server, "roll", rate, duration_s)
        time.sleep(duration_s / 4)
        entity = {"entity_name": str(v2), "min_provisioned_concurrency": 4, "max_provisioned_concurrency": 4,
                  "scale_to_zero_enabled": False}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                          timeout=60.0) as client:
            started = time.perf_counter()
            response = client.put("/api/2.0/serving-endpoints/roll/config", json={"served_entities": [entity]})
            if response.status_code != 200:
                raise BenchError(f"update: {response.status_code} {response.text}")
            view = server.wait_ready("roll")
            took = time.perf_counter() - started
        if view["config"]["served_entities"][0]["entity_name"] != str(v2):
            raise BenchError(f"the rollout did not go live: {view}")
        out["rollout"] = summarize(proc)
        out["rollout"]["update_s"] = round(took, 3)
    finally:
        server.stop()
    return out


def render(report: Report) -> str:
    lines = ["", "Scale-up decision -> new replica's first served response (lr; ms)",
             "| path | p50 | p90 | n | vs fresh p50 |", "|---|---|---|---|---|"]
    fresh = median(report.start_ms.get("fresh", []))
    for path in ("fork", "warm", "fresh"):
        samples = report.start_ms.get(path, [])
        lines.append(f"| {path} | {median(samples):.1f} | {percentile(samples, 90):.1f} | {len(samples)} | "
                     f"×{median(samples) / fresh:.3f} |")
    load = median(report.load_ms)
    lines.append(f"model load + warm-up (runtime imported), p50: {load:.1f} ms; "
                 f"warm path minus load: {median(report.start_ms.get('warm', [])) - load:.1f} ms")
    lines += ["", "First request to an endpoint at zero (held while a replica starts; ms)",
              "| path | p50 | max | n |", "|---|---|---|---|"]
    for path, samples in report.at_zero_ms.items():
        lines.append(f"| {path} | {median(samples):.1f} | {max(samples):.1f} | {len(samples)} |")
    if report.rollout:
        lines += ["", "Rollout to a new model version under open-loop load",
                  "| run | requests | failed | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
        for run, r in report.rollout.items():
            lines.append(f"| {run} | {r['requests']:,} | {r['failed']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['max_ms']:.1f} |")
        steady, rolled = report.rollout["steady"], report.rollout["rollout"]
        lines.append(f"rollout p99 ÷ steady p99: ×{rolled['p99_ms'] / steady['p99_ms']:.2f}; "
                     f"update live after {rolled['update_s']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.instant_replicas")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="1 start a path, 1 at zero, a short rollout")
    parser.add_argument("--rate", type=float, default=300.0, help="open-loop rate of the rollout load")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each rollout load")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    reps = 1 if args.smoke else args.reps
    duration = 4.0 if args.smoke else args.duration
    # Smoke: half the load, so a stall of this 2-core machine while the new model loads (~100 ms seen) does
    # not fill the entity's 4 slots and 4 waiting at 2 ms a call: admission would answer 429 (by design).
    rate = 50.0 if args.smoke else args.rate
    report = Report(reps=reps)
    with tempfile.TemporaryDirectory(prefix="berth-bench-instant-") as tmp:
        work = Path(tmp)
        v1, v2 = build_lr(work / "lr"), build_lr(work / "lr2", seed=1)
        for path in ("fork", "warm", "fresh"):
            log(f"scale-up, {path} path: {reps} starts")
            report.start_ms[path] = asyncio.run(measure_path(path, v1, reps, work / "logs"))
        report.load_ms = measure_load(v1, 1 if args.smoke else max(2, reps // 3))
        zero_reps = 1 if args.smoke else min(reps, 5)
        for path in ("fork", "warm"):
            log(f"first request at zero, {path} path: {zero_reps} times")
            report.at_zero_ms[path] = measure_at_zero(path, v1, zero_reps, work)
        report.rollout = measure_rollout(v1, v2, rate, duration, work)
    print(render(report))
    ok = report.rollout["rollout"]["failed"] == 0 and report.rollout["steady"]["failed"] == 0
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"ok": ok, **asdict(report)}, indent=2))
    if not ok:
        seen = {run: (r["status_codes"], r["errors"]) for run, r in report.rollout.items()}
        print(f"FAILED: requests failed under load (status codes, errors): {seen}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
