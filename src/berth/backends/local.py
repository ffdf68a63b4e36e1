"""Local backend: each replica is a process on this host, reached over a Unix socket.

A replica starts on the quickest path that is safe for its model (`berth.replica.launch`):

1. **fork**: from its entity's template, a process holding the loaded model (`berth.replica.template`),
   in milliseconds. The first replica of an entity starts the template (from the warm pool when it
   has a standby) and is forked once the model is loaded. Linux only; a template that finds its
   model fork-unsafe (CUDA, TensorFlow, threads started by the model's code) says so, and that
   entity's replicas take the next path.
2. **warm**: a standby from the warm pool (`berth.backends.warmpool`) loads the model.
3. **fresh**: a new `python -m berth.replica` process imports everything and loads the model.

Every replica is this server's child (forked ones are adopted: this process is a child subreaper),
dies with it (PR_SET_PDEATHSIG), runs in its own session so a terminal's Ctrl-C reaches only the
server (which then stops them in order), and carries an address-space limit (RLIMIT_AS) as its
memory limit. Replica ids are new uuids, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

from berth.backends.base import ReplicaExit, ReplicaHandle, ReplicaSpec
from berth.backends.procs import AsyncChannel, Child, become_subreaper, control_pair, spawn
from berth.backends.warmpool import PoolPolicy, WarmPool
from berth.payload import PayloadLimits
from berth.process import child_setup, reap_strays
from berth.replica.launch import THREAD_VARS, ReplicaArgs

log = logging.getLogger("berth.backend")

# The platform's own settings and credentials never reach a model's process: BERTH_* holds the store URL
# (with its password), the secrets key and the admin token; the rest are the tracking server's and
# PostgreSQL's credentials. A model gets what its entity's environment_vars give it.
PLATFORM_ONLY_ENV = frozenset({
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET", "PGPASSWORD",
})


REPLICA_SETTINGS = frozenset({"BERTH_OTLP_ENDPOINT"})  # the BERTH_* a replica reads itself (its traces)


def inherited_env() -> dict[str, str]:
    """The server's environment as replicas inherit it: without `BERTH_*` (but `REPLICA_SETTINGS`) and
    `PLATFORM_ONLY_ENV`."""
    return {k: v for k, v in os.environ.items()
            if (k in REPLICA_SETTINGS or not k.startswith("BERTH_")) and k not in PLATFORM_ONLY_ENV}


THREAD_ENV_DEFAULTS = {
    # One GIL-bound replica per core: native thread pools inside it only fight each other.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
LOG_TAIL_LINES = 30
DEFAULT_MEMORY_LIMIT_MB = 4096
REAP_EVERY_S = 5.0
# Model processes run this much nicer than the gateway: on a busy host a gateway that waits for a core
# delays every answer, a refusal's included, while its own share of the CPU is small (BENCHMARKS.md, "Overload").
MODEL_NICE = 5


def _model_setup(memory_limit_bytes: int) -> Callable[[], None]:
    """`preexec_fn` of every process that holds a model (templates, standbys, fresh replicas)."""
    return child_setup(os.getpid(), memory_limit_bytes, MODEL_NICE)


@dataclass
class _Template:
    key: tuple[Any, ...]
    child: Child
    channel: AsyncChannel
    log_path: Path
    state: str = "loading"  # loading | ready | unsafe | failed
    reason: str = ""
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    forks: int = 0


@dataclass
class _LocalReplica:
    handle: ReplicaHandle
    spec: ReplicaSpec
    socket_path: str
    log_path: Path
    path: str  # how it started: fork | warm | fresh
    child: Child | None = None  # None while it waits for its template
    exit: ReplicaExit | None = None  # set when it ended before it had a process
    pending: asyncio.Task[None] | None = None
    forking: bool = False  # between the fork request and its answer: a stop waits for the answer
    stopped: bool = False
    requested_at: float = field(default_factory=time.perf_counter)


class LocalBackend:
    """Runs replicas as processes of this server."""

    def __init__(
        self,
        log_dir: Path,
        *,
        python: str | None = None,
        fork: bool = True,
        pool: PoolPolicy | None = None,
        memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB,
        payload_limits: PayloadLimits | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.payload_limits = payload_limits or PayloadLimits()  # replicas refuse bodies too deep, too many rows
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.python = python or sys.executable
        # Unix socket paths are limited to ~107 bytes: keep them short, outside the data dir.
        self.socket_dir = tempfile.mkdtemp(prefix="berth-")
        self._replicas: dict[str, _LocalReplica] = {}
        self._usage_procs: dict[str, psutil.Process] = {}  # kept: psutil caches what it read once
        self._templates: dict[tuple[Any, ...], _Template] = {}
        self._unsafe: dict[tuple[Any, ...], str] = {}  # models whose template said "do not fork me"
        self._reaper: asyncio.Task[None] | None = None
        self.fork = fork and become_subreaper()
        base_env = {**inherited_env(), **THREAD_ENV_DEFAULTS, "PYTHONUNBUFFERED": "1"}
        self.pool = (
            WarmPool(self.python, log_dir / "standby", pool, env=base_env,
                     preexec=_model_setup(memory_limit_mb * 2**20))
            if pool is not None else None
        )

    def activate(self) -> None:
        """Start the warm pool's background refill and the stray reaper (needs the running event loop)."""
        if self.pool is not None:
            self.pool.start()
        if self.fork and self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="berth-reaper")

    async def _reap(self) -> None:
        """As a subreaper this process inherits its replicas' orphans: collect the ones that exit."""
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            try:
                reap_strays()
            except Exception:
                log.exception("reaping stray children failed")

    # Backend
    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        replica_id = uuid.uuid4().hex[:12]
        socket_path = os.path.join(self.socket_dir, f"{replica_id}.sock")
        address = f"unix:{socket_path}"
        key = _template_key(spec)
        if self.fork and key not in self._unsafe:
            template = self._templates.get(key)
            if template is None or template.state == "failed":
                template = await self._start_template(spec, key)
                self._retire_templates(spec.entity_uid, keep=key)
            handle = ReplicaHandle(id=replica_id, address=address)
            replica = _LocalReplica(handle, spec, socket_path, self.log_dir / f"{replica_id}.log", "fork")
            self._replicas[replica_id] = replica
            replica.pending = asyncio.get_running_loop().create_task(self._fork_from(template, replica))
            return handle
        replica = _LocalReplica(ReplicaHandle(replica_id, address), spec, socket_path,
                                self.log_dir / f"{replica_id}.log", "fresh")
        self._replicas[replica_id] = replica
        await self._start_process(replica)
        return replica.handle

    async def is_ready(self, replica_id: str) -> bool:
        replica = self._replicas.get(replica_id)
        if replica is None or replica.child is None or replica.child.poll() is not None:
            return False
        if not os.path.exists(replica.socket_path):  # noqa: ASYNC240 (a stat of a tmpfs path)
            return False
        status, _ = await self.request(replica_id, "GET", "/ping")
        return status == 200

    async def request(self, replica_id: str, method: str, path: str, body: bytes = b"",
                      timeout_s: float = 2.0) -> tuple[int, bytes]:
        """One request to a replica's own server (health, stats, settings); (0, b"") if unreachable."""
        replica = self._replicas.get(replica_id)
        if replica is None:
            return 0, b""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(replica.socket_path), timeout_s)
        except (OSError, TimeoutError):
            return 0, b""
        try:
            head = (f"{method} {path} HTTP/1.1\r\nHost: replica\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
            writer.write(head.encode() + body)
            raw = await asyncio.wait_for(reader.read(), timeout_s)
        except (OSError, TimeoutError):
            return 0, b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, payload = raw.partition(b"\r\n\r\n")
        try:
            return int(head.split(b" ", 2)[1]), payload
        except (IndexError, ValueError):
            return 0, b""

    async def stats(self, replica_id: str) -> dict[str, Any] | None:
        status, payload = await self.request(replica_id, "GET", "/stats")
        return orjson.loads(payload) if status == 200 else None

    async def configure(self, replica_id: str, max_concurrency: int) -> bool:
        body = orjson.dumps({"max_concurrency": max_concurrency})
        status, _ = await self.request(replica_id, "POST", "/settings", body)
        return status == 200

    def exited(self, replica_id: str) -> ReplicaExit | None:
        replica = self._replicas.get(replica_id)
        if replica is None:
            return ReplicaExit(returncode=-signal.SIGKILL, log_tail="")
        if replica.exit is not None:
            return replica.exit
        if replica.child is None:
            return None
        code = replica.child.poll()
        if code is None:
            return None
        return ReplicaExit(returncode=code, log_tail=self.logs(replica_id, LOG_TAIL_LINES))

    async def stop(self, replica_id: str, grace_s: float = 10.0) -> None:
        replica = self._replicas.pop(replica_id, None)
        self._usage_procs.pop(replica_id, None)
        if replica is None:
            return
        replica.stopped = True
        if replica.pending is not None and not replica.pending.done():
            if not replica.forking:
                replica.pending.cancel()  # still waiting for its template: nothing to stop yet
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await replica.pending  # a fork in progress: finish it, then stop what it made
        if replica.child is not None:
            await replica.child.stop(grace_s)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(replica.socket_path)

    async def release(self, spec: ReplicaSpec) -> None:
        """The entity is gone: stop its templates (its replicas are stopped separately). Matched by the
        entity's uid, as `spec` may not carry the environment its replicas started with (their secrets)."""
        key = _template_key(spec)
        gone = [k for k in self._templates if k == key or (spec.entity_uid and k[-1] == spec.entity_uid)]
        await asyncio.gather(*(self._stop_template(self._templates.pop(k)) for k in gone))

    def logs(self, replica_id: str, max_lines: int = 200) -> str:
        return _tail(self.log_dir / f"{replica_id}.log", max_lines)

    def usage(self, replica_id: str) -> tuple[float, int] | None:
        replica = self._replicas.get(replica_id)
        if replica is None or replica.child is None:
            return None
        process = self._usage_procs.get(replica_id)
        try:
            if process is None or process.pid != replica.child.pid:
                process = self._usage_procs[replica_id] = psutil.Process(replica.child.pid)
            with process.oneshot():
                cpu, memory = process.cpu_times(), process.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._usage_procs.pop(replica_id, None)
            return None
        return cpu.user + cpu.system, memory.rss

    def path_of(self, replica_id: str) -> str | None:
        """How a replica started (fork, warm or fresh): for metrics, tests and benchmarks."""
        replica = self._replicas.get(replica_id)
        return replica.path if replica is not None else None

    def template_pids(self) -> dict[str, int]:
        return {str(t.key[:2]): t.child.pid for t in self._templates.values() if t.child.poll() is None}

    def cleanup_orphans(self, records: list[tuple[str, int | None]]) -> list[str]:
        killed = []
        for replica_id, pid in records:
            if not pid or replica_id in self._replicas:
                continue
            try:
                proc = psutil.Process(pid)
                if replica_id in " ".join(proc.cmdline()):
                    proc.kill()
                    _wait_dead(proc, timeout=10)
                    killed.append(replica_id)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.TimeoutExpired):
                continue
        return killed

    def pids(self) -> dict[str, int]:
        """Process ids of running replicas (for tests and resource accounting only)."""
        return {rid: r.child.pid for rid, r in self._replicas.items() if r.child is not None and r.child.poll() is None}

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*(self.stop(rid, grace_s=5.0) for rid in list(self._replicas)))
        templates, self._templates = list(self._templates.values()), {}
        await asyncio.gather(*(self._stop_template(t) for t in templates))
        if self.pool is not None:
            await self.pool.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    # The fork path
    async def _start_template(self, spec: ReplicaSpec, key: tuple[Any, ...]) -> _Template:
        """A template for the spec's model, from a standby when the pool has one."""
        log_path = self.log_dir / "templates" / f"{uuid.uuid4().hex[:12]}.log"
        log_path.parent.mkdir(exist_ok=True)
        user_env = {k: v for k, v in spec.environment_vars.items() if k not in THREAD_VARS}
        thread_env = {var: spec.environment_vars.get(var, THREAD_ENV_DEFAULTS[var]) for var in THREAD_VARS}
        memory_limit = spec.memory_limit_mb * 2**20
        standby = self._take_standby()
        if standby is not None:
            await standby.channel.send(op="template", model_uri=spec.model_uri, name=spec.entity_name,
                                       log=str(log_path), env=user_env, thread_env=thread_env,
                                       memory_limit_bytes=memory_limit)
            template = _Template(key, standby.child, standby.channel, log_path)
            if (await standby.channel.recv()) is None:  # {"event": "assigned"}
                template.state = "failed"
        else:
            ours, theirs = control_pair()
            env = {**inherited_env(), **user_env, **THREAD_ENV_DEFAULTS, "PYTHONUNBUFFERED": "1"}
            cmd = [self.python, "-m", "berth.replica", "--template", "--model-uri", spec.model_uri,
                   "--name", spec.entity_name, "--control-fd", str(theirs.fileno()),
                   "--thread-env", json.dumps(thread_env)]
            try:
                child = spawn(cmd, log_path, env, _model_setup(memory_limit),
                              pass_fds=(theirs.fileno(),))
            finally:
                theirs.close()
            template = _Template(key, child, await AsyncChannel.open(ours), log_path)
        self._templates[key] = template
        asyncio.get_running_loop().create_task(self._await_template(template))
        return template

    async def _await_template(self, template: _Template) -> None:
        message = None if template.state == "failed" else await template.channel.recv()
        if message is not None and message.get("event") == "template":
            template.state = "ready" if message["fork_safe"] else "unsafe"
            template.reason = message.get("reason", "")
            if template.state == "unsafe":
                self._unsafe[template.key] = template.reason
                log.warning("replicas of %s start without forking: %s", template.key[:2], template.reason)
        else:
            template.state = "failed"
            template.channel.close()
            if not await template.child.wait(10.0):
                await template.child.stop(grace_s=2.0)
        template.loaded.set()
        if template.state != "ready":
            if self._templates.get(template.key) is template:
                del self._templates[template.key]
            if template.state == "unsafe":
                await self._stop_template(template)

    async def _fork_from(self, template: _Template, replica: _LocalReplica) -> None:
        try:
            await self._fork_or_fall_back(template, replica)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. the template or a standby died mid-handshake: the replica failed to start
            log.exception("starting replica %s failed", replica.handle.id)
            if replica.child is None:
                replica.exit = ReplicaExit(returncode=1, log_tail=f"starting the replica failed: {exc!r}")

    async def _fork_or_fall_back(self, template: _Template, replica: _LocalReplica) -> None:
        await template.loaded.wait()
        if replica.stopped:
            return
        if template.state == "failed":
            shutil.copyfile(template.log_path, replica.log_path)  # its build log: why the model did not load
            code = template.child.poll()
            replica.exit = ReplicaExit(returncode=code if code is not None else -signal.SIGKILL,
                                       log_tail=_tail(template.log_path, LOG_TAIL_LINES))
            return
        if template.state == "ready":
            # The replica's log starts with its template's: the model load is its build log too.
            shutil.copyfile(template.log_path, replica.log_path)
            args = self._args(replica)
            async with template.lock:
                reply = None
                if template.child.poll() is None and not replica.stopped:
                    replica.forking = True
                    try:
                        await template.channel.send(op="fork", replica=args.to_json(), log=str(replica.log_path))
                        reply = await template.channel.recv()
                    finally:
                        replica.forking = False
            if replica.stopped and reply is None:
                return
            if reply is not None and "pid" in reply:
                template.forks += 1
                replica.child = Child(int(reply["pid"]))
                if replica.stopped:
                    await replica.child.stop(2.0)
                return
            log.warning("template of %s could not fork (%s); starting a process instead", template.key[:2],
                        reply.get("error") if reply else f"it exited with {template.child.poll()}")
            if self._templates.get(template.key) is template:
                del self._templates[template.key]
                asyncio.get_running_loop().create_task(self._stop_template(template))
        await self._start_process(replica)

    def _retire_templates(self, entity_uid: str, keep: tuple[Any, ...]) -> None:
        """The entity's other templates (started before one of its secrets changed) fork no more."""
        for k in [k for k in self._templates if entity_uid and k[-1] == entity_uid and k != keep]:
            asyncio.get_running_loop().create_task(self._stop_template(self._templates.pop(k)))

    async def _stop_template(self, template: _Template) -> None:
        template.channel.close()  # a template exits when its channel closes
        await template.child.stop(grace_s=5.0)

    # The warm and fresh paths
    def _take_standby(self) -> Any:
        if self.pool is None:
            return None
        self.pool.note_demand()
        return self.pool.take()

    def _args(self, replica: _LocalReplica) -> ReplicaArgs:
        spec, limits = replica.spec, self.payload_limits
        return ReplicaArgs(replica.handle.id, spec.entity_name, replica.socket_path, spec.max_concurrency,
                           spec.model_uri, limits.max_rows, limits.max_json_depth)

    async def _start_process(self, replica: _LocalReplica) -> None:
        spec = replica.spec
        args = self._args(replica)
        memory_limit = spec.memory_limit_mb * 2**20
        standby = self._take_standby()
        if standby is not None:
            env = {**THREAD_ENV_DEFAULTS, **spec.environment_vars}
            await standby.channel.send(op="replica", replica=args.to_json(), log=str(replica.log_path), env=env,
                                       memory_limit_bytes=memory_limit)
            if (await standby.channel.recv()) is not None:  # {"event": "assigned"}
                standby.channel.close()
                replica.child, replica.path = standby.child, "warm"
                return
            standby.channel.close()
        env = {**inherited_env(), **THREAD_ENV_DEFAULTS, **spec.environment_vars, "PYTHONUNBUFFERED": "1"}
        cmd = [self.python, "-m", "berth.replica", "--model-uri", spec.model_uri, "--socket", replica.socket_path,
               "--replica-id", replica.handle.id, "--name", spec.entity_name,
               "--max-concurrency", str(spec.max_concurrency), "--max-rows", str(args.max_rows),
               "--max-json-depth", str(args.max_json_depth)]
        replica.child = spawn(cmd, replica.log_path, env, _model_setup(memory_limit))
        replica.path = "fresh"
        replica.handle = ReplicaHandle(replica.handle.id, replica.handle.address, replica.child.pid)


def _template_key(spec: ReplicaSpec) -> tuple[Any, ...]:
    """Replicas that may fork from one template: the same served entity (a new version or a new entity
    gets a template of its own, even from a rewritten model directory), environment and memory limit."""
    return (spec.endpoint_name, spec.entity_name, spec.model_uri, spec.runtime,
            tuple(sorted(spec.environment_vars.items())), spec.memory_limit_mb, spec.entity_uid)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            return b"".join(deque(f, maxlen=lines)).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _wait_dead(proc: psutil.Process, timeout: float) -> None:
    """Wait for a killed process that is not our child: a zombie its reaper has not collected yet
    (an orphan's init may never reap it) is dead too, where psutil's wait would time out on it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        if time.monotonic() > deadline:
            raise psutil.TimeoutExpired(timeout, proc.pid)
        time.sleep(0.02)
