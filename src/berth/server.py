"""The platform in one process: store, backend, reconciler, control API and gateway, on uvicorn.

Replicas run in their own processes (started by the backend); everything else lives here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import uvicorn

from berth.backends.local import LocalBackend
from berth.client.credentials import Credentials, read_credentials, write_credentials
from berth.control.api import build_control_app
from berth.control.reconciler import CrashPolicy, Reconciler
from berth.control.service import EndpointService
from berth.gateway.app import Gateway, RootApp
from berth.gateway.auth import TokenAuthority, hash_token, new_token
from berth.observability.metrics import Metrics
from berth.settings import Settings
from berth.store import Store

log = logging.getLogger("berth")


@dataclass(frozen=True)
class AdminToken:
    token: str
    generated: bool  # True when made on this start (print it once)


class Platform:
    """Everything one Berth server runs, wired together; `app` is its ASGI entry point."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.resolved_store_url)
        self.backend = LocalBackend(settings.data_dir / "logs" / "replicas")
        self.auth = TokenAuthority(self.store.token_hashes())
        self.metrics = Metrics()
        self.gateway = Gateway(self.auth, self.metrics, request_timeout_s=settings.request_timeout_s)
        self.reconciler = Reconciler(
            self.backend,
            self.store,
            crash_policy=CrashPolicy(
                limit=settings.crash_limit,
                backoff_s=settings.crash_backoff_s,
                backoff_max_s=settings.crash_backoff_max_s,
                stable_after_s=settings.stable_after_s,
            ),
            memory_limit_mb=settings.replica_memory_limit_mb,
            start_timeout_s=settings.replica_start_timeout_s,
            on_routes=self.gateway.set_routes,
            on_persist=lambda ep: self.service.persist(ep),
        )
        self.service = EndpointService(self.store, self.reconciler, cores=settings.cores)
        self.app = RootApp(
            self.gateway,
            build_control_app(self.service),
            on_startup=self.start,
            on_shutdown=self.stop,
        )

    def ensure_admin_token(self) -> AdminToken:
        """BERTH_ADMIN_TOKEN if set; else the credentials file's token if this store knows it;
        else a new token (stored as a hash only)."""
        if self.settings.admin_token:
            token, generated = self.settings.admin_token, False
        else:
            creds = read_credentials()
            known = self.store.token_hashes()
            if creds is not None and hash_token(creds.token) in known:
                token, generated = creds.token, False
            else:
                token, generated = new_token(), True
        self.store.add_token(hash_token(token), comment="admin", is_admin=True)
        self.auth.replace(self.store.token_hashes())
        return AdminToken(token, generated)

    async def start(self) -> None:
        records = self.store.list_replicas()
        killed = self.backend.cleanup_orphans([(r.id, r.pid) for r in records])
        if killed:
            log.warning("killed %d replica(s) left by a previous run: %s", len(killed), killed)
        for record in records:
            self.store.remove_replica(record.id)
        self.service.load()
        self.reconciler.start()
        # Everything imported and built so far lives as long as the server: keep it out of the
        # collector's full passes, which would otherwise pause every request in flight.
        gc.freeze()

    async def stop(self) -> None:
        await self.reconciler.stop()
        self.gateway.close()
        await self.backend.close()
        self.store.close()


def uvicorn_config(app: RootApp, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=75,
        proxy_headers=False,  # nothing reads the client address: skip the middleware on every request
    )


async def run_platform(
    settings: Settings,
    on_ready: Callable[[Platform, str, AdminToken], Awaitable[None]] | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM. `on_ready(platform, url, token)` runs once listening."""
    platform = Platform(settings)
    token = platform.ensure_admin_token()
    server = uvicorn.Server(uvicorn_config(platform.app, settings.bind_host, settings.port))

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        sock = server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        url = f"http://{_url_host(host)}:{port}"
        write_credentials(Credentials(host=url, token=token.token))
        if on_ready is not None:
            await on_ready(platform, url, token)

    watcher = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        watcher.cancel()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
