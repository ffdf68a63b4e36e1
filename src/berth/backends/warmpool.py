"""The warm pool: replica processes started ahead of need, their runtime imports already done.

A standby (`python -m berth.replica --standby`) has imported MLflow, pandas, numpy, scikit-learn and
the replica's own server (~2 s of CPU here) and waits on its control socket. Given an assignment it
loads just the model, as a replica or as a template (`berth.replica.template`).

How many to keep is a pure function of recent demand (`pool_target`): the largest number of new
processes needed within any burst of `burst_s` seconds over the last `window_s`, at least `floor`,
and never more than the memory cap holds at the standbys' measured RSS. A background task refills
and trims the pool toward that target.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from berth.backends.procs import AsyncChannel, Child, control_pair, spawn

log = logging.getLogger("berth.warmpool")

STANDBY_RSS_GUESS_MB = 260.0  # before any standby was measured (import_runtime's RSS here)


@dataclass(frozen=True)
class PoolPolicy:
    """Warm-pool sizing: the floor, the memory cap, and the windows that measure demand."""

    floor: int = 1
    memory_cap_mb: int = 1024
    window_s: float = 300.0
    burst_s: float = 10.0
    tick_s: float = 0.5


def pool_target(demand: Sequence[float], now: float, policy: PoolPolicy, standby_mb: float) -> int:
    """Standbys to keep: the peak of recent demand, at least the floor, within the memory cap.

    `demand` holds the times new processes were needed, in ascending order.
    """
    start = bisect.bisect_left(demand, now - policy.window_s)
    recent = demand[start:]
    peak = 0
    for i, t in enumerate(recent):
        peak = max(peak, bisect.bisect_right(recent, t + policy.burst_s) - i)
    fits = int(policy.memory_cap_mb // max(standby_mb, 1.0))
    return max(0, min(max(policy.floor, peak), fits))


@dataclass
class Standby:
    child: Child
    channel: AsyncChannel
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    rss_mb: float = 0.0


class WarmPool:
    """Keeps standby processes ready; `take()` hands one out, the background task refills."""

    def __init__(
        self,
        python: str,
        log_dir: Path,
        policy: PoolPolicy,
        *,
        env: dict[str, str],
        preexec: Callable[[], None],
    ) -> None:
        self.python = python
        self.log_dir = log_dir
        self.policy = policy
        self.env = env
        self.preexec = preexec
        self.standbys: list[Standby] = []
        self.demand: deque[float] = deque()
        self.spawned = 0
        self.taken = 0
        self._standby_mb = STANDBY_RSS_GUESS_MB
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # What the backend calls
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="berth-warm-pool")

    def note_demand(self) -> None:
        """A new process was needed (a replica or a template): the pool sizes itself on these."""
        self.demand.append(time.monotonic())
        self._wake.set()

    def take(self) -> Standby | None:
        """A ready standby, now the caller's; None when none is ready."""
        for standby in self.standbys:
            if standby.ready and standby.child.poll() is None:
                self.standbys.remove(standby)
                self.taken += 1
                self._wake.set()
                return standby
        return None

    @property
    def standby_mb(self) -> float:
        """The standbys' RSS as last measured (a guess before the first one is ready)."""
        return self._standby_mb

    @property
    def target(self) -> int:
        return pool_target(list(self.demand), time.monotonic(), self.policy, self._standby_mb)

    def total_rss_mb(self) -> float:
        return sum(s.rss_mb for s in self.standbys)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        standbys, self.standbys = self.standbys, []
        for standby in standbys:
            standby.channel.close()  # a standby exits when its channel closes
        await asyncio.gather(*(s.child.stop(grace_s=2.0) for s in standbys))

    # The background task
    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except Exception:
                log.exception("warm pool step failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.policy.tick_s)

    async def _step(self) -> None:
        now = time.monotonic()
        while self.demand and now - self.demand[0] > self.policy.window_s:
            self.demand.popleft()
        for standby in list(self.standbys):
            if standby.child.poll() is not None:
                self.standbys.remove(standby)
                log.warning("standby %d exited with %s", standby.child.pid, standby.child.returncode)
        self._measure()
        target = self.target
        if len(self.standbys) < target:
            # One at a time: a standby's imports take a core for ~2 s, and replicas need the cores more.
            if all(s.ready for s in self.standbys):
                await self._spawn()
        elif len(self.standbys) > target:
            extra = sorted(self.standbys, key=lambda s: (s.ready, s.started_at))[: len(self.standbys) - target]
            for standby in extra:
                self.standbys.remove(standby)
                standby.channel.close()
            await asyncio.gather(*(s.child.stop(grace_s=2.0) for s in extra))

    def _measure(self) -> None:
        sizes = []
        for standby in self.standbys:
            if not standby.ready:
                continue
            with contextlib.suppress(psutil.Error):
                standby.rss_mb = psutil.Process(standby.child.pid).memory_info().rss / 2**20
                sizes.append(standby.rss_mb)
        if sizes:
            self._standby_mb = max(sizes)

    async def _spawn(self) -> None:
        ours, theirs = control_pair()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"standby-{self.spawned}-{os.getpid()}.log"
        cmd = [self.python, "-m", "berth.replica", "--standby", "--control-fd", str(theirs.fileno())]
        try:
            child = spawn(cmd, log_path, self.env, self.preexec, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.spawned += 1
        standby = Standby(child, await AsyncChannel.open(ours), log_path)
        self.standbys.append(standby)
        asyncio.get_running_loop().create_task(self._await_ready(standby))

    async def _await_ready(self, standby: Standby) -> None:
        message = await standby.channel.recv()
        if message is not None and message.get("event") == "standby":
            standby.ready = True
        self._wake.set()
