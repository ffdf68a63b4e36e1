"""The replica's HTTP server: a raw ASGI app (no framework) served by uvicorn on a Unix socket.

Predictions run on a pool of worker threads sized to the replica's concurrency, so the event
loop stays free to accept and answer connections while models compute or wait.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import orjson

from berth.http import Receive, Scope, Send, header, read_body, send_response
from berth.replica.scoring import Scorer

_PING_HEADERS = [(b"content-type", b"application/json")]


class ReplicaApp:
    """Serves `/invocations`, `/ping`, `/health` and `/stats` for one loaded model."""

    def __init__(self, scorer: Scorer, replica_id: str, name: str, max_concurrency: int = 1) -> None:
        self.scorer = scorer
        self.replica_id = replica_id
        self.name = name
        # As many predictions run at once as the replica admits: its share of provisioned concurrency.
        self.executor = ThreadPoolExecutor(max_workers=max(1, max_concurrency), thread_name_prefix="predict")
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
            stats = {
                "replica_id": self.replica_id,
                "name": self.name,
                "pid": os.getpid(),
                "requests": self.requests,
                "in_flight": self.in_flight,
            }
            await send_response(send, 200, orjson.dumps(stats), _PING_HEADERS)
        else:
            await send_response(send, 404, b'{"error_code":"NOT_FOUND","message":"Not found"}', _PING_HEADERS)

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        content_type = (header(scope, b"content-type") or b"").decode("latin-1")
        self.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self.executor, self.scorer.score, body, content_type)
        finally:
            self.in_flight -= 1
            self.requests += 1
        await send_response(
            send, result.status, result.body, [(b"content-type", result.content_type.encode())]
        )
