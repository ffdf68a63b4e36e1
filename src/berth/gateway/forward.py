"""The control plane as seen from a gateway worker process: every request goes, as it came, to the
main process over its internal Unix socket, and the answer comes back as it went.

The main process owns the store, the reconciler and the backend; a worker only serves the data plane
itself. Credentials are forwarded too: the main process checks them again.
"""

from __future__ import annotations

from berth.errors import TemporarilyUnavailable
from berth.gateway.upstream import Upstream, UpstreamError
from berth.http import Receive, Scope, Send, error_body, read_body, send_response

# Response headers that describe the main process's connection, not the answer.
_DROP = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


class ControlForwarder:
    """An ASGI app that relays every HTTP request to `address` (the main process's internal socket)."""

    def __init__(self, address: str, *, timeout_s: float) -> None:
        self.upstream = Upstream(address)
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        target = scope["raw_path"] or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        method = scope["method"].encode()
        if method == b"HEAD":
            method = b"GET"  # the answer's body is dropped on the way out (uvicorn sends none for HEAD)
        try:
            response = await self.upstream.exchange(method, target, scope["headers"], body, self.timeout_s)
        except (UpstreamError, TimeoutError) as exc:
            error = TemporarilyUnavailable(f"The control plane did not answer ({exc or 'timeout'}); retry.",
                                           retry_after=1)
            await send_response(send, *error_body(error))
            return
        headers = [(k, v) for k, v in response.headers if k not in _DROP]
        await send_response(send, response.status, response.body, headers)

    def close(self) -> None:
        self.upstream.close()
