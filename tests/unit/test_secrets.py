"""Secrets without a server: names, values and references (pure), the encrypted store and its key file, the
service's permission and reference checks, and a replica start whose secret is gone (fake backend)."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from berth.access.permissions import Caller
from berth.backends.base import ReplicaExit
from berth.control.reconciler import CrashPolicy, Reconciler
from berth.control.secrets import SecretService, SecretUnavailable, parse_name, parse_value
from berth.control.service import EndpointService
from berth.control.spec import SecretReference, parse_config, secret_references
from berth.control.state import Deployment
from berth.errors import (
    InvalidParameterValue,
    MalformedRequest,
    PermissionDenied,
    ResourceAlreadyExists,
    ResourceDoesNotExist,
)
from berth.store import Store
from berth.store.db import secret_values
from berth.store.secrets import KEY_FILE, SecretKeyError, SecretStore, load_cipher
from tests.unit.test_reconciler import Clock, FakeBackend

ALICE = Caller("1001", "alice@example.com")
BOB = Caller("1002", "bob@example.com")
ADMIN = Caller("1000", "admin", admin=True)
VALUE = "s3cr3t-value-\u00e9"


@pytest.fixture
def store(store_url: str):  # type: ignore[no-untyped-def]
    """An empty store, SQLite and PostgreSQL (tests/conftest.py `store_url`)."""
    store = Store(store_url)
    yield store
    store.close()


@pytest.fixture
def secrets(store: Store, tmp_path: Path) -> SecretService:
    return SecretService(SecretStore(store.engine, load_cipher(tmp_path)))


def config(env: dict[str, str]):  # type: ignore[no-untyped-def]
    return parse_config({"served_entities": [{"entity_name": "/models/a", "name": "a", "environment_vars": env}]})


# Pure parts
@pytest.mark.parametrize("name", ["a", "A-b_c.9", "x" * 128])
def test_valid_names(name: str) -> None:
    assert parse_name({"scope": name}, "scope") == name


@pytest.mark.parametrize("name", [None, "", "x" * 129, "a b", "a/b", "é", 7, "a\n"])
def test_invalid_names_are_400(name: object) -> None:
    with pytest.raises(InvalidParameterValue):
        parse_name({"key": name}, "key")


def test_values_string_or_base64_bytes_at_most_128_kib() -> None:
    assert parse_value({"string_value": VALUE}) == VALUE.encode()
    assert parse_value({"bytes_value": base64.b64encode(b"\x00\xff").decode()}) == b"\x00\xff"
    assert len(parse_value({"string_value": "x" * 128 * 1024})) == 128 * 1024
    with pytest.raises(InvalidParameterValue, match="limit"):
        parse_value({"string_value": "x" * (128 * 1024 + 1)})
    with pytest.raises(InvalidParameterValue, match="base64"):
        parse_value({"bytes_value": "not base64!"})
    with pytest.raises(InvalidParameterValue):
        parse_value({})
    with pytest.raises(MalformedRequest):
        parse_value({"string_value": "a", "bytes_value": "YQ=="})


def test_references_are_whole_values() -> None:
    env = {"TOKEN": "{{secrets/prod.api/token-1}}", "PLAIN": "x", "BRACES": "{{not a secret}}"}
    assert secret_references(env) == [SecretReference("TOKEN", "prod.api", "token-1")]
    assert str(SecretReference("T", "s", "k")) == "{{secrets/s/k}}"
    for bad in ("Bearer {{secrets/s/k}}", "{{secrets/s/k}} ", "{{secrets/s}}", "{{secrets/s/k/x}}",
                "{{secrets/" + "x" * 129 + "/k}}"):
        with pytest.raises(InvalidParameterValue, match="whole secret reference"):
            secret_references({"V": bad})


# The store
def test_round_trip_keeps_only_ciphertext(store: Store, secrets: SecretService) -> None:
    secrets.create_scope(ALICE, {"scope": "s"})
    with pytest.raises(ResourceAlreadyExists, match="Scope s already exists!"):
        secrets.create_scope(BOB, {"scope": "s"})
    secrets.put(ALICE, {"scope": "s", "key": "k", "string_value": VALUE})
    secrets.put(ALICE, {"scope": "s", "key": "k", "string_value": VALUE + "2"})  # overwrites
    assert [k for k, _ in secrets.store.keys("s")] == ["k"]
    assert secrets.list_scopes(BOB) == {"scopes": [{"name": "s", "backend_type": "DATABRICKS"}]}
    listed = secrets.list_secrets(ALICE, {"scope": "s"})["secrets"]
    assert [e["key"] for e in listed] == ["k"]
    assert isinstance(listed[0]["last_updated_timestamp"], int)
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(secret_values.c.value)).scalar_one()
    assert VALUE not in stored
    assert VALUE.encode() not in base64.urlsafe_b64decode(stored)
    assert secrets.resolve({"X": "{{secrets/s/k}}", "Y": "literal"}) == {"X": VALUE + "2", "Y": "literal"}

    secrets.delete(ALICE, {"scope": "s", "key": "k"})
    with pytest.raises(ResourceDoesNotExist, match="Secret does not exist with scope: s and key: k"):
        secrets.delete(ALICE, {"scope": "s", "key": "k"})
    secrets.put(ALICE, {"scope": "s", "key": "k2", "string_value": "v"})
    secrets.delete_scope(ALICE, {"scope": "s"})
    assert secrets.list_scopes(ALICE) == {}
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(secret_values)).scalar() == 0  # went with it
    for call in (lambda: secrets.delete_scope(ALICE, {"scope": "s"}),
                 lambda: secrets.list_secrets(ALICE, {"scope": "s"}),
                 lambda: secrets.put(ALICE, {"scope": "s", "key": "k", "string_value": "v"})):
        with pytest.raises(ResourceDoesNotExist, match="Scope s does not exist!"):
            call()


def test_only_the_creator_and_admins_manage_a_scope(secrets: SecretService) -> None:
    secrets.create_scope(ALICE, {"scope": "alices"})
    secrets.put(ADMIN, {"scope": "alices", "key": "k", "string_value": "v"})
    for call in (lambda: secrets.put(BOB, {"scope": "alices", "key": "k", "string_value": "mine"}),
                 lambda: secrets.list_secrets(BOB, {"scope": "alices"}),
                 lambda: secrets.delete(BOB, {"scope": "alices", "key": "k"}),
                 lambda: secrets.delete_scope(BOB, {"scope": "alices"})):
        with pytest.raises(PermissionDenied, match=r"bob@example\.com does not have MANAGE permission"):
            call()
    assert secrets.resolve({"X": "{{secrets/alices/k}}"}) == {"X": "v"}
    with pytest.raises(InvalidParameterValue, match="initial_manage_principal"):
        secrets.create_scope(ALICE, {"scope": "shared", "initial_manage_principal": "users"})
    with pytest.raises(InvalidParameterValue, match="DATABRICKS"):
        secrets.create_scope(ALICE, {"scope": "akv", "scope_backend_type": "AZURE_KEYVAULT"})
    assert secrets.store.scope("shared") is None
    assert secrets.store.scope("akv") is None


def test_a_config_may_name_only_existing_secrets_of_scopes_the_caller_manages(secrets: SecretService) -> None:
    secrets.create_scope(ALICE, {"scope": "s"})
    secrets.put(ALICE, {"scope": "s", "key": "k", "string_value": "v"})
    secrets.require_references(ALICE, config({"X": "{{secrets/s/k}}"}))
    secrets.require_references(ADMIN, config({"X": "{{secrets/s/k}}"}))
    secrets.require_references(None, config({"X": "{{secrets/s/k}}"}))  # the platform itself
    with pytest.raises(PermissionDenied, match=r"\{\{secrets/s/k\}\}: bob@example.com does not have MANAGE"):
        secrets.require_references(BOB, config({"X": "{{secrets/s/k}}"}))
    with pytest.raises(PermissionDenied):  # a missing key of someone else's scope: 403, its keys are not shown
        secrets.require_references(BOB, config({"X": "{{secrets/s/nope}}"}))
    with pytest.raises(ResourceDoesNotExist, match="scope s has no secret nope"):
        secrets.require_references(ALICE, config({"X": "{{secrets/s/nope}}"}))
    with pytest.raises(ResourceDoesNotExist, match="scope gone does not exist"):
        secrets.require_references(ALICE, config({"X": "{{secrets/gone/k}}"}))
    with pytest.raises(InvalidParameterValue, match="thread pool"):
        secrets.require_references(ALICE, config({"OMP_NUM_THREADS": "{{secrets/s/k}}"}))


def test_resolving_names_the_reference_never_the_value(secrets: SecretService) -> None:
    secrets.create_scope(ALICE, {"scope": "s"})
    with pytest.raises(SecretUnavailable, match=r"environment_vars\['X'\]: \{\{secrets/s/k\}\} does not exist"):
        secrets.resolve({"X": "{{secrets/s/k}}"})
    secrets.put(ALICE, {"scope": "s", "key": "bin", "bytes_value": base64.b64encode(b"\xff\xfe").decode()})
    with pytest.raises(SecretUnavailable, match="not UTF-8"):
        secrets.resolve({"X": "{{secrets/s/bin}}"})
    secrets.put(ALICE, {"scope": "s", "key": "nul", "string_value": "a\x00b"})
    with pytest.raises(SecretUnavailable, match="NUL"):
        secrets.resolve({"X": "{{secrets/s/nul}}"})
    secrets.put(ALICE, {"scope": "s", "key": "big", "string_value": "x" * (128 * 1024)})  # a valid secret ...
    with pytest.raises(SecretUnavailable, match="over the 131072 bytes"):  # ... too long for execve with its name
        secrets.resolve({"X": "{{secrets/s/big}}"})


# The key
def test_the_key_file_is_private_made_once_and_shared_by_racing_servers(tmp_path: Path) -> None:
    ciphers: list[object] = []
    threads = [threading.Thread(target=lambda: ciphers.append(load_cipher(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temporary file left behind
    token = load_cipher(tmp_path).encrypt(b"x")
    assert all(c.decrypt(token) == b"x" for c in ciphers)  # type: ignore[attr-defined]
    os.chmod(path, 0o644)
    load_cipher(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened


def test_a_configured_key_rotates_and_a_wrong_one_is_refused_at_start(store: Store, tmp_path: Path) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    first = SecretStore(store.engine, load_cipher(tmp_path, old))
    first.check_key()
    first.create_scope("s", ALICE.id)
    first.put("s", "k", b"v")
    rotated = SecretStore(store.engine, load_cipher(tmp_path, f"{new},{old}"))
    rotated.check_key()  # the old key still decrypts
    assert rotated.value("s", "k") == b"v"
    assert not (tmp_path / KEY_FILE).exists()  # a configured key makes no file
    with pytest.raises(SecretKeyError, match="another key"):
        SecretStore(store.engine, load_cipher(tmp_path, new)).check_key()
    assert rotated.rotate() == 1  # re-encrypted with the new key: the old one can go
    only_new = SecretStore(store.engine, load_cipher(tmp_path, new))
    only_new.check_key()
    assert only_new.value("s", "k") == b"v"
    with pytest.raises(SecretKeyError, match="another key"):
        SecretStore(store.engine, load_cipher(tmp_path, old)).check_key()
    with pytest.raises(SecretKeyError, match="BERTH_SECRETS_KEY must be a Fernet key"):
        load_cipher(tmp_path, "not-a-key")


# A replica whose secret is gone
def test_a_deleted_secret_fails_replica_starts_under_the_crash_policy(store: Store, secrets: SecretService,
                                                                      tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    monkeypatch.setattr("berth.control.reconciler.time.monotonic", clock)
    backend = FakeBackend()
    holder: dict[str, EndpointService] = {}
    reconciler = Reconciler(backend, store, crash_policy=CrashPolicy(limit=3, backoff_s=1.0), memory_limit_mb=4096,
                            start_timeout_s=300.0, on_routes=lambda table: None,
                            on_persist=lambda ep: holder["service"].persist(ep), settle_s=0.0,
                            resolve_env=secrets.resolve)
    service = holder["service"] = EndpointService(store, reconciler, cores=2)
    service.secrets = secrets
    secrets.create_scope(ALICE, {"scope": "s"})
    secrets.put(ALICE, {"scope": "s", "key": "k", "string_value": VALUE})
    body = {"served_entities": [{"entity_name": "/models/a", "name": "a", "max_provisioned_concurrency": 32,
                                 "environment_vars": {"X": "{{secrets/s/k}}", "Y": "plain"}}]}

    async def scenario() -> None:
        with pytest.raises(PermissionDenied):
            await service.create({"name": "ep", "config": body}, creator=BOB.name, owner=BOB.id, caller=BOB)
        assert "ep" not in reconciler.endpoints
        assert store.list_endpoints() == []
        view = await service.create({"name": "ep", "config": body}, creator=ALICE.name, owner=ALICE.id,
                                    caller=ALICE)
        assert view["pending_config"]["served_entities"][0]["environment_vars"]["X"] == "{{secrets/s/k}}"
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        assert backend.started[0].environment_vars == {"X": VALUE, "Y": "plain"}  # resolved for the backend only
        assert VALUE not in str(store.get_endpoint("ep").doc)
        assert VALUE not in str(service.get("ep"))
        entity = reconciler.endpoints["ep"].active.entities["a"]
        assert entity.deployment is Deployment.READY
        started = len(backend.started)

        secrets.delete(ALICE, {"scope": "s", "key": "k"})
        backend.exits[next(iter(entity.replicas))] = ReplicaExit(returncode=-9, log_tail="")  # one crashes
        for _ in range(6):
            clock.t += 60.0
            await reconciler.reconcile_once()
        assert len(backend.started) == started  # no replica started without its secret
        assert entity.deployment is Deployment.FAILED
        assert "{{secrets/s/k}}" in entity.message
        assert VALUE not in entity.message
        assert entity.replicas == {}

    asyncio.run(scenario())
