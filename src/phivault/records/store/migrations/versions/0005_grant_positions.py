"""Break-glass grant positions: a strictly increasing number per grant, the resume cursor of
DEK rotation over the grants' sealed justification and review note.

Revision ID: 0005
Revises: 0004

Frozen DDL: later changes are new revisions, never edits of this file. Declared for queries
as ``grant_positions`` in :mod:`phivault.access.grant_store` (docs/decisions/keys-rotation.md).
A side table rather than a column of ``bg_grants``: SQLite cannot add an auto-increment column
to an existing table. Grants made before this revision get positions in creation order.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "bg_grant_positions",
        sa.Column("position", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("grant_id", sa.String(64), nullable=False),
        sqlite_autoincrement=True,  # a position is never reused
    )
    op.create_index(
        "bg_grant_positions_by_grant", "bg_grant_positions", ["tenant", "grant_id"], unique=True
    )
    op.create_index("bg_grant_positions_by_tenant", "bg_grant_positions", ["tenant", "position"])
    op.execute(
        "INSERT INTO bg_grant_positions (tenant, grant_id) "
        "SELECT tenant, grant_id FROM bg_grants ORDER BY created_at, tenant, grant_id"
    )


def downgrade() -> None:
    op.drop_index("bg_grant_positions_by_tenant", table_name="bg_grant_positions")
    op.drop_index("bg_grant_positions_by_grant", table_name="bg_grant_positions")
    op.drop_table("bg_grant_positions")
