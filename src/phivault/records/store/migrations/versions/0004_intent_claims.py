"""Write-intent claims: the writer and the reconciler race for one row per intent, so an
intent is never recorded as not made while its transaction can still commit.

Revision ID: 0004
Revises: 0003

Frozen DDL: later changes are new revisions, never edits of this file. Declared for queries
as ``intent_claims`` in :mod:`phivault.records.store.schema`
(docs/decisions/records-intent-claims.md). The row with the empty tenant records when claims
began (the database's clock, microseconds): intents recorded before it were written without
a claim, and the reconciler judges them by the versions in the store.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

_NOW_MICROS = {
    "postgresql": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)",
    "sqlite": "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)",
}


def upgrade() -> None:
    op.create_table(
        "rec_intent_claims",
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("claim", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("claimed_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "claim", name="rec_intent_claims_pk"),
    )
    op.create_index("rec_intent_claims_by_time", "rec_intent_claims", ["claimed_at"])
    claims = sa.table(
        "rec_intent_claims",
        sa.column("tenant", sa.String),
        sa.column("claim", sa.String),
        sa.column("state", sa.String),
        sa.column("claimed_at", sa.BigInteger),
    )
    now: sa.ColumnClause[int] = sa.literal_column(_NOW_MICROS[op.get_bind().dialect.name])
    op.execute(
        claims.insert().values(tenant="", claim="claims-since", state="since", claimed_at=now)
    )


def downgrade() -> None:
    op.drop_index("rec_intent_claims_by_time", table_name="rec_intent_claims")
    op.drop_table("rec_intent_claims")
