"""The replica's HTTP server: a raw ASGI app (no framework) served by uvicorn on a Unix socket.

Predictions run on one worker thread (one GIL-bound worker per replica, one replica per core).
Requests that arrive while it is busy wait together and go to the model as one batch when it is
free: batch size grows with load, with no timer to tune.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import orjson

from berth.http import Receive, Scope, Send, header, read_body, send_response
from berth.replica.scoring import Scorer, ScoringResult

_PING_HEADERS = [(b"content-type", b"application/json")]

Pending = tuple[bytes, str, "asyncio.Future[ScoringResult]"]


class Batcher:
    """Feeds the model from a queue: whatever waited while it was busy becomes its next batch."""

    def __init__(self, scorer: Scorer, max_batch: int) -> None:
        self.scorer = scorer
        self.max_batch = max(1, max_batch)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self._pending: deque[Pending] = deque()
        self._busy = False

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, body: bytes, content_type: str) -> ScoringResult:
        future: asyncio.Future[ScoringResult] = asyncio.get_running_loop().create_future()
        self._pending.append((body, content_type, future))
        if not self._busy:
            self._next()
        return await future

    def _next(self) -> None:
        if not self._pending:
            self._busy = False
            return
        self._busy = True
        batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        done = asyncio.get_running_loop().run_in_executor(self.executor, self._score, batch)
        done.add_done_callback(lambda f: self._finish(batch, f))

    def _score(self, batch: list[Pending]) -> list[ScoringResult]:
        if len(batch) == 1:
            return [self.scorer.score(batch[0][0], batch[0][1])]
        return self.scorer.score_many([(body, ctype) for body, ctype, _ in batch])

    def _finish(self, batch: list[Pending], done: asyncio.Future[list[ScoringResult]]) -> None:
        error = done.exception()
        results = done.result() if error is None else [None] * len(batch)
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]
        self._next()


class ReplicaApp:
    """Serves `/invocations`, `/ping`, `/health` and `/stats` for one loaded model."""

    def __init__(self, scorer: Scorer, replica_id: str, name: str, max_concurrency: int = 1) -> None:
        self.scorer = scorer
        self.replica_id = replica_id
        self.name = name
        self.batcher = Batcher(scorer, max_batch=max_concurrency)
        self.requests = 0
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        method = scope["method"]
        if path == "/invocations" and method == "POST":
            await self._invocations(scope, receive, send)
        elif path in ("/ping", "/health") and method == "GET":
            await send_response(send, 200, b"\n", _PING_HEADERS)
        elif path == "/stats" and method == "GET":
            await send_response(send, 200, orjson.dumps(self.stats()), _PING_HEADERS)
        else:
            await send_response(send, 404, b'{"error_code":"NOT_FOUND","message":"Not found"}', _PING_HEADERS)

    def stats(self) -> dict[str, object]:
        return {
            "replica_id": self.replica_id,
            "name": self.name,
            "pid": os.getpid(),
            "requests": self.requests,
            "in_flight": self.in_flight,
            "queued": self.batcher.queued,
            "batches": self.scorer.batches,
            "batched_requests": self.scorer.batched_requests,
            "largest_batch": self.scorer.largest_batch,
        }

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        content_type = (header(scope, b"content-type") or b"").decode("latin-1")
        self.in_flight += 1
        try:
            result = await self.batcher.submit(body, content_type)
        finally:
            self.in_flight -= 1
            self.requests += 1
        await send_response(send, result.status, result.body, [(b"content-type", result.content_type.encode())])
