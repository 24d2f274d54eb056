"""The records tables, as SQLAlchemy Core metadata, and the migration runner.

Why two descriptions of one schema: queries are built on :data:`metadata` (typed columns, no
SQL strings), while the database is created and changed only by Alembic migrations under
``migrations/versions`` (frozen DDL, one file per change). A test compares the two after
``upgrade head`` on SQLite and PostgreSQL, so they cannot drift apart.

The shape (docs/decisions/records-storage.md):

* ``rec_resources``: one row per resource, its *current* version (the head). Version
  conflicts are a compare-and-swap on this row.
* ``rec_versions``: every version ever written (history, vread), tombstones included.
* ``rec_groups``: one sealed element group per version (ciphertext only). ``position`` is the
  cursor DEK rotation resumes from.
* ``rec_idx_*``: search index rows of **current versions only** (replaced in the same
  transaction as the write, removed by a delete), so search never sees an old version.
* ``rec_intent_claims``: one row per write intent, inserted by the writing transaction or by
  the reconciler, whichever comes first (docs/decisions/records-intent-claims.md).

Every key and every index starts with ``tenant``. Instants are integer microseconds since the
Unix epoch (UTC) on both engines, so ordering and comparisons are the same everywhere; open
date bounds are stored as the smallest and largest 64-bit integers, so range predicates need no
NULL cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Connection

__all__ = [
    "CLAIMS_SINCE",
    "DATE_MAX",
    "DATE_MIN",
    "HEAD_REVISION",
    "VERSION_TABLE",
    "care_assignments",
    "groups",
    "idx_blind",
    "idx_date",
    "idx_reference",
    "idx_string",
    "idx_token",
    "intent_claims",
    "metadata",
    "resources",
    "upgrade",
    "versions",
]

#: The Alembic revision :func:`upgrade` brings a database to.
HEAD_REVISION: Final = "0005"
#: Alembic's bookkeeping table for this part (other parts may use Alembic in the same database).
VERSION_TABLE: Final = "rec_alembic_version"
#: Open lower / upper bounds of a date range (microseconds).
DATE_MIN: Final = -(2**63)
DATE_MAX: Final = 2**63 - 1

_MIGRATIONS: Final = Path(__file__).resolve().parent / "migrations"

# BIGSERIAL on PostgreSQL; a rowid alias (with AUTOINCREMENT: never reused) on SQLite.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()


def _tenant() -> Column[str]:
    return Column("tenant", String(128), nullable=False)


def _type() -> Column[str]:
    return Column("resource_type", String(64), nullable=False)


def _id() -> Column[str]:
    return Column("resource_id", String(64), nullable=False)


resources = Table(
    "rec_resources",
    metadata,
    _tenant(),
    _type(),
    _id(),
    Column("version", Integer, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("key_subject", String(64), nullable=False),
    PrimaryKeyConstraint("tenant", "resource_type", "resource_id", name="rec_resources_pk"),
    Index("rec_resources_by_updated", "tenant", "resource_type", "last_updated", "resource_id"),
    Index("rec_resources_by_subject", "tenant", "key_subject"),
)

versions = Table(
    "rec_versions",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=True),
    _tenant(),
    _type(),
    _id(),
    Column("version", Integer, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("key_subject", String(64), nullable=False),
    UniqueConstraint(
        "tenant", "resource_type", "resource_id", "version", name="rec_versions_identity"
    ),
    Index("rec_versions_by_type", "tenant", "resource_type", "seq"),
    sqlite_autoincrement=True,
)

groups = Table(
    "rec_groups",
    metadata,
    Column("position", _SEQ, primary_key=True, autoincrement=True),
    Column(
        "version_seq",
        _SEQ,
        ForeignKey("rec_versions.seq", ondelete="CASCADE", name="rec_groups_version"),
        nullable=False,
    ),
    _tenant(),
    Column("key_subject", String(64), nullable=False),
    Column("grp", String(32), nullable=False),
    Column("ciphertext", LargeBinary, nullable=False),
    UniqueConstraint("version_seq", "grp", name="rec_groups_identity"),
    Index("rec_groups_by_tenant", "tenant", "position"),
    Index("rec_groups_by_subject", "tenant", "key_subject", "position"),
    sqlite_autoincrement=True,
)


def _index_table(name: str, *columns: Column[object], key: tuple[str, ...]) -> Table:
    """An index table: tenant, type, id and parameter, then its own value columns."""
    return Table(
        name,
        metadata,
        _tenant(),
        _type(),
        _id(),
        Column("param", String(64), nullable=False),
        *columns,
        PrimaryKeyConstraint(
            "tenant", "resource_type", "param", *key, "resource_id", name=f"{name}_pk"
        ),
        Index(f"{name}_by_resource", "tenant", "resource_type", "resource_id"),
    )  # fmt: skip


idx_token = _index_table(
    "rec_idx_token",
    Column("code", Text, nullable=False),
    Column("system", Text, nullable=False),  # "" when the token has no system
    key=("code", "system"),
)
idx_string = _index_table(
    "rec_idx_string",
    Column("value", Text, nullable=False),
    key=("value",),
)
idx_date = _index_table(
    "rec_idx_date",
    Column("low", BigInteger, nullable=False),
    Column("high", BigInteger, nullable=False),
    key=("low", "high"),
)
idx_reference = _index_table(
    "rec_idx_reference",
    Column("target_type", String(64), nullable=False),
    Column("target_id", String(64), nullable=False),
    key=("target_type", "target_id"),
)
idx_blind = Table(
    "rec_idx_blind",
    metadata,
    _tenant(),
    _type(),
    _id(),
    Column("param", String(64), nullable=False),
    Column("field", String(128), nullable=False),
    Column("key_version", Integer, nullable=False),
    Column("token", String(128), nullable=False),
    Column("key_subject", String(64), nullable=False),
    PrimaryKeyConstraint(
        "tenant", "resource_type", "field", "token", "resource_id", name="rec_idx_blind_pk"
    ),
    Index("rec_idx_blind_by_resource", "tenant", "resource_type", "resource_id"),
    Index("rec_idx_blind_by_subject", "tenant", "key_subject"),
    Index("rec_idx_blind_by_key_version", "tenant", "key_version"),
)  # fmt: skip


#: Explicit care assignments (migration 0003): a care relationship an administrator made.
care_assignments = Table(
    "acc_care_assignments",
    metadata,
    _tenant(),
    Column("practitioner_type", String(64), nullable=False),
    Column("practitioner_id", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("assigned_by", String(128), nullable=False),
    Column("assigned_at", BigInteger, nullable=False),
    PrimaryKeyConstraint(
        "tenant", "practitioner_type", "practitioner_id", "patient_id",
        name="acc_care_assignments_pk",
    ),
    Index("acc_care_assignments_by_patient", "tenant", "patient_id"),
)  # fmt: skip


#: Write-intent claims (migration 0004). ``claim`` is the intent's id (a SHA-256, hex) and
#: ``state`` an :class:`~phivault.records.store.ports.IntentClaim` value; the primary key is
#: what decides between a writer and the reconciler. ``claimed_at``: microseconds.
intent_claims = Table(
    "rec_intent_claims",
    metadata,
    _tenant(),
    Column("claim", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("claimed_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("tenant", "claim", name="rec_intent_claims_pk"),
    Index("rec_intent_claims_by_time", "claimed_at"),
)

#: The row migration 0004 adds (no tenant can be empty): when claims began, so the reconciler
#: judges older intents by the versions in the store, as it did before claims.
CLAIMS_SINCE: Final = ("", "claims-since", "since")


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Bring the database behind ``connection`` to ``revision`` (Alembic, no alembic.ini).

    Runs inside the connection's transaction: the caller commits. On PostgreSQL the tables go
    to the connection's ``search_path`` (the store sets it to its schema).
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
