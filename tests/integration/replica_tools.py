"""Helpers for tests that look at replica processes from outside: find them, poll, query them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from tests.conftest import ServerProcess

T = TypeVar("T")
X_BODY = {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}


@dataclass(frozen=True)
class ReplicaProc:
    """A running replica process as seen from outside: `python -m berth.replica ...`."""

    pid: int
    replica_id: str
    name: str
    socket: str
    model_uri: str
    ppid: int


def _arg(cmdline: list[str], flag: str) -> str:
    return cmdline[cmdline.index(flag) + 1] if flag in cmdline else ""


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def replicas_of(server: ServerProcess) -> list[ReplicaProc]:
    """Live replica processes under the server process (cmdline contains `berth.replica` and
    `--replica-id`: templates and warm-pool standbys are not replicas)."""
    out = []
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            # A forked or warm-pool replica names itself (setproctitle): one string, space-separated.
            cmdline = " ".join(child.cmdline()).split()
            if "berth.replica" not in cmdline or "--replica-id" not in cmdline:
                continue  # not a replica, or a template or standby
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            ppid = child.ppid()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        out.append(
            ReplicaProc(
                pid=child.pid,
                replica_id=_arg(cmdline, "--replica-id"),
                name=_arg(cmdline, "--name"),
                socket=_arg(cmdline, "--socket"),
                model_uri=_arg(cmdline, "--model-uri"),
                ppid=ppid,
            )
        )
    return out


def replicas_named(server: ServerProcess, name: str) -> list[ReplicaProc]:
    return [r for r in replicas_of(server) if r.name == name]


def poll(fn: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.05, what: str = "condition") -> T:
    """Call `fn` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def replica_stats(socket_path: str) -> dict[str, Any]:
    """The replica's own /stats (pid, requests served, requests in flight), over its Unix socket."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), timeout=5.0) as client:
        response = client.get("http://replica/stats")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]


def started_at(pid: int) -> float:
    """A process's start as wall-clock time, to ~10 ms (psutil's create_time rounds boot time to 1 s)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22: starttime, in ticks since boot
    since_boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return since_boot + ticks / os.sysconf("SC_CLK_TCK")


def address_space_limit(pid: int) -> tuple[str, str]:
    """The soft and hard 'Max address space' of a process, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            soft, hard = line[len("Max address space"):].split()[:2]
            return soft, hard
    raise AssertionError(f"no 'Max address space' line in /proc/{pid}/limits")


def client_for(server: ServerProcess, timeout: float = 60.0) -> httpx.Client:
    """A separate authenticated client (httpx clients are not shared across threads here)."""
    headers = {"Authorization": f"Bearer {server.token}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=timeout)


def create_and_wait(server: ServerProcess, endpoint: str, entities: list[dict[str, Any]]) -> dict[str, Any]:
    """Create an endpoint with these served entities and wait until its update is over."""
    response = server.create(endpoint, {"served_entities": entities})
    assert response.status_code == 200, response.text
    return server.wait_not_updating(endpoint)


def entity_state(view: dict[str, Any], index: int = 0) -> dict[str, str]:
    return view["config"]["served_entities"][index]["state"]  # type: ignore[no-any-return]


def assert_temporarily_unavailable(response: httpx.Response) -> dict[str, Any]:
    """503 with the Databricks error shape and a Retry-After header."""
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error_code"] == "TEMPORARILY_UNAVAILABLE", body
    assert isinstance(body["message"], str), body
    assert body["message"], body
    assert int(response.headers["Retry-After"]) >= 1, response.headers
    return body  # type: ignore[no-any-return]


class ReplicaProcess:
    """`python -m berth.replica` started directly (no server), polled until it answers /ping."""

    def __init__(self, model: Path, tmp: Path, max_concurrency: int, replica_id: str = "test") -> None:
        self.socket = f"/tmp/berth-test-{uuid.uuid4().hex[:8]}.sock"
        self.log = tmp / f"replica-{uuid.uuid4().hex[:6]}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "berth.replica", "--model-uri", str(model), "--socket", self.socket,
                 "--replica-id", replica_id, "--max-concurrency", str(max_concurrency)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        with self.client() as client:
            while True:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    if client.get("/ping").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.05)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), base_url="http://replica", timeout=60)

    def stats(self) -> dict[str, Any]:
        return replica_stats(self.socket)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if os.path.exists(self.socket):
            os.unlink(self.socket)


def metric_samples(server: ServerProcess, name: str, **labels: str) -> list[float]:
    """Values of the samples called `name` whose labels include `labels`, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    response = server.client.get("/metrics")
    assert response.status_code == 200, response.text
    return [
        s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
