"""Admission: the pure rule (capacity in flight, a queue of about one service time, then refuse) and
one entity's state handing slots from finished requests to the oldest waiter."""

from __future__ import annotations

import asyncio

from berth.gateway.admission import Admission, Verdict, decide, queue_bound, retry_after_s


def test_the_queue_holds_one_service_time_of_work() -> None:
    # capacity 8 slots at 20 ms each = 400 requests/s; one service time (20 ms) of that = 8 requests
    assert queue_bound(8, 0.020, remaining_s=297.0) == 8
    assert queue_bound(8, None, remaining_s=297.0) == 8  # nothing observed yet: the same
    assert queue_bound(8, 0.020, remaining_s=0.010) == 4  # only half a service time left before the deadline
    assert queue_bound(8, 0.020, remaining_s=0.0) == 0
    assert queue_bound(8, 0.020, remaining_s=297.0, budget_s=0.040) == 16  # a larger budget, if configured
    assert queue_bound(0, 0.020, remaining_s=297.0) == 0


def test_decide_runs_then_queues_then_refuses() -> None:
    verdicts = [decide(in_flight, queued, 4, 0.02, 297.0) for in_flight, queued in
                [(0, 0), (3, 0), (4, 0), (4, 3), (4, 4), (2, 1)]]
    assert verdicts == [Verdict.RUN, Verdict.RUN, Verdict.QUEUE, Verdict.QUEUE, Verdict.REFUSE, Verdict.QUEUE]


def test_retry_after_is_whole_seconds_and_never_zero() -> None:
    assert retry_after_s(4, 4, 0.02) == 1
    assert retry_after_s(99, 4, 0.5) == 13
    assert retry_after_s(0, 0, None) == 1


def test_slots_pass_to_the_oldest_waiter_and_nothing_leaks() -> None:
    async def scenario() -> None:
        adm = Admission(capacity=2)
        assert [adm.decide(297.0) for _ in range(2)] == [Verdict.RUN, Verdict.RUN]
        assert adm.decide(297.0) is Verdict.QUEUE
        first = adm.enqueue()
        assert adm.decide(297.0) is Verdict.QUEUE
        second = adm.enqueue()
        assert adm.decide(297.0) is Verdict.REFUSE  # 2 in flight + 2 queued
        assert adm.rejected == 1
        adm.leave(second)  # its client went away
        assert adm.queued == 1
        adm.release(0.02)  # a request finished: its slot goes to the first waiter
        assert first.done()
        assert adm.in_flight == 2
        assert adm.queued == 0
        adm.release(0.02)
        adm.release(0.02)
        assert adm.in_flight == 0
        assert adm.service_s is not None

        # Fewer replicas: slots freed above the new capacity are not handed on.
        adm = Admission(capacity=2)
        adm.decide(297.0), adm.decide(297.0)
        waiter = adm.enqueue()
        adm.resize(1)
        adm.release(None)
        assert not waiter.done()
        assert adm.in_flight == 1
        adm.resize(3)  # more replicas: the waiter gets in at once
        assert waiter.done()
        assert adm.in_flight == 2

        # A waiter handed a slot just as it gives up passes the slot on.
        adm = Admission(capacity=1)
        adm.decide(297.0)
        late, next_one = adm.enqueue(), adm.enqueue()
        adm.release(None)
        assert late.done()
        adm.leave(late)
        assert next_one.done()
        assert adm.in_flight == 1

    asyncio.run(scenario())
