"""Which HTTP server for which hop, by measurement: wrk against each candidate, one at a time, in one run.

    .venv/bin/python -m bench.http_servers            # 3 reps × c=1,8,64, 2 s warm-up + 8 s each
    .venv/bin/python -m bench.http_servers --smoke    # 1 rep of 1 s at c=8: checks the harness

Two hops, two questions:

- **replica** (answers a fixed 24-byte JSON body, no model): Berth's replica server (an asyncio
  protocol on httptools, `berth.replica.server`) against uvicorn's raw ASGI server (uvloop +
  httptools), both over TCP here because wrk speaks TCP.
- **gateway** (proxies each request to that same replica server on a Unix socket, through Berth's
  pooled upstream connections): uvicorn's raw ASGI server against granian's RSGI server (if
  granian is installed), one worker each.

For each: rps, p50, p99 and the server's CPU per request (every process of its tree), medians of
the repetitions, candidates alternated A B A B.
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
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import REPO, BenchError, PortServer, clean_env, cpu_seconds
from bench.wrk import WrkError, WrkRequest, run_wrk, wrk_binary

BODY = b'{"predictions": [0.125]}'
REQUEST = b'{"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}'


@dataclass(frozen=True)
class Config:
    reps: int = 3
    warmup_s: int = 2
    duration_s: int = 8
    concurrencies: tuple[int, ...] = (1, 8, 64)
    json_out: Path | None = None


SMOKE = {"reps": 1, "warmup_s": 0, "duration_s": 1, "concurrencies": (8,)}


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench.http_servers", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--duration", type=int, dest="duration_s")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(SMOKE) if args.smoke else {}
    for key in ("reps", "duration_s", "json_out"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return Config(**values)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the servers (run as subprocesses)

STUB_REPLICA = """
import sys, uvloop
from berth.replica.server import ReplicaServer
BODY = {body!r}
class Stub:
    def handle(self, method, path, content_type, body, answer, alive=None, trace=None):
        answer(200, b"application/json", BODY)
    def close(self):
        pass
kind, where = sys.argv[1], sys.argv[2]
server = ReplicaServer(Stub(), uds=where) if kind == "uds" else ReplicaServer(Stub(), port=int(where))
uvloop.run(server.serve())
"""

APPS = """
import os
from berth.gateway.upstream import Upstream
BODY = {body!r}
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
_up = []

def upstream():
    if not _up:
        _up.append(Upstream(os.environ["UPSTREAM"]))
    return _up[0]

async def _body(receive):
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)

async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await _body(receive)
    await send({{"type": "http.response.start", "status": 200, "headers": HEADERS}})
    await send({{"type": "http.response.body", "body": BODY}})

async def proxy(scope, receive, send):
    if scope["type"] != "http":
        return
    r = await upstream().request(b"/invocations", await _body(receive), b"application/json", 60)
    await send({{"type": "http.response.start", "status": r.status,
                "headers": [(b"content-type", r.content_type), (b"content-length", str(len(r.body)).encode())]}})
    await send({{"type": "http.response.body", "body": r.body}})

async def proxy_rsgi(scope, proto):
    r = await upstream().request(b"/invocations", await proto(), b"application/json", 60)
    proto.response_bytes(r.status, [("content-type", r.content_type.decode())], r.body)
"""


def granian_installed() -> bool:
    return subprocess.run([sys.executable, "-c", "import granian"], capture_output=True).returncode == 0


@dataclass
class Candidate(PortServer):
    """One server under comparison, started on a free port by `bench.procs.PortServer`."""

    hop: str = ""
    argv: list[str] = field(default_factory=list)  # "{port}" is replaced by the port
    extra_env: dict[str, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        return [part.replace("{port}", str(self.port)) for part in self.argv]

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": f"{self.workdir}{os.pathsep}{REPO / 'src'}", **self.extra_env}

    @property
    def invocations(self) -> str:
        return f"{self.url}/invocations"

    def cpu(self) -> float:
        return cpu_seconds(self.processes())


def candidates(workdir: Path, upstream_socket: str) -> list[Candidate]:
    uvicorn = [sys.executable, "-m", "uvicorn", "--port", "{port}", "--loop", "uvloop", "--http", "httptools",
               "--workers", "1", "--no-access-log", "--no-proxy-headers", "--log-level", "warning"]
    upstream = {"UPSTREAM": f"unix:{upstream_socket}"}
    found = [
        Candidate("berth replica server (httptools protocol)", workdir, hop="replica",
                  argv=[sys.executable, str(workdir / "stub_replica.py"), "tcp", "{port}"]),
        Candidate("uvicorn raw ASGI", workdir, hop="replica", argv=[*uvicorn, "apps:hello"]),
        Candidate("uvicorn raw ASGI proxy", workdir, hop="gateway", argv=[*uvicorn, "apps:proxy"], extra_env=upstream),
    ]
    if granian_installed():
        found.append(Candidate(
            "granian RSGI proxy", workdir, hop="gateway", extra_env=upstream,
            argv=[sys.executable, "-m", "granian", "--interface", "rsgi", "--port", "{port}", "--workers", "1",
                  "--loop", "uvloop", "--no-ws", "--log-level", "warning", "apps:proxy_rsgi"],
        ))
    return found


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Run:
    hop: str
    server: str
    concurrency: int
    rep: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float
    errors: int


def measure(cfg: Config, workdir: Path) -> list[Run]:
    (workdir / "stub_replica.py").write_text(STUB_REPLICA.format(body=BODY))
    (workdir / "apps.py").write_text(APPS.format(body=BODY))
    upstream_socket = f"/tmp/berth-bench-{uuid.uuid4().hex[:8]}.sock"
    upstream = subprocess.Popen([sys.executable, str(workdir / "stub_replica.py"), "uds", upstream_socket],
                                env=clean_env(PYTHONPATH=str(REPO / "src")), start_new_session=True)
    runs: list[Run] = []
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(upstream_socket):
            if upstream.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the upstream stub replica did not start")
            time.sleep(0.05)
        servers = candidates(workdir, upstream_socket)
        for c in cfg.concurrencies:
            for rep in range(1, cfg.reps + 1):
                for cand in servers:  # A B A B: one server under load at a time
                    cand.attempts = 0
                    cand.start()
                    try:
                        cand.wait_ready(timeout_s=30)
                        request = WrkRequest(url=cand.invocations, method="POST", body=REQUEST,
                                             headers=(("Content-Type", "application/json"),), expect_in_body=None)
                        if cfg.warmup_s:
                            run_wrk(request, connections=c, duration_s=cfg.warmup_s)
                        before = cand.cpu()
                        result = run_wrk(request, connections=c, duration_s=cfg.duration_s)
                        used = cand.cpu() - before
                    finally:
                        cand.stop()
                    run = Run(cand.hop, cand.name, c, rep, result.rps, result.p50_ms, result.p99_ms,
                              used / max(result.responses, 1) * 1e3, result.errors)
                    runs.append(run)
                    log(f"  {cand.hop:<8}{cand.name:<44} c={c:<3} rep {rep}: {run.rps:9,.0f} rps  "
                        f"p50 {run.p50_ms:6.3f}  p99 {run.p99_ms:7.3f} ms  CPU {run.cpu_ms_per_request:.4f} ms/req")
    finally:
        upstream.terminate()
        upstream.wait(10)
        if os.path.exists(upstream_socket):
            os.unlink(upstream_socket)
    return runs


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    keys = sorted({(r.hop, r.server, r.concurrency) for r in runs}, key=lambda k: (k[0] != "replica", k[2], k[1]))
    rows = []
    for hop, server, c in keys:
        cell = [r for r in runs if (r.hop, r.server, r.concurrency) == (hop, server, c)]
        rows.append({
            "hop": hop, "server": server, "concurrency": c, "reps": len(cell),
            "rps": statistics.median(r.rps for r in cell),
            "p50_ms": statistics.median(r.p50_ms for r in cell),
            "p99_ms": statistics.median(r.p99_ms for r in cell),
            "cpu_ms_per_request": statistics.median(r.cpu_ms_per_request for r in cell),
            "errors": sum(r.errors for r in cell),
        })
    return rows


def format_rows(rows: list[dict[str, Any]], cfg: Config) -> str:
    lines = [f"== HTTP servers: medians of {cfg.reps} rep(s), {cfg.warmup_s} s warm-up + {cfg.duration_s} s, "
             "wrk -t1 ==",
             f"{'hop':<9}{'server':<44}{'conc':>5}{'rps':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/req':>12}{'errors':>7}"]
    for r in rows:
        lines.append(f"{r['hop']:<9}{r['server']:<44}{r['concurrency']:>5}{r['rps']:>10,.0f}{r['p50_ms']:>9.3f}"
                     f"{r['p99_ms']:>9.3f}{r['cpu_ms_per_request']:>12.4f}{r['errors']:>7}")
    if not granian_installed():
        lines.append("(granian is not installed: pip install granian to add it to the gateway comparison)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if wrk_binary() is None:
        log("BENCHMARK FAILED: wrk is not installed (apt-get install -y wrk, or ./scripts/setup test)")
        return 2
    with tempfile.TemporaryDirectory(prefix="berth-http-") as tmp:
        try:
            runs = measure(cfg, Path(tmp))
        except (BenchError, WrkError) as exc:
            log(f"BENCHMARK FAILED: {exc}")
            return 1
    rows = summarize(runs)
    print(format_rows(rows, cfg), flush=True)
    if cfg.json_out is not None:
        cfg.json_out.write_text(json.dumps({"config": {k: str(v) for k, v in asdict(cfg).items()}, "summary": rows,
                                            "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    errors = sum(r.errors for r in runs)
    if errors:
        log(f"BENCHMARK FAILED: {errors} errors")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
