"""Shared fixtures: real Berth servers on ephemeral loopback ports and real MLflow models."""

from __future__ import annotations

import json
import os
import secrets
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
import sqlalchemy as sa

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
    store_url: str | None = None  # None: SQLite in the data dir
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


def interrupt(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """Ctrl-C a process group started with `start_new_session` (SIGKILL after `timeout`); its exit status."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def start_server(
    base: Path, *, data_dir: Path | None = None, extra_env: dict[str, str] | None = None,
    admin_token: str | None = ADMIN_TOKEN, args: list[str] | None = None, store_url: str | None = None,
) -> ServerProcess:
    """Start `berth server --port 0` and wait until it answers /ping (`store_url`: BERTH_STORE_URL)."""
    base.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or base / "data"
    config_dir = base / "config"
    log_path = base / f"server-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_") and k != "MLFLOW_TRACKING_URI"}
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
    if store_url:
        env["BERTH_STORE_URL"] = store_url
    env.update(extra_env or {})
    creds = config_dir / "credentials.json"
    if creds.exists():
        creds.unlink()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "berth", "server", "--port", "0", "--data-dir", str(data_dir), *(args or [])],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True,
        )
    server = ServerProcess(proc, data_dir, config_dir, log_path, store_url=env.get("BERTH_STORE_URL"))
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


# Both stores. A module marked `both_stores` runs each test that starts a server (through `shared_server`,
# `server_factory` or `store_url_for`) once on SQLite and once on PostgreSQL, each server on a database of
# its own; other modules' servers use SQLite. PostgreSQL is the server at BERTH_TEST_POSTGRES_URL (the admin
# connection; `scripts/setup test` starts one on 127.0.0.1): when it does not answer, those tests fail.
STORES = ("sqlite", "postgresql")
POSTGRES_ADMIN_URL = os.environ.get("BERTH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class PostgresDatabases:
    """Fresh databases `berth_<random>` on the test PostgreSQL server (unique across xdist workers)."""

    def __init__(self, admin_url: str) -> None:
        from berth.store.engine import normalise_url

        self.admin_url = admin_url
        self.admin = sa.engine.make_url(normalise_url(admin_url))
        self.names: list[str] = []
        self._engine: sa.Engine | None = None
        self._failure = ""  # why the server cannot be used (tried once)

    def _connect(self) -> sa.Engine:
        if self._engine is None:
            engine = sa.create_engine(self.admin, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool,
                                      connect_args={"connect_timeout": 5})
            if not self._failure:
                try:
                    with engine.connect():
                        pass
                except sa.exc.DBAPIError as exc:
                    self._failure = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
            reason = self._failure
            if reason:
                pytest.fail(f"PostgreSQL at {self.admin_url} cannot be used ({reason}): the PostgreSQL half of "
                            "the suite cannot run. Run ./scripts/setup test to start it, or set "
                            "BERTH_TEST_POSTGRES_URL to a server where this user may create databases.",
                            pytrace=False)
            self._engine = engine
        return self._engine

    def create(self, options: str = "") -> str:
        """A new empty database's URL, as users write it (`postgresql://…`); `options` go to CREATE DATABASE."""
        name = f"berth_{secrets.token_hex(6)}"
        with self._connect().connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" {options}')
        self.names.append(name)
        return self.admin.set(drivername="postgresql", database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = sa.engine.make_url(url).database
        if name in self.names and self._engine is not None:
            with self._engine.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self.names.remove(name)

    def close(self) -> None:
        if self._engine is not None:
            for name in list(self.names):
                with self._engine.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self._engine.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    """Makes fresh PostgreSQL databases (connecting on first use); drops those left at the end."""
    databases = PostgresDatabases(POSTGRES_ADMIN_URL)
    yield databases
    databases.close()


@pytest.fixture(scope="session")
def store_kind(request: pytest.FixtureRequest) -> str:
    """The store the test's servers use: "sqlite", or each of `STORES` in a `both_stores` module."""
    return getattr(request, "param", "sqlite")  # type: ignore[no-any-return]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_stores"):
        metafunc.parametrize("store_kind", STORES, indirect=True, scope="session")


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path, postgres: PostgresDatabases) -> Iterator[str]:
    """An empty store of each kind, for `Store` unit tests: SQLite in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'berth.db'}"
        return
    url = postgres.create()
    yield url
    postgres.drop(url)


@pytest.fixture
def store_url_for(store_kind: str, postgres: PostgresDatabases) -> Iterator[Callable[[Path], str | None]]:
    """`store_url_for(data_dir)`: the store URL of a server with that data dir (None: SQLite in it); on
    PostgreSQL one database per data dir, so a restart finds its state. Dropped at teardown."""
    urls: dict[Path, str] = {}

    def get(data_dir: Path) -> str | None:
        if store_kind == "sqlite":
            return None
        key = Path(data_dir).resolve()
        if key not in urls:
            urls[key] = postgres.create()
        return urls[key]

    yield get
    for url in urls.values():
        postgres.drop(url)


@pytest.fixture(scope="session")
def _shared_servers(postgres: PostgresDatabases) -> Iterator[dict[str, ServerProcess]]:
    servers: dict[str, ServerProcess] = {}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def shared_server(store_kind: str, _shared_servers: dict[str, ServerProcess], postgres: PostgresDatabases,
                  tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """One server (per store) for tests that only add their own uniquely named endpoints."""
    if store_kind not in _shared_servers:
        url = postgres.create() if store_kind == "postgresql" else None
        _shared_servers[store_kind] = start_server(tmp_path_factory.mktemp(f"shared-server-{store_kind}"),
                                                   store_url=url)
    return _shared_servers[store_kind]


@pytest.fixture
def server_factory(tmp_path: Path, store_url_for: Callable[[Path], str | None]) -> Iterator[
        Callable[..., ServerProcess]]:
    """Start dedicated servers (for restarts, crashes, isolation); all stopped at teardown. A server given
    the `data_dir` of an earlier one finds its state (on PostgreSQL: the same database)."""
    started: list[ServerProcess] = []

    def make(**kwargs: Any) -> ServerProcess:
        base = tmp_path / f"srv{len(started)}"
        if "store_url" not in kwargs and "BERTH_STORE_URL" not in (kwargs.get("extra_env") or {}):
            kwargs["store_url"] = store_url_for(kwargs.get("data_dir") or base / "data")
        server = start_server(base, **kwargs)
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
