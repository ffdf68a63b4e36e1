"""Durable identities, access tokens (hashes only), endpoint grants and the OAuth signing key.

Each method is one short transaction; a failed one changes nothing.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from berth.access.permissions import Caller, Level
from berth.errors import ResourceAlreadyExists, ResourceDoesNotExist
from berth.store.db import access_tokens, endpoint_acl, endpoints, legacy_tokens, platform_keys, principals

ADMIN_NAME = "admin"


@dataclass(frozen=True)
class Principal:
    id: str
    kind: str  # user | service_principal
    name: str  # userName, or applicationId
    display_name: str
    admin: bool
    has_secret: bool
    created_at: float

    @property
    def caller(self) -> Caller:
        return Caller(self.id, self.name, self.kind, self.admin)


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    principal_id: str
    comment: str
    created_at: float
    expires_at: float | None


def _principal(row: sa.Row) -> Principal:  # type: ignore[type-arg]
    return Principal(row.id, row.kind, row.name, row.display_name, bool(row.admin), row.secret_hash is not None,
                     row.created_at)


def _new_id() -> str:
    return str(10**15 + secrets.randbelow(9 * 10**15))  # 16 digits, as SCIM ids look


class AccessStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    # Principals
    def create_principal(self, kind: str, name: str, display_name: str, *, admin: bool = False,
                         secret_hash: str | None = None) -> Principal:
        row = {"id": _new_id(), "kind": kind, "name": name, "display_name": display_name, "admin": admin,
               "secret_hash": secret_hash, "created_at": time.time()}
        try:
            with self.engine.begin() as conn:
                conn.execute(principals.insert().values(**row))
        except IntegrityError as exc:
            label = "User" if kind == "user" else "Service principal"
            raise ResourceAlreadyExists(f"{label} '{name}' already exists.") from exc
        return Principal(row["id"], kind, name, display_name, admin, secret_hash is not None, row["created_at"])

    def principals(self, kind: str | None = None) -> list[Principal]:
        query = principals.select().order_by(principals.c.created_at, principals.c.id)
        if kind is not None:
            query = query.where(principals.c.kind == kind)
        with self.engine.connect() as conn:
            return [_principal(r) for r in conn.execute(query)]

    def principal(self, principal_id: str, kind: str | None = None) -> Principal:
        query = principals.select().where(principals.c.id == principal_id)
        if kind is not None:
            query = query.where(principals.c.kind == kind)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise ResourceDoesNotExist(f"Principal '{principal_id}' does not exist.")
        return _principal(row)

    def find(self, kind: str, name: str) -> Principal | None:
        """A principal by its ACL name (userName or applicationId); a service principal also by display name."""
        with self.engine.connect() as conn:
            row = conn.execute(principals.select().where(principals.c.kind == kind, principals.c.name == name)).first()
            if row is None and kind == "service_principal":
                row = conn.execute(principals.select().where(principals.c.kind == kind,
                                                             principals.c.display_name == name)
                                   .order_by(principals.c.created_at)).first()
        return _principal(row) if row is not None else None

    def delete_principal(self, principal_id: str, kind: str) -> None:
        """The principal, its tokens and its grants, in one transaction."""
        with self.engine.begin() as conn:
            done = conn.execute(principals.delete().where(principals.c.id == principal_id, principals.c.kind == kind))
            if done.rowcount == 0:
                raise ResourceDoesNotExist(f"Principal '{principal_id}' does not exist.")
            conn.execute(access_tokens.delete().where(access_tokens.c.principal_id == principal_id))
            conn.execute(endpoint_acl.delete().where(endpoint_acl.c.principal_id == principal_id))

    def set_secret(self, principal_id: str, secret_hash: str) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(principals.update().where(principals.c.id == principal_id)
                                .values(secret_hash=secret_hash))
            if done.rowcount == 0:
                raise ResourceDoesNotExist(f"Principal '{principal_id}' does not exist.")

    def secret_hash(self, kind: str, name: str) -> tuple[str, str | None] | None:
        """(id, secret hash) of a principal by ACL name, for the token endpoint."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(principals.c.id, principals.c.secret_hash)
                               .where(principals.c.kind == kind, principals.c.name == name)).first()
        return (row.id, row.secret_hash) if row is not None else None

    def ensure_admin(self) -> Principal:
        """The bootstrap admin user; legacy admin tokens (before identities) become its tokens."""
        admin = self.find("user", ADMIN_NAME)
        if admin is None:
            try:
                admin = self.create_principal("user", ADMIN_NAME, ADMIN_NAME, admin=True)
            except ResourceAlreadyExists:  # another server on the same store made it first
                admin = self.find("user", ADMIN_NAME)
                assert admin is not None
        with self.engine.begin() as conn:
            for row in conn.execute(legacy_tokens.select()).all():
                known = conn.execute(sa.select(access_tokens.c.token_id)
                                     .where(access_tokens.c.token_hash == row.token_hash)).first()
                if known is None:
                    conn.execute(access_tokens.insert().values(
                        token_id=secrets.token_hex(16), token_hash=row.token_hash, principal_id=admin.id,
                        comment=row.comment or "admin", created_at=row.created_at, expires_at=None))
            conn.execute(legacy_tokens.delete())
        return admin

    # Tokens
    def add_token(self, principal_id: str, token_hash: str, *, comment: str = "",
                  expires_at: float | None = None) -> TokenRecord:
        record = TokenRecord(secrets.token_hex(16), principal_id, comment, time.time(), expires_at)
        with self.engine.begin() as conn:
            known = conn.execute(sa.select(access_tokens.c.token_id)
                                 .where(access_tokens.c.token_hash == token_hash)).first()
            if known is not None:
                return self.token(known.token_id)
            conn.execute(access_tokens.insert().values(token_hash=token_hash, **record.__dict__))
        return record

    def token(self, token_id: str) -> TokenRecord:
        with self.engine.connect() as conn:
            row = conn.execute(access_tokens.select().where(access_tokens.c.token_id == token_id)).first()
        if row is None:
            raise ResourceDoesNotExist(f"Token '{token_id}' does not exist.")
        return TokenRecord(row.token_id, row.principal_id, row.comment, row.created_at, row.expires_at)

    def tokens(self, principal_id: str | None = None) -> list[TokenRecord]:
        query = access_tokens.select().order_by(access_tokens.c.created_at)
        if principal_id is not None:
            query = query.where(access_tokens.c.principal_id == principal_id)
        with self.engine.connect() as conn:
            return [TokenRecord(r.token_id, r.principal_id, r.comment, r.created_at, r.expires_at)
                    for r in conn.execute(query)]

    def token_hashes(self) -> dict[str, tuple[str, float | None]]:
        """Every token's hash → (principal id, expiry): what the hot path checks."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(access_tokens.c.token_hash, access_tokens.c.principal_id,
                                          access_tokens.c.expires_at)).all()
        return {r.token_hash: (r.principal_id, r.expires_at) for r in rows}

    def delete_token(self, token_id: str, principal_id: str | None = None) -> None:
        query = access_tokens.delete().where(access_tokens.c.token_id == token_id)
        if principal_id is not None:
            query = query.where(access_tokens.c.principal_id == principal_id)
        with self.engine.begin() as conn:
            if conn.execute(query).rowcount == 0:
                raise ResourceDoesNotExist(f"Token '{token_id}' does not exist.")

    # Endpoint identity (the Permissions API names endpoints by id, the rest by name)
    def endpoint_id(self, name: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(endpoints.c.id).where(endpoints.c.name == name)).scalar()

    def endpoint_name(self, endpoint_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(endpoints.c.name).where(endpoints.c.id == endpoint_id)).scalar()

    # Grants
    def acl(self, endpoint_id: str) -> dict[str, Level]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(endpoint_acl.c.principal_id, endpoint_acl.c.level)
                                .where(endpoint_acl.c.endpoint_id == endpoint_id)).all()
        return {r.principal_id: Level(r.level) for r in rows}

    def acls(self) -> dict[str, dict[str, Level]]:
        """Every endpoint's grants, keyed by endpoint *name* (what the gateway routes on)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(endpoints.c.name, endpoint_acl.c.principal_id, endpoint_acl.c.level)
                                .join(endpoint_acl, endpoint_acl.c.endpoint_id == endpoints.c.id)).all()
        out: dict[str, dict[str, Level]] = {}
        for r in rows:
            out.setdefault(r.name, {})[r.principal_id] = Level(r.level)
        return out

    def set_acl(self, endpoint_id: str, grants: dict[str, Level], *, replace: bool) -> None:
        """Replace the endpoint's grants (PUT) or merge these in (PATCH), in one transaction."""
        with self.engine.begin() as conn:
            if replace:
                conn.execute(endpoint_acl.delete().where(endpoint_acl.c.endpoint_id == endpoint_id))
            else:
                conn.execute(endpoint_acl.delete().where(endpoint_acl.c.endpoint_id == endpoint_id,
                                                         endpoint_acl.c.principal_id.in_(list(grants))))
            if grants:
                conn.execute(endpoint_acl.insert(), [{"endpoint_id": endpoint_id, "principal_id": pid,
                                                      "level": int(level)} for pid, level in grants.items()])

    # Keys
    def key(self, name: str) -> bytes:
        """A platform key, made on first use (servers sharing a store share it)."""
        query = sa.select(platform_keys.c.value).where(platform_keys.c.name == name)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is not None:
            return bytes.fromhex(row.value)
        try:
            with self.engine.begin() as conn:
                conn.execute(platform_keys.insert().values(name=name, value=secrets.token_bytes(32).hex()))
        except IntegrityError:
            pass  # another server made it first: use theirs
        with self.engine.connect() as conn:
            return bytes.fromhex(conn.execute(query).scalar_one())
