"""What every child process of the server gets between fork and exec: it dies with the server."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def child_setup(parent_pid: int, memory_limit_bytes: int = 0, nice: int = 0) -> Callable[[], None]:
    """Runs in the child between fork and exec: die with the parent, cap the address space, lower
    the scheduling priority by `nice`."""

    # Load libc here, in the parent: importing between fork and exec can deadlock.
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def setup() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
        if memory_limit_bytes > 0:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
        if nice > 0:
            with contextlib.suppress(OSError):
                os.nice(nice)

    return setup


# Children this process waits for itself (Popen objects, adopted replicas). As a child subreaper
# (`berth.backends.procs.become_subreaper`) it also inherits orphans of its descendants, e.g. the
# worker processes of a replica that died; nobody else waits for those, so `reap_strays` does.
_owned: set[int] = set()


def own(pid: int) -> None:
    """Mark `pid` as a child whose exit status its owner collects (never reaped as a stray)."""
    _owned.add(pid)


def disown(pid: int) -> None:
    _owned.discard(pid)


def reap_strays() -> int:
    """Collect exited children nobody owns; returns how many."""
    import psutil

    reaped = 0
    for child in psutil.Process().children():
        if child.pid in _owned:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            if os.waitpid(child.pid, os.WNOHANG)[0] == child.pid:
                reaped += 1
        except (psutil.Error, ChildProcessError):
            continue
    return reaped
