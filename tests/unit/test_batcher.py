"""The replica's batcher with a fake scorer on a real event loop: batches form from what waited, never
exceed the cap, every request is answered once with its own result, and model calls run on the loop
when they are short and on the predict thread when they are long."""

from __future__ import annotations

import asyncio
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from berth.replica.scoring import ScoringResult
from berth.replica.server import INLINE_CALL_S, Batcher


class FakeScorer:
    """Echoes each body; one model call per batch taking `call_s` (slept, so it releases the GIL)."""

    def __init__(self, call_s: float) -> None:
        self.call_s = call_s
        self.model_call_s = 0.0
        self.batches: list[int] = []
        self.threads: list[str] = []

    def _call(self, n: int) -> None:
        self.batches.append(n)
        self.threads.append(threading.current_thread().name)
        if self.call_s:
            time.sleep(self.call_s)
        self.model_call_s += max(self.call_s, 1e-6)

    def score(self, body: bytes, content_type: str) -> ScoringResult:
        self._call(1)
        return ScoringResult(200, body, content_type)

    def score_many(self, requests: list[tuple[bytes, str]]) -> list[ScoringResult]:
        self._call(len(requests))
        return [ScoringResult(200, body, ctype) for body, ctype in requests]


async def run_waves(batcher: Batcher, waves: list[int]) -> list[bytes]:
    """Submit `waves[i]` requests in loop iteration i (a sleep(0) between waves); return the answers."""
    answers: list[bytes] = []
    done = asyncio.get_running_loop().create_future()
    total = sum(waves)
    sent = 0

    def on_done(result: ScoringResult) -> None:
        answers.append(result.body)
        if len(answers) == total and not done.done():
            done.set_result(None)

    for n in waves:
        for _ in range(n):
            batcher.submit(str(sent).encode(), "application/json", on_done)
            sent += 1
        await asyncio.sleep(0)
    if total:
        await asyncio.wait_for(done, 30)
    return answers


def test_requests_of_one_loop_iteration_share_a_call_up_to_the_cap() -> None:
    scorer = FakeScorer(call_s=0.0)
    answers = asyncio.run(run_waves(Batcher(scorer, max_batch=4), [10]))  # type: ignore[arg-type]
    assert sorted(answers, key=int) == [str(i).encode() for i in range(10)]
    assert scorer.batches == [4, 4, 2]


def test_short_calls_move_to_the_loop_and_long_calls_stay_on_the_thread() -> None:
    fast = FakeScorer(call_s=0.0)
    asyncio.run(run_waves(Batcher(fast, max_batch=8), [1, 0, 0, 3, 0, 0, 5]))  # type: ignore[arg-type]
    assert fast.threads[0].startswith("predict")  # unknown duration: the thread first
    assert set(fast.threads[1:]) == {"MainThread"}

    slow = FakeScorer(call_s=INLINE_CALL_S * 3)
    asyncio.run(run_waves(Batcher(slow, max_batch=8), [1, 0, 0, 3, 0, 0, 5]))  # type: ignore[arg-type]
    assert all(name.startswith("predict") for name in slow.threads)


@settings(max_examples=60, deadline=None)
@given(waves=st.lists(st.integers(0, 12), min_size=1, max_size=12), cap=st.integers(1, 9),
       call_s=st.sampled_from([0.0, 0.004]))
def test_every_request_is_answered_once_with_its_own_result(waves: list[int], cap: int, call_s: float) -> None:
    scorer = FakeScorer(call_s)
    answers = asyncio.run(run_waves(Batcher(scorer, max_batch=cap), waves))  # type: ignore[arg-type]
    assert sorted(answers, key=int) == [str(i).encode() for i in range(sum(waves))]
    assert sum(scorer.batches) == sum(waves)
    assert max(scorer.batches, default=1) <= cap
