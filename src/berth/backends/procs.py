"""Process plumbing the local backend shares between its replica paths.

- `Child`: a process of this server, started by `subprocess.Popen` or forked by a template and
  adopted (this process is a child subreaper), polled and signalled the same way.
- `AsyncChannel`: the backend's end of a control socket (JSON lines; the process's end is
  `berth.replica.launch.Channel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from berth.process import disown, own

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (replicas forked by templates) instead of init. Linux only."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


class Child:
    """One child process: a `Popen`, or a bare pid this process adopted."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self.returncode: int | None = None
        own(pid)

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.popen is not None:
            self.returncode = self.popen.poll()
        else:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours (any more): gone, and its status is lost
                self.returncode = -signal.SIGKILL
            else:
                if pid == 0:
                    return None
                self.returncode = os.waitstatus_to_exitcode(status)
        if self.returncode is not None:
            disown(self.pid)
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; returns once the process is gone."""
        self.signal(signal.SIGTERM)
        if await self.wait(grace_s):
            return
        self.signal(signal.SIGKILL)
        await self.wait(30.0)

    async def wait(self, timeout_s: float) -> bool:
        """True once the process has exited (reaped), False after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = 0.002
        while self.poll() is None:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(0.05, delay * 2)
        return True


class AsyncChannel:
    """JSON lines over one end of a socketpair, on the event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> AsyncChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    async def send(self, **message: Any) -> None:
        self.writer.write(orjson.dumps(message) + b"\n")
        await self.writer.drain()

    async def recv(self) -> dict[str, Any] | None:
        """The next message, or None once the process closed its end (exited)."""
        try:
            line = await self.reader.readline()
        except (ConnectionError, ValueError):
            return None
        return orjson.loads(line) if line else None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def spawn(cmd: list[str], log_path: Path, env: dict[str, str], preexec: Callable[[], None],
          pass_fds: tuple[int, ...] = ()) -> Child:
    """Start `cmd` in its own session, output appended to `log_path`, `preexec` between fork and exec.

    Call it on the event loop's thread: PR_SET_PDEATHSIG (in `berth.process.child_setup`) fires when
    the thread that forked exits, so a worker thread would take the process down with it."""
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=preexec, pass_fds=pass_fds,
        )
    return Child(popen.pid, popen)


def control_pair() -> tuple[socket.socket, socket.socket]:
    """(our end, the child's end): the child's end is inheritable, to pass with `pass_fds`."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.set_inheritable(True)
    return ours, theirs
