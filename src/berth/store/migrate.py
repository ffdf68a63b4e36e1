"""The store's schema, brought to the newest migration on every start (Alembic, run in-process).

A database from before migrations (Berth's tables, no version table) is checked against the
baseline (revision 0001) and adopted; an empty one is made from scratch. One server migrates at a
time: on PostgreSQL under a transaction-level advisory lock (and in one transaction: DDL is
transactional there), on SQLite inside a `BEGIN IMMEDIATE` transaction (the database file's write lock).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Set
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from berth.store.engine import StoreError, safe_url

# Not "alembic_version": a database shared with another Alembic user (an MLflow tracking store) keeps its own.
VERSION_TABLE = "berth_alembic_version"
BASELINE = "0001"
SCRIPTS = Path(__file__).with_name("migrations")
log = logging.getLogger("berth.store")
LOCK_KEY = 0x6265727468  # "berth": the advisory lock every Berth server takes to migrate its database


def alembic_config(connection: sa.Connection | None = None, scripts: Path = SCRIPTS) -> Config:
    """An Alembic config without an ini file; `connection` is the one env.py migrates."""
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.attributes["connection"] = connection
    return config


def head(scripts: Path = SCRIPTS) -> str:
    revision = ScriptDirectory.from_config(alembic_config(scripts=scripts)).get_current_head()
    assert revision is not None
    return revision


def baseline_tables(scripts: Path = SCRIPTS) -> dict[str, set[str]]:
    """The baseline's tables and their columns (from revision 0001's frozen metadata)."""
    module = ScriptDirectory.from_config(alembic_config(scripts=scripts)).get_revision(BASELINE).module
    return {name: {c.name for c in table.columns} for name, table in module.metadata.tables.items()}


def unknown_schema(existing: Mapping[str, Set[str]], baseline: Mapping[str, Set[str]]) -> list[str]:
    """For a database without a version table: how its Berth tables differ from the baseline ([] = adoptable).

    A table of the baseline may be missing (older servers made tables as they came; 0001 adds them);
    tables that are not Berth's are ignored (a database shared with other applications).
    """
    problems = []
    for name in sorted(set(existing) & set(baseline)):
        missing = sorted(set(baseline[name]) - set(existing[name]))
        if missing:
            problems.append(f"table {name!r} lacks column(s) {', '.join(missing)}")
    return problems


def upgrade(engine: sa.Engine, scripts: Path = SCRIPTS) -> None:
    """Bring the store's schema to the newest migration; `StoreError` when the database cannot be reached,
    a migration fails (nothing of it is kept on PostgreSQL) or it holds tables that are not Berth's."""
    try:
        conn = engine.connect()
    except sa.exc.DBAPIError as exc:
        raise StoreError(f"Cannot connect to the store at {safe_url(engine.url)}: {_reason(exc)}") from exc
    try:
        with conn:
            _lock(conn)
            _upgrade(conn, scripts)
            conn.commit()
    except sa.exc.DBAPIError as exc:
        raise StoreError(f"Cannot migrate the store at {safe_url(engine.url)}: {_reason(exc)}") from exc
    except CommandError as exc:  # e.g. a revision this Berth does not know: the store is newer than the code
        raise StoreError(f"Cannot migrate the store at {safe_url(engine.url)}: {exc}. Was it last used by a "
                         "newer Berth?") from exc


def _reason(exc: sa.exc.DBAPIError) -> str:
    lines = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
    return lines[0] if lines else type(exc.orig).__name__


def current(conn: sa.Connection) -> str | None:
    """The database's revision (None before migrations)."""
    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def _lock(conn: sa.Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})  # released at commit
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # waits out another writer (busy_timeout), then holds the file


def _upgrade(conn: sa.Connection, scripts: Path) -> None:
    inspector = sa.inspect(conn)
    tables = set(inspector.get_table_names())
    before = current(conn) if VERSION_TABLE in tables else None
    if VERSION_TABLE not in tables:
        baseline = baseline_tables(scripts)
        existing: dict[str, set[str]] = {
            name: {c["name"] for c in inspector.get_columns(name)} for name in tables & set(baseline)}
        problems = unknown_schema(existing, baseline)
        if problems:
            raise StoreError(f"The store at {safe_url(conn.engine.url)} has tables that are not Berth's schema "
                             f"({'; '.join(problems)}); use an empty database.")
        # Empty, or made before migrations: 0001 makes what is missing and keeps what is there.
    command.upgrade(alembic_config(conn, scripts), "head")
    after = current(conn)
    if after != before:
        what = "an empty database" if not tables & set(baseline_tables(scripts)) else "the schema before migrations"
        log.info("store %s migrated from %s to revision %s", safe_url(conn.engine.url),
                 f"revision {before}" if before else what, after,
                 extra={"event": "store_migrated", "from_revision": before, "to_revision": after})
