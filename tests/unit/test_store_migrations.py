"""Schema migrations on both stores: from an empty database, from the schema before migrations (dumps of what
Berth at ba18f4b left, with data), concurrent starts, a failed migration, and the models in `berth.store.db`
matching the migrated schema (so a new table cannot skip its migration)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from berth.gateway.auth import hash_token
from berth.store import Store, StoreError, migrate
from berth.store.db import metadata
from tests.conftest import REPO
from tests.fixtures import previous_schema


def schema_diff(store: Store) -> list[object]:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": migrate.VERSION_TABLE})
        return list(compare_metadata(context, metadata))


def revision(store: Store) -> str | None:
    with store.engine.connect() as conn:
        return migrate.current(conn)


def tables(store_url: str) -> set[str]:
    engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://", 1),
                              poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def execute(store_url: str, *statements: str) -> None:
    engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://", 1),
                              poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def test_an_empty_database_is_migrated_to_head_and_matches_the_models(store_url: str) -> None:
    store = Store(store_url)
    try:
        assert revision(store) == migrate.head()
        assert schema_diff(store) == [], "db.py's tables differ from the migrations: add a migration"
    finally:
        store.close()
    again = Store(store_url)  # a second start has nothing to do
    try:
        assert revision(again) == migrate.head()
    finally:
        again.close()


def test_the_schema_before_migrations_is_adopted_with_its_data(store_url: str) -> None:
    old = previous_schema.load(store_url)
    assert migrate.VERSION_TABLE not in tables(store_url)
    store = Store(store_url)
    try:
        assert revision(store) == migrate.head()
        assert schema_diff(store) == []
        endpoint = store.get_endpoint("fixture-ep")
        assert endpoint.id == old["endpoint_id"]
        assert endpoint.doc["active"]["config"]["served_entities"][0]["entity_name"] == "/nonexistent-model"
        access = store.access
        bob = access.find("user", "bob@example.com")
        assert bob is not None
        assert bob.id == old["bob_id"]
        admin = access.ensure_admin()  # moves the pre-identities admin token into access_tokens
        hashes = access.token_hashes()
        assert hashes[hash_token(old["bob_token"])] == (bob.id, None)
        assert hashes[hash_token(old["legacy_token"])] == (admin.id, None)
        assert hashes[hash_token(old["admin_token"])] == (admin.id, None)
        assert access.acl(old["endpoint_id"]) == {admin.id: 3, bob.id: 2}
        [decision] = store.list_decisions("fixture-ep")
        store.add_decisions([("fixture-ep", decision["served_entity_name"], 1.0, {"new": True})])
        assert [d.get("new") for d in store.list_decisions("fixture-ep")] == [None, True], \
            "numbering goes on after the old rows (the PostgreSQL sequence came along)"
    finally:
        store.close()


def test_an_older_database_made_before_migrations_gets_the_tables_it_lacks(store_url: str) -> None:
    # The first release's store (7987aa6) as its create_all made it: endpoints and admin tokens; later
    # releases' create_all added tables as they came.
    execute(store_url,
            "CREATE TABLE endpoints (name VARCHAR(64) NOT NULL, id VARCHAR(32) NOT NULL, doc TEXT NOT NULL, "
            "PRIMARY KEY (name), UNIQUE (id))",
            "CREATE TABLE tokens (token_hash VARCHAR(64) NOT NULL, comment VARCHAR(256) NOT NULL, "
            "is_admin BOOLEAN NOT NULL, created_at FLOAT NOT NULL, PRIMARY KEY (token_hash))",
            "INSERT INTO endpoints VALUES ('old', 'id-old', '{\"config\": {}}')")
    store = Store(store_url)
    try:
        assert revision(store) == migrate.head()
        assert schema_diff(store) == []
        assert store.get_endpoint("old").doc == {"config": {}}
    finally:
        store.close()


def test_tables_of_another_shape_are_refused_and_nothing_is_changed(store_url: str) -> None:
    execute(store_url, "CREATE TABLE endpoints (name VARCHAR(64) PRIMARY KEY, something TEXT)")
    with pytest.raises(StoreError, match=r"not Berth's schema \(table 'endpoints' lacks column\(s\) doc, id\)"):
        Store(store_url)
    assert tables(store_url) == {"endpoints"}


def _scripts_with(tmp_path: Path, body: str) -> Path:
    """The packaged migrations plus one more revision after the head."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.SCRIPTS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_probe.py").write_text(
        f"import sqlalchemy as sa\nfrom alembic import op\n\nrevision = '9999'\ndown_revision = {migrate.head()!r}\n"
        f"branch_labels = None\ndepends_on = None\n\n\ndef upgrade() -> None:\n{body}\n")
    return scripts


def test_revisions_after_the_baseline_run_on_an_adopted_database(store_url: str, tmp_path: Path) -> None:
    previous_schema.load(store_url)
    scripts = _scripts_with(tmp_path, "    op.create_table('probe', sa.Column('id', sa.Integer, primary_key=True))")
    engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        migrate.upgrade(engine, scripts)
        with engine.connect() as conn:
            assert migrate.current(conn) == "9999"
        assert "probe" in tables(store_url)
    finally:
        engine.dispose()


def test_a_failed_migration_leaves_the_database_as_it_was(store_url: str, tmp_path: Path) -> None:
    scripts = _scripts_with(tmp_path, "    op.create_table('probe', sa.Column('id', sa.Integer, primary_key=True))\n"
                                      "    op.execute('SELECT no_such_function()')")
    engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with pytest.raises(StoreError, match=r"^Cannot migrate the store at .*no_such_function"):
            migrate.upgrade(engine, scripts)
    finally:
        engine.dispose()
    assert tables(store_url) == set(), "the baseline and the probe were rolled back with it"


def test_concurrent_starts_on_one_database_migrate_once(store_url: str) -> None:
    code = "import sys; from berth.store import Store; Store(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, store_url], cwd=REPO, stderr=subprocess.PIPE)
             for _ in range(4)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    store = Store(store_url)
    try:
        assert revision(store) == migrate.head()
        assert schema_diff(store) == []
    finally:
        store.close()


@pytest.mark.parametrize(("existing", "problems"), [
    ({}, []),
    ({"endpoints": {"name", "id", "doc"}, "other_apps_table": {"x"}}, []),
    ({"endpoints": {"name", "id", "doc", "added_by_hand"}}, []),
    ({"endpoints": {"name"}, "tokens": {"token_hash"}},
     ["table 'endpoints' lacks column(s) doc, id", "table 'tokens' lacks column(s) comment, created_at, is_admin"]),
])
def test_which_databases_without_a_version_are_adoptable(existing: dict[str, set[str]], problems: list[str]) -> None:
    assert migrate.unknown_schema(existing, migrate.baseline_tables()) == problems


def test_the_baseline_is_the_schema_before_migrations() -> None:
    """0001's frozen tables are what `metadata.create_all` made at ba18f4b (columns per table)."""
    old = subprocess.run(["git", "show", "ba18f4b:src/berth/store/db.py"], cwd=REPO, capture_output=True, text=True)
    if old.returncode != 0:
        pytest.skip("no git history here")  # a source tarball; the dumps above still test the adoption
    module = types.ModuleType("berth_store_db_ba18f4b")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    try:
        exec(compile(old.stdout, "db_ba18f4b.py", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    old_metadata = module.metadata
    assert {n: {c.name for c in t.columns} for n, t in old_metadata.tables.items()} == migrate.baseline_tables()


def test_a_store_newer_than_the_code_is_a_one_line_error(store_url: str) -> None:
    Store(store_url).close()
    execute(store_url, f"UPDATE {migrate.VERSION_TABLE} SET version_num = '9999'")
    with pytest.raises(StoreError, match=r"Can't locate revision identified by '9999'.*newer Berth"):
        Store(store_url)
