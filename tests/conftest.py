"""Shared fixtures: real Berth servers on ephemeral loopback ports and real MLflow models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures import models as model_builders

ADMIN_TOKEN = "berth_test_admin_token"
REPO = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 60.0


@dataclass
class ServerProcess:
    """A `berth server` subprocess and an authenticated client for it."""

    proc: subprocess.Popen[bytes]
    data_dir: Path
    config_dir: Path
    log_path: Path
    url: str = ""
    token: str = ADMIN_TOKEN
    client: httpx.Client = field(init=False)

    def connect(self) -> None:
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60.0
        )

    # Control plane helpers
    def api(self, method: str, path: str = "", **kwargs: Any) -> httpx.Response:
        return self.client.request(method, f"/api/2.0/serving-endpoints{path}", **kwargs)

    def create(self, name: str, config: dict[str, Any], **extra: Any) -> httpx.Response:
        return self.api("POST", json={"name": name, "config": config, **extra})

    def get(self, name: str) -> dict[str, Any]:
        response = self.api("GET", f"/{name}")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def wait_not_updating(self, name: str, timeout: float = 90.0) -> dict[str, Any]:
        """Poll like the SDK does until config_update leaves IN_PROGRESS."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.get(name)
            if view["state"]["config_update"] != "IN_PROGRESS":
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} still updating after {timeout}s: {view}\n{self.log_tail()}")
            time.sleep(0.1)

    def wait_until(
        self, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 90.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            view = self.get(name)
            if predicate(view):
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: condition not met after {timeout}s: {view}")
            time.sleep(0.1)

    def deploy(self, name: str, model: Path | str, **entity: Any) -> dict[str, Any]:
        """Create a one-entity endpoint and wait until it is READY."""
        response = self.create(name, {"served_entities": [{"entity_name": str(model), **entity}]})
        assert response.status_code == 200, response.text
        view = self.wait_not_updating(name)
        assert view["state"]["ready"] == "READY", view
        return view

    def invoke(self, name: str, body: Any = None, *, content: bytes | None = None,
               content_type: str = "application/json") -> httpx.Response:
        data = content if content is not None else json.dumps(body).encode()
        return self.client.post(
            f"/serving-endpoints/{name}/invocations", content=data, headers={"Content-Type": content_type}
        )

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if hasattr(self, "client"):
            self.client.close()
        return self.proc.returncode


def start_server(
    base: Path, *, data_dir: Path | None = None, extra_env: dict[str, str] | None = None,
    admin_token: str | None = ADMIN_TOKEN, args: list[str] | None = None,
) -> ServerProcess:
    """Start `berth server --port 0` and wait until it answers /ping."""
    base.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or base / "data"
    config_dir = base / "config"
    log_path = base / f"server-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env.update(
        BERTH_CONFIG_DIR=str(config_dir),
        BERTH_CRASH_BACKOFF_S="0.2",
        # No standby kept without demand: on 2 cores, one per test server would cost ~2 s of CPU each.
        # The warm pool's own tests (test_instant_replicas.py) set it.
        BERTH_WARM_POOL_MIN="0",
        PYTHONUNBUFFERED="1",
    )
    if admin_token:
        env["BERTH_ADMIN_TOKEN"] = admin_token
    env.update(extra_env or {})
    creds = config_dir / "credentials.json"
    if creds.exists():
        creds.unlink()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "berth", "server", "--port", "0", "--data-dir", str(data_dir), *(args or [])],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True,
        )
    server = ServerProcess(proc, data_dir, config_dir, log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not creds.exists():
        if proc.poll() is not None:
            raise AssertionError(f"berth server exited with {proc.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise AssertionError(f"berth server did not start:\n{server.log_tail()}")
        time.sleep(0.05)
    saved = json.loads(creds.read_text())
    server.url, server.token = saved["host"], saved["token"]
    server.connect()
    assert server.client.get("/ping").status_code == 200
    return server


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`model_zoo("sleep", seconds=0.05)` builds a model once per session and returns its path."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[tuple[Any, ...], Path] = {}

    def get(kind: str, **kwargs: Any) -> Path:
        key = (kind, *sorted(kwargs.items()))
        if key not in cache:
            suffix = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
            path = root / (kind + (f"-{suffix}" if suffix else "")).replace(".", "_")
            builder = getattr(model_builders, kind.replace("-", "_"))
            cache[key] = builder(path, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for tests that only add their own uniquely named endpoints."""
    server = start_server(tmp_path_factory.mktemp("shared-server"))
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start dedicated servers (for restarts, crashes, isolation); all stopped at teardown."""
    started: list[ServerProcess] = []

    def make(**kwargs: Any) -> ServerProcess:
        server = start_server(tmp_path / f"srv{len(started)}", **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


_counter = iter(range(1_000_000))


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """An endpoint name unique in the session (tests share a server)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"{base}-{next(_counter)}"


REDIS_URL = os.environ.get("BERTH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The local Redis server (`scripts/setup test` installs and starts it); its absence is a failure."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not answering at {REDIS_URL} ({exc}); run ./scripts/setup test to start it.")
    finally:
        client.close()
    return REDIS_URL
