"""Pooled keep-alive HTTP/1.1 connections from the gateway to one replica (Unix socket or TCP).

A small asyncio protocol with httptools' response parser: no framework and no per-request
allocation beyond the request bytes and the response it returns.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from dataclasses import dataclass

import httptools

# Headers that describe one connection, not the request: never forwarded.
_HOP_BY_HOP = frozenset(
    {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade", b"te",
     b"proxy-connection", b"expect"}
)


class UpstreamError(Exception):
    """The replica could not be reached, or the connection broke before a full response."""

    def __init__(self, message: str, *, delivered: bool = True) -> None:
        super().__init__(message)
        self.delivered = delivered  # False: the request never reached the replica (safe to retry)


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    content_type: bytes
    body: bytes
    sent_at: float  # perf_counter() when the request was handed to the socket
    received_at: float  # perf_counter() when the response's last byte was parsed
    headers: tuple[tuple[bytes, bytes], ...] = ()  # (lower-cased name, value); only from `exchange`


class _Connection(asyncio.Protocol):
    __slots__ = (
        "chunks", "closed", "content_type", "headers", "keep_alive", "parser", "sent_at", "timer", "transport",
        "waiter",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        self.closed = False
        self.content_type = b"application/json"
        self.chunks: list[bytes] = []
        self.keep_alive = True
        self.sent_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.headers: list[tuple[bytes, bytes]] | None = None  # every header, when the caller asks for them

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"invalid response from replica: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if isinstance(exc, BrokenPipeError | ConnectionResetError) and not self.chunks:
            # The write found the replica's end already closed (a pooled connection to a replica
            # that had just died): nothing reached it, so another replica may take the request.
            self._fail(UpstreamError(f"replica was gone when the request was written ({exc})", delivered=False))
        else:
            self._fail(UpstreamError("replica closed the connection before answering"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value
        if self.headers is not None:
            self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self._stop_timer()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
            waiter.set_result(
                UpstreamResponse(
                    self.parser.get_status_code(), self.content_type, body, self.sent_at, time.perf_counter(),
                    tuple(self.headers) if self.headers is not None else (),
                )
            )

    def _fail(self, exc: Exception) -> None:
        self._stop_timer()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def abandon(self) -> None:
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def _timed_out(self) -> None:
        # The answer may still come: this connection cannot carry another request.
        self.timer = None
        self._fail(TimeoutError())
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes, timeout_s: float, all_headers: bool = False) -> asyncio.Future[UpstreamResponse]:
        """Write one request; the future gets its response, an `UpstreamError`, or `TimeoutError`."""
        assert self.transport is not None
        self.chunks = []
        self.headers = [] if all_headers else None
        self.content_type = b"application/json"
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.timer = loop.call_later(timeout_s, self._timed_out)
        self.sent_at = time.perf_counter()
        self.transport.write(data)
        return self.waiter


class Upstream:
    """A pool of keep-alive connections to one replica address, with an outstanding-request count."""

    def __init__(self, address: str, *, max_idle: int = 256) -> None:
        self.address = address
        self.outstanding = 0
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle
        self._closed = False
        kind, _, target = address.partition(":")
        if kind == "unix":
            self._unix_path: str | None = target
            self._tcp: tuple[str, int] | None = None
        elif kind == "tcp":
            host, _, port = target.rpartition(":")
            self._unix_path = None
            self._tcp = (host.strip("[]"), int(port))
        else:
            raise ValueError(f"unsupported replica address {address!r}")

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if self._unix_path is not None:
                _, conn = await loop.create_unix_connection(_Connection, self._unix_path)
            else:
                assert self._tcp is not None
                _, conn = await loop.create_connection(_Connection, *self._tcp)
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to replica at {self.address}: {exc}", delivered=False
            ) from exc
        return conn

    async def request(
        self, path: bytes, body: bytes, content_type: bytes, timeout_s: float, extra: bytes = b""
    ) -> UpstreamResponse:
        """POST `body` to `path` on a pooled connection (`extra`: more header lines, each ending CRLF).

        Never retried here: once written, the request may be running in the replica, and a
        replica that dies mid-request must answer 503, not run it twice somewhere else. Only a
        failure to connect (`delivered=False`) is safe for the caller to send elsewhere.
        """
        head = b"".join(
            (
                b"POST ", path, b" HTTP/1.1\r\nHost: replica\r\nContent-Type: ",
                content_type, b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n", extra, b"\r\n",
            )
        )
        return await self._roundtrip(head + body, timeout_s, all_headers=False)

    async def exchange(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, timeout_s: float
    ) -> UpstreamResponse:
        """Any request, with its headers (hop-by-hop ones dropped); the response carries all of its own."""
        lines = [method, b" ", target, b" HTTP/1.1\r\nHost: upstream\r\n"]
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                lines += [name, b": ", value, b"\r\n"]
        lines += [b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n", body]
        return await self._roundtrip(b"".join(lines), timeout_s, all_headers=True)

    async def _roundtrip(self, data: bytes, timeout_s: float, *, all_headers: bool) -> UpstreamResponse:
        self.outstanding += 1
        try:
            conn = self._take_idle()
            if conn is None:
                conn = await self._connect()
            try:
                response = await conn.send(data, timeout_s, all_headers)
            except asyncio.CancelledError:
                conn.abandon()  # its answer would come on a connection nobody reads
                raise
            self._give_back(conn)
            return response
        finally:
            self.outstanding -= 1

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    def _give_back(self, conn: _Connection) -> None:
        conn.waiter = None
        if self._closed or conn.closed or not conn.keep_alive or len(self._idle) >= self._max_idle:
            if conn.transport is not None:
                conn.transport.close()
            return
        self._idle.append(conn)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()
