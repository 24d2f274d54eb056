"""Break-glass grants: who broke the glass for which patient, why (coded), until when, reviewed?

Revision ID: 0002
Revises: 0001

Frozen DDL: later changes are new revisions, never edits of this file. The table is declared
for queries in :mod:`phivault.access.grant_store` (on the records metadata); the free-text
justification and the review note are stored sealed under the patient's data key.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "bg_grants",
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("grant_id", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("patient", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("justification", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("starts_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger, nullable=True),
        sa.Column("revoked_by", sa.String(128), nullable=True),
        sa.Column("reviewed_at", sa.BigInteger, nullable=True),
        sa.Column("reviewed_by", sa.String(128), nullable=True),
        sa.Column("review_outcome", sa.String(32), nullable=True),
        sa.Column("review_note", sa.LargeBinary, nullable=True),
        sa.PrimaryKeyConstraint("tenant", "grant_id", name="bg_grants_pk"),
    )
    op.create_index("bg_grants_by_subject", "bg_grants", ["tenant", "subject", "expires_at"])
    op.create_index("bg_grants_by_created", "bg_grants", ["tenant", "created_at"])


def downgrade() -> None:
    op.drop_index("bg_grants_by_created", table_name="bg_grants")
    op.drop_index("bg_grants_by_subject", table_name="bg_grants")
    op.drop_table("bg_grants")
