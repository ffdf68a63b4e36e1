"""Models from an MLflow registry, against a real `mlflow server` (SQLite backend, proxied artifacts).

Every artifact download goes through the tracking server and is one line of its access log, which is
how these tests count fetches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from berth.registry.cache import ArtifactCache
from tests.conftest import REPO, ServerProcess, interrupt, start_server
from tests.fixtures.mlflow_server import BIG_FILE_MB, TrackingServer, start_tracking_server

pytestmark = pytest.mark.slow  # a tracking server and its models (~20 s), then replicas


@pytest.fixture(scope="session")  # not per module: the both-stores test's params would start it again
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    server = start_tracking_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def berth(tmp_path_factory: pytest.TempPathFactory, tracking: TrackingServer) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("berth-registry"),
                          extra_env={"BERTH_MLFLOW_TRACKING_URI": tracking.url})
    yield server
    server.stop()


def _entity(**fields: object) -> dict[str, object]:
    return {"served_entities": [{"workload_size": "Small", "scale_to_zero_enabled": False, **fields}]}


def _answer(server: ServerProcess, name: str) -> int:
    response = server.invoke(name, {"dataframe_records": [{"x": 1.0}]})
    assert response.status_code == 200, response.text
    (value,) = response.json()["predictions"]
    return int(value)


def _model_files(tracking: TrackingServer, name: str, version: str) -> list[str]:
    """The artifact paths (as the access log names them) of a registered model version."""
    uri = tracking.api("GET", "/model-versions/get-download-uri", params={"name": name, "version": version})
    root = uri.json()["artifact_uri"].removeprefix("mlflow-artifacts:/")
    files = [str(p.relative_to(tracking.artifacts)) for p in (tracking.artifacts / root).rglob("*") if p.is_file()]
    assert any(f.endswith("/MLmodel") for f in files)
    return sorted(files)


def test_serve_by_version_and_by_alias_move_the_alias_and_update(berth: ServerProcess,
                                                                 tracking: TrackingServer) -> None:
    tracking.set_alias("const", "champion", "1")
    v1_files = _model_files(tracking, "const", "1")
    # Databricks' shape: a registered model name and its version.
    assert berth.create("by-version", _entity(entity_name="const", entity_version="1")).status_code == 200
    # The same version through an alias: pinned to version 1, fetched once for both endpoints.
    assert berth.create("by-alias", _entity(entity_name="models:/const@champion")).status_code == 200
    for name in ("by-version", "by-alias"):
        view = berth.wait_not_updating(name)
        assert view["state"]["ready"] == "READY", view
        assert _answer(berth, name) == 1
    entity = berth.get("by-alias")["config"]["served_entities"][0]
    assert (entity["name"], entity["entity_name"], entity["entity_version"]) == (
        "const-champion", "models:/const@champion", "1")
    fetched = tracking.downloads()
    assert {f: fetched[f] for f in v1_files} == dict.fromkeys(v1_files, 1)

    # Move the alias: nothing changes until the endpoint is updated; then version 2 rolls out.
    tracking.set_alias("const", "champion", "2")
    assert _answer(berth, "by-alias") == 1
    update = berth.api("PUT", "/by-alias/config", json=_entity(entity_name="models:/const@champion"))
    assert update.status_code == 200, update.text
    view = berth.wait_not_updating("by-alias")
    assert view["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}, view
    assert view["config"]["served_entities"][0]["entity_version"] == "2"
    assert view["config"]["config_version"] == 2
    assert _answer(berth, "by-alias") == 2
    assert _answer(berth, "by-version") == 1  # pinned by version: untouched

    # models:/name/version and runs:/ pin to version 2's artifacts: already cached, nothing fetched again.
    run_2 = tracking.models["runs"]["2"]
    for name, uri in (("by-uri", "models:/const/2"), ("by-run", f"runs:/{run_2}/model")):
        assert berth.create(name, _entity(entity_name=uri)).status_code == 200
        assert berth.wait_not_updating(name)["state"]["ready"] == "READY"
        assert _answer(berth, name) == 2
    v2_files = _model_files(tracking, "const", "2")
    fetched = tracking.downloads()
    assert {f: fetched[f] for f in v2_files} == dict.fromkeys(v2_files, 1)
    blobs = [p for p in (berth.data_dir / "artifacts" / "blobs").glob("*/*")]
    trees = list((berth.data_dir / "artifacts" / "trees").iterdir())
    refs = list((berth.data_dir / "artifacts" / "refs").glob("*.json"))
    assert len(refs) == len(trees) == 2  # versions 1 and 2
    assert len(blobs) < len(v1_files) + len(v2_files)  # stored by content: their environment files once
    assert all(p.stat().st_nlink >= 2 for p in blobs)  # each blob is linked into a tree


def test_registry_errors_are_clear_and_write_nothing(berth: ServerProcess, tracking: TrackingServer) -> None:
    cases = [
        (_entity(entity_name="const", entity_version="99"), 404, "RESOURCE_DOES_NOT_EXIST", "models:/const/99"),
        (_entity(entity_name="models:/nope@champion"), 404, "RESOURCE_DOES_NOT_EXIST", "models:/nope@champion"),
        (_entity(entity_name="models:/const@nope"), 404, "RESOURCE_DOES_NOT_EXIST", "alias"),
        (_entity(entity_name="runs:/0123456789abcdef0123456789abcdef/model"), 404, "RESOURCE_DOES_NOT_EXIST",
         "runs:/"),
        (_entity(entity_name="const"), 400, "INVALID_PARAMETER_VALUE", "entity_version"),
    ]
    for config, status, code, fragment in cases:
        response = berth.create("bad-source", config)
        assert response.status_code == status, response.text
        body = response.json()
        assert body["error_code"] == code
        assert fragment in body["message"], body
        assert berth.api("GET", "/bad-source").status_code == 404


@pytest.mark.both_stores
def test_a_restart_serves_the_pinned_version_from_the_cache(server_factory: Callable[..., ServerProcess],
                                                           tracking: TrackingServer) -> None:
    tracking.set_alias("const", "champion", "1")
    env = {"BERTH_MLFLOW_TRACKING_URI": tracking.url}
    try:
        server = server_factory(extra_env=env)
        assert server.create("pinned", _entity(entity_name="models:/const@champion")).status_code == 200
        assert server.wait_not_updating("pinned")["state"]["ready"] == "READY"
        before = sum(tracking.downloads().values())
        server.stop()
        tracking.set_alias("const", "champion", "2")  # moved while the server was down
        server = server_factory(data_dir=server.data_dir, extra_env=env)
        view = server.wait_until("pinned", lambda view: view["state"]["ready"] == "READY")
        assert view["config"]["served_entities"][0]["entity_version"] == "1"
        assert _answer(server, "pinned") == 1  # a restart never re-resolves
        assert sum(tracking.downloads().values()) == before  # and fetches nothing
    finally:
        tracking.set_alias("const", "champion", "1")


def _uri(tracking: TrackingServer, name: str, version: str) -> str:
    return tracking.api("GET", "/model-versions/get-download-uri",
                        params={"name": name, "version": version}).json()["artifact_uri"]


FETCH = """
import sys
from pathlib import Path
from berth.registry.cache import ArtifactCache
cache = ArtifactCache(Path(sys.argv[1]), max_bytes=1 << 40, tracking_uri=sys.argv[2])
print(cache.fetch(sys.argv[3]), flush=True)
"""


def _fetcher(root: Path, tracking: TrackingServer, uri: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", FETCH, str(root), tracking.url, uri], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_five_concurrent_resolves_fetch_each_file_once(tmp_path: Path, tracking: TrackingServer) -> None:
    uri = _uri(tracking, "spare", "1")
    files = _model_files(tracking, "spare", "1")
    before = tracking.downloads()
    procs = [_fetcher(tmp_path / "cache", tracking, uri) for _ in range(5)]  # five processes, one cache
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, [o[1][-2000:] for o in outs]
    trees = {o[0].strip() for o in outs}
    assert len(trees) == 1  # all five got the same directory
    assert (Path(trees.pop()) / "MLmodel").is_file()
    after = tracking.downloads()
    assert {f: after[f] - before[f] for f in files} == dict.fromkeys(files, 1)


def test_a_download_killed_midway_leaves_nothing_a_later_fetch_uses(tmp_path: Path,
                                                                    tracking: TrackingServer) -> None:
    uri = _uri(tracking, "big", "1")
    (blob_path,) = [f for f in _model_files(tracking, "big", "1") if f.endswith("big.bin")]
    root = tmp_path / "cache"
    before = tracking.downloads()[blob_path]
    proc = _fetcher(root, tracking, uri)
    full = BIG_FILE_MB << 20
    partial = None
    deadline = time.monotonic() + 120
    while partial is None and time.monotonic() < deadline and proc.poll() is None:
        for path in (root / "tmp").rglob("big.bin") if (root / "tmp").exists() else ():
            with_size = path.stat().st_size
            if 0 < with_size < full // 2:
                os.killpg(proc.pid, signal.SIGKILL)  # midway through the big file
                partial = with_size
                break
        time.sleep(0.002)
    proc.wait(30)
    assert partial is not None, "the fetch ended before it could be killed midway"
    assert not list((root / "refs").glob("*.json"))  # nothing names the half-made download
    assert list((root / "tmp").iterdir())  # its staging directory is left behind...

    cache = ArtifactCache(root, max_bytes=1 << 40, tracking_uri=tracking.url)
    assert not list((root / "tmp").iterdir())  # ...and swept when the cache opens again
    assert cache.lookup(uri) is None
    tree = cache.fetch(uri)
    blob = next(tree.rglob("big.bin"))
    assert blob.stat().st_size == full
    assert tracking.downloads()[blob_path] == before + 2  # the killed fetch's GET, then the whole one
    assert len(list((root / "refs").glob("*.json"))) == 1


def test_the_cache_is_bounded_and_evicts_least_recently_used_unused_artifacts(tmp_path: Path,
                                                                               tracking: TrackingServer) -> None:
    uris = [_uri(tracking, "spare", v) for v in ("1", "2", "3")]
    in_use = {uris[0]}
    cache = ArtifactCache(tmp_path / "cache", max_bytes=1 << 40, tracking_uri=tracking.url,
                          in_use=lambda: set(in_use))
    for age, uri in zip((300, 200, 100), uris, strict=True):  # uris[0] used longest ago, uris[2] last
        cache.fetch(uri)
        ref = tmp_path / "cache" / "refs" / f"{cache.key(uri)}.json"
        os.utime(ref, (time.time() - age, time.time() - age))
    refs = {r.artifact_uri: r for r in cache.refs()}
    shared = {**refs[uris[0]].blobs, **refs[uris[2]].blobs}  # the versions share their environment files
    assert len(shared) < len(refs[uris[0]].blobs) + len(refs[uris[2]].blobs)
    assert cache.usage() == sum({**shared, **refs[uris[1]].blobs}.values())

    # Bound to what versions 1 and 3 need: version 2 goes (least recently used of those nobody serves),
    # version 1 stays although it is older, because it is in use.
    cache.max_bytes = sum(shared.values())
    assert cache.evict() == [uris[1]]
    assert [cache.lookup(u) is not None for u in uris] == [True, False, True]
    assert cache.usage() == cache.max_bytes
    # In use, version 1 counts as used now: with room for one version, version 3 goes.
    cache.max_bytes = sum(refs[uris[0]].blobs.values())
    assert cache.evict() == [uris[2]]
    # Nothing served: everything can go, and no tree or blob is left behind.
    in_use.clear()
    cache.max_bytes = 0
    assert cache.evict() == [uris[0]]
    assert cache.usage() == 0
    assert not list((tmp_path / "cache" / "trees").iterdir())
    assert not list((tmp_path / "cache" / "refs").iterdir())


def test_threads_of_one_process_share_one_fetch(tmp_path: Path, tracking: TrackingServer) -> None:
    uri = _uri(tracking, "spare", "2")
    files = _model_files(tracking, "spare", "2")
    before = tracking.downloads()
    cache = ArtifactCache(tmp_path / "cache", max_bytes=1 << 40, tracking_uri=tracking.url)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(cache.fetch(uri))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 5
    assert len(set(results)) == 1
    after = tracking.downloads()
    assert {f: after[f] - before[f] for f in files} == dict.fromkeys(files, 1)


def test_berth_serve_takes_a_registry_uri(tmp_path: Path, tracking: TrackingServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BERTH_", "MLFLOW_"))}
    env.update(BERTH_PORT="0", BERTH_DATA_DIR=str(tmp_path / "data"), BERTH_CONFIG_DIR=str(tmp_path / "config"),
               BERTH_MLFLOW_TRACKING_URI=tracking.url, BERTH_WARM_POOL_MIN="0", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "berth", "serve", "models:/const/2"], cwd=str(REPO), env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "is READY" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        creds = json.loads((tmp_path / "config" / "credentials.json").read_text())
        response = httpx.post(f"{creds['host']}/serving-endpoints/const-2/invocations",
                              json={"dataframe_records": [{"x": 1}, {"x": 2}]},
                              headers={"Authorization": f"Bearer {creds['token']}"})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == [2, 2]
        assert "serves models:/const/2" in log_path.read_text()
    finally:
        interrupt(proc)


def test_the_databricks_sdk_serves_a_registered_model_version(berth: ServerProcess, tracking: TrackingServer) -> None:
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.service.serving import EndpointCoreConfigInput, ServedEntityInput

    ws = WorkspaceClient(host=berth.url, token=berth.token, auth_type="pat")
    entity = ServedEntityInput(entity_name="const", entity_version="2", workload_size="Small",
                               scale_to_zero_enabled=False)
    created = ws.serving_endpoints.create_and_wait(
        name="sdk-registry", config=EndpointCoreConfigInput(name="sdk-registry", served_entities=[entity]))
    (served,) = created.config.served_entities
    assert (served.name, served.entity_name, served.entity_version) == ("const-2", "const", "2")
    assert ws.serving_endpoints.query("sdk-registry", dataframe_records=[{"x": 1}]).predictions == [2]
