"""The store: SQLite by default, any SQLAlchemy URL (PostgreSQL) by setting.

Endpoint documents are kept as JSON beside their indexed name, so the shape can grow without
schema churn; every write is one transaction, so a failed operation leaves nothing half-made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from berth.errors import InvalidParameterValue, ResourceAlreadyExists, ResourceDoesNotExist
from berth.store.engine import create_engine, normalise_url
from berth.store.migrate import upgrade

metadata = sa.MetaData()

endpoints = sa.Table(
    "endpoints",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("doc", sa.Text, nullable=False),
)

legacy_tokens = sa.Table(  # before identities: admin tokens only; moved into access_tokens on start
    "tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("comment", sa.String(256), nullable=False, default=""),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# Identities and credentials (`berth.store.access`): users and service principals, their access tokens
# (hashes only), per-endpoint grants, and the platform's signing key for OAuth access tokens.
principals = sa.Table(
    "principals",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(24), nullable=False),  # user | service_principal
    sa.Column("name", sa.String(256), nullable=False),  # userName, or a service principal's applicationId
    sa.Column("display_name", sa.String(256), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("secret_hash", sa.String(64), nullable=True),  # service principals' OAuth client secret
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("kind", "name", name="uq_principals_kind_name"),
)

access_tokens = sa.Table(
    "access_tokens",
    metadata,
    sa.Column("token_id", sa.String(32), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("principal_id", sa.String(32), nullable=False, index=True),
    sa.Column("comment", sa.String(256), nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
)

endpoint_acl = sa.Table(
    "endpoint_acl",
    metadata,
    sa.Column("endpoint_id", sa.String(32), primary_key=True),
    sa.Column("principal_id", sa.String(32), primary_key=True),
    sa.Column("level", sa.Integer, nullable=False),
)

platform_keys = sa.Table(
    "platform_keys",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Secret scopes and their secrets (`berth.store.secrets`): values only as Fernet tokens, never plaintext.
secret_scopes = sa.Table(
    "secret_scopes",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("owner", sa.String(32), nullable=True),  # the creating principal's id (None: admins only)
    sa.Column("created_at", sa.Float, nullable=False),
)

secret_values = sa.Table(
    "secrets",
    metadata,
    sa.Column("scope", sa.String(128), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),  # a Fernet token (encrypted and authenticated)
    sa.Column("updated_at", sa.Float, nullable=False),
)

replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("endpoint_name", sa.String(64), nullable=False),
    sa.Column("entity_name", sa.String(64), nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("address", sa.String(512), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
)

# The autoscaler's decision log (newest kept, per served entity) and learned traffic profiles.
decisions = sa.Table(
    "autoscaler_decisions",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("endpoint_name", sa.String(64), nullable=False),
    sa.Column("entity_name", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),  # epoch seconds
    sa.Column("doc", sa.Text, nullable=False),
    sa.Index("ix_autoscaler_decisions_entity", "endpoint_name", "entity_name", "seq"),
)

profiles = sa.Table(
    "autoscaler_profiles",
    metadata,
    sa.Column("endpoint_name", sa.String(64), primary_key=True),
    sa.Column("entity_name", sa.String(64), primary_key=True),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

DECISIONS_KEPT = 2000
MANAGE_LEVEL = 3  # berth.access.permissions.Level.CAN_MANAGE  # per served entity


@dataclass
class EndpointRecord:
    """An endpoint as stored: identity plus a JSON document the control plane owns."""

    name: str
    id: str
    doc: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaRecord:
    id: str
    endpoint_name: str
    entity_name: str
    pid: int | None
    address: str
    started_at: float


class Store:
    """All durable state. Methods are short synchronous transactions."""

    def __init__(self, url: str) -> None:
        """Open the store at a SQLAlchemy URL (`postgresql://…` uses psycopg) and migrate its schema to the
        newest revision; `StoreError` when that cannot be done."""
        url = normalise_url(url)
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        sa.event.listen(self.engine, "before_cursor_execute", _refuse_nul)
        try:
            upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        from berth.store.access import AccessStore

        self.access = AccessStore(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # Endpoints
    def create_endpoint(self, record: EndpointRecord, *, owner: str | None = None) -> None:
        """Insert the endpoint and, in the same transaction, its creator's `CAN_MANAGE` grant."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    endpoints.insert().values(
                        name=record.name, id=record.id, doc=orjson.dumps(record.doc).decode()
                    )
                )
                if owner is not None:
                    conn.execute(endpoint_acl.insert().values(endpoint_id=record.id, principal_id=owner,
                                                              level=MANAGE_LEVEL))
        except IntegrityError as exc:
            raise ResourceAlreadyExists(f"Endpoint '{record.name}' already exists.") from exc

    def save_endpoint(self, record: EndpointRecord) -> None:
        with self.engine.begin() as conn:
            result = conn.execute(
                endpoints.update()
                .where(endpoints.c.name == record.name, endpoints.c.id == record.id)  # not a re-created namesake
                .values(doc=orjson.dumps(record.doc).decode())
            )
            if result.rowcount == 0:
                raise ResourceDoesNotExist(f"Endpoint '{record.name}' does not exist.")

    def get_endpoint(self, name: str) -> EndpointRecord:
        with self.engine.connect() as conn:
            row = conn.execute(endpoints.select().where(endpoints.c.name == name)).first()
        if row is None:
            raise ResourceDoesNotExist(f"Endpoint '{name}' does not exist.")
        return EndpointRecord(row.name, row.id, orjson.loads(row.doc))

    def list_endpoints(self) -> list[EndpointRecord]:
        """By name in code-point order (as SQLite sorts; a PostgreSQL database's collation may not)."""
        with self.engine.connect() as conn:
            rows = sorted(conn.execute(endpoints.select()).all(), key=lambda r: r.name)
        return [EndpointRecord(r.name, r.id, orjson.loads(r.doc)) for r in rows]

    def delete_endpoint(self, name: str) -> None:
        """Delete the endpoint and its grants in one transaction."""
        with self.engine.begin() as conn:
            endpoint_id = conn.execute(sa.select(endpoints.c.id).where(endpoints.c.name == name)).scalar()
            if endpoint_id is None:
                raise ResourceDoesNotExist(f"Endpoint '{name}' does not exist.")
            conn.execute(endpoints.delete().where(endpoints.c.name == name))
            conn.execute(endpoint_acl.delete().where(endpoint_acl.c.endpoint_id == endpoint_id))

    # Replica records: what this server started, so a restart after SIGKILL can clean up.
    def add_replica(self, record: ReplicaRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(replicas.insert().values(**record.__dict__))

    def remove_replica(self, replica_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(replicas.delete().where(replicas.c.id == replica_id))

    def list_replicas(self) -> list[ReplicaRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(replicas.select()).all()
        return [ReplicaRecord(**row._mapping) for row in rows]

    # Autoscaler
    def add_decisions(self, rows: list[tuple[str, str, float, dict[str, Any]]]) -> None:
        """Append (endpoint, entity, epoch seconds, decision) rows; keeps the newest per entity."""
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.execute(decisions.insert(), [
                {"endpoint_name": ep, "entity_name": ent, "at": at, "doc": orjson.dumps(doc).decode()}
                for ep, ent, at, doc in rows
            ])
            for ep, ent in {(r[0], r[1]) for r in rows}:
                keep_from = conn.execute(
                    sa.select(decisions.c.seq)
                    .where(decisions.c.endpoint_name == ep, decisions.c.entity_name == ent)
                    .order_by(decisions.c.seq.desc()).offset(DECISIONS_KEPT).limit(1)
                ).scalar()
                if keep_from is not None:
                    conn.execute(decisions.delete().where(decisions.c.endpoint_name == ep,
                                                          decisions.c.entity_name == ent,
                                                          decisions.c.seq <= keep_from))

    def list_decisions(self, endpoint_name: str, entity_name: str | None = None, limit: int = 100) -> list[
            dict[str, Any]]:
        """The newest `limit` decisions of an endpoint (or one entity), oldest first."""
        query = sa.select(decisions).where(decisions.c.endpoint_name == endpoint_name)
        if entity_name is not None:
            query = query.where(decisions.c.entity_name == entity_name)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(decisions.c.seq.desc()).limit(limit)).all()
        return [{"served_entity_name": r.entity_name, "timestamp": r.at, **orjson.loads(r.doc)} for r in reversed(rows)]

    def delete_decisions(self, endpoint_name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(decisions.delete().where(decisions.c.endpoint_name == endpoint_name))

    def delete_profiles(self, endpoint_name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(profiles.delete().where(profiles.c.endpoint_name == endpoint_name))

    def save_profile(self, endpoint_name: str, entity_name: str, doc: dict[str, Any]) -> None:
        values = {"doc": orjson.dumps(doc).decode(), "updated_at": time.time()}
        with self.engine.begin() as conn:
            key = (profiles.c.endpoint_name == endpoint_name) & (profiles.c.entity_name == entity_name)
            if conn.execute(profiles.update().where(key).values(**values)).rowcount == 0:
                conn.execute(profiles.insert().values(endpoint_name=endpoint_name, entity_name=entity_name, **values))

    def get_profile(self, endpoint_name: str, entity_name: str) -> dict[str, Any] | None:
        key = (profiles.c.endpoint_name == endpoint_name) & (profiles.c.entity_name == entity_name)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(profiles.c.doc).where(key)).first()
        return orjson.loads(row.doc) if row is not None else None


def _refuse_nul(_conn: Any, _cursor: Any, _statement: str, parameters: Any, *_: Any) -> None:
    """PostgreSQL text cannot hold NUL characters: refuse them on both stores alike (a 400, not a 500 on one)."""
    stack = [parameters]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidParameterValue("Names and text values must not contain NUL (\\u0000) characters.")
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL never corrupts the database; only the last commits before a power cut (not a
    # crash) may be lost. FULL would fsync every commit on the event loop: the autoscaler's decisions
    # each second, every replica start.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()
