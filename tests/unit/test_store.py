"""The store behaves the same on SQLite and PostgreSQL (`store_url` gives each, empty): conflicts, missing rows
(rowcounts), JSON documents, sequence numbers, float timestamps, order. And the embedded SQLite store's
connection settings: WAL journal, `synchronous=NORMAL` (no fsync per commit on the event loop; in WAL mode a
crash never corrupts, only a power cut may lose the last commits), a busy timeout for the other processes'
writes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from berth.errors import ResourceAlreadyExists, ResourceDoesNotExist
from berth.store import EndpointRecord, ReplicaRecord, Store, StoreError
from berth.store import db as store_db
from berth.store.engine import normalise_url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def test_every_connection_gets_wal_normal_sync_and_a_busy_timeout(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'berth.db'}")
    try:
        with store.engine.connect() as conn:
            pragma = {name: conn.execute(sa.text(f"PRAGMA {name}")).scalar()
                      for name in ("journal_mode", "synchronous", "busy_timeout")}
        assert pragma == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 5000}  # 1: NORMAL (FULL is 2)
    finally:
        store.close()


def test_endpoints_conflict_go_missing_and_keep_their_documents(store: Store) -> None:
    doc = {"config": {"served_entities": [{"name": "é-model", "environment_vars": {"K": "v\u00e9\u4e2d"}}]},
           "ratio": 0.1, "big": 2**53, "none": None, "nested": [[1, 2.5], {"a": True}]}
    store.create_endpoint(EndpointRecord("ep-b", "id-b", doc), owner="p1")
    with pytest.raises(ResourceAlreadyExists, match="ep-b"):
        store.create_endpoint(EndpointRecord("ep-b", "id-other", {}))
    with pytest.raises(ResourceAlreadyExists):  # the id is unique too
        store.create_endpoint(EndpointRecord("ep-c", "id-b", {}))
    assert store.access.acl("id-b") == {"p1": 3}, "a failed create left no grant behind"
    assert store.get_endpoint("ep-b").doc == doc
    for name in ("ep-a", "EP", "ep_z", "ep-a-1"):
        store.create_endpoint(EndpointRecord(name, f"id-{name}", {}))
    assert [r.name for r in store.list_endpoints()] == sorted(["ep-a", "ep-b", "EP", "ep_z", "ep-a-1"])

    store.save_endpoint(EndpointRecord("ep-b", "id-b", {"v": 2}))
    store.save_endpoint(EndpointRecord("ep-b", "id-b", {"v": 2}))  # the same values: still found (rowcount 1)
    assert store.get_endpoint("ep-b").doc == {"v": 2}
    with pytest.raises(ResourceDoesNotExist):
        store.save_endpoint(EndpointRecord("nope", "x", {}))
    store.delete_endpoint("ep-b")
    with pytest.raises(ResourceDoesNotExist):
        store.delete_endpoint("ep-b")
    with pytest.raises(ResourceDoesNotExist):
        store.get_endpoint("ep-b")
    assert store.access.acl("id-b") == {}


def test_endpoints_list_in_code_point_order_whatever_the_databases_collation(postgres: Any) -> None:
    # An ICU en-US database sorts "EP" < "ep_z" < "ep-a"; SQLite (and Berth) sort by code point.
    url = postgres.create("TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'")
    store = Store(url)
    try:
        names = ["ep-a", "ep_z", "EP", "ep-a-1", "epa"]
        for name in names:
            store.create_endpoint(EndpointRecord(name, f"id-{name}", {}))
        assert [r.name for r in store.list_endpoints()] == sorted(names)
    finally:
        store.close()
        postgres.drop(url)


def test_replicas_keep_exact_float_timestamps(store: Store) -> None:
    now = time.time()
    record = ReplicaRecord("r1", "ep", "entity", 4242, "unix:/tmp/x.sock", now)
    store.add_replica(record)
    store.add_replica(ReplicaRecord("r2", "ep", "entity", None, "127.0.0.1:1", 1e-6))
    assert sorted(store.list_replicas(), key=lambda r: r.id) == [
        record, ReplicaRecord("r2", "ep", "entity", None, "127.0.0.1:1", 1e-6)]
    store.remove_replica("r1")
    store.remove_replica("r1")  # already gone: nothing to do
    assert [r.id for r in store.list_replicas()] == ["r2"]


def test_decisions_are_numbered_in_order_and_only_the_newest_are_kept(store: Store,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_db, "DECISIONS_KEPT", 5)
    at = time.time()
    store.add_decisions([("ep", "a", at + i, {"i": i, "reason": "grow"}) for i in range(4)])
    store.add_decisions([("ep", "a", at + i, {"i": i}) for i in range(4, 8)] + [("ep", "b", at, {"i": 0})])
    kept = store.list_decisions("ep", "a", limit=100)
    assert [d["i"] for d in kept] == [3, 4, 5, 6, 7]
    assert [d["timestamp"] for d in kept] == [at + i for i in range(3, 8)]
    assert kept[0] == {"served_entity_name": "a", "timestamp": at + 3, "i": 3, "reason": "grow"}
    assert [d["i"] for d in store.list_decisions("ep", limit=2)] == [7, 0]  # one batch: numbered in order
    store.delete_decisions("ep")
    assert store.list_decisions("ep") == []
    store.add_decisions([("ep", "a", at, {"i": 99})])  # numbering goes on after a delete
    assert [d["i"] for d in store.list_decisions("ep")] == [99]


def test_profiles_upsert(store: Store) -> None:
    assert store.get_profile("ep", "a") is None
    store.save_profile("ep", "a", {"minutes": [0.5] * 3})
    store.save_profile("ep", "a", {"minutes": [1.5] * 3})
    assert store.get_profile("ep", "a") == {"minutes": [1.5] * 3}
    store.delete_profiles("ep")
    assert store.get_profile("ep", "a") is None


def test_access_rows_behave_alike(store: Store) -> None:
    access = store.access
    bob = access.create_principal("user", "bob@example.com", "Bob \u00e9")
    with pytest.raises(ResourceAlreadyExists, match=r"User 'bob@example\.com' already exists"):
        access.create_principal("user", "bob@example.com", "Bob")
    assert access.create_principal("service_principal", "bob@example.com", "bot").kind == "service_principal"
    got = access.principal(bob.id)
    assert (got.admin, got.has_secret, got.created_at) == (False, False, bob.created_at)
    token = access.add_token(bob.id, "h" * 64, comment="c" * 256, expires_at=time.time() + 0.25)
    assert access.add_token(bob.id, "h" * 64) == token, "the same hash is the same token"
    assert access.token_hashes() == {"h" * 64: (bob.id, token.expires_at)}
    with pytest.raises(ResourceDoesNotExist):
        access.set_secret("0", "s" * 64)
    with pytest.raises(ResourceDoesNotExist):
        access.delete_token(token.token_id, principal_id="someone-else")
    access.delete_token(token.token_id)
    with pytest.raises(ResourceDoesNotExist):
        access.delete_token(token.token_id)
    assert access.key("oauth") == access.key("oauth")


def test_a_second_store_on_the_same_database_sees_the_same_state(store_url: str) -> None:
    first = Store(store_url)
    first.create_endpoint(EndpointRecord("ep", "id1", {"a": 1}))
    second = Store(store_url)  # already migrated: nothing to do
    try:
        assert second.get_endpoint("ep").doc == {"a": 1}
        assert second.access.key("oauth") == first.access.key("oauth")
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(("given", "expected"), [
    ("postgresql://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
    ("postgres://u@h/db?sslmode=require", "postgresql+psycopg://u@h/db?sslmode=require"),
    ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ("sqlite:////var/lib/berth/berth.db", "sqlite:////var/lib/berth/berth.db"),
])
def test_urls_as_users_write_them_use_psycopg(given: str, expected: str) -> None:
    assert normalise_url(given) == expected


def test_a_missing_driver_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "psycopg", None)  # `import psycopg` now fails
    with pytest.raises(StoreError) as caught:
        Store("postgresql://postgres:secret@127.0.0.1/berth")
    message = str(caught.value)
    assert "pip install 'berth-serve[postgres]'" in message
    assert "secret" not in message, "no password in messages"


def test_an_unreachable_database_is_one_clear_error() -> None:
    with pytest.raises(StoreError, match=r"^Cannot connect to the store at postgresql\+psycopg://postgres:\*\*\*@"
                                         r"127\.0\.0\.1:1/berth: .*refused"):
        Store("postgresql://postgres:secret@127.0.0.1:1/berth")
    with pytest.raises(StoreError, match="not a SQLAlchemy URL"):
        Store("nonsense")


def test_nul_characters_are_refused_alike(store: Store) -> None:
    """PostgreSQL text cannot hold NUL: both stores refuse it with a 400 (documents are JSON: escaped)."""
    from berth.errors import InvalidParameterValue

    with pytest.raises(InvalidParameterValue, match="NUL"):
        store.access.create_principal("user", "a\x00b", "A")
    with pytest.raises(InvalidParameterValue, match="NUL"):
        store.get_endpoint("a\x00b")
    with pytest.raises(InvalidParameterValue, match="NUL"):
        store.add_decisions([("ep", "a\x00", 1.0, {})])
    store.create_endpoint(EndpointRecord("ep", "id", {"text": "a\x00b"}))
    assert store.get_endpoint("ep").doc == {"text": "a\x00b"}
    assert store.access.principals() == []
