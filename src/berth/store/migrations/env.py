"""Alembic's environment for the store: `berth.store.migrate` passes the connection (and holds the lock)."""

from alembic import context

from berth.store.db import metadata
from berth.store.migrate import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
