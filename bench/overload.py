"""Overload: a served entity offered 3× its capacity, with admission control in the gateway.

    .venv/bin/python -m bench.overload                  # 20 ms sleep model, 2 replicas × 4; 1,200 req/s for 30 s
    .venv/bin/python -m bench.overload --smoke          # a few seconds of each phase: checks the harness
    .venv/bin/python -m bench.overload --rate 2000 --duration 60 --sleep-ms 50 --json-out overload.json

One `berth server` (ephemeral loopback port, `BERTH_REPLICA_CONCURRENCY=4`: fixed per-replica
concurrency, no vertical tuning) serves an endpoint whose entity has min = max provisioned
concurrency 8, i.e. 2 replicas × 4, of a model that sleeps 20 ms per call (no CPU). A replica
micro-batches (what arrives during a call is its next call, up to 4), so capacity is
replicas × concurrency ÷ sleep = 400 req/s. `berth loadtest --json` (open loop, no coordinated
omission), pinned to the last core (the server may use every core), loads it twice, one phase at a
time, the server idle in between:

1. **unloaded**: a low rate (50 req/s, 15 s after 2 s warm-up) → the reference p99;
2. **overload**: 1,200 req/s for 30 s, no warm-up (the onset counts).

Criteria (issue #5), each reported PASS/FAIL: the platform stays up (process alive, `/health` 200
after); every request is answered 2xx or 429 (nothing lost: no read error, timeout or unsent
request); no 5xx and no 504; the accepted (2xx) p99 ≤ 2× the unloaded p99; the 429 answers' p99,
as the load generator measures them, ≤ 5 ms. Also reported: the server's own count by status, the
replicas' requests per model call, and the server tree's CPU per request. Exits non-zero only when
the benchmark or the server crashed, never on a criterion's FAIL.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.procs import BenchError, BerthServer, cpu_seconds, open_loop, wait_idle

ENDPOINT = "overload"
BODY = json.dumps({"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}, separators=(",", ":"))
REFUSED_P99_MS = 5.0
ACCEPTED_P99_RATIO = 2.0
LOST = ("read", "timeout", "parse", "unsent")


@dataclass(frozen=True)
class Config:
    sleep_ms: float = 20.0
    replicas: int = 2
    per_replica: int = 4
    unloaded_rate: float = 50.0
    unloaded_s: float = 15.0
    unloaded_warmup_s: float = 2.0
    rate: float = 1200.0
    duration_s: float = 30.0
    connections: int = 128
    timeout_s: float = 60.0  # the load generator's: a request unanswered this long counts as lost
    json_out: Path | None = None

    @property
    def concurrency(self) -> int:
        return self.replicas * self.per_replica

    @property
    def capacity_rps(self) -> float:
        return self.concurrency / (self.sleep_ms / 1000.0)


SMOKE = {"unloaded_rate": 50.0, "unloaded_s": 2.0, "unloaded_warmup_s": 0.5, "duration_s": 3.0}


@dataclass
class Phase:
    """One load run, as `berth loadtest --json` reported it, plus what the server did meanwhile."""

    name: str
    load: dict[str, Any]
    server_cpu_s: float = 0.0
    replica_cpu_s: float = 0.0
    server_status: dict[str, int] = field(default_factory=dict)  # the gateway's own count, by status
    model_calls: int = 0
    replica_requests: int = 0

    @property
    def answered(self) -> int:
        return int(self.load["responses"])

    @property
    def statuses(self) -> dict[int, int]:
        return {int(code): n for code, n in self.load["status_codes"].items()}

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)

    @property
    def refused(self) -> int:
        return self.statuses.get(429, 0)

    @property
    def lost(self) -> int:
        return sum(self.load["errors"].get(kind, 0) for kind in LOST)

    def latency(self, code: int, key: str) -> float:
        stats = self.load["latency_by_status"].get(str(code))
        return float(stats[key]) if stats else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "answered": self.answered, "ok": self.ok, "refused": self.refused, "lost": self.lost}


@dataclass
class Report:
    config: Config
    unloaded: Phase | None = None
    overload: Phase | None = None
    healthy_after: bool = False
    alive_after: bool = False
    gateway_processes: int = 0
    replica_concurrency: list[int] = field(default_factory=list)
    criteria: list[tuple[str, bool, str]] = field(default_factory=list)  # (criterion, passed, the figures)

    def judge(self) -> None:
        u, o = self.unloaded, self.overload
        assert u is not None
        assert o is not None
        errors = o.load["errors"]
        bad = {code: n for code, n in o.statuses.items() if not (200 <= code < 300 or code == 429)}
        fives = sum(n for code, n in o.statuses.items() if code >= 500)
        ratio = o.latency(200, "p99") / u.latency(200, "p99")
        self.criteria = [
            ("platform stays up", self.alive_after and self.healthy_after,
             f"server process {'alive' if self.alive_after else 'gone'}, "
             f"/health {'200' if self.healthy_after else 'not answered'} after the overload"),
            ("every request answered 2xx or 429", o.lost == 0 and not bad and o.answered == o.load["requests"],
             f"{o.ok + o.refused:,} of {o.load['requests']:,}; lost {o.lost} "
             f"({', '.join(f'{k} {errors.get(k, 0)}' for k in LOST)}); other statuses {bad or 'none'}"),
            ("no 5xx, no 504", fives == 0, f"5xx {fives}, 504 {o.statuses.get(504, 0)}"),
            (f"accepted p99 ≤ {ACCEPTED_P99_RATIO:g}× unloaded p99", ratio <= ACCEPTED_P99_RATIO,
             f"{o.latency(200, 'p99'):.2f} ms ÷ {u.latency(200, 'p99'):.2f} ms = ×{ratio:.2f}"),
            (f"429 p99 ≤ {REFUSED_P99_MS:g} ms", o.latency(429, "p99") <= REFUSED_P99_MS,
             f"{o.latency(429, 'p99'):.2f} ms over {o.refused:,} refusals"),
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "capacity_rps": self.config.capacity_rps,
            "unloaded": self.unloaded.to_dict() if self.unloaded else None,
            "overload": self.overload.to_dict() if self.overload else None,
            "healthy_after": self.healthy_after, "alive_after": self.alive_after,
            "gateway_processes": self.gateway_processes, "replica_concurrency": self.replica_concurrency,
            "criteria": [{"criterion": c, "passed": p, "detail": d} for c, p, d in self.criteria],
        }


def log(message: str) -> None:
    print(f"[overload] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the server and its replicas


def replica_sockets(server: BerthServer) -> list[str]:
    """The Unix sockets of the server's replicas (forked replicas retitle themselves: one string)."""
    sockets = []
    for proc in server.replicas():
        try:
            words = " ".join(proc.cmdline()).split()
        except psutil.Error:
            continue
        if "--socket" in words:
            sockets.append(words[words.index("--socket") + 1])
    return sockets


def replica_stats(server: BerthServer) -> list[dict[str, Any]]:
    """Each replica's own /stats, over its socket."""
    out = []
    for path in replica_sockets(server):
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=5.0) as client:
            out.append(client.get("http://replica/stats").json())
    return out


def model_calls(stats: list[dict[str, Any]]) -> tuple[int, int]:
    """(requests, model calls) summed over replicas: a merged batch is one call, anything else one each."""
    requests = sum(s["requests"] for s in stats)
    return requests, sum(s["requests"] - s["batched_requests"] + s["batches"] for s in stats)


def check_answers(server: BerthServer, n: int = 5) -> None:
    """A few requests one at a time: the endpoint serves, and answers what the model returns."""
    with httpx.Client(headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"},
                      timeout=30) as client:
        for _ in range(n):
            response = client.post(f"{server.url}/serving-endpoints/{ENDPOINT}/invocations", content=BODY)
            if response.status_code != 200 or response.json() != {"predictions": [1]}:
                raise BenchError(f"unexpected answer: {response.status_code} {response.text[:500]}")


def healthy(server: BerthServer) -> bool:
    try:
        return httpx.get(f"{server.url}/health", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- load


def loadtest(server: BerthServer, cfg: Config, rate: float, duration_s: float, warmup_s: float,
             connections: int) -> dict[str, Any]:
    return open_loop(server, ENDPOINT, BODY, rate=rate, duration_s=duration_s, warmup_s=warmup_s,
                     connections=connections, timeout_s=cfg.timeout_s)


def run_phase(server: BerthServer, cfg: Config, name: str, rate: float, duration_s: float, warmup_s: float,
              connections: int) -> Phase:
    wait_idle(server.processes())
    procs = server.processes()
    replicas = server.replicas()
    cpu0, rcpu0 = cpu_seconds(procs), cpu_seconds(replicas)
    status0, (req0, calls0) = server.statuses(ENDPOINT), model_calls(replica_stats(server))
    log(f"{name}: {rate:,.0f} req/s open loop for {duration_s:g} s" + (f" after {warmup_s:g} s" if warmup_s else ""))
    load = loadtest(server, cfg, rate, duration_s, warmup_s, connections)
    wait_idle(server.processes())
    cpu1, rcpu1 = cpu_seconds(procs), cpu_seconds(replicas)
    status1, (req1, calls1) = server.statuses(ENDPOINT), model_calls(replica_stats(server))
    return Phase(
        name=name, load=load, server_cpu_s=cpu1 - cpu0, replica_cpu_s=rcpu1 - rcpu0,
        server_status={k: v - status0.get(k, 0) for k, v in sorted(status1.items()) if v - status0.get(k, 0)},
        model_calls=calls1 - calls0, replica_requests=req1 - req0,
    )


def build_model(path: Path, seconds: float) -> Path:
    """The tests' sleep model (`tests/fixtures/models.py`), built without MLflow's advice on stderr."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tests.fixtures.models import sleep_model

        return sleep_model(path, seconds)


def run_benchmark(cfg: Config, workdir: Path) -> Report:
    report = Report(cfg)
    model = build_model(workdir / "sleep", cfg.sleep_ms / 1000.0)
    server = BerthServer(workdir / "server")
    # No warm-pool standby (nothing scales here; on 2 cores it would only take CPU).
    server.start(BERTH_REPLICA_CONCURRENCY=str(cfg.per_replica), BERTH_WARM_POOL_MIN="0")
    try:
        server.create_endpoint(ENDPOINT, model, cfg.concurrency)
        server.wait_ready(ENDPOINT)
        stats = replica_stats(server)
        report.replica_concurrency = sorted(s["max_concurrency"] for s in stats)
        if report.replica_concurrency != [cfg.per_replica] * cfg.replicas:
            raise BenchError(f"expected {cfg.replicas} replicas × {cfg.per_replica}, got {report.replica_concurrency}")
        report.gateway_processes = sum(1 for p in server.processes() if "berth.replica" not in " ".join(
            p.cmdline()))
        check_answers(server)
        report.unloaded = run_phase(server, cfg, "unloaded", cfg.unloaded_rate, cfg.unloaded_s,
                                    cfg.unloaded_warmup_s, 16)
        report.overload = run_phase(server, cfg, "overload", cfg.rate, cfg.duration_s, 0.0, cfg.connections)
        report.alive_after = server.proc is not None and server.proc.poll() is None
        report.healthy_after = healthy(server)
        if not report.alive_after:
            raise BenchError("the berth server exited during the overload")
    finally:
        server.stop()
    report.judge()
    return report


# --------------------------------------------------------------------------- output


def _ms(value: float) -> str:
    return f"{value:.2f}"


def format_report(report: Report) -> str:
    cfg = report.config
    lines = [
        "",
        f"Overload (admission control): {cfg.replicas} replicas × {cfg.per_replica} concurrency, "
        f"{cfg.sleep_ms:g} ms sleep model → capacity {cfg.capacity_rps:,.0f} req/s; "
        f"{report.gateway_processes} gateway process(es)",
        "| phase | offered req/s | answered req/s | 2xx req/s | status counts | lost (read/timeout/parse/unsent) "
        "| 2xx p50 ms | 2xx p99 ms | 429 p50 ms | 429 p99 ms | 429 max ms | generator CPU | server CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in (report.unloaded, report.overload):
        if phase is None:
            continue
        load = phase.load
        codes = " ".join(f"{code}: {n:,}" for code, n in sorted(phase.statuses.items()))
        lost = "/".join(str(load["errors"].get(k, 0)) for k in LOST)
        lines.append(
            f"| {phase.name} | {load['rate']:,.0f} | {load['rps']:,.1f} | {phase.ok / load['duration_s']:,.1f} | "
            f"{codes} | {lost} | {_ms(phase.latency(200, 'p50'))} | {_ms(phase.latency(200, 'p99'))} | "
            f"{_ms(phase.latency(429, 'p50'))} | {_ms(phase.latency(429, 'p99'))} | {_ms(phase.latency(429, 'max'))} | "
            f"{load['generator_cpu']:.0%} | {phase.server_cpu_s * 1e3 / max(phase.answered, 1):.3f} |"
        )
    for phase in (report.unloaded, report.overload):
        if phase is None:
            continue
        per_call = phase.replica_requests / phase.model_calls if phase.model_calls else float("nan")
        lines.append(
            f"{phase.name}: server counted {phase.server_status}; replicas served {phase.replica_requests:,} requests "
            f"in {phase.model_calls:,} model calls ({per_call:.2f} per call); server tree CPU "
            f"{phase.server_cpu_s:.1f} s (replicas {phase.replica_cpu_s:.1f} s); connect errors "
            f"{phase.load['connect_errors']}"
        )
    if report.unloaded and report.overload:
        ratio = report.overload.latency(200, "p99") / report.unloaded.latency(200, "p99")
        lines.append(f"accepted p99 ÷ unloaded p99: ×{ratio:.2f}; 2xx throughput ÷ capacity: "
                     f"{report.overload.ok / report.overload.load['duration_s'] / cfg.capacity_rps:.2f}")
    lines += [f"{'PASS' if passed else 'FAIL'}  {name}: {detail}" for name, passed, detail in report.criteria]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="bench.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long phases: checks the harness end to end")
    parser.add_argument("--rate", type=float, help="overload rate, req/s (default 1200)")
    parser.add_argument("--duration", type=float, help="overload seconds (default 30)")
    parser.add_argument("--unloaded-rate", type=float, help="req/s of the unloaded reference (default 50)")
    parser.add_argument("--unloaded-duration", type=float, help="seconds of the unloaded reference (default 15)")
    parser.add_argument("--sleep-ms", type=float, help="the model's latency per call (default 20)")
    parser.add_argument("--replicas", type=int, help="replicas (default 2)")
    parser.add_argument("--per-replica", type=int, help="per-replica concurrency (default 4)")
    parser.add_argument("--connections", type=int, help="load generator connections in the overload (default 128)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(SMOKE) if args.smoke else {}
    for key, attr in (("rate", "rate"), ("duration_s", "duration"), ("unloaded_rate", "unloaded_rate"),
                      ("unloaded_s", "unloaded_duration"), ("sleep_ms", "sleep_ms"), ("replicas", "replicas"),
                      ("per_replica", "per_replica"), ("connections", "connections"), ("json_out", "json_out")):
        if getattr(args, attr) is not None:
            values[key] = getattr(args, attr)
    return Config(**values)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    # The server runs in its own session: on SIGTERM unwind like Ctrl-C, so it is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="berth-bench-overload-") as tmp:
        try:
            report = run_benchmark(cfg, Path(tmp))
        except BenchError as exc:
            log(f"BENCHMARK FAILED: {exc}")
            return 1
    print(format_report(report), flush=True)
    if cfg.json_out is not None:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        log(f"results written to {cfg.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
