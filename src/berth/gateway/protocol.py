"""uvicorn's httptools protocol with a bound on a request's head while it arrives.

uvicorn over httptools (llhttp) takes a request line and headers of any size: they are held in
memory until the head is complete, and httptools grows a long header by concatenation, so one 50 MB
header costs the gateway ~5 s of CPU (measured with uvicorn 0.55, httptools 0.9). This protocol counts
the bytes read while a request's head is incomplete; once they pass the limit it answers 431 and
closes the connection, having read at most one socket read past the limit. The exact limits (one
header, all of them) are checked by the gateway once the head is complete (`berth.payload.check_head`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from berth.errors import HeadersTooLarge
from berth.payload import DEFAULT_MAX_HEADER_BYTES

LINGER_S = 1.0  # after the refusal, what the client still sends is read (and dropped) this long, so it sees the 431


class HeadLimitedProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that refuses a request head (request line and headers) over `max_head_bytes`."""

    max_head_bytes = DEFAULT_MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a connection starts with a request's head
        self._head_bytes = 0
        self._refused = False

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: dropped
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse()

    def _refuse(self) -> None:
        """Answer 431 and close; reading (and dropping) what the client still sends for `LINGER_S`, since a
        close with unread data resets the connection, and the client could lose the answer."""
        self._refused = True
        error = HeadersTooLarge(f"The request line and headers are over the limit of {self.max_head_bytes} bytes "
                                "(BERTH_MAX_HEADER_KB).")
        body = orjson.dumps(error.to_dict())
        head = [STATUS_LINE[error.http_status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nconnection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def head_limited(max_head_bytes: int) -> type[HeadLimitedProtocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`) for this limit."""
    return type("HeadLimitedProtocol", (HeadLimitedProtocol,), {"max_head_bytes": max_head_bytes})
