"""What the hot path's guards and observability cost: CPU per request, and throughput, with each on vs off.

    .venv/bin/python -m bench.hot_path_cost            # auth and rate limits: 5 interleaved reps × 4 variants
    .venv/bin/python -m bench.hot_path_cost --what observability   # metrics and inference tables: × 3 variants
    .venv/bin/python -m bench.hot_path_cost --smoke    # a second of load per variant: checks the harness
    .venv/bin/python -m bench.hot_path_cost --reps 7 --rate 800 --json-out cost.json

Servers serve the same logistic-regression model (one replica, per-replica concurrency 16, no warm
pool), one variant each. `--what guards` (the default):

- **unguarded**: `bench.unguarded`, the product with authentication and the CAN_QUERY check
  short-circuited (every caller an admin), no rate limits: the baseline;
- **auth**: `berth server` as shipped, a bearer token per request, no rate limits;
- **auth + limits (host)**: plus AI-gateway rate limits keyed by endpoint and by user, counted in
  the host's shared-memory windows (`berth.ratelimit.local`);
- **auth + limits (Redis)**: the same limits counted in Redis (`BERTH_REDIS_URL`, the local server).

`--what observability`:

- **unmetered**: `bench.unmetered`, the product without the gateway's per-request histograms (the
  answer count by status stays: the harness counts with it): the baseline;
- **metrics**: `berth server` as shipped;
- **metrics + inference table**: plus the endpoint's inference table (every request a Delta row);
  at the end, the rows in the table must equal the requests answered.

The limits are a million calls a minute, so nothing is refused: what is measured is their
bookkeeping. Each run offers a fixed rate below saturation, open loop (`berth loadtest`, pinned to
the last core), and measures the CPU time (user + system from /proc) of every process of the
server's tree, the load generator excluded, divided by the requests answered; the Redis server's
own CPU is reported beside it (it is shared infrastructure, not the server's tree). Variants are
interleaved within each rep, their order rotated from rep to rep (one server under load at a time,
the others idle), and the table quotes medians. After the CPU runs, the same rotation measures
throughput: a closed loop on the run's connections. Then (guards) each guard alone, called in a loop
in this process: µs of CPU per call. Every answer must be 200: anything else fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.models import build_lr, request_body
from bench.procs import BenchError, BerthServer, closed_loop, cpu_seconds, open_loop, wait_idle
from berth.observability.inference import FLUSH_S

ENDPOINT = "cost"
CONCURRENCY = 16  # one replica
LIMIT_CALLS = 1_000_000  # per minute and key: far above any run's count, so nothing is refused
REDIS_URL = os.environ.get("BERTH_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class Variant:
    name: str
    module: str = "berth"
    rate_limits: bool = False
    redis: bool = False
    inference: bool = False  # the endpoint logs every request to its inference table


# Two sets (`--what`), each against its own baseline, the first of the set.
GROUPS: dict[str, tuple[Variant, ...]] = {
    "guards": (
        Variant("unguarded", module="bench.unguarded"),
        Variant("auth"),
        Variant("auth + limits (host)", rate_limits=True),
        Variant("auth + limits (Redis)", rate_limits=True, redis=True),
    ),
    "observability": (
        Variant("unmetered", module="bench.unmetered"),
        Variant("metrics"),
        Variant("metrics + inference table", inference=True),
    ),
}
VARIANTS = tuple(v for group in GROUPS.values() for v in group)
INFERENCE_TABLE = {"catalog_name": "bench", "schema_name": "cost", "table_name_prefix": "cost", "enabled": True}


@dataclass(frozen=True)
class Config:
    reps: int = 5
    rate: float = 400.0
    duration_s: float = 10.0
    warmup_s: float = 1.0
    connections: int = 16
    guard_iterations: int = 20_000
    what: str = "guards"  # which GROUPS set
    variants: tuple[str, ...] = ()  # of that set; empty: all of it
    saturation_s: float = 3.0  # after each fixed-rate run, a closed loop this long: the throughput
    json_out: Path | None = None


# The smoke runs each set's baseline and its variant with everything on: two servers, not four.
SMOKE = {"reps": 1, "rate": 50.0, "duration_s": 1.0, "warmup_s": 0.0, "guard_iterations": 200, "saturation_s": 0.5}
SMOKE_VARIANTS = {"guards": ("unguarded", "auth + limits (Redis)"),
                  "observability": ("unmetered", "metrics + inference table")}


@dataclass
class Run:
    variant: str
    rep: int
    answered: int
    statuses: dict[str, int]
    server_cpu_s: float
    redis_cpu_s: float
    p50_ms: float
    p99_ms: float
    throughput_rps: float = 0.0  # closed loop, `saturation_s`, the connections of the run
    saturation_answered: int = 0  # requests that closed loop sent (all answered 200)

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu_s * 1e3 / max(self.answered, 1)

    @property
    def redis_ms_per_request(self) -> float:
        return self.redis_cpu_s * 1e3 / max(self.answered, 1)


@dataclass
class Report:
    config: Config
    runs: list[Run] = field(default_factory=list)
    guards: dict[str, dict[str, float]] = field(default_factory=dict)  # guard_costs()
    inference_rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # variant: (answered, rows written)

    def of(self, variant: str) -> list[Run]:
        return [r for r in self.runs if r.variant == variant]

    def median(self, variant: str, value: Callable[[Run], float]) -> float:
        return statistics.median(value(r) for r in self.of(variant))

    @property
    def variants(self) -> list[Variant]:
        group = GROUPS[self.config.what]
        return [v for v in group if not self.config.variants or v.name in self.config.variants]

    @property
    def baseline(self) -> str:
        return GROUPS[self.config.what][0].name

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "runs": [{**asdict(r), "cpu_ms_per_request": r.cpu_ms_per_request,
                      "redis_ms_per_request": r.redis_ms_per_request} for r in self.runs],
            "medians": {v.name: {"cpu_ms_per_request": self.median(v.name, Run.cpu_ms_per_request.fget),  # type: ignore[arg-type]
                                 "redis_ms_per_request": self.median(v.name, Run.redis_ms_per_request.fget)}  # type: ignore[arg-type]
                        for v in self.variants if self.of(v.name)},
            "guards": self.guards,
            "inference_rows": self.inference_rows,
        }


def log(message: str) -> None:
    print(f"[hot_path_cost] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- servers and load


def redis_process() -> psutil.Process | None:
    """The Redis server at `REDIS_URL` (its CPU is counted beside the server tree's), if it is local."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        return psutil.Process(int(client.info("server")["process_id"]))
    except (redis.RedisError, psutil.Error):
        return None
    finally:
        client.close()


def start_variant(variant: Variant, workdir: Path, model: Path) -> BerthServer:
    server = BerthServer(workdir / variant.name.replace(" ", "_").replace("(", "").replace(")", ""),
                         module=variant.module)
    # 16 slots for the generator's 16 connections: admission never refuses, whatever the machine's stalls.
    # One gateway process on any host: `bench.unguarded` patches only its own process.
    settings = {"BERTH_REPLICA_CONCURRENCY": str(CONCURRENCY), "BERTH_WARM_POOL_MIN": "0",
                "BERTH_GATEWAY_WORKERS": "1"}
    if variant.redis:
        settings["BERTH_REDIS_URL"] = REDIS_URL
    server.start(**settings)
    server.create_endpoint(ENDPOINT, model, CONCURRENCY)
    server.wait_ready(ENDPOINT)
    gateway: dict[str, Any] = {}
    if variant.rate_limits:
        gateway["rate_limits"] = [{"calls": LIMIT_CALLS, "key": key, "renewal_period": "minute"}
                                  for key in ("endpoint", "user")]
    if variant.inference:
        gateway["inference_table_config"] = INFERENCE_TABLE
    if gateway:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=30) as c:
            answer = c.put(f"/api/2.0/serving-endpoints/{ENDPOINT}/ai-gateway", json=gateway)
        if answer.status_code != 200:
            raise BenchError(f"setting the AI gateway failed: {answer.status_code} {answer.text}")
    return server


def inference_rows(server: BerthServer) -> int:
    """Rows in the endpoint's inference table (read after the server stopped: all of them written)."""
    from deltalake import DeltaTable

    path = server.workdir / "data" / "inference" / ENDPOINT
    return DeltaTable(str(path)).to_pyarrow_table(columns=["databricks_request_id"]).num_rows if path.exists() else 0


def measure(variant: Variant, rep: int, server: BerthServer, everyone: list[BerthServer], cfg: Config,
            body: bytes, redis: psutil.Process | None) -> Run:
    wait_idle([p for s in everyone for p in s.processes()])
    procs = server.processes()
    before = sum(server.statuses(ENDPOINT).values())  # read outside the CPU window: a scrape costs CPU too
    cpu0, redis0 = cpu_seconds(procs), cpu_seconds([redis] if redis else [])
    load = open_loop(server, ENDPOINT, body.decode(), rate=cfg.rate, duration_s=cfg.duration_s,
                     warmup_s=cfg.warmup_s, connections=cfg.connections)
    time.sleep(FLUSH_S + 0.5)  # every variant alike: an inference table's last rows are written inside the window
    wait_idle(procs)
    cpu1, redis1 = cpu_seconds(procs), cpu_seconds([redis] if redis else [])
    answered = sum(server.statuses(ENDPOINT).values()) - before  # the warm-up included: its CPU is in the window
    statuses = load["status_codes"]
    if set(statuses) != {"200"} or sum(load["errors"].values()) or load["connect_errors"]:
        raise BenchError(f"{variant.name}: not every answer was 200: {statuses}, errors {load['errors']}")
    return Run(variant.name, rep, answered, statuses, cpu1 - cpu0, redis1 - redis0 if variant.redis else 0.0,
               load["latency_ms"]["p50"], load["latency_ms"]["p99"])


def saturate(variant: Variant, server: BerthServer, everyone: list[BerthServer], cfg: Config,
             body: bytes) -> tuple[float, int]:
    """Throughput: a closed loop over the run's connections, with the other servers idle; (req/s, answered)."""
    wait_idle([p for s in everyone for p in s.processes()])
    closed = closed_loop(server, ENDPOINT, body.decode(), duration_s=cfg.saturation_s, connections=cfg.connections)
    if set(closed["status_codes"]) != {"200"}:
        raise BenchError(f"{variant.name}: the closed loop got {closed['status_codes']}")
    return float(closed["rps"]), sum(closed["status_codes"].values())


def run_benchmark(cfg: Config, workdir: Path) -> Report:
    report = Report(cfg)
    model = build_lr(workdir / "lr")
    body = request_body()
    redis = redis_process()
    servers: list[BerthServer] = []
    try:
        log("starting " + ", ".join(v.name for v in report.variants))
        with ThreadPoolExecutor(len(report.variants)) as pool:  # together: most of a start is waiting
            starts = [pool.submit(start_variant, v, workdir, model) for v in report.variants]
            wait(starts)
        servers = [f.result() for f in starts if f.exception() is None]
        for f in starts:
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        pairs = list(zip(report.variants, servers, strict=True))
        for rep in range(1, cfg.reps + 1):
            shift = (rep - 1) % len(pairs)  # each variant takes each place in the order in turn
            for variant, server in pairs[shift:] + pairs[:shift]:
                run = measure(variant, rep, server, servers, cfg, body, redis)
                log(f"rep {rep} {variant.name}: {run.cpu_ms_per_request:.3f} ms CPU/request, p50 {run.p50_ms:.2f} ms")
                report.runs.append(run)
        # Then the throughput, interleaved the same way (after the CPU runs: its backlog must not leak into them).
        for rep in range(1, cfg.reps + 1):
            shift = (rep - 1) % len(pairs)
            for variant, server in pairs[shift:] + pairs[:shift]:
                run = next(r for r in report.of(variant.name) if r.rep == rep)
                run.throughput_rps, run.saturation_answered = saturate(variant, server, servers, cfg, body)
                log(f"rep {rep} {variant.name}: {run.throughput_rps:,.0f} req/s closed loop")
        answered = {v.name: sum(s.statuses(ENDPOINT).values()) for v, s in pairs if v.inference}
    finally:
        for server in servers:
            server.stop()
    for variant, server in zip(report.variants, servers, strict=False):
        if variant.name in answered:  # every request answered (closed loops too) is a row: none dropped
            report.inference_rows[variant.name] = (answered[variant.name], inference_rows(server))
    if cfg.what == "guards":
        log(f"the guards alone: {cfg.guard_iterations:,} calls each")
        report.guards = guard_costs(cfg.guard_iterations, redis)
    return report


# --------------------------------------------------------------------------- the guards alone, in this process


def guard_costs(iterations: int, redis: psutil.Process | None) -> dict[str, dict[str, float]]:
    """µs of CPU per call of each guard, called directly in a loop (this process's CPU; for Redis also
    the server's): the resolution the server-tree figures, with their noise, do not have."""
    import asyncio

    from berth.access.permissions import Caller
    from berth.gateway.auth import AccessState, TokenAuthority, hash_token, new_token
    from berth.ratelimit.local import HostLimiter
    from berth.ratelimit.redis import RedisLimiter
    from berth.ratelimit.rules import RateLimit, windows

    token = new_token()
    caller_id = "u1"
    caller = Caller(caller_id, "bob@example.com")
    auth = TokenAuthority(AccessState(tokens={hash_token(token): (caller_id, None)}, principals={caller_id: caller},
                                      queriers={ENDPOINT: frozenset({caller_id})}))
    header = f"Bearer {token}".encode()
    rules = [RateLimit(calls=LIMIT_CALLS, key=key) for key in ("endpoint", "user")]
    out: dict[str, dict[str, float]] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        fn()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(iterations):
            fn()
        out[name] = {"cpu_us": (time.process_time() - cpu0) / iterations * 1e6,
                     "wall_us": (time.perf_counter() - wall0) / iterations * 1e6}

    def authorise() -> bool:
        return auth.may_query(auth.authenticate(header), ENDPOINT)

    timed("authenticate + CAN_QUERY (cached)", authorise)
    timed("rate-limit windows of a request", lambda: windows(rules, ENDPOINT, caller))
    wins = windows(rules, ENDPOINT, caller)
    with tempfile.TemporaryDirectory(prefix="berth-cost-rings-") as rings:
        host = HostLimiter(Path(rings))
        timed("host limiter, 2 keys (flock + mmap)", lambda: host.admit_at(wins, time.monotonic_ns()))
        host.close()

    async def over_redis() -> None:
        limiter = RedisLimiter(REDIS_URL, prefix=f"berth:bench:{os.getpid()}:")
        try:
            await limiter.ping()
            await limiter.admit(wins)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            server0 = cpu_seconds([redis] if redis else [])
            for _ in range(iterations):
                await limiter.admit(wins)
            out["Redis limiter, 2 keys (one script call)"] = {
                "cpu_us": (time.process_time() - cpu0) / iterations * 1e6,
                "wall_us": (time.perf_counter() - wall0) / iterations * 1e6,
                "redis_server_cpu_us": (cpu_seconds([redis] if redis else []) - server0) / iterations * 1e6,
            }
        finally:
            await limiter.aclose()

    asyncio.run(over_redis())
    return out


# --------------------------------------------------------------------------- output


def format_report(report: Report) -> str:
    cfg = report.config
    base_name = report.baseline
    base = report.median(base_name, Run.cpu_ms_per_request.fget)  # type: ignore[arg-type]
    base_rps = report.median(base_name, lambda r: r.throughput_rps)
    title = "Hot-path guards" if cfg.what == "guards" else "Metrics and inference tables"
    lines = [
        "",
        f"{title}: logistic regression, 1 replica × {CONCURRENCY}; {cfg.rate:,.0f} req/s open loop for "
        f"{cfg.duration_s:g} s per run, then {cfg.saturation_s:g} s closed loop on {cfg.connections} connections; "
        f"{cfg.reps} interleaved rep(s); medians (min–max)",
        f"| variant | server tree CPU ms/request | vs {base_name} | Redis CPU ms/request | p50 ms | p99 ms | "
        f"throughput req/s | vs {base_name} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in report.variants:
        runs = report.of(variant.name)
        cpu = [r.cpu_ms_per_request for r in runs]
        rps = [r.throughput_rps for r in runs]
        med, med_rps = statistics.median(cpu), statistics.median(rps)
        redis = f"{statistics.median(r.redis_ms_per_request for r in runs):.3f}" if variant.redis else "–"
        lines.append(
            f"| {variant.name} | {med:.3f} ({min(cpu):.3f}–{max(cpu):.3f}) | ×{med / base:.3f} | {redis} | "
            f"{statistics.median(r.p50_ms for r in runs):.2f} | {statistics.median(r.p99_ms for r in runs):.2f} | "
            f"{med_rps:,.0f} ({min(rps):,.0f}–{max(rps):,.0f}) | ×{med_rps / base_rps:.3f} |"
        )
    for name, (answered, rows) in report.inference_rows.items():
        lines.append(f"\n{name}: {answered:,} requests answered, {rows:,} rows in the inference table "
                     f"({'none lost' if rows == answered else 'MISMATCH'})")
    if not report.guards:
        lines.append("")
        return "\n".join(lines)
    lines += [
        "",
        f"The guards alone, {cfg.guard_iterations:,} calls each in one process (µs per call)",
        "| guard | CPU µs | wall µs | Redis server CPU µs |",
        "|---|---|---|---|",
    ]
    for name, cost in report.guards.items():
        server = f"{cost['redis_server_cpu_us']:.1f}" if "redis_server_cpu_us" in cost else "–"
        lines.append(f"| {name} | {cost['cpu_us']:.1f} | {cost['wall_us']:.1f} | {server} |")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.hot_path_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a second of load per variant")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--rate", type=float, help="offered req/s, below saturation (default 400)")
    parser.add_argument("--duration", type=float, dest="duration_s", help="measured seconds per run (default 10)")
    parser.add_argument("--what", choices=sorted(GROUPS), default="guards",
                        help="guards: auth and rate limits; observability: metrics and inference tables")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {**SMOKE, "variants": SMOKE_VARIANTS[args.what]} if args.smoke else {}
    values.update({k: v for k, v in vars(args).items() if k != "smoke" and v is not None})
    return Config(**values)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="berth-cost-") as tmp:
        try:
            report = run_benchmark(cfg, Path(tmp))
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    print(format_report(report))
    lost = {name: counts for name, counts in report.inference_rows.items() if counts[0] != counts[1]}
    if lost:
        print(f"benchmark failed: inference-table rows do not match the requests answered: {lost}", file=sys.stderr)
        return 1
    if cfg.json_out is not None:
        cfg.json_out.write_text(json.dumps(report.to_dict(), indent=2))
        log(f"results written to {cfg.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
