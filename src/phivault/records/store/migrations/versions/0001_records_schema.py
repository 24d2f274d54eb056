"""The records tables: resources (heads), versions, sealed groups and the search index.

Revision ID: 0001
Revises: (none)

Frozen DDL: later changes are new revisions, never edits of this file.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _key() -> list[sa.Column[str]]:
    return [
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
    ]


def _index_table(name: str, *columns: sa.Column[object], key: tuple[str, ...]) -> None:
    op.create_table(
        name,
        *_key(),
        sa.Column("param", sa.String(64), nullable=False),
        *columns,
        sa.PrimaryKeyConstraint(
            "tenant", "resource_type", "param", *key, "resource_id", name=f"{name}_pk"
        ),
    )
    op.create_index(f"{name}_by_resource", name, ["tenant", "resource_type", "resource_id"])


def upgrade() -> None:
    op.create_table(
        "rec_resources",
        *_key(),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("key_subject", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "resource_type", "resource_id", name="rec_resources_pk"),
    )
    op.create_index(
        "rec_resources_by_updated",
        "rec_resources",
        ["tenant", "resource_type", "last_updated", "resource_id"],
    )
    op.create_index("rec_resources_by_subject", "rec_resources", ["tenant", "key_subject"])

    op.create_table(
        "rec_versions",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        *_key(),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("last_updated", sa.BigInteger, nullable=False),
        sa.Column("key_subject", sa.String(64), nullable=False),
        sa.UniqueConstraint(
            "tenant", "resource_type", "resource_id", "version", name="rec_versions_identity"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("rec_versions_by_type", "rec_versions", ["tenant", "resource_type", "seq"])

    op.create_table(
        "rec_groups",
        sa.Column("position", _SEQ, primary_key=True, autoincrement=True),
        sa.Column(
            "version_seq",
            _SEQ,
            sa.ForeignKey("rec_versions.seq", ondelete="CASCADE", name="rec_groups_version"),
            nullable=False,
        ),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("key_subject", sa.String(64), nullable=False),
        sa.Column("grp", sa.String(32), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("version_seq", "grp", name="rec_groups_identity"),
        sqlite_autoincrement=True,
    )
    op.create_index("rec_groups_by_tenant", "rec_groups", ["tenant", "position"])
    op.create_index("rec_groups_by_subject", "rec_groups", ["tenant", "key_subject", "position"])

    _index_table(
        "rec_idx_token",
        sa.Column("code", sa.Text, nullable=False),
        sa.Column("system", sa.Text, nullable=False),
        key=("code", "system"),
    )
    _index_table("rec_idx_string", sa.Column("value", sa.Text, nullable=False), key=("value",))
    _index_table(
        "rec_idx_date",
        sa.Column("low", sa.BigInteger, nullable=False),
        sa.Column("high", sa.BigInteger, nullable=False),
        key=("low", "high"),
    )
    _index_table(
        "rec_idx_reference",
        sa.Column("target_type", sa.String(64), nullable=False),
        sa.Column("target_id", sa.String(64), nullable=False),
        key=("target_type", "target_id"),
    )

    op.create_table(
        "rec_idx_blind",
        *_key(),
        sa.Column("param", sa.String(64), nullable=False),
        sa.Column("field", sa.String(128), nullable=False),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("token", sa.String(128), nullable=False),
        sa.Column("key_subject", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant", "resource_type", "field", "token", "resource_id", name="rec_idx_blind_pk"
        ),
    )
    op.create_index(
        "rec_idx_blind_by_resource", "rec_idx_blind", ["tenant", "resource_type", "resource_id"]
    )
    op.create_index("rec_idx_blind_by_subject", "rec_idx_blind", ["tenant", "key_subject"])
    op.create_index("rec_idx_blind_by_key_version", "rec_idx_blind", ["tenant", "key_version"])


def downgrade() -> None:
    for table in (
        "rec_idx_blind",
        "rec_idx_reference",
        "rec_idx_date",
        "rec_idx_string",
        "rec_idx_token",
        "rec_groups",
        "rec_versions",
        "rec_resources",
    ):
        op.drop_table(table)
