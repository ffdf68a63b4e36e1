"""Shared raw-ASGI helpers: the one place Berth errors become HTTP responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from berth.errors import BerthError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = b"application/json"


def error_body(exc: BerthError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, Databricks-shaped JSON body and headers (with Retry-After when set) for an error."""
    headers = [(b"content-type", JSON)]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    return exc.http_status, orjson.dumps(exc.to_dict()), headers


async def send_response(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: BerthError) -> None:
    await send_response(send, *error_body(exc))


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks = [body]
    while message.get("more_body"):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None
