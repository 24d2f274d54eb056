"""Explicit care assignments: a practitioner assigned to a patient by an administrator
(a covering physician, a consult), which establishes a care relationship like a CareTeam.

Revision ID: 0003
Revises: 0002

Frozen DDL: later changes are new revisions, never edits of this file. Declared for queries
as ``care_assignments`` in :mod:`phivault.records.store.schema`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "acc_care_assignments",
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("practitioner_type", sa.String(64), nullable=False),
        sa.Column("practitioner_id", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("assigned_by", sa.String(128), nullable=False),
        sa.Column("assigned_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant", "practitioner_type", "practitioner_id", "patient_id",
            name="acc_care_assignments_pk",
        ),
    )  # fmt: skip
    op.create_index(
        "acc_care_assignments_by_patient", "acc_care_assignments", ["tenant", "patient_id"]
    )


def downgrade() -> None:
    op.drop_index("acc_care_assignments_by_patient", table_name="acc_care_assignments")
    op.drop_table("acc_care_assignments")
