"""Admission: each served entity takes at most its provisioned concurrency in flight, plus a queue
bounded to about one service time of work; beyond that a request is refused at once (429).

The queue's head waits at the replicas, not here: each replica may hold up to twice its concurrency,
one model call's worth running and one forming the next batch (`AHEAD`), so a call that ends finds
the next one's requests already there. With the slots refilled from the gateway instead, a replica
starts its next call on the few that arrived while the gateway was still reading the answers, and
its batches alternate k and c − k (half full on average: BENCHMARKS.md, "Overload"). The gateway's
own queue holds the rest of the bound: none with the default budget of one service time.

`decide` is the pure rule. `Admission` holds one entity's counts and its FIFO of waiting requests in
a gateway process (asyncio, no I/O): a finished request hands its slot straight to the oldest waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
from collections import deque
from dataclasses import dataclass

EWMA_WEIGHT = 0.1  # of each new service time in the running estimate
AHEAD = 2  # requests sent on to the replicas per slot of provisioned concurrency: one running, one forming


class Verdict(enum.Enum):
    RUN = "run"  # a slot is free: send it now
    QUEUE = "queue"  # wait for a slot
    REFUSE = "refuse"  # 429 RESOURCE_EXHAUSTED


def queue_bound(capacity: int, service_s: float | None, remaining_s: float, budget_s: float | None = None) -> int:
    """How many requests may wait: capacity (requests/s = slots ÷ service time) × min(remaining
    deadline, queue-wait budget), the budget one observed service time unless given. So the queue
    holds about the provisioned concurrency; none when the deadline would pass in the queue."""
    if capacity <= 0:
        return 0
    if service_s is None or service_s <= 0:  # nothing observed yet: one service time's worth is the capacity
        return capacity
    wait_s = min(remaining_s, service_s if budget_s is None else budget_s)
    return max(0, math.floor(capacity * wait_s / service_s))


def decide(in_flight: int, queued: int, capacity: int, service_s: float | None, remaining_s: float,
           budget_s: float | None = None) -> Verdict:
    """Run (send it on to a replica), queue or refuse a request arriving now. `in_flight` counts what
    the replicas hold: the capacity running and, of the queue bound, up to (`AHEAD` − 1) × capacity
    forming their next calls; the rest of the bound waits here."""
    bound = queue_bound(capacity, service_s, remaining_s, budget_s)
    ahead = min((AHEAD - 1) * capacity, bound)
    if in_flight < capacity + ahead and queued == 0:
        return Verdict.RUN
    if queued < bound - ahead:
        return Verdict.QUEUE
    return Verdict.REFUSE


def retry_after_s(queued: int, capacity: int, service_s: float | None) -> int:
    """Whole seconds until the queue ahead has likely drained (at least 1)."""
    if capacity <= 0 or service_s is None:
        return 1
    return max(1, math.ceil((queued + 1) * service_s / capacity))


@dataclass
class Admission:
    """One served entity's admission state in one gateway process."""

    capacity: int = 0  # provisioned concurrency of its ready replicas (this process's share)
    in_flight: int = 0  # sent on to a replica: at most AHEAD × capacity
    service_s: float | None = None  # running estimate of one request's time at a replica
    rejected: int = 0  # refusals so far (the autoscaler counts them as demand)

    def __post_init__(self) -> None:
        self.waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self.waiters)

    def decide(self, remaining_s: float, budget_s: float | None = None) -> Verdict:
        verdict = decide(self.in_flight, len(self.waiters), self.capacity, self.service_s, remaining_s, budget_s)
        if verdict is Verdict.RUN:
            self.in_flight += 1
        elif verdict is Verdict.REFUSE:
            self.rejected += 1
        return verdict

    def enqueue(self) -> asyncio.Future[None]:
        """A future that resolves when the request holds a slot (cancel it to leave the queue)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return waiter

    def leave(self, waiter: asyncio.Future[None]) -> None:
        """A waiter gives up (deadline, disconnect); if it had just been handed a slot, pass it on."""
        if waiter.done() and not waiter.cancelled():
            self.release(None)
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    def release(self, service_s: float | None) -> None:
        """A request finished (`service_s`: its time at the replica, if it got there): hand the slot on."""
        if service_s is not None:
            self.service_s = service_s if self.service_s is None else \
                self.service_s + EWMA_WEIGHT * (service_s - self.service_s)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                if self.in_flight <= AHEAD * self.capacity:  # the slot goes on (in flight stays the same)
                    waiter.set_result(None)
                    return
                self.waiters.appendleft(waiter)  # capacity shrank: this slot is gone
                break
        self.in_flight -= 1

    def resize(self, capacity: int) -> None:
        """New ready replicas (or fewer): more room lets waiters in at once."""
        self.capacity = capacity
        while self.waiters and self.in_flight < AHEAD * capacity:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)
