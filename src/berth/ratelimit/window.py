"""The exact sliding-window log: pure functions over a ring of the last `calls` admission times.

A key's ring holds the times of its most recent admissions (at least `calls` of them; `EMPTY` where
there were fewer), the next slot to write at `head`. A request at `now` is admitted iff fewer than
`calls` admissions lie in the window `(now - window, now]`, which is the case iff the `calls`-th most
recent one lies at or before `now - window`; it is then recorded. So no window of that length ever
holds more than `calls` admissions, and a request that fits is never refused — unlike a fixed-window
counter, a two-window approximation or GCRA, which can admit up to twice the limit across a window
boundary.

A ring starts with `INITIAL_SLOTS` (or `calls`, if fewer) and doubles, up to `calls`, only when
recording would overwrite an admission still in the window (`room`): a limit of a million calls a
minute costs memory in proportion to the traffic it actually sees, not to the limit. A ring shorter
than `calls` holds every admission of the window, so fewer than `calls` lie in it: the request fits.

Times are integers in any unit (the window in the same unit): the gateway uses nanoseconds of the
host's monotonic clock, the Redis script microseconds of the server's `TIME`. Integers make the
local ring and the Redis script agree exactly on the same arrivals.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence

EMPTY = -(1 << 62)  # an unused slot: older than any time
INITIAL_SLOTS = 64


def initial_slots(calls: int) -> int:
    return min(calls, INITIAL_SLOTS)


def room(times: Sequence[int], head: int, calls: int, now: int, window: int) -> int:
    """The slots the ring needs before a request at `now` is recorded: more than it has only when it
    is shorter than `calls` and its next slot to overwrite still holds an admission of the window."""
    n = len(times)
    if n >= calls or times[head] <= now - window:
        return n
    return min(calls, 2 * n)


def wait(times: Sequence[int], head: int, calls: int, now: int, window: int) -> int:
    """How long until a request at `now` fits under `calls` (0: it fits now). The ring has the
    `room` the request needs."""
    if len(times) < calls:  # it holds every admission of the window: fewer than `calls`
        return 0
    oldest = times[(head - calls) % len(times)]  # the calls-th most recent admission
    return 0 if oldest <= now - window else oldest + window - now


def record(times: MutableSequence[int], head: int, now: int) -> int:
    """Record an admission at `now` (after `wait` said 0); returns the new head."""
    times[head] = now
    head += 1
    return 0 if head == len(times) else head


def admit(times: MutableSequence[int], head: int, calls: int, now: int, window: int) -> tuple[int, int]:
    """One key: (new head, 0) when admitted and recorded, else (head, time until it would fit). The
    ring has the `room` the request needs."""
    waited = wait(times, head, calls, now, window)
    if waited:
        return head, waited
    return record(times, head, now), 0


def grown(times: Sequence[int], head: int, capacity: int) -> list[int]:
    """The ring with room for `capacity` admissions, in order (head 0). Rings only grow: under a lower
    limit the older entries stay, so raising it again still counts what the window admitted."""
    ordered = [*times[head:], *times[:head]]
    return [EMPTY] * (capacity - len(ordered)) + ordered


class Ring:
    """An in-memory ring for one key (the pure functions above, with their state)."""

    __slots__ = ("calls", "head", "times")

    def __init__(self, calls: int) -> None:
        self.times = [EMPTY] * initial_slots(calls)
        self.head = 0
        self.calls = calls

    def admit(self, now: int, window: int) -> int:
        """0 when admitted, else the time until a request would fit."""
        need = room(self.times, self.head, self.calls, now, window)
        if need > len(self.times):
            self.times, self.head = grown(self.times, self.head, need), 0
        self.head, waited = admit(self.times, self.head, self.calls, now, window)
        return waited

    def resize(self, calls: int) -> None:
        """A new limit: the ring grows when the traffic needs it (`room`); it never shrinks."""
        self.calls = calls
