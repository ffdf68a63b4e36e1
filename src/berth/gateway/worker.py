"""A gateway worker process: `python -m berth.gateway.worker --index N --host H --port P ...`.

It binds the public port beside the main process (SO_REUSEPORT), serves invocations from the routing
table the main process feeds it, forwards every other request to the main process, and writes its
metrics to the shared directory. It exits when the main process goes (its feed closes) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
from pathlib import Path

import orjson
import uvicorn

from berth.gateway.app import Gateway, RootApp, uvicorn_config
from berth.gateway.auth import AccessState, TokenAuthority
from berth.gateway.forward import ControlForwarder
from berth.gateway.hub import listening_socket
from berth.gateway.routing import RoutingTable
from berth.observability.logs import configure_logging
from berth.observability.metrics import Metrics
from berth.payload import PayloadLimits
from berth.ratelimit.shared import close_limiter, make_limiter


class Feed:
    """The worker's end of the hub's feed: applies every state line to the gateway."""

    def __init__(self, path: str, index: int, gateway: Gateway, server: uvicorn.Server) -> None:
        self.path = path
        self.index = index
        self.gateway = gateway
        self.server = server
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self._access: object = None  # the access state last applied (as sent)

    async def connect(self) -> None:
        reader, self.writer = await asyncio.open_unix_connection(self.path, limit=1 << 26)
        self.writer.write(f"worker {self.index}\n".encode())
        self.apply(await reader.readline())
        self.task = asyncio.get_running_loop().create_task(self._follow(reader))

    def announce_ready(self) -> None:
        if self.writer is not None:
            self.writer.write(b"ready\n")

    def demand(self, endpoint: str, entity: str) -> None:
        """Tell the main process a request waits for an entity at zero (names never hold spaces)."""
        if self.writer is not None:
            self.writer.write(f"demand {endpoint} {entity}\n".encode())

    def apply(self, line: bytes) -> None:
        state = orjson.loads(line)
        if state["access"] != self._access:  # most lines change only the routes: keep the credential cache
            self._access = state["access"]
            self.gateway.auth.replace(AccessState.from_json(self._access))
        self.gateway.set_routes(RoutingTable.from_json(state["routes"]))

    async def _follow(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.apply(line)
        self.server.should_exit = True  # the main process is gone

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="berth.gateway.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--feed", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--metrics-dir", type=Path, required=True)
    parser.add_argument("--request-timeout", type=float, required=True)
    parser.add_argument("--hold-timeout", type=float, default=60.0)
    parser.add_argument("--limits-dir", type=Path, required=True)
    parser.add_argument("--redis-url")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--queue-wait", type=float, default=0.0)
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--inference-buffer-mb", type=float, default=64.0)
    parser.add_argument("--payload-limits", default="{}", help="berth.payload.PayloadLimits as JSON")
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level, f"gateway-{args.index}")
    payload_limits = PayloadLimits.from_json(orjson.loads(args.payload_limits))

    limiter = make_limiter(args.redis_url, args.limits_dir)
    gateway = Gateway(TokenAuthority(), Metrics(shared_dir=args.metrics_dir), limiter, processes=args.processes,
                      request_timeout_s=args.request_timeout,
                      name=str(args.index), hold_timeout_s=args.hold_timeout, queue_wait_s=args.queue_wait,
                      payload_limits=payload_limits, inference_buffer_mb=args.inference_buffer_mb,
                      on_demand=lambda endpoint, entity: feed.demand(endpoint, entity) if feed is not None else None)
    control = ControlForwarder(args.control, timeout_s=args.request_timeout)
    feed: Feed | None = None

    async def startup() -> None:
        assert feed is not None
        await feed.connect()
        gc.freeze()
        logging.getLogger("berth.gateway").info("gateway process %d serving", args.index,
                                                extra={"gateway": args.index, "processes": args.processes})
        feed.announce_ready()  # the socket already listens: connections queue until uvicorn accepts them

    async def shutdown() -> None:
        if feed is not None:
            feed.close()
        gateway.close()
        control.close()
        await close_limiter(limiter)

    app = RootApp(gateway, control, on_startup=startup, on_shutdown=shutdown)
    server = uvicorn.Server(uvicorn_config(app))
    feed = Feed(args.feed, args.index, gateway, server)
    sock = listening_socket(args.host, args.port, reuse_port=True)

    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(server.serve(sockets=[sock]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
