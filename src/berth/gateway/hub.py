"""One gateway per host, in several processes: the main process and N-1 workers on the same port.

The main process owns the control plane. Each worker (`python -m berth.gateway.worker`) binds the
public port with SO_REUSEPORT, so the kernel spreads connections over all of them, and serves the
data plane itself. Everything else a worker receives goes to the main process over its internal
socket (`berth.gateway.forward`).

The hub feeds the workers what the data plane reads: on a Unix socket, each worker gets the routing
table and the access state (token hashes, principals, grants, the OAuth key) as one JSON line when
it connects and again on every change. Rate-limit windows are shared through memory-mapped files
in the run directory (`berth.ratelimit.local`), or through Redis when configured. Metrics are shared
through prometheus-client's multiprocess files (`berth.observability.metrics`). A worker that dies
is restarted (with backoff); workers die with the main process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from berth.gateway.auth import AccessState
from berth.gateway.routing import RoutingTable
from berth.payload import PayloadLimits
from berth.process import child_setup, own

log = logging.getLogger("berth.gateway")

READY_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = (0.5, 30.0)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    crashes: int = 0


class GatewayHub:
    """Starts, feeds, watches and stops the gateway's worker processes."""

    def __init__(self, workers: int, run_dir: Path, *, request_timeout_s: float, log_dir: Path,
                 hold_timeout_s: float = 60.0, queue_wait_s: float = 0.0, log: tuple[str, str] = ("text", "info"),
                 on_demand: Callable[[str, str], None] | None = None,
                 redis_url: str | None = None, payload_limits: PayloadLimits | None = None,
                 inference_buffer_mb: float = 64.0) -> None:
        self.count = workers - 1  # the main process is gateway 0
        self.run_dir = run_dir
        self.feed_path = str(run_dir / "feed.sock")
        self.control_path = str(run_dir / "control.sock")
        self.metrics_dir = run_dir / "metrics"
        self.log_dir = log_dir
        self.request_timeout_s = request_timeout_s
        self.hold_timeout_s = hold_timeout_s
        self.queue_wait_s = queue_wait_s
        self.log = log  # the workers' log format and level (berth.observability.logs)
        self.payload_limits = payload_limits or PayloadLimits()  # what one request may carry, in every worker too
        self.limits_dir = run_dir / "limits"  # rate-limit windows every process maps (berth.ratelimit.local)
        self.redis_url = redis_url  # or, across hosts, in Redis
        self.on_demand = on_demand  # a worker holds a request for an entity at zero
        self.inference_buffer_mb = inference_buffer_mb  # each worker's inference-table buffer
        self._state: dict[str, Any] = {"routes": [], "access": AccessState().to_json()}
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._workers = [_Worker(i) for i in range(1, workers)]
        self._server: asyncio.AbstractServer | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._listen: tuple[str, int] = ("127.0.0.1", 0)

    # state the workers mirror
    def publish_routes(self, table: RoutingTable) -> None:
        self._publish(routes=table.to_json())

    def publish_access(self, access: dict[str, Any]) -> None:
        """Credentials and grants (`berth.gateway.auth.AccessState.to_json`)."""
        self._publish(access=access)

    def _publish(self, **changes: Any) -> None:
        self._state.update(changes)
        line = orjson.dumps(self._state) + b"\n"
        for writer in list(self._writers.values()):
            writer.write(line)

    # lifecycle
    async def start(self, host: str, port: int) -> None:
        """Start the workers on `host:port` (already bound here with SO_REUSEPORT); wait until each serves."""
        self._listen = (host, port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._on_feed, path=self.feed_path)
        for worker in self._workers:
            self._spawn(worker)
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in self._workers)), READY_TIMEOUT_S)
        except TimeoutError as exc:
            logs = {w.index: self._log_tail(w.index) for w in self._workers if not w.ready.is_set()}
            raise RuntimeError(f"gateway workers did not start: {logs}") from exc
        self._watch = asyncio.get_running_loop().create_task(self._watch_workers())

    def _spawn(self, worker: _Worker) -> None:
        worker.ready.clear()
        host, port = self._listen
        cmd = [
            sys.executable, "-m", "berth.gateway.worker", "--index", str(worker.index), "--host", host,
            "--port", str(port), "--feed", self.feed_path, "--control", f"unix:{self.control_path}",
            "--metrics-dir", str(self.metrics_dir), "--request-timeout", str(self.request_timeout_s),
            "--hold-timeout", str(self.hold_timeout_s), "--limits-dir", str(self.limits_dir),
            "--processes", str(self.count + 1), "--queue-wait", str(self.queue_wait_s),
            "--log-format", self.log[0], "--log-level", self.log[1],
            "--inference-buffer-mb", str(self.inference_buffer_mb),
        ]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        cmd += ["--payload-limits", orjson.dumps(self.payload_limits.to_json()).decode()]
        # On the event loop's thread: PR_SET_PDEATHSIG fires when the thread that forked exits.
        with open(self.log_dir / f"gateway-{worker.index}.log", "ab") as out:
            worker.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=child_setup(os.getpid()), env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        own(worker.proc.pid)  # its Popen collects its exit status, not berth.process.reap_strays

    async def _on_feed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await reader.readline()  # b"worker N\n"
        try:
            index = int(hello.split()[1])
        except (IndexError, ValueError):
            writer.close()
            return
        self._writers[index] = writer
        writer.write(orjson.dumps(self._state) + b"\n")
        try:
            # Lines from the worker: "ready" once it serves, then "demand ENDPOINT ENTITY" for each
            # request it holds for an entity at zero; EOF when it goes.
            while line := await reader.readline():
                words = line.split()
                if words == [b"ready"]:
                    for worker in self._workers:
                        if worker.index == index:
                            worker.ready.set()
                elif len(words) == 3 and words[0] == b"demand" and self.on_demand is not None:
                    self.on_demand(words[1].decode(), words[2].decode())
        finally:
            if self._writers.get(index) is writer:
                del self._writers[index]
            writer.close()

    async def _watch_workers(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            for worker in self._workers:
                if self._stopping or worker.proc is None or worker.proc.poll() is None:
                    continue
                worker.crashes += 1
                delay = min(RESTART_BACKOFF_S[1], RESTART_BACKOFF_S[0] * 2 ** (worker.crashes - 1))
                log.warning("gateway worker %d exited with %s; restarting in %.1f s:\n%s", worker.index,
                            worker.proc.returncode, delay, self._log_tail(worker.index))
                worker.proc = None
                await asyncio.sleep(delay)
                if not self._stopping:
                    self._spawn(worker)

    def _log_tail(self, index: int, lines: int = 20) -> str:
        try:
            text = (self.log_dir / f"gateway-{index}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> dict[int, int]:
        return {w.index: w.proc.pid for w in self._workers if w.proc is not None and w.proc.poll() is None}

    async def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every worker (each finishes what it holds), then wait for them."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        procs = [w.proc for w in self._workers if w.proc is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(proc.wait), max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        for writer in self._writers.values():
            writer.close()
        if self._server is not None:
            self._server.close()


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; with `reuse_port`, other processes can bind the same port too."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
