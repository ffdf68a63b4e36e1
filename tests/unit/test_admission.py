"""Admission: the pure rule (capacity running and as many more forming the replicas' next batches, a
queue of about one service time in all, then refuse) and one entity's state handing slots from
finished requests to the oldest waiter."""

from __future__ import annotations

import asyncio

from berth.gateway.admission import AHEAD, Admission, Verdict, decide, queue_bound, retry_after_s


def test_the_queue_holds_one_service_time_of_work() -> None:
    # capacity 8 slots at 20 ms each = 400 requests/s; one service time (20 ms) of that = 8 requests
    assert queue_bound(8, 0.020, remaining_s=297.0) == 8
    assert queue_bound(8, None, remaining_s=297.0) == 8  # nothing observed yet: the same
    assert queue_bound(8, 0.020, remaining_s=0.010) == 4  # only half a service time left before the deadline
    assert queue_bound(8, 0.020, remaining_s=0.0) == 0
    assert queue_bound(8, 0.020, remaining_s=297.0, budget_s=0.040) == 16  # a larger budget, if configured
    assert queue_bound(0, 0.020, remaining_s=297.0) == 0


def test_decide_sends_on_up_to_twice_the_capacity_then_refuses() -> None:
    # capacity 4: 4 running and 4 forming the next batches at the replicas are the whole bound (4 + 4)
    assert AHEAD == 2
    verdicts = [decide(in_flight, 0, 4, 0.02, 297.0) for in_flight in (0, 3, 4, 7, 8)]
    assert verdicts == [Verdict.RUN] * 4 + [Verdict.REFUSE]
    assert decide(0, 0, 0, None, 297.0) is Verdict.REFUSE  # no ready replica's concurrency: nothing admitted
    # Half a service time of budget (or of deadline left): only 2 may wait, at the replicas.
    assert [decide(n, 0, 4, 0.02, 297.0, budget_s=0.010) for n in (5, 6)] == [Verdict.RUN, Verdict.REFUSE]
    assert [decide(n, 0, 4, 0.02, remaining_s=0.010) for n in (5, 6)] == [Verdict.RUN, Verdict.REFUSE]


def test_a_longer_budget_queues_the_rest_in_the_gateway() -> None:
    # budget 40 ms = two service times: a bound of 8, of which 4 wait at the replicas and 4 here
    verdicts = [decide(in_flight, queued, 4, 0.02, 297.0, budget_s=0.040) for in_flight, queued in
                [(7, 0), (8, 0), (8, 3), (8, 4), (2, 1)]]
    assert verdicts == [Verdict.RUN, Verdict.QUEUE, Verdict.QUEUE, Verdict.REFUSE, Verdict.QUEUE]
    assert decide(8, 0, 4, 0.02, remaining_s=0.030, budget_s=0.040) is Verdict.QUEUE  # 6 − 4 = 2 may wait
    assert decide(8, 0, 4, 0.02, remaining_s=0.020, budget_s=0.040) is Verdict.REFUSE  # 4 − 4: none


def test_retry_after_is_whole_seconds_and_never_zero() -> None:
    assert retry_after_s(4, 4, 0.02) == 1
    assert retry_after_s(99, 4, 0.5) == 13
    assert retry_after_s(0, 0, None) == 1


def test_slots_pass_to_the_oldest_waiter_and_nothing_leaks() -> None:
    async def scenario() -> None:
        # 2 sent on (1 running, 1 forming); a budget of 3 service times of 20 ms: 2 more queue here
        adm = Admission(capacity=1, service_s=0.02)
        budget = 0.06
        assert [adm.decide(297.0, budget) for _ in range(2)] == [Verdict.RUN, Verdict.RUN]
        assert adm.decide(297.0, budget) is Verdict.QUEUE
        first = adm.enqueue()
        assert adm.decide(297.0, budget) is Verdict.QUEUE
        second = adm.enqueue()
        assert adm.decide(297.0, budget) is Verdict.REFUSE  # 2 sent on + 2 queued
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
        adm = Admission(capacity=1)
        adm.in_flight = 2
        waiter = adm.enqueue()
        adm.resize(0)
        adm.release(None)
        assert not waiter.done()
        assert adm.in_flight == 1
        adm.resize(1)  # more replicas: the waiter gets in at once
        assert waiter.done()
        assert adm.in_flight == 2

        # A waiter handed a slot just as it gives up passes the slot on.
        adm = Admission(capacity=1)
        adm.in_flight = 2
        late, next_one = adm.enqueue(), adm.enqueue()
        adm.release(None)
        assert late.done()
        adm.leave(late)
        assert next_one.done()
        assert adm.in_flight == 2

    asyncio.run(scenario())
