"""Local backend: each replica is a child process on this host, reached over a Unix socket.

Replicas die with the server (PR_SET_PDEATHSIG on Linux), run in their own session so a
terminal's Ctrl-C reaches only the server (which then stops them in order), and carry an
address-space limit (RLIMIT_AS) as their memory limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil

from berth.backends.base import ReplicaExit, ReplicaHandle, ReplicaSpec
from berth.process import child_setup

THREAD_ENV_DEFAULTS = {
    # One GIL-bound replica per core: native thread pools inside it only fight each other.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
LOG_TAIL_LINES = 30


@dataclass
class _LocalReplica:
    handle: ReplicaHandle
    spec: ReplicaSpec
    proc: subprocess.Popen[bytes]
    socket_path: str
    log_path: Path


class LocalBackend:
    """Runs replicas as subprocesses of this server."""

    def __init__(self, log_dir: Path, *, python: str | None = None) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.python = python or sys.executable
        # Unix socket paths are limited to ~107 bytes: keep them short, outside the data dir.
        self.socket_dir = tempfile.mkdtemp(prefix="berth-")
        self._replicas: dict[str, _LocalReplica] = {}

    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        replica_id = uuid.uuid4().hex[:12]
        socket_path = os.path.join(self.socket_dir, f"{replica_id}.sock")
        log_path = self.log_dir / f"{replica_id}.log"
        env = dict(os.environ)
        for key, value in THREAD_ENV_DEFAULTS.items():
            env.setdefault(key, value)
        env.update(spec.environment_vars)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [
            self.python,
            "-m",
            "berth.replica",
            "--model-uri",
            spec.model_uri,
            "--socket",
            socket_path,
            "--replica-id",
            replica_id,
            "--name",
            spec.entity_name,
            "--max-concurrency",
            str(spec.max_concurrency),
        ]
        memory_limit = spec.memory_limit_mb * 1024 * 1024
        # Popen runs on the event loop's thread on purpose: PR_SET_PDEATHSIG fires when the thread
        # that forked exits, so a worker thread would take the replica down with it.
        with open(log_path, "ab") as log:  # noqa: ASYNC230
            proc = subprocess.Popen(  # noqa: ASYNC220
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=child_setup(os.getpid(), memory_limit),
            )
        handle = ReplicaHandle(id=replica_id, address=f"unix:{socket_path}", pid=proc.pid)
        self._replicas[replica_id] = _LocalReplica(handle, spec, proc, socket_path, log_path)
        return handle

    async def is_ready(self, replica_id: str) -> bool:
        replica = self._replicas.get(replica_id)
        if replica is None or replica.proc.poll() is not None:
            return False
        if not os.path.exists(replica.socket_path):  # noqa: ASYNC240 (a stat of a tmpfs path)
            return False
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(replica.socket_path), timeout=1.0
            )
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(b"GET /ping HTTP/1.1\r\nHost: replica\r\nConnection: close\r\n\r\n")
            status_line = await asyncio.wait_for(reader.readline(), timeout=2.0)
            return status_line.startswith(b"HTTP/1.1 200")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def exited(self, replica_id: str) -> ReplicaExit | None:
        replica = self._replicas.get(replica_id)
        if replica is None:
            return ReplicaExit(returncode=-signal.SIGKILL, log_tail="")
        code = replica.proc.poll()
        if code is None:
            return None
        return ReplicaExit(returncode=code, log_tail=self.logs(replica_id, LOG_TAIL_LINES))

    async def stop(self, replica_id: str, grace_s: float = 10.0) -> None:
        replica = self._replicas.pop(replica_id, None)
        if replica is None:
            return
        proc = replica.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(proc.wait), grace_s)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.to_thread(proc.wait)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(replica.socket_path)

    def logs(self, replica_id: str, max_lines: int = 200) -> str:
        path = self.log_dir / f"{replica_id}.log"
        try:
            with open(path, "rb") as f:
                lines = deque(f, maxlen=max_lines)
        except FileNotFoundError:
            return ""
        return b"".join(lines).decode("utf-8", errors="replace")

    def cleanup_orphans(self, records: list[tuple[str, int | None]]) -> list[str]:
        killed = []
        for replica_id, pid in records:
            if not pid or replica_id in self._replicas:
                continue
            try:
                proc = psutil.Process(pid)
                if f"--replica-id={replica_id}" in proc.cmdline() or replica_id in proc.cmdline():
                    proc.kill()
                    _wait_dead(proc, timeout=10)
                    killed.append(replica_id)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.TimeoutExpired):
                continue
        return killed

    def pids(self) -> dict[str, int]:
        """Process ids of running replicas (for tests and resource accounting only)."""
        return {rid: r.proc.pid for rid, r in self._replicas.items() if r.proc.poll() is None}

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(rid, grace_s=5.0) for rid in list(self._replicas)))
        shutil.rmtree(self.socket_dir, ignore_errors=True)


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
