"""The registry's pure parts: eviction order, tree identity, error mapping; and the cache's commit
protocol, with a download function that writes files locally (the network is the integration tests')."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from berth.errors import InvalidParameterValue, ResourceDoesNotExist, TemporarilyUnavailable
from berth.registry.cache import ArtifactCache, CachedRef, evictions, redact, tree_id
from berth.registry.resolver import Resolver, _registry_error
from berth.registry.sources import ModelSource, PinnedModel, parse_source


def ref(key: str, last_used: float, *blobs: tuple[str, int]) -> CachedRef:
    return CachedRef(key, f"uri-{key}", f"tree-{key}", tuple((f"f{i}", sha, size) for i, (sha, size) in
                                                            enumerate(blobs)), last_used)


class TestEvictions:
    def test_least_recently_used_first_until_it_fits(self) -> None:
        refs = [ref("a", 1, ("x", 10)), ref("b", 3, ("y", 10)), ref("c", 2, ("z", 10))]
        assert evictions(refs, set(), 20) == ["a"]
        assert evictions(refs, set(), 10) == ["a", "c"]
        assert evictions(refs, set(), 30) == []

    def test_in_use_refs_are_never_chosen_even_over_the_bound(self) -> None:
        refs = [ref("a", 1, ("x", 50)), ref("b", 2, ("y", 50))]
        assert evictions(refs, {"a"}, 10) == ["b"]
        assert evictions(refs, {"a", "b"}, 0) == []

    def test_shared_blobs_count_once(self) -> None:
        refs = [ref("a", 1, ("env", 5), ("m1", 10)), ref("b", 2, ("env", 5), ("m2", 10))]
        assert evictions(refs, set(), 25) == []  # 5 + 10 + 10
        assert evictions(refs, set(), 24) == ["a"]  # dropping a frees only its own 10

    def test_ties_break_by_key(self) -> None:
        refs = [ref("b", 1, ("y", 10)), ref("a", 1, ("x", 10))]
        assert evictions(refs, set(), 10) == ["a"]


def test_tree_id_depends_on_paths_and_content_not_order_or_size() -> None:
    one = [("MLmodel", "aa", 1), ("model.pkl", "bb", 2)]
    assert tree_id(one) == tree_id(list(reversed(one)))
    assert tree_id(one) != tree_id([("MLmodel", "aa", 1), ("other.pkl", "bb", 2)])
    assert tree_id(one) != tree_id([("MLmodel", "aa", 1), ("model.pkl", "cc", 2)])


def writer(files: dict[str, bytes], *, executable: tuple[str, ...] = (), fail: bool = False):  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def download(uri: str, dest: Path) -> None:
        calls.append(uri)
        root = dest / "artifacts"
        for rel, data in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if rel in executable:
                path.chmod(0o755)
        if fail:
            raise ConnectionError("the tracking server went away")

    download.calls = calls  # type: ignore[attr-defined]
    return download


MODEL = {"MLmodel": b"flavors: {}\n", "model.pkl": b"weights", "code/run.sh": b"#!/bin/sh\n"}


def test_a_fetch_stores_blobs_by_content_links_a_tree_and_writes_its_ref(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=1 << 30, tracking_uri="http://t")
    download = writer(MODEL, executable=("code/run.sh",))
    tree = cache.fetch("mlflow-artifacts:/a", download=download)
    assert {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*") if p.is_file()} == MODEL
    assert os.access(tree / "code" / "run.sh", os.X_OK)
    assert not (tree / "model.pkl").stat().st_mode & stat.S_IWUSR  # blobs are read-only
    assert cache.fetch("mlflow-artifacts:/a", download=download) == tree
    assert download.calls == ["mlflow-artifacts:/a"]  # the second was a hit
    # Another source with the same files: its own ref, the same tree and blobs.
    assert cache.fetch("runs:/r/model", download=writer(MODEL, executable=("code/run.sh",))) == tree
    assert len(cache.refs()) == 2
    assert cache.usage() == sum(len(v) for v in MODEL.values())
    assert not list((tmp_path / "tmp").iterdir())


def test_a_failed_download_leaves_no_ref_and_no_staging(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=1 << 30, tracking_uri=None)
    with pytest.raises(ConnectionError):
        cache.fetch("s3://b/m", download=writer(MODEL, fail=True))
    assert cache.lookup("s3://b/m") is None
    assert not cache.refs()
    assert not list((tmp_path / "tmp").iterdir())
    assert not list((tmp_path / "blobs").iterdir())


def test_a_download_without_an_mlmodel_is_refused(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=1 << 30, tracking_uri=None)
    with pytest.raises(FileNotFoundError):
        cache.fetch("s3://b/m", download=writer({"model.pkl": b"x"}))
    assert not cache.refs()


def test_a_ref_whose_tree_is_gone_is_a_miss(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=1 << 30, tracking_uri=None)
    tree = cache.fetch("s3://b/m", download=writer(MODEL))
    for path in sorted(tree.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    tree.rmdir()
    assert cache.lookup("s3://b/m") is None
    (tmp_path / "refs" / "garbage.json").write_text("{not json")
    assert len(cache.refs()) == 1  # the unreadable ref is ignored


class TestRegistryErrors:
    class Raised(Exception):
        def __init__(self, code: str, message: str) -> None:
            super().__init__(message)
            self.error_code, self.message = code, message

    SOURCE = ModelSource("version", "3", "churn")

    @pytest.mark.parametrize(
        ("code", "message", "kind"),
        [
            ("RESOURCE_DOES_NOT_EXIST", "RESOURCE_DOES_NOT_EXIST: Model Version not found", ResourceDoesNotExist),
            ("INVALID_PARAMETER_VALUE", "Registered model alias champion not found.", ResourceDoesNotExist),
            ("INVALID_PARAMETER_VALUE", "Bad version", InvalidParameterValue),
            ("PERMISSION_DENIED", "no", TemporarilyUnavailable),  # Berth's credentials, not the caller's
            ("INTERNAL_ERROR", "API request failed with exception ConnectionRefused", TemporarilyUnavailable),
        ],
    )
    def test_mapping(self, code: str, message: str, kind: type) -> None:
        error = _registry_error(self.SOURCE, self.Raised(code, message))
        assert isinstance(error, kind)
        assert "models:/churn/3" in error.message
        assert "RESOURCE_DOES_NOT_EXIST:" not in error.message

    def test_no_tracking_server_configured(self) -> None:
        with pytest.raises(InvalidParameterValue, match="BERTH_MLFLOW_TRACKING_URI"):
            Resolver(None).resolve(parse_source("churn", "3"))


def test_pinned_round_trips() -> None:
    pinned = PinnedModel("mlflow-artifacts:/0/models/m-1/artifacts", "3", "run")
    assert PinnedModel.from_dict(pinned.to_dict()) == pinned
    assert PinnedModel.from_dict(PinnedModel("s3://x").to_dict()) == PinnedModel("s3://x")


def test_credentials_in_urls_are_redacted() -> None:
    text = "API request to https://alice:s3cret@mlflow.internal/api/2.0/x failed; see http://tok@h:5000/"
    assert redact(text) == "API request to https://***@mlflow.internal/api/2.0/x failed; see http://***@h:5000/"
    error = _registry_error(TestRegistryErrors.SOURCE, TestRegistryErrors.Raised("INTERNAL_ERROR", text))
    assert "s3cret" not in error.message


def test_logged_model_uris_and_refused_schemes() -> None:
    source = parse_source("models:/m-0123456789abcdef", None)
    assert (source.kind, source.ref, source.uri) == ("logged", "m-0123456789abcdef", "models:/m-0123456789abcdef")
    for uri in ("https://internal.example/model", "http://169.254.169.254/latest", "ftp://x/y"):
        with pytest.raises(InvalidParameterValue, match="not served"):
            parse_source(uri, None)
    assert parse_source("s3://bucket/model", None).kind == "uri"


def test_eviction_spares_what_was_used_after_its_in_use_snapshot(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, max_bytes=0, tracking_uri=None)
    for uri, body in (("s3://b/one", b"1"), ("s3://b/two", b"2")):
        cache.fetch(uri, download=writer({**MODEL, "model.pkl": body}), evict=False)
        path = tmp_path / "refs" / f"{cache.key(uri)}.json"
        os.utime(path, (1_000, 1_000))  # used long ago
    taken_at = 2_000.0  # the snapshot (in use: nothing) ...
    cache.lookup("s3://b/one")  # ... and a use it cannot show
    assert cache.evict(set(), taken_at=taken_at) == ["s3://b/two"]
    assert cache.lookup("s3://b/one") is not None
