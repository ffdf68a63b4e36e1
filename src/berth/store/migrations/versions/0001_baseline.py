"""Baseline: the schema as `metadata.create_all` made it before migrations (commit ba18f4b).

Revision ID: 0001
Revises: -
Create Date: 2026-05-01

The tables are a frozen copy, not `berth.store.db`'s (which move on); a database made before
migrations is checked against `metadata` here, then stamped with this revision.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

metadata = sa.MetaData()

sa.Table(
    "endpoints",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("doc", sa.Text, nullable=False),
)
sa.Table(  # before identities: admin tokens only; the store moves them into access_tokens on start
    "tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("comment", sa.String(256), nullable=False),
    sa.Column("is_admin", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
sa.Table(
    "principals",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(24), nullable=False),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("display_name", sa.String(256), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("kind", "name", name="uq_principals_kind_name"),
)
sa.Table(
    "access_tokens",
    metadata,
    sa.Column("token_id", sa.String(32), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("principal_id", sa.String(32), nullable=False, index=True),
    sa.Column("comment", sa.String(256), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
)
sa.Table(
    "endpoint_acl",
    metadata,
    sa.Column("endpoint_id", sa.String(32), primary_key=True),
    sa.Column("principal_id", sa.String(32), primary_key=True),
    sa.Column("level", sa.Integer, nullable=False),
)
sa.Table(
    "platform_keys",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
sa.Table(
    "replicas",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("endpoint_name", sa.String(64), nullable=False),
    sa.Column("entity_name", sa.String(64), nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("address", sa.String(512), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
)
sa.Table(
    "autoscaler_decisions",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("endpoint_name", sa.String(64), nullable=False),
    sa.Column("entity_name", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Index("ix_autoscaler_decisions_entity", "endpoint_name", "entity_name", "seq"),
)
sa.Table(
    "autoscaler_profiles",
    metadata,
    sa.Column("endpoint_name", sa.String(64), primary_key=True),
    sa.Column("entity_name", sa.String(64), primary_key=True),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


def upgrade() -> None:
    """Make the tables (and their indexes) a database made before migrations may lack; keep what it has."""
    bind = op.get_bind()
    metadata.create_all(bind)  # checkfirst: an existing table is left as it is
    inspector = sa.inspect(bind)
    for table in metadata.sorted_tables:
        have = {ix["name"] for ix in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in have:
                index.create(bind)


def downgrade() -> None:
    metadata.drop_all(op.get_bind())
