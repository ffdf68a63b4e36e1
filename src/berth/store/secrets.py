"""Secret scopes and their secrets, encrypted at rest with Fernet (AES-128-CBC + HMAC-SHA256).

The key is `BERTH_SECRETS_KEY` when set (servers sharing one PostgreSQL store must share it), else
`DATA_DIR/secrets.key`, made once with mode 0600. The store only ever holds Fernet tokens; a value is
decrypted in memory when a replica's environment is built, and nothing here logs one.
Each method is one short transaction; a failed one changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets as stdlib_secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy.exc import IntegrityError

from berth.errors import ResourceAlreadyExists, ResourceDoesNotExist
from berth.store.db import platform_keys, secret_scopes, secret_values
from berth.store.engine import StoreError

log = logging.getLogger("berth.secrets")

KEY_FILE = "secrets.key"
KEY_ENV = "BERTH_SECRETS_KEY"
# A token of a known text, kept in the store: a server whose key cannot read it was given another key.
CHECK_NAME = "secrets-key-check"
CHECK_TEXT = b"berth secrets key check"


class SecretKeyError(StoreError):
    """The configured secrets key is malformed, or not the one the store's secrets were written with."""


@dataclass(frozen=True)
class ScopeRecord:
    name: str
    owner: str | None  # the creating principal's id
    created_at: float


def load_cipher(data_dir: Path, configured: str | None = None) -> MultiFernet:
    """The secrets cipher: from `configured` (one Fernet key, or several comma-separated: the first
    encrypts, any decrypts, for rotation), else from the key file in `data_dir`, made on first use."""
    if configured:
        try:
            return MultiFernet([Fernet(part.strip().encode()) for part in configured.split(",") if part.strip()])
        except (ValueError, TypeError) as exc:
            raise SecretKeyError(f"{KEY_ENV} must be a Fernet key (32 url-safe base64-encoded bytes), or several "
                                 "separated by commas.") from exc
    return MultiFernet([Fernet(_key_file(data_dir / KEY_FILE))])


def _key_file(path: Path) -> bytes:
    """The key in `path`, written first if absent: to a private temporary file (0600) linked into place, so
    two servers starting at once agree on one key and no reader sees a partial file."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{stdlib_secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another server linked its key first: use that one
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was readable by others (mode %o); made it 0600", path, mode)
    key = path.read_bytes().strip()
    try:
        Fernet(key)
    except (ValueError, TypeError) as exc:
        raise SecretKeyError(f"{path} does not hold a Fernet key.") from exc
    return key


class SecretStore:
    def __init__(self, engine: sa.Engine, cipher: MultiFernet) -> None:
        self.engine = engine
        self.cipher = cipher

    def check_key(self) -> None:
        """Raise `SecretKeyError` when this key cannot read what servers sharing the store wrote with theirs
        (the first server to start leaves a check token)."""
        query = sa.select(platform_keys.c.value).where(platform_keys.c.name == CHECK_NAME)
        with self.engine.connect() as conn:
            token = conn.execute(query).scalar()
        if token is None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(platform_keys.insert().values(name=CHECK_NAME,
                                                               value=self.cipher.encrypt(CHECK_TEXT).decode()))
                return
            except IntegrityError:  # another server wrote one first: check against it
                with self.engine.connect() as conn:
                    token = conn.execute(query).scalar_one()
        try:
            ok = self.cipher.decrypt(token.encode()) == CHECK_TEXT
        except InvalidToken:
            ok = False
        if not ok:
            raise SecretKeyError(
                "The store's secrets were written with another key. Servers sharing a store need the same "
                f"{KEY_ENV} (or the same {KEY_FILE} in their data directories).")

    def rotate(self) -> int:
        """Re-encrypt every secret and the check token with the cipher's first key, in one transaction (after
        a start with `BERTH_SECRETS_KEY=new,old`, `old` can be dropped). Returns the secrets re-encrypted."""
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(secret_values.c.scope, secret_values.c.key, secret_values.c.value)).all()
            for row in rows:
                conn.execute(secret_values.update()
                             .where(secret_values.c.scope == row.scope, secret_values.c.key == row.key)
                             .values(value=self.cipher.rotate(row.value.encode()).decode()))
            token = conn.execute(sa.select(platform_keys.c.value).where(platform_keys.c.name == CHECK_NAME)).scalar()
            if token is not None:
                conn.execute(platform_keys.update().where(platform_keys.c.name == CHECK_NAME)
                             .values(value=self.cipher.rotate(token.encode()).decode()))
        return len(rows)

    # Scopes
    def create_scope(self, name: str, owner: str | None) -> ScopeRecord:
        record = ScopeRecord(name, owner, time.time())
        try:
            with self.engine.begin() as conn:
                conn.execute(secret_scopes.insert().values(**record.__dict__))
        except IntegrityError as exc:
            raise ResourceAlreadyExists(f"Scope {name} already exists!") from exc
        return record

    def scope(self, name: str) -> ScopeRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(secret_scopes.select().where(secret_scopes.c.name == name)).first()
        return ScopeRecord(row.name, row.owner, row.created_at) if row is not None else None

    def scopes(self) -> list[ScopeRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(secret_scopes.select().order_by(secret_scopes.c.name)).all()
        return [ScopeRecord(r.name, r.owner, r.created_at) for r in rows]

    def delete_scope(self, name: str) -> None:
        """The scope and every secret in it."""
        with self.engine.begin() as conn:
            if conn.execute(secret_scopes.delete().where(secret_scopes.c.name == name)).rowcount == 0:
                raise ResourceDoesNotExist(f"Scope {name} does not exist!")
            conn.execute(secret_values.delete().where(secret_values.c.scope == name))

    # Secrets
    def put(self, scope: str, key: str, value: bytes) -> None:
        """Insert or overwrite a secret; its scope must exist (held until the write commits)."""
        token = self.cipher.encrypt(value).decode()
        row = {"value": token, "updated_at": time.time()}
        where = (secret_values.c.scope == scope) & (secret_values.c.key == key)
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    found = conn.execute(sa.select(secret_scopes.c.name).where(secret_scopes.c.name == scope)
                                         .with_for_update()).first()
                    if found is None:
                        raise ResourceDoesNotExist(f"Scope {scope} does not exist!")
                    if conn.execute(secret_values.update().where(where).values(**row)).rowcount == 0:
                        conn.execute(secret_values.insert().values(scope=scope, key=key, **row))
                return
            except IntegrityError:  # a concurrent put inserted it first: overwrite theirs
                if attempt:
                    raise

    def keys(self, scope: str) -> list[tuple[str, float]]:
        """(key, last update) of each secret in the scope, by key."""
        with self.engine.connect() as conn:
            if conn.execute(sa.select(secret_scopes.c.name).where(secret_scopes.c.name == scope)).first() is None:
                raise ResourceDoesNotExist(f"Scope {scope} does not exist!")
            rows = conn.execute(sa.select(secret_values.c.key, secret_values.c.updated_at)
                                .where(secret_values.c.scope == scope).order_by(secret_values.c.key)).all()
        return [(r.key, r.updated_at) for r in rows]

    def exists(self, scope: str, key: str) -> bool:
        where = (secret_values.c.scope == scope) & (secret_values.c.key == key)
        with self.engine.connect() as conn:
            return conn.execute(sa.select(secret_values.c.key).where(where)).first() is not None

    def delete(self, scope: str, key: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(sa.select(secret_scopes.c.name).where(secret_scopes.c.name == scope)).first() is None:
                raise ResourceDoesNotExist(f"Scope {scope} does not exist!")
            where = (secret_values.c.scope == scope) & (secret_values.c.key == key)
            if conn.execute(secret_values.delete().where(where)).rowcount == 0:
                raise ResourceDoesNotExist(f"Secret does not exist with scope: {scope} and key: {key}")

    def value(self, scope: str, key: str) -> bytes | None:
        """The decrypted value, or None when there is no such secret; `InvalidToken` when this key
        cannot decrypt it."""
        where = (secret_values.c.scope == scope) & (secret_values.c.key == key)
        with self.engine.connect() as conn:
            token = conn.execute(sa.select(secret_values.c.value).where(where)).scalar()
        return None if token is None else self.cipher.decrypt(token.encode())
