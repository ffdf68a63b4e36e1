"""The platform's main process: store, backend, reconciler, control API and gateway, on uvicorn.

Replicas run in their own processes (started by the backend). With several gateway processes
(`gateway_workers`), the others serve the same port beside this one (`berth.gateway.hub`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from berth.autoscaler import AutoscalerSettings
from berth.backends.local import LocalBackend
from berth.backends.warmpool import PoolPolicy
from berth.client.credentials import Credentials, read_credentials, write_credentials
from berth.control.access import AccessService
from berth.control.api import build_control_app
from berth.control.autoscaling import AutoscalingLoop
from berth.control.reconciler import CrashPolicy, Reconciler
from berth.control.secrets import SecretService
from berth.control.service import EndpointService
from berth.gateway.app import Gateway, RootApp, uvicorn_config
from berth.gateway.auth import AccessState, TokenAuthority, hash_token, new_token
from berth.gateway.hub import GatewayHub, listening_socket
from berth.gateway.routing import RoutingTable
from berth.observability.export import WINDOW_S, RequestWindow
from berth.observability.logs import configure_logging
from berth.observability.metrics import Metrics
from berth.payload import PayloadLimits
from berth.ratelimit.shared import close_limiter, make_limiter
from berth.registry.cache import ArtifactCache
from berth.registry.resolver import Resolver
from berth.settings import Settings
from berth.store import Store
from berth.store.secrets import SecretStore, load_cipher

log = logging.getLogger("berth")


@dataclass(frozen=True)
class AdminToken:
    token: str
    generated: bool  # True when made on this start (print it once)


class Platform:
    """Everything one Berth server runs, wired together; `app` is its ASGI entry point."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.payload_limits = PayloadLimits.from_settings(settings)  # what one request may carry
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.resolved_store_url)
        secret_store = SecretStore(self.store.engine, load_cipher(settings.data_dir, settings.secrets_key))
        secret_store.check_key()  # servers sharing a store must share its secrets key
        if settings.secrets_key and "," in settings.secrets_key.strip(","):  # new,old: finish the rotation
            count = secret_store.rotate()
            log.info("re-encrypted %d secret(s) with the first key of BERTH_SECRETS_KEY; the others may go", count,
                     extra={"event": "secrets_rotated", "secrets": count})
        self.secrets = SecretService(secret_store)
        self.backend = LocalBackend(
            settings.data_dir / "logs" / "replicas",
            fork=settings.replica_fork,
            pool=PoolPolicy(floor=settings.warm_pool_min, memory_cap_mb=settings.warm_pool_memory_mb,
                            window_s=settings.warm_pool_window_s),
            memory_limit_mb=settings.replica_memory_limit_mb,
            payload_limits=self.payload_limits,
        )
        self.auth = TokenAuthority()
        self.access = AccessService(self.store, on_change=self._publish_access)
        self.hub: GatewayHub | None = None
        shared_metrics: Path | None = None
        if settings.gateway_processes > 1:
            run_dir = Path(tempfile.mkdtemp(prefix="berth-gw-"))  # short: it holds Unix sockets
            self.hub = GatewayHub(settings.gateway_processes, run_dir, request_timeout_s=settings.request_timeout_s,
                                  hold_timeout_s=settings.hold_timeout_s, queue_wait_s=settings.queue_wait_s,
                                  log=(settings.log_format, settings.log_level),
                                  redis_url=settings.redis_url,
                                  log_dir=settings.data_dir / "logs" / "gateway", payload_limits=self.payload_limits,
                                  inference_buffer_mb=settings.inference_buffer_mb,
                                  on_demand=lambda endpoint, entity: self.reconciler.demand(endpoint, entity))
            shared_metrics = self.hub.metrics_dir
            shared_metrics.mkdir()
        self.metrics = Metrics(shared_dir=shared_metrics)
        # Rate-limit windows: in files every gateway process of this host maps, or in Redis for all hosts.
        self.run_dir = self.hub.run_dir if self.hub is not None else Path(tempfile.mkdtemp(prefix="berth-gw-"))
        self.limiter = make_limiter(settings.redis_url, self.run_dir / "limits")
        self.gateway = Gateway(self.auth, self.metrics, self.limiter, processes=settings.gateway_processes,
                               request_timeout_s=settings.request_timeout_s,
                               hold_timeout_s=settings.hold_timeout_s, queue_wait_s=settings.queue_wait_s,
                               payload_limits=self.payload_limits, inference_buffer_mb=settings.inference_buffer_mb,
                               on_demand=lambda endpoint, entity: self.reconciler.demand(endpoint, entity))
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
            on_routes=self._set_routes,
            on_persist=lambda ep: self.service.persist(ep),
            settle_s=settings.drain_settle_s,
            drain_grace_s=max(30.0, settings.request_timeout_s),  # a request in flight may take that long
            metrics=self.metrics,
            inference_root=settings.resolved_inference_uri,
            resolve_env=self.secrets.resolve,
        )
        # Registry sources: pinned through the tracking server, fetched once into DATA_DIR/artifacts.
        tracking_uri = settings.resolved_tracking_uri
        self.artifacts = ArtifactCache(settings.data_dir / "artifacts",
                                       max_bytes=int(settings.artifact_cache_mb * 2**20),
                                       tracking_uri=tracking_uri, in_use=self.reconciler.artifacts_in_use)
        self.reconciler.artifacts = self.artifacts
        scale = settings.autoscale_time_scale
        if scale <= 0:
            raise ValueError(f"BERTH_AUTOSCALE_TIME_SCALE must be > 0; got {scale:g}.")
        self.autoscaling = AutoscalingLoop(
            self.reconciler,
            self.store,
            # The idle period is set directly (not time-scaled): it is the one users name.
            AutoscalerSettings(time_scale=scale, scale_to_zero_idle=settings.scale_to_zero_idle_s / scale),
            vertical=settings.replica_concurrency <= 0,
            memory_limit_mb=settings.replica_memory_limit_mb,
            held=self.gateway.waiting,
            rejected=self.gateway.rejected,
            metrics=self.metrics,
        )
        self.service = EndpointService(self.store, self.reconciler, cores=settings.cores,
                                       replica_concurrency=settings.replica_concurrency,
                                       resolver=Resolver(tracking_uri))
        self.service.autoscaling = self.autoscaling
        self.service.secrets = self.secrets
        # The export's "last minute" is time-scaled with the autoscaler (tests run it in seconds).
        self.requests_window = RequestWindow(self.metrics.totals, window_s=WINDOW_S * scale, period_s=scale)
        self.service.requests = self.requests_window
        self.app = RootApp(
            self.gateway,
            build_control_app(self.service, self.access, payload_limits=self.payload_limits, secrets=self.secrets),
            on_startup=self.start,
            on_shutdown=self.stop,
        )

    def _set_routes(self, table: RoutingTable) -> None:
        self.gateway.set_routes(table)
        if self.hub is not None:
            self.hub.publish_routes(table)

    def _publish_access(self, state: AccessState) -> None:
        """Swap the hot path's credentials and grants in, here and in every gateway process."""
        self.auth.replace(state)
        if self.hub is not None:
            self.hub.publish_access(state.to_json())

    def ensure_admin_token(self) -> AdminToken:
        """BERTH_ADMIN_TOKEN if set; else the credentials file's token if this store knows it;
        else a new token (stored as a hash only). It belongs to the bootstrap admin user."""
        admin = self.store.access.ensure_admin()
        known = self.store.access.token_hashes()
        if self.settings.admin_token:
            token, generated = self.settings.admin_token, False
        else:
            creds = read_credentials()
            if creds is not None and known.get(hash_token(creds.token), ("",))[0] == admin.id:
                token, generated = creds.token, False
            else:
                token, generated = new_token(), True
        self.store.access.add_token(admin.id, hash_token(token), comment="admin")
        self.access.changed()
        return AdminToken(token, generated)

    async def start(self) -> None:
        records = self.store.list_replicas()
        killed = self.backend.cleanup_orphans([(r.id, r.pid) for r in records])
        if killed:
            log.warning("killed %d replica(s) left by a previous run: %s", len(killed), killed)
        for record in records:
            self.store.remove_replica(record.id)
        self.backend.activate()
        self.service.load()
        # The bound may have shrunk since the last run.
        await asyncio.to_thread(self.artifacts.evict, self.reconciler.artifacts_in_use())
        self.reconciler.start()
        self.autoscaling.start()
        self.requests_window.start()
        # Everything imported and built so far lives as long as the server: keep it out of the
        # collector's full passes, which would otherwise pause every request in flight.
        gc.freeze()

    async def start_gateway_workers(self, host: str, port: int) -> None:
        """Start the other gateway processes on the port this one listens on (none with one process)."""
        if self.hub is not None:
            await self.hub.start(host, port)

    async def stop(self) -> None:
        if self.hub is not None:
            await self.hub.stop()  # first: they would forward to a control plane going away
        await self.autoscaling.stop()
        await self.requests_window.stop()
        await self.reconciler.stop()
        self.gateway.close()
        await close_limiter(self.limiter)
        await self.backend.close()
        self.store.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


async def run_platform(
    settings: Settings,
    on_ready: Callable[[Platform, str, AdminToken], Awaitable[None]] | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM. `on_ready(platform, url, token)` runs once listening."""
    configure_logging(settings.log_format, settings.log_level, "main")
    platform = Platform(settings)
    token = platform.ensure_admin_token()
    sockets = [listening_socket(settings.bind_host, settings.port, reuse_port=platform.hub is not None)]
    if platform.hub is not None:  # the other gateway processes forward control-plane requests here
        internal = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        internal.bind(platform.hub.control_path)
        internal.listen(2048)
        sockets.append(internal)
    host, port = sockets[0].getsockname()[:2]
    server = uvicorn.Server(uvicorn_config(platform.app))

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        try:
            await platform.start_gateway_workers(host, port)
        except RuntimeError as exc:
            log.error("%s", exc)
            server.should_exit = True
            return
        url = f"http://{_url_host(host)}:{port}"
        write_credentials(Credentials(host=url, token=token.token))
        log.info("listening on %s", url, extra={"url": url, "gateway_processes": settings.gateway_processes,
                                                "data_dir": str(settings.data_dir)})
        if on_ready is not None:
            await on_ready(platform, url, token)

    watcher = asyncio.create_task(announce())
    try:
        await server.serve(sockets=sockets)
    finally:
        watcher.cancel()
        for sock in sockets:
            sock.close()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
