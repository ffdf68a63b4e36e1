"""Rate-limit windows shared by the gateway processes of one host: one memory-mapped ring per key.

Each key's ring lives in a file of the host's gateway run directory: a header (capacity, head) and
`capacity` int64 slots of admission times in nanoseconds of the host's monotonic clock (the same in
every process). A check-and-record takes an exclusive `flock` on the files of every window the
request counts in (in a fixed order, so two processes never deadlock), runs the pure
`berth.ratelimit.window` functions on the mapped slots, and lets go: two system calls per key, no
server, exact across processes. The kernel drops a lock when its holder dies. Files only grow
(another process may have them mapped; a lower limit looks at fewer of the slots).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import mmap
import os
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from berth.ratelimit import window

_HEADER = struct.Struct("=qq")  # capacity, head
_SLOT = struct.Struct("=q")
NS = 1_000_000_000


class _Slots:
    """`calls` int64 slots of a mapped ring, as the mutable sequence `berth.ratelimit.window` works on."""

    __slots__ = ("calls", "map")

    def __init__(self, mapped: mmap.mmap, calls: int) -> None:
        self.map = mapped
        self.calls = calls

    def __len__(self) -> int:
        return self.calls

    def __getitem__(self, i: int) -> int:
        return _SLOT.unpack_from(self.map, _HEADER.size + _SLOT.size * i)[0]  # type: ignore[no-any-return]

    def __setitem__(self, i: int, value: int) -> None:
        _SLOT.pack_into(self.map, _HEADER.size + _SLOT.size * i, value)


class _Ring:
    """One key's file, mapped in this process."""

    __slots__ = ("fd", "map", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.map: mmap.mmap | None = None

    def _mapped(self, size: int) -> mmap.mmap:
        if self.map is None or len(self.map) != size:  # new here, or another process grew the file
            if self.map is not None:
                self.map.close()
            self.map = mmap.mmap(self.fd, size)
        return self.map

    def _write(self, mapped: mmap.mmap, times: list[int]) -> None:
        _HEADER.pack_into(mapped, 0, len(times), 0)
        struct.pack_into(f"={len(times)}q", mapped, _HEADER.size, *times)

    def locked_slots(self, calls: int, now: int, window_ns: int) -> tuple[_Slots, int]:
        """Under the caller's flock: the ring's slots, with the room a request at `now` needs
        (`window.room`), and its head."""
        size = os.fstat(self.fd).st_size
        mapped = self._mapped(size) if size >= _HEADER.size else None
        capacity, head = _HEADER.unpack_from(mapped, 0) if mapped is not None else (0, 0)
        if capacity < 1 or size < _HEADER.size + capacity * _SLOT.size:  # new, or left half-made by a crash
            capacity = window.initial_slots(calls)
            needed = _HEADER.size + capacity * _SLOT.size
            os.ftruncate(self.fd, needed)
            self._write(self._mapped(needed), [window.EMPTY] * capacity)
            return _Slots(self._mapped(needed), capacity), 0
        slots = _Slots(mapped, capacity)  # type: ignore[arg-type]
        need = window.room(slots, head, calls, now, window_ns)
        if need > capacity:  # the window holds the ring full: grow it, keeping what it holds
            times = list(struct.unpack_from(f"={capacity}q", mapped, _HEADER.size))
            needed = _HEADER.size + need * _SLOT.size
            os.ftruncate(self.fd, needed)
            mapped = self._mapped(needed)
            self._write(mapped, window.grown(times, head, need))
            slots, head = _Slots(mapped, need), 0
        return slots, head

    def set_head(self, head: int) -> None:
        assert self.map is not None
        _SLOT.pack_into(self.map, _SLOT.size, head)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        os.close(self.fd)


class HostLimiter:
    """Exact sliding windows shared through files in `directory` by every process that opens it."""

    def __init__(self, directory: Path, clock_ns: object = time.monotonic_ns) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._clock = clock_ns
        self._rings: dict[str, _Ring] = {}

    def _ring(self, key: str) -> _Ring:
        ring = self._rings.get(key)
        if ring is None:
            name = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
            ring = self._rings[key] = _Ring(self.directory / f"{name}.ring")
        return ring

    @contextlib.contextmanager
    def _locked(self, rings: Sequence[_Ring]) -> Iterator[None]:
        taken: list[_Ring] = []
        try:
            for ring in rings:
                fcntl.flock(ring.fd, fcntl.LOCK_EX)
                taken.append(ring)
            yield
        finally:
            for ring in reversed(taken):
                fcntl.flock(ring.fd, fcntl.LOCK_UN)

    def admit_at(self, windows: Sequence[tuple[str, int, int]], now_ns: int) -> float:
        """Check and record a request at `now_ns` in every (key, calls, window seconds): 0.0 when
        admitted (counted in all), else seconds until it would fit (counted in none)."""
        order = sorted(range(len(windows)), key=lambda i: windows[i][0])
        rings = [self._ring(windows[i][0]) for i in order]
        with self._locked(rings):
            views = []
            longest = 0
            for i, ring in zip(order, rings, strict=True):
                _, calls, seconds = windows[i]
                slots, head = ring.locked_slots(calls, now_ns, seconds * NS)
                longest = max(longest, window.wait(slots, head, calls, now_ns, seconds * NS))
                views.append((ring, slots, head))
            if not longest:
                for ring, slots, head in views:
                    ring.set_head(window.record(slots, head, now_ns))
        return longest / NS

    async def admit(self, windows: Sequence[tuple[str, int, int]]) -> float:
        return self.admit_at(windows, self._clock())  # type: ignore[operator]

    def close(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()


def retry_after(wait_s: float) -> int:
    """Whole seconds for a Retry-After header: never 0 for a refused request."""
    return max(1, math.ceil(wait_s))
