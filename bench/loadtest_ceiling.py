"""How fast `berth loadtest` can go: it and wrk against nginx answering a fixed JSON body, beside Berth's
own LogisticRegression endpoint at c=64, in one invocation.

    .venv/bin/python -m bench.loadtest_ceiling            # 3 reps × (berth lr, loadtest, wrk), 2 s warm-up + 10 s
    .venv/bin/python -m bench.loadtest_ceiling --smoke    # 1 rep of 2 s each: checks the harness end to end

First Berth serves the benchmark's `lr` model (min = max provisioned concurrency 64, as in
`bench.serving`) and wrk loads it at c=64: the throughput the generator must never be the limit of.

nginx (one worker, access log off, unlimited keep-alive) is started on a free loopback port by this
script and stopped by it; it runs on one core and both load generators on another (one process,
pinned with `os.sched_setaffinity`; on a one-core machine they share it). Both send the same POST
(a one-row `dataframe_split` body) over 64 keep-alive connections; wrk runs with one thread and a
script that only sets the request (no per-response Lua, its fastest mode). Runs alternate
loadtest, wrk, loadtest, wrk… The run fails (exit 1) on any non-2xx answer or socket error, or
when `berth loadtest` on one core reaches under `--min-ratio` (default 2) × Berth's lr throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.models import build_lr, request_body
from bench.procs import REPO, BenchError, BerthServer, clean_env, cpu_seconds, free_port, wait_idle
from bench.wrk import WrkRequest, _lua_string, wrk_binary
from bench.wrk import run_wrk as run_wrk_checked

NGINX_BODY = '{"predictions": [0]}'
RESULT_PREFIX = "WRK_JSON "

_NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      default_type application/json;
      return 200 '{body}';
    }}
  }}
}}
"""

_WRK_LUA = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{prefix}{{"requests": %d, "duration_s": %.6f, "p50_ms": %.4f, "p99_ms": %.4f, "non2xx": %d, ' ..
    '"socket_errors": %d}}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""


@dataclass(frozen=True)
class Config:
    reps: int = 3
    warmup_s: int = 2
    duration_s: int = 10
    concurrency: int = 64
    min_ratio: float = 2.0
    json_out: Path | None = None


SMOKE = {"reps": 1, "warmup_s": 0, "duration_s": 2}


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest_ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 rep, no warm-up, 2 s runs (other flags still apply)")
    parser.add_argument("--reps", type=int, help="runs per tool, alternated (default 3)")
    parser.add_argument("--warmup", type=int, dest="warmup_s", help="warm-up seconds before each run (default 2)")
    parser.add_argument("--duration", type=int, dest="duration_s", help="measured seconds per run (default 10)")
    parser.add_argument("--concurrency", type=int, help="connections (default 64)")
    parser.add_argument("--min-ratio", type=float,
                        help="fail when berth loadtest's median is under this × Berth's lr c=64 median (default 2)")
    parser.add_argument("--json-out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(SMOKE) if args.smoke else {}
    for key in ("reps", "warmup_s", "duration_s", "concurrency", "min_ratio", "json_out"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    config = Config(**values)
    if config.reps < 1 or config.duration_s < 1 or config.warmup_s < 0 or config.concurrency < 1:
        parser.error("--reps, --duration and --concurrency must be >= 1, --warmup >= 0")
    return config


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def cores() -> tuple[int, int]:
    """(core for nginx, core for the load generators): two different ones when there are two."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[-1], allowed[0]) if len(allowed) > 1 else (allowed[0], allowed[0])


def _pin(core: int) -> Any:
    return lambda: os.sched_setaffinity(0, {core})


@dataclass
class Nginx:
    """nginx on a free loopback port, its config and logs in `workdir`, started and stopped here."""

    workdir: Path
    core: int
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/invocations"

    def start(self, attempts: int = 3) -> None:
        binary = nginx_binary()
        if binary is None:
            raise BenchError("nginx is not installed (apt-get install -y nginx-light, or ./scripts/setup test)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            self.port = free_port()
            conf = self.workdir / "nginx.conf"
            conf.write_text(_NGINX_CONF.format(dir=self.workdir, port=self.port, body=NGINX_BODY))
            with open(self.workdir / "nginx.out", "ab") as out:
                self.proc = subprocess.Popen(
                    [binary, "-p", str(self.workdir), "-c", str(conf), "-g", "daemon off;"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_pin(self.core),
                )
            if self._wait_ready():
                return
        raise BenchError(f"nginx did not start:\n{self._logs()}")

    def _wait_ready(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    return False  # most likely the port was taken meanwhile: try another
                try:
                    if client.get(self.url).text == NGINX_BODY:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        return False

    def _logs(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def cpu_seconds(self) -> float:
        """CPU time of the master and its worker so far."""
        if self.proc is None:
            return 0.0
        try:
            root = psutil.Process(self.proc.pid)
            return cpu_seconds([root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # fast shutdown of master and worker
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class CpuPeak:
    """Samples a process tree's CPU every 0.25 s in a thread; `peak` is the highest share of one core
    over any 1 s window (so a generator's start-up does not dilute it)."""

    def __init__(self, sample: Any) -> None:
        self.sample = sample
        self.points: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.points.append((time.monotonic(), self.sample()))
            if self._stop.wait(0.25):
                return

    def __enter__(self) -> CpuPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        best = 0.0
        for i, (t0, c0) in enumerate(self.points):
            for t1, c1 in self.points[i + 1:]:
                if t1 - t0 >= 1.0:
                    best = max(best, (c1 - c0) / (t1 - t0))
                    break
        return best


@dataclass(frozen=True)
class Run:
    tool: str
    rep: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    nginx_cpu: float = 0.0  # nginx's peak CPU during the run (1 s windows), as a share of one core
    generator_cpu: float | None = None  # the generator's own figure (berth loadtest reports it)


@dataclass
class Report:
    config: Config
    nginx_core: int
    load_core: int
    runs: list[Run] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def median(self, tool: str, key: str) -> float:
        values = [getattr(r, key) for r in self.runs if r.tool == tool and getattr(r, key) is not None]
        return statistics.median(values) if values else 0.0

    def median_rps(self, tool: str) -> float:
        return self.median(tool, "rps")

    def problems(self) -> list[str]:
        found = [f"{r.tool} rep {r.rep}: {r.errors} errors of {r.requests} requests" for r in self.runs if r.errors]
        ours, floor = self.median_rps("loadtest"), self.config.min_ratio * self.median_rps("berth-lr")
        if ours < floor:
            found.append(f"berth loadtest reached {ours:,.0f} req/s, under {self.config.min_ratio:g} × Berth's lr "
                         f"c={self.config.concurrency} ({floor:,.0f} req/s)")
        return found

    def to_dict(self) -> dict[str, Any]:
        ours, wrk, berth = self.median_rps("loadtest"), self.median_rps("wrk"), self.median_rps("berth-lr")
        return {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()},
            "cores": {"nginx": self.nginx_core, "load": self.load_core, "machine": os.cpu_count()},
            "loadavg_before": self.load_before,
            "loadavg_after": self.load_after,
            "median_rps": {"loadtest": ours, "wrk": wrk, "berth_lr": berth},
            "loadtest_over_wrk": ours / wrk if wrk else None,
            "loadtest_over_berth_lr": ours / berth if berth else None,
            "runs": [asdict(r) for r in self.runs],
            "problems": self.problems(),
            "ok": not self.problems(),
        }


def run_loadtest(url: str, body: bytes, cfg: Config, core: int, rep: int) -> Run:
    cmd = [
        sys.executable, "-m", "berth", "loadtest", "--url", url, "--body", body.decode(), "--json",
        "--concurrency", str(cfg.concurrency), "--duration", str(cfg.duration_s), "--warmup", str(cfg.warmup_s),
    ]
    with tempfile.TemporaryDirectory(prefix="loadtest-cfg-") as cfg_dir:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, preexec_fn=_pin(core),
                              env=clean_env(BERTH_CONFIG_DIR=cfg_dir), timeout=cfg.warmup_s + cfg.duration_s + 120)
    if proc.returncode != 0:
        raise BenchError(f"berth loadtest failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    data = json.loads(proc.stdout)
    errors = sum(data["errors"].values()) + data["connect_errors"]
    errors += sum(n for code, n in data["status_codes"].items() if not code.startswith("2"))
    lat = data["latency_ms"]
    return Run("loadtest", rep, data["rps"], lat["p50"], lat["p99"], data["requests"], errors,
               generator_cpu=data["generator_cpu"])


def run_wrk(url: str, body: bytes, cfg: Config, core: int, rep: int, seconds: int) -> Run:
    binary = wrk_binary()
    if binary is None:
        raise BenchError("wrk is not installed (apt-get install -y wrk, or ./scripts/setup test)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="ceiling-") as script:
        script.write(_WRK_LUA.format(body=_lua_string(body.decode()), prefix=RESULT_PREFIX))
        script.flush()
        cmd = [binary, "-t1", f"-c{cfg.concurrency}", f"-d{seconds}s", "--latency", "-s", script.name, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_pin(core), timeout=seconds + 60)
    match = re.search(rf"^{RESULT_PREFIX}(\{{.*\}})$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise BenchError(f"wrk failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    data = json.loads(match.group(1))
    return Run("wrk", rep, data["requests"] / data["duration_s"], data["p50_ms"], data["p99_ms"],
               data["requests"], data["non2xx"] + data["socket_errors"])


def measure_berth_lr(report: Report, workdir: Path) -> None:
    """Berth serving `lr` at min = max provisioned concurrency 64, loaded by wrk at the ceiling's concurrency."""
    cfg = report.config
    berth = BerthServer(workdir / "berth")
    try:
        berth.start()
        berth.create_endpoint("ceiling-lr", build_lr(workdir / "models" / "lr"), 64)
        berth.wait_ready("ceiling-lr")
        target = berth.target("ceiling-lr")
        request = WrkRequest(url=target.url, method="POST", body=request_body(), headers=target.headers,
                             expect_in_body='"predictions"')
        for rep in range(1, cfg.reps + 1):
            if cfg.warmup_s:
                run_wrk_checked(request, connections=cfg.concurrency, duration_s=cfg.warmup_s)
            result = run_wrk_checked(request, connections=cfg.concurrency, duration_s=cfg.duration_s)
            wait_idle(berth.processes())
            report.runs.append(Run("berth-lr", rep, result.rps, result.p50_ms, result.p99_ms, result.responses,
                                   result.errors))
            log(f"  berth lr (wrk) rep {rep}: {result.rps:10,.0f} req/s  p50 {result.p50_ms:.3f} ms  "
                f"p99 {result.p99_ms:.3f} ms  errors {result.errors}")
    finally:
        berth.stop()


def run_benchmark(cfg: Config, workdir: Path) -> Report:
    nginx_core, load_core = cores()
    report = Report(cfg, nginx_core, load_core, load_before=os.getloadavg())
    log(f"Berth serving lr at c={cfg.concurrency} (both cores, as in bench.serving)")
    measure_berth_lr(report, workdir)
    nginx = Nginx(workdir / "nginx", nginx_core)
    try:
        nginx.start()
        log(f"nginx on core {nginx_core} at {nginx.url}; load generators on core {load_core}; "
            f"load average {report.load_before[0]:.2f} on {os.cpu_count()} cores")
        body = request_body()
        for rep in range(1, cfg.reps + 1):
            with CpuPeak(nginx.cpu_seconds) as cpu:
                ours = run_loadtest(nginx.url, body, cfg, load_core, rep)
            ours = replace(ours, nginx_cpu=cpu.peak)
            report.runs.append(ours)
            log(f"  berth loadtest rep {rep}: {ours.rps:10,.0f} req/s  p50 {ours.p50_ms:.3f} ms  "
                f"p99 {ours.p99_ms:.3f} ms  errors {ours.errors}  its CPU {ours.generator_cpu:.0%}  "
                f"nginx CPU {ours.nginx_cpu:.0%}")
            if cfg.warmup_s:
                run_wrk(nginx.url, body, cfg, load_core, rep, cfg.warmup_s)
            with CpuPeak(nginx.cpu_seconds) as cpu:
                theirs = run_wrk(nginx.url, body, cfg, load_core, rep, cfg.duration_s)
            theirs = replace(theirs, nginx_cpu=cpu.peak)
            report.runs.append(theirs)
            log(f"  wrk            rep {rep}: {theirs.rps:10,.0f} req/s  p50 {theirs.p50_ms:.3f} ms  "
                f"p99 {theirs.p99_ms:.3f} ms  errors {theirs.errors}  nginx CPU {theirs.nginx_cpu:.0%}")
    finally:
        nginx.stop()
    report.load_after = os.getloadavg()
    return report


def format_report(report: Report) -> str:
    cfg = report.config
    ours, wrk, berth = report.median_rps("loadtest"), report.median_rps("wrk"), report.median_rps("berth-lr")
    lines = [
        f"== load generators against nginx (fixed {len(NGINX_BODY)}-byte JSON answer): c={cfg.concurrency}, "
        f"{cfg.warmup_s} s warm-up + {cfg.duration_s} s, median of {cfg.reps}; generators pinned to core "
        f"{report.load_core}, nginx to core {report.nginx_core} ==",
        f"berth loadtest (1 process): {ours:12,.0f} req/s",
        f"wrk -t1:                    {wrk:12,.0f} req/s",
        f"berth loadtest ÷ wrk: ×{ours / wrk:.2f}" if wrk else "berth loadtest ÷ wrk: n/a",
        f"berth loadtest's own CPU: {report.median('loadtest', 'generator_cpu'):.0%} of its core; nginx's peak CPU: "
        f"{report.median('loadtest', 'nginx_cpu'):.0%} under loadtest, {report.median('wrk', 'nginx_cpu'):.0%} "
        "under wrk (near 100%: nginx, not the generator, is the limit)",
        f"Berth lr c={cfg.concurrency} (wrk, both cores): {berth:,.0f} req/s; berth loadtest on one core ÷ it: "
        + (f"×{ours / berth:.1f} (needs ×{cfg.min_ratio:g}: {'ok' if ours >= cfg.min_ratio * berth else 'MISSED'})"
           if berth else "n/a"),
        f"load average (1 min) before {report.load_before[0]:.2f}, after {report.load_after[0]:.2f} "
        f"on {os.cpu_count()} cores",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: nginx is stopped
    with tempfile.TemporaryDirectory(prefix="berth-ceiling-") as tmp:
        try:
            report = run_benchmark(cfg, Path(tmp))
        except BenchError as exc:
            log(f"BENCHMARK FAILED: {exc}")
            return 2 if "not installed" in str(exc) else 1
    print(format_report(report), flush=True)
    if cfg.json_out is not None:
        cfg.json_out.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    problems = report.problems()
    for problem in problems:
        log(f"BENCHMARK FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
