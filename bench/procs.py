"""The servers under test, as subprocesses in their own sessions, and their memory and CPU.

Every server here is started by the benchmark and stopped by it (its process group, then any
replica it left behind, by pid).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300.0
PORT_ATTEMPTS = 3


class BenchError(RuntimeError):
    """The benchmark cannot go on (a server failed, an answer was wrong)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without Berth/MLflow settings, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BERTH_", "MLFLOW_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def pin_to_last_core() -> Callable[[], None] | None:
    """A `preexec_fn` putting a load generator on the host's last core only (Linux): moved between
    cores by the scheduler, its own wake-up delays would count as the server's latency. The server
    may still use every core."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    last = max(os.sched_getaffinity(0))
    return lambda: os.sched_setaffinity(0, {last})


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _stop_group(proc: subprocess.Popen[bytes], first: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((first, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / (1024 * 1024)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def wait_idle(procs: list[psutil.Process], *, busy_fraction: float = 0.05, interval_s: float = 0.2,
              timeout_s: float = 20.0) -> float:
    """Wait until `procs` use under `busy_fraction` of one core (requests queued inside a server
    keep running after wrk stops); returns the seconds waited."""
    start = time.monotonic()
    last = cpu_seconds(procs)
    while time.monotonic() - start < timeout_s:
        time.sleep(interval_s)
        now = cpu_seconds(procs)
        if now - last < busy_fraction * interval_s:
            break
        last = now
    return time.monotonic() - start


@dataclass
class Target:
    """Where wrk sends a model's requests on one server."""

    url: str
    headers: tuple[tuple[str, str], ...]


@dataclass
class BerthServer:
    """`berth server --port 0` with its own data and config directories (`module`: what runs as
    `python -m MODULE server`, e.g. `bench.unguarded`)."""

    workdir: Path
    module: str = "berth"
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    token: str = ""
    replica_pids: set[int] = field(default_factory=set)

    @property
    def log_path(self) -> Path:
        return self.workdir / "berth-server.log"

    def start(self, **settings: str) -> None:
        """Start the server; `settings` are extra `BERTH_*` variables (e.g. `BERTH_REPLICA_FORK="0"`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_dir = self.workdir / "config"
        creds = config_dir / "credentials.json"
        creds.unlink(missing_ok=True)
        env = clean_env(BERTH_CONFIG_DIR=str(config_dir), BERTH_ADMIN_TOKEN=f"bench_{secrets.token_hex(16)}",
                        **settings)
        cmd = [sys.executable, "-m", self.module, "server", "--port", "0", "--data-dir", str(self.workdir / "data")]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)
        deadline = time.monotonic() + 60.0
        while not creds.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"berth server exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise BenchError(f"berth server did not start within 60 s:\n{_tail(self.log_path)}")
            time.sleep(0.05)
        saved = json.loads(creds.read_text())
        self.url, self.token = saved["host"], saved["token"]

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30.0)

    def create_endpoint(self, name: str, model_path: Path, concurrency: int) -> None:
        entity = {
            "entity_name": str(model_path),
            "min_provisioned_concurrency": concurrency,
            "max_provisioned_concurrency": concurrency,
            "scale_to_zero_enabled": False,
        }
        with self._client() as client:
            response = client.post("/api/2.0/serving-endpoints",
                                   json={"name": name, "config": {"served_entities": [entity]}})
        if response.status_code != 200:
            raise BenchError(f"creating Berth endpoint {name} failed: {response.status_code} {response.text}")

    def wait_ready(self, name: str, timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._client() as client:
            while True:
                self._check_alive()
                response = client.get(f"/api/2.0/serving-endpoints/{name}")
                if response.status_code != 200:
                    raise BenchError(f"GET endpoint {name}: {response.status_code} {response.text}")
                view: dict[str, Any] = response.json()
                state = view["state"]
                if state["config_update"] == "UPDATE_FAILED":
                    raise BenchError(f"Berth endpoint {name} failed to deploy: {json.dumps(view)[:4000]}")
                if state["config_update"] != "IN_PROGRESS" and state["ready"] == "READY":
                    self.replica_pids.update(p.pid for p in self.replicas())
                    return view
                if time.monotonic() > deadline:
                    raise BenchError(f"Berth endpoint {name} not ready after {timeout_s:.0f} s: {view}")
                time.sleep(0.2)

    def statuses(self, endpoint: str) -> dict[str, int]:
        """The gateway's `berth_requests_total` of `endpoint`, by status."""
        from prometheus_client.parser import text_string_to_metric_families

        with self._client() as client:
            text = client.get("/metrics").text
        counts: dict[str, int] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples if family.name == "berth_requests" else ():
                if sample.name == "berth_requests_total" and sample.labels.get("endpoint") == endpoint:
                    counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0) + int(sample.value)
        return counts

    def gateway_added_histogram(self) -> list[tuple[float, float]]:
        """The buckets (upper bound s, cumulative count) of the gateway's own added-latency histogram."""
        from prometheus_client.parser import text_string_to_metric_families

        with self._client() as client:
            text = client.get("/metrics").text
        families = [f for f in text_string_to_metric_families(text) if f.name == "berth_gateway_added_latency_seconds"]
        buckets = [(float(s.labels["le"]), s.value) for f in families for s in f.samples if s.name.endswith("_bucket")]
        return sorted(buckets)

    def target(self, name: str) -> Target:
        return Target(
            url=f"{self.url}/serving-endpoints/{name}/invocations",
            headers=(("Content-Type", "application/json"), ("Authorization", f"Bearer {self.token}")),
        )

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"berth server is not running:\n{_tail(self.log_path)}")

    def gateway(self) -> list[psutil.Process]:
        return self.processes()[:1]

    def replicas(self, model_path: Path | None = None, kind: str = "--replica-id") -> list[psutil.Process]:
        """The server's replica processes, of one model if given (`kind="--template"`: its templates).

        Forked and warm-pool replicas retitle themselves: their command line is one string."""
        found = []
        for proc in self.processes()[1:]:
            try:
                cmdline = " ".join(proc.cmdline()).split()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "berth.replica" not in cmdline or kind not in cmdline:
                continue
            if model_path is not None and str(model_path) not in cmdline:
                continue
            found.append(proc)
        return found

    def processes(self) -> list[psutil.Process]:
        return _tree(self.proc.pid) if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        self.replica_pids.update(p.pid for p in self.replicas())
        _stop_group(self.proc, signal.SIGTERM, grace_s=30.0)
        for pid in self.replica_pids:  # replicas run in their own sessions: end any survivor
            try:
                proc = psutil.Process(pid)
                if "berth.replica" in " ".join(proc.cmdline()):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue


@dataclass
class PortServer(ABC):
    """A server started on a free loopback port (retried if the port was taken meanwhile)."""

    name: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    attempts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @abstractmethod
    def command(self) -> list[str]: ...

    def ready_path(self) -> str:
        return "/"

    def env(self) -> dict[str, str]:
        """Extra environment for the server."""
        return {}

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.attempts += 1
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=clean_env(**self.env()), cwd=REPO, start_new_session=True)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    if self.attempts >= PORT_ATTEMPTS:
                        raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
                    self.start()  # most likely another process took the port first
                    continue
                try:
                    if client.get(self.url + self.ready_path()).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} not ready after {timeout_s:.0f} s:\n{_tail(self.log_path)}")
                time.sleep(0.1)

    def processes(self) -> list[psutil.Process]:
        return _tree(self.proc.pid) if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc)


@dataclass
class MlflowServer(PortServer):
    """`mlflow models serve --env-manager local` with one uvicorn worker."""

    model_path: Path = Path()

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", str(self.model_path),
            "--env-manager", "local", "--workers", "1", "-h", "127.0.0.1", "-p", str(self.port),
        ]

    def ready_path(self) -> str:
        return "/ping"

    def target(self) -> Target:
        return Target(url=f"{self.url}/invocations", headers=(("Content-Type", "application/json"),))


@dataclass
class HelloServer(PortServer):
    """uvicorn serving the raw ASGI hello world (uvloop + httptools, 1 worker)."""

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "bench.hello_asgi:app", "--host", "127.0.0.1", "--port", str(self.port),
            "--loop", "uvloop", "--http", "httptools", "--workers", "1", "--no-access-log", "--log-level", "warning",
        ]

    def target(self) -> Target:
        return Target(url=f"{self.url}/", headers=(("Content-Type", "application/json"),))


def open_loop(server: BerthServer, endpoint: str, body: str, *, rate: float, duration_s: float, warmup_s: float,
              connections: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """`berth loadtest --json` at `rate` open loop, in its own process (its CPU is its own), pinned to
    the last core (`pin_to_last_core`); its JSON report."""
    return _loadtest(server, endpoint, body, ["--rate", str(rate), "--duration", str(duration_s),
                                              "--warmup", str(warmup_s), "--concurrency", str(connections)],
                     warmup_s + duration_s + timeout_s + 60, timeout_s)


def closed_loop(server: BerthServer, endpoint: str, body: str, *, duration_s: float, connections: int,
                timeout_s: float = 60.0) -> dict[str, Any]:
    """`berth loadtest --json` closed loop (`connections` requests in flight) for `duration_s`, pinned
    like `open_loop`; its JSON report (`rps`: the throughput)."""
    return _loadtest(server, endpoint, body, ["--duration", str(duration_s), "--warmup", "0",
                                              "--concurrency", str(connections)], duration_s + timeout_s + 60,
                     timeout_s)


def _loadtest(server: BerthServer, endpoint: str, body: str, args: list[str], limit_s: float,
              timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "berth", "loadtest", endpoint, *args, "--timeout", str(timeout_s),
           "--body", body, "--json", "--host", server.url, "--token", server.token]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), preexec_fn=pin_to_last_core(),
                          timeout=limit_s)
    if proc.returncode != 0:
        raise BenchError(f"berth loadtest failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result
