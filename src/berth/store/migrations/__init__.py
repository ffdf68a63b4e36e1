"""The store's schema migrations (Alembic), run by `berth.store.migrate.upgrade` on every start.

To change the schema: edit the tables in `berth/store/db.py`, then add `versions/NNNN_what.py` with
`revision = "NNNN"` and `down_revision` = the current head, whose `upgrade()` makes the same change with
`alembic.op` (SQLite runs in batch mode: use `with op.batch_alter_table(...)` to alter a table).
`tests/unit/test_store_migrations.py` fails while the migrated schema and `db.py` differ.
"""
