"""Berth against `mlflow models serve` on the same models, under wrk, in one invocation.

    .venv/bin/python -m bench.serving                 # 3 reps × c=1,8,64 × {lr, rf}, 3 s warm-up + 10 s each
    .venv/bin/python -m bench.serving --smoke         # a few seconds of load: checks the harness end to end
    .venv/bin/python -m bench.serving --reps 5 --duration 20 --json-out results.json

Method (as in the peer measurements): one-row `dataframe_split` requests, `wrk -t1` at each
concurrency, a warm-up then a measured run per cell, servers alternated A B A B so drift hits
both, one server under load at a time (the previous one must go idle first). Every response is
checked by the wrk script (status 200 and a body with `predictions`) and a few sample requests are
validated from Python before each run. Any 429, non-200, bad body or socket error fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.models import BUILDERS, request_body
from bench.procs import BenchError, BerthServer, HelloServer, MlflowServer, Target, rss_mb, wait_idle
from bench.wrk import WrkError, WrkRequest, WrkResult, run_wrk, wrk_binary

SERVERS = ("berth", "mlflow")
PREDICTIONS_MARKER = '"predictions"'


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    reps: int = 3
    warmup_s: int = 3
    duration_s: int = 10
    concurrencies: tuple[int, ...] = (1, 8, 64)
    models: tuple[str, ...] = ("lr", "rf")
    hello_concurrency: int = 64
    provisioned_concurrency: int = 64
    samples: int = 3
    json_out: Path | None = None
    workdir: Path | None = None


SMOKE = {"reps": 1, "warmup_s": 0, "duration_s": 1, "concurrencies": (8,), "samples": 2}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrencies must be positive integers")
    return values


def _models(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in BUILDERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"models are among {sorted(BUILDERS)}, got {text!r}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds of load: 1 rep, c=8, no warm-up, 1 s runs (other flags still apply)")
    parser.add_argument("--reps", type=int, help="repetitions per cell, servers alternated (default 3)")
    parser.add_argument("--warmup", type=int, dest="warmup_s", help="warm-up seconds before each run (default 3)")
    parser.add_argument("--duration", type=int, dest="duration_s", help="measured seconds per run (default 10)")
    parser.add_argument("--concurrency", type=_int_list, dest="concurrencies",
                        help="wrk connections, comma-separated (default 1,8,64)")
    parser.add_argument("--models", type=_models, help="models to serve, comma-separated (default lr,rf)")
    parser.add_argument("--hello-concurrency", type=int, help="connections for the hello-world ceiling (default 64)")
    parser.add_argument("--provisioned-concurrency", type=int,
                        help="Berth min = max provisioned concurrency (default 64)")
    parser.add_argument("--samples", type=int, help="Python-side sample requests validated before each run")
    parser.add_argument("--json-out", type=Path, help="write all results as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep models and server logs here (default: a temp dir)")
    args = parser.parse_args(argv)

    values: dict[str, Any] = dict(SMOKE) if args.smoke else {}
    for key in ("reps", "warmup_s", "duration_s", "concurrencies", "models", "hello_concurrency",
                "provisioned_concurrency", "samples", "json_out", "workdir"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    config = Config(**values)
    if config.reps < 1 or config.duration_s < 1 or config.warmup_s < 0 or config.samples < 1:
        parser.error("--reps, --duration and --samples must be >= 1, --warmup >= 0")
    return config


_T0 = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, stamped with seconds since start (the table goes to stdout)."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Run:
    """One wrk run: a warm-up or a measured run of one server on one cell."""

    subject: str  # model name, or "hello"
    server: str
    concurrency: int
    rep: int
    phase: str  # "warmup" | "measure"
    result: WrkResult
    gateway_added_ms: dict[str, float] | None = None  # p50/p99 from the gateway's own histogram (Berth only)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "result"} | {"result": self.result.to_dict()}

    def problem(self) -> str | None:
        r = self.result
        if r.errors == 0 and r.status_429 == 0:
            return None
        return (f"{self.server} {self.subject} c={self.concurrency} rep {self.rep} {self.phase}: "
                f"{r.status_429} × 429, {r.non200} non-200 in all, {r.bad_body} bodies without predictions, "
                f"{r.socket_errors} socket errors (of {r.responses} responses)")


@dataclass(frozen=True)
class CellSummary:
    """Medians over the measured repetitions of one server on one cell; errors are summed."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    status_429: int
    reps: int
    gateway_added_p50_ms: float | None = None
    gateway_added_p99_ms: float | None = None

    @classmethod
    def of(cls, runs: Sequence[Run]) -> CellSummary:
        results = [r.result for r in runs]
        added = [r.gateway_added_ms for r in runs if r.gateway_added_ms]
        return cls(
            rps=statistics.median(r.rps for r in results),
            p50_ms=statistics.median(r.p50_ms for r in results),
            p99_ms=statistics.median(r.p99_ms for r in results),
            errors=sum(r.errors for r in results),
            status_429=sum(r.status_429 for r in results),
            reps=len(results),
            gateway_added_p50_ms=statistics.median(a["p50"] for a in added) if added else None,
            gateway_added_p99_ms=statistics.median(a["p99"] for a in added) if added else None,
        )


@dataclass
class Rss:
    """Resident memory of one component: right after startup, and the most seen after a measured run."""

    processes: int = 0
    idle_mb: float = 0.0
    loaded_mb: float = 0.0

    def sample(self, procs: list[psutil.Process], *, idle: bool) -> None:
        mb = rss_mb(procs)
        self.processes = max(self.processes, len(procs))
        if idle:
            self.idle_mb = mb
        else:
            self.loaded_mb = max(self.loaded_mb, mb)


@dataclass(frozen=True)
class Ratio:
    """Berth ÷ mlflow: rps above 1 and p50 below 1 favour Berth."""

    rps: float
    p50: float


@dataclass
class Report:
    config: Config
    runs: list[Run] = field(default_factory=list)
    rss: dict[str, Rss] = field(default_factory=dict)
    runtime_s: float = 0.0

    def measured(self, subject: str, server: str, concurrency: int) -> list[Run]:
        return [r for r in self.runs
                if (r.subject, r.server, r.concurrency, r.phase) == (subject, server, concurrency, "measure")]

    def summary(self, subject: str, server: str, concurrency: int) -> CellSummary | None:
        runs = self.measured(subject, server, concurrency)
        return CellSummary.of(runs) if runs else None

    def problems(self) -> list[str]:
        return [p for run in self.runs if (p := run.problem()) is not None]

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        summary: dict[str, Any] = {}
        ratios: dict[str, Any] = {}
        for model in cfg.models:
            summary[model] = {
                server: {str(c): asdict(s) for c in cfg.concurrencies if (s := self.summary(model, server, c))}
                for server in SERVERS
            }
            ratios[model] = {str(c): asdict(r) for c in cfg.concurrencies if (r := self.ratio(model, c))}
        hello = self.summary("hello", "uvicorn", cfg.hello_concurrency)
        return {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "machine": {"cpus": os.cpu_count(), "wrk": _wrk_version()},
            "runtime_s": round(self.runtime_s, 1),
            "summary": summary,
            "ratios_berth_over_mlflow": ratios,
            "hello": asdict(hello) if hello else None,
            "rss_mb": {name: asdict(rss) for name, rss in self.rss.items()},
            "problems": self.problems(),
            "ok": not self.problems(),
            "runs": [run.to_dict() for run in self.runs],
        }

    def ratio(self, model: str, concurrency: int) -> Ratio | None:
        berth, mlflow = self.summary(model, "berth", concurrency), self.summary(model, "mlflow", concurrency)
        if berth is None or mlflow is None or mlflow.rps == 0 or mlflow.p50_ms == 0:
            return None
        return Ratio(rps=berth.rps / mlflow.rps, p50=berth.p50_ms / mlflow.p50_ms)


def _wrk_version() -> str:
    binary = wrk_binary()
    if binary is None:
        return ""
    proc = subprocess.run([binary, "--version"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).splitlines()[0].strip() if (proc.stdout or proc.stderr) else ""


# --------------------------------------------------------------------------- checks and runs


def sample_predictions(target: Target, body: bytes, count: int) -> list[Any]:
    """Send `count` requests from Python; each must be a 200 with a one-row `predictions` list."""
    predictions: list[Any] = []
    with httpx.Client(timeout=60.0) as client:
        for _ in range(count):
            try:
                response = client.post(target.url, content=body, headers=dict(target.headers))
            except httpx.HTTPError as exc:
                raise BenchError(f"sample request to {target.url} failed: {exc!r}") from exc
            if response.status_code != 200:
                raise BenchError(f"sample request to {target.url}: {response.status_code} {response.text[:500]}")
            try:
                data = response.json()
            except ValueError as exc:
                raise BenchError(f"sample request to {target.url}: not JSON: {response.text[:500]}") from exc
            if not isinstance(data, dict) or not isinstance(data.get("predictions"), list) \
                    or len(data["predictions"]) != 1:
                raise BenchError(f"sample request to {target.url}: no one-row predictions in {response.text[:500]}")
            predictions = data["predictions"]
    return predictions


@dataclass
class Subject:
    """Something wrk loads: a URL with its headers, the processes behind it (to wait until idle)."""

    server: str
    target: Target
    processes: Callable[[], list[psutil.Process]]
    expect: str = PREDICTIONS_MARKER
    predicts: bool = True  # answers are model predictions (checked from Python too)
    gateway_histogram: Callable[[], Buckets] | None = None  # Berth: its gateway-added latency histogram


def load(subject: Subject, body: bytes, concurrency: int, seconds: int) -> WrkResult:
    request = WrkRequest(url=subject.target.url, method="POST", body=body, headers=subject.target.headers,
                         expect_in_body=subject.expect)
    result = run_wrk(request, connections=concurrency, duration_s=seconds)
    # Requests the server queued keep it busy after wrk stops: the next run must find it idle.
    wait_idle(subject.processes())
    return result


def run_cell(report: Report, name: str, subject: Subject, body: bytes, concurrency: int, rep: int) -> WrkResult:
    cfg = report.config
    if subject.predicts:
        sample_predictions(subject.target, body, cfg.samples)
    if cfg.warmup_s > 0:
        warm = load(subject, body, concurrency, cfg.warmup_s)
        report.runs.append(Run(name, subject.server, concurrency, rep, "warmup", warm))
    before = subject.gateway_histogram() if subject.gateway_histogram else None
    result = load(subject, body, concurrency, cfg.duration_s)
    added = None
    if before is not None and subject.gateway_histogram is not None:
        delta = histogram_delta(before, subject.gateway_histogram())
        added = {"p50": histogram_quantile(delta, 0.50) * 1e3, "p99": histogram_quantile(delta, 0.99) * 1e3}
    report.runs.append(Run(name, subject.server, concurrency, rep, "measure", result, added))
    log(f"  {name:>5} {subject.server:<7} c={concurrency:<3} rep {rep}: {result.rps:9.1f} rps  "
        f"p50 {result.p50_ms:8.2f} ms  p99 {result.p99_ms:8.2f} ms  errors {result.errors}"
        + (f"  (429: {result.status_429})" if result.status_429 else "")
        + (f"  gateway-added p50 {added['p50']:.3f} / p99 {added['p99']:.3f} ms" if added else ""))
    return result


Buckets = list[tuple[float, float]]  # (upper bound in seconds, cumulative count), ascending, +Inf last


def histogram_delta(before: Buckets, after: Buckets) -> Buckets:
    """The observations made between two scrapes of one cumulative histogram."""
    old = dict(before)
    return [(le, count - old.get(le, 0.0)) for le, count in after]


def histogram_quantile(buckets: Buckets, q: float) -> float:
    """Prometheus' `histogram_quantile`: linear within the bucket holding the q-th observation."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return 0.0
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower_bound  # beyond the largest finite bound: report that bound
            span = count - lower_count
            return lower_bound + (le - lower_bound) * ((rank - lower_count) / span if span else 1.0)
        lower_bound, lower_count = le, count
    return lower_bound


def run_benchmark(cfg: Config, workdir: Path, stack: ExitStack) -> Report:
    report = Report(cfg)
    body = request_body()

    log(f"building models {', '.join(cfg.models)} in {workdir / 'models'}")
    model_paths = {name: BUILDERS[name](workdir / "models" / name) for name in cfg.models}

    log("starting berth server and mlflow models serve (one per model)")
    berth = BerthServer(workdir / "berth")
    stack.callback(berth.stop)
    berth.start()
    mlflow: dict[str, MlflowServer] = {}
    for name, path in model_paths.items():
        server = MlflowServer(name=f"mlflow-{name}", workdir=workdir / "mlflow", model_path=path)
        stack.callback(server.stop)
        server.start()
        mlflow[name] = server
    endpoints = {name: f"bench-{name}" for name in cfg.models}
    for name, path in model_paths.items():
        berth.create_endpoint(endpoints[name], path, cfg.provisioned_concurrency)
    for name in cfg.models:
        berth.wait_ready(endpoints[name])
        mlflow[name].wait_ready()
    log(f"ready: berth at {berth.url}, mlflow at " + ", ".join(f"{n} {s.url}" for n, s in mlflow.items()))

    subjects: dict[str, dict[str, Subject]] = {
        name: {
            "berth": Subject("berth", berth.target(endpoints[name]), berth.processes,
                             gateway_histogram=berth.gateway_added_histogram),
            "mlflow": Subject("mlflow", mlflow[name].target(), mlflow[name].processes),
        }
        for name in cfg.models
    }
    for name in cfg.models:
        answers = {server: sample_predictions(s.target, body, cfg.samples) for server, s in subjects[name].items()}
        if answers["berth"] != answers["mlflow"]:
            raise BenchError(f"{name}: Berth predicts {answers['berth']}, mlflow predicts {answers['mlflow']}")

    def sample_rss(idle: bool) -> None:
        report.rss.setdefault("berth gateway", Rss()).sample(berth.gateway(), idle=idle)
        for name, path in model_paths.items():
            report.rss.setdefault(f"berth replicas {name}", Rss()).sample(berth.replicas(path), idle=idle)
            # The template the replicas were forked from (shares most of its pages with them).
            report.rss.setdefault(f"berth template {name}", Rss()).sample(berth.replicas(path, "--template"),
                                                                          idle=idle)
            report.rss.setdefault(f"mlflow {name} (server tree)", Rss()).sample(mlflow[name].processes(), idle=idle)

    sample_rss(idle=True)
    for name in cfg.models:
        log(f"model {name}")
        for concurrency in cfg.concurrencies:
            for rep in range(1, cfg.reps + 1):
                for server in SERVERS:  # A B A B …
                    run_cell(report, name, subjects[name][server], body, concurrency, rep)
                    sample_rss(idle=False)

    log("hello-world ceiling: uvicorn raw ASGI (uvloop + httptools, 1 worker)")
    hello = HelloServer(name="hello-asgi", workdir=workdir / "hello")
    stack.callback(hello.stop)
    hello.start()
    hello.wait_ready()
    hello_subject = Subject("uvicorn", hello.target(), hello.processes, expect='"hello"', predicts=False)
    for rep in range(1, cfg.reps + 1):
        run_cell(report, "hello", hello_subject, body, cfg.hello_concurrency, rep)
    hello.stop()
    return report


# --------------------------------------------------------------------------- output


def _fmt_rps(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def format_report(report: Report) -> str:
    cfg = report.config
    lines: list[str] = []
    method = (f"median of {cfg.reps} rep{'s' if cfg.reps != 1 else ''}, "
              f"{cfg.warmup_s} s warm-up + {cfg.duration_s} s measured, wrk -t1, errors summed")
    for model in cfg.models:
        lines += ["", f"== {model}: {method} ==",
                  f"{'server':<8}{'conc':>5}{'rps':>11}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'429s':>6}"]
        for concurrency in cfg.concurrencies:
            for server in SERVERS:
                s = report.summary(model, server, concurrency)
                if s is None:
                    continue
                lines.append(f"{server:<8}{concurrency:>5}{_fmt_rps(s.rps):>11}{_fmt_ms(s.p50_ms):>10}"
                             f"{_fmt_ms(s.p99_ms):>10}{s.errors:>8}{s.status_429:>6}")
        for concurrency in cfg.concurrencies:
            ratio = report.ratio(model, concurrency)
            if ratio is not None:
                lines.append(f"berth ÷ mlflow  {model} c={concurrency}: rps ×{ratio.rps:.2f}  p50 ×{ratio.p50:.2f}")
        for concurrency in cfg.concurrencies:
            s = report.summary(model, "berth", concurrency)
            if s is not None and s.gateway_added_p50_ms is not None:
                lines.append(f"gateway-added latency (its own histogram) {model} c={concurrency}: "
                             f"p50 {s.gateway_added_p50_ms:.3f} ms  p99 {s.gateway_added_p99_ms:.3f} ms")
    hello = report.summary("hello", "uvicorn", cfg.hello_concurrency)
    lines.append("")
    if hello is not None:
        lines.append(f"hello-world ceiling (uvicorn raw ASGI, uvloop + httptools, 1 worker) c={cfg.hello_concurrency}: "
                     f"{_fmt_rps(hello.rps)} rps  p50 {_fmt_ms(hello.p50_ms)} ms  p99 {_fmt_ms(hello.p99_ms)} ms  "
                     f"errors {hello.errors}")
    for name, rss in report.rss.items():
        lines.append(f"RSS {name}: {rss.processes} process{'es' if rss.processes != 1 else ''}, "
                     f"{rss.idle_mb:.1f} MB after start, {rss.loaded_mb:.1f} MB after load")
    lines.append(f"runtime {report.runtime_s:.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    # The servers run in their own sessions: on SIGTERM unwind like Ctrl-C, so they are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if wrk_binary() is None:
        log("BENCHMARK FAILED: wrk is not installed (apt-get install -y wrk, or ./scripts/setup test)")
        return 2
    started_at = time.monotonic()
    with ExitStack() as stack:
        if cfg.workdir is not None:
            cfg.workdir.mkdir(parents=True, exist_ok=True)
            workdir = cfg.workdir.resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="berth-bench-")))
        servers = ExitStack()
        stack.enter_context(servers)  # servers stop before the temp dir goes
        try:
            report = run_benchmark(cfg, workdir, servers)
        except (BenchError, WrkError) as exc:
            log(f"BENCHMARK FAILED: {exc}")
            return 1
    report.runtime_s = time.monotonic() - started_at
    print(format_report(report), flush=True)
    if cfg.json_out is not None:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        log(f"results written to {cfg.json_out}")
    problems = report.problems()
    if problems:
        log(f"BENCHMARK FAILED: {len(problems)} run(s) had a 429, a non-200 or a bad answer:")
        for problem in problems:
            log(f"  {problem}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
