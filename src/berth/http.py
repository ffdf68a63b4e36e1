"""Shared raw-ASGI helpers: the one place Berth errors become HTTP responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from berth.errors import BerthError
from berth.payload import body_too_large

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


async def read_body(receive: Receive, limit: int | None = None, content_length: bytes | None = None) -> bytes:
    """The request's whole body. With `limit` (bytes), a body over it raises `PayloadTooLarge`: at once
    when `content_length` (the header's value) announces one, else as soon as the chunks read pass it,
    so no more than `limit` bytes are ever held (the rest is never read)."""
    if limit is not None and content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise body_too_large(limit)
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        if limit is not None and len(body) > limit:
            raise body_too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def limit_body(receive: Receive, limit: int) -> Receive:
    """`receive` for an app that reads the body itself (the control plane): it raises `PayloadTooLarge`
    once the request's body chunks pass `limit` bytes."""
    seen = 0

    async def limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise body_too_large(limit)
        return message

    return limited


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None
