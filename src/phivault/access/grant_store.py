"""Break-glass grants in the records database (SQLAlchemy Core; SQLite or PostgreSQL).

The table ``bg_grants`` is created by the records migration ``0002_break_glass`` and declared
here on the records :data:`~phivault.records.store.schema.metadata`, so that queries are typed
and the schema-drift test compares it with the migration. Times are integer microseconds since
the epoch (as in the records tables); the justification and review note are ciphertext.

Revocation and review are compare-and-set updates (``WHERE revoked_at IS NULL``): two
reviewers, or two workers, cannot both win. Driver exceptions never leave this module:
:class:`GrantStoreUnavailable` carries the driver's class name only.

:class:`SqlGrantElements` is the key ring's view of the two sealed columns (a
:class:`~phivault.crypto.ports.SealedElementStore`): DEK rotation re-seals them before it
destroys the old data keys, so a justification stays readable audit evidence. Each grant gets
a position in ``bg_grant_positions`` (migration 0005); its justification is element
``2 * position`` and its review note ``2 * position + 1``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    RowMapping,
    String,
    Table,
    and_,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from phivault.access.breakglass import (
    BreakGlassReason,
    GrantRecord,
    ReviewOutcome,
    justification_ref,
)
from phivault.crypto.blind_index import BlindToken
from phivault.crypto.ports import SealedElement
from phivault.errors import InvalidInput, StoreUnavailable
from phivault.records.store.schema import metadata, resources

if TYPE_CHECKING:
    from phivault.crypto.ports import SealedElementStore

__all__ = [
    "GrantStoreUnavailable",
    "SqlGrantElements",
    "SqlGrantStore",
    "grant_positions",
    "grants",
]

grants = Table(
    "bg_grants",
    metadata,
    Column("tenant", String(128), nullable=False),
    Column("grant_id", String(64), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("patient", String(64), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("justification", LargeBinary, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("starts_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
    Column("revoked_by", String(128), nullable=True),
    Column("reviewed_at", BigInteger, nullable=True),
    Column("reviewed_by", String(128), nullable=True),
    Column("review_outcome", String(32), nullable=True),
    Column("review_note", LargeBinary, nullable=True),
    PrimaryKeyConstraint("tenant", "grant_id", name="bg_grants_pk"),
    Index("bg_grants_by_subject", "tenant", "subject", "expires_at"),
    Index("bg_grants_by_created", "tenant", "created_at"),
)

#: One row per grant (migration 0005): the rotation's resume cursor over grants.
grant_positions = Table(
    "bg_grant_positions",
    metadata,
    Column(
        "position",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("tenant", String(128), nullable=False),
    Column("grant_id", String(64), nullable=False),
    Index("bg_grant_positions_by_grant", "tenant", "grant_id", unique=True),
    Index("bg_grant_positions_by_tenant", "tenant", "position"),
    sqlite_autoincrement=True,
)

# The sealed columns, in element order within a grant (element = 2 * position + index).
_SEALED: Final = (("reason", "justification"), ("review-note", "review_note"))

_TENANT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,127}$")
_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


class GrantStoreUnavailable(StoreUnavailable):
    """The grants table could not be read or written (a 503)."""


def _micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _seconds(micros: int | None) -> float | None:
    return None if micros is None else micros / 1_000_000


def _check(tenant: str, the_id: str, what: str) -> None:
    if not _TENANT_RE.match(tenant):
        raise InvalidInput("not a tenant id", path="tenant")
    if not _ID_RE.match(the_id):
        raise InvalidInput(f"not a {what} id", path=what)


def _record(row: RowMapping) -> GrantRecord:
    outcome = row["review_outcome"]
    return GrantRecord(
        tenant=row["tenant"],
        grant_id=row["grant_id"],
        subject=row["subject"],
        patient=row["patient"],
        reason=BreakGlassReason(row["reason"]),
        created_at=row["created_at"] / 1_000_000,
        starts_at=row["starts_at"] / 1_000_000,
        expires_at=row["expires_at"] / 1_000_000,
        justification=row["justification"],
        revoked_at=_seconds(row["revoked_at"]),
        revoked_by=row["revoked_by"],
        reviewed_at=_seconds(row["reviewed_at"]),
        reviewed_by=row["reviewed_by"],
        review_outcome=None if outcome is None else ReviewOutcome(outcome),
        review_note=row["review_note"],
    )


class _OnEngine:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def _connection(self, doing: str, *, write: bool = False) -> Iterator[Connection]:
        try:
            if write:
                with self._engine.begin() as conn:
                    yield conn
            else:
                # A read: on SQLite a deferred BEGIN (a WAL snapshot), not the BEGIN
                # IMMEDIATE of writes, which takes the database's one write lock: every
                # clinician request looks up its grants, and would queue behind (and hold
                # back) the records store's group commits just to read.
                with self._engine.connect() as conn:
                    yield conn.execution_options(phivault_read_only=True)
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None)
            kind = type(orig).__name__ if orig is not None else type(exc).__name__
            raise GrantStoreUnavailable(f"break-glass grants: {doing} failed ({kind})") from exc


class SqlGrantStore(_OnEngine):
    """Grants on an engine whose database the records migrations brought to head (the
    records store's: ``SqlGrantStore(record_store.engine)``)."""

    def patient_exists(self, tenant: str, patient: str) -> bool:
        """Whether the patient's head exists and is not deleted (nothing is decrypted)."""
        _check(tenant, patient, "patient")
        query = select(resources.c.deleted).where(
            and_(
                resources.c.tenant == tenant,
                resources.c.resource_type == "Patient",
                resources.c.resource_id == patient,
            )
        )
        with self._connection("patient look-up") as conn:
            deleted = conn.execute(query).scalar_one_or_none()
        return deleted is not None and not deleted

    def insert(self, record: GrantRecord) -> None:
        _check(record.tenant, record.grant_id, "grant")
        _check(record.tenant, record.patient, "patient")
        values = {
            "tenant": record.tenant,
            "grant_id": record.grant_id,
            "subject": record.subject,
            "patient": record.patient,
            "reason": record.reason.value,
            "justification": record.justification,
            "created_at": _micros(record.created_at),
            "starts_at": _micros(record.starts_at),
            "expires_at": _micros(record.expires_at),
        }
        with self._connection("insert", write=True) as conn:
            conn.execute(insert(grants).values(**values))
            # same transaction: a grant never exists without its rotation position
            conn.execute(
                insert(grant_positions).values(tenant=record.tenant, grant_id=record.grant_id)
            )

    def get(self, tenant: str, grant_id: str) -> GrantRecord | None:
        _check(tenant, grant_id, "grant")
        query = select(grants).where(and_(grants.c.tenant == tenant, grants.c.grant_id == grant_id))
        with self._connection("read") as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _record(row)

    def for_subject(self, tenant: str, subject: str, *, ending_after: float) -> list[GrantRecord]:
        """The subject's grants that end after ``ending_after`` (revoked ones included)."""
        query = select(grants).where(
            and_(
                grants.c.tenant == tenant,
                grants.c.subject == subject,
                grants.c.expires_at > _micros(ending_after),
            )
        )
        with self._connection("look-up") as conn:
            return [_record(row) for row in conn.execute(query).mappings()]

    def listing(self, tenant: str, *, reviewed: bool | None, limit: int) -> list[GrantRecord]:
        """The tenant's grants, newest first; only (un)reviewed ones when ``reviewed`` says."""
        where = grants.c.tenant == tenant
        if reviewed is True:
            where = and_(where, grants.c.reviewed_at.is_not(None))
        elif reviewed is False:
            where = and_(where, grants.c.reviewed_at.is_(None))
        query = (
            select(grants)
            .where(where)
            .order_by(grants.c.created_at.desc(), grants.c.grant_id)
            .limit(limit)
        )
        with self._connection("list") as conn:
            return [_record(row) for row in conn.execute(query).mappings()]

    def mark_revoked(self, tenant: str, grant_id: str, *, at: float, by: str) -> bool:
        """Revoke unless already revoked; whether this call did it."""
        _check(tenant, grant_id, "grant")
        statement = (
            update(grants)
            .where(
                and_(
                    grants.c.tenant == tenant,
                    grants.c.grant_id == grant_id,
                    grants.c.revoked_at.is_(None),
                )
            )
            .values(revoked_at=_micros(at), revoked_by=by)
        )
        with self._connection("revoke", write=True) as conn:
            return conn.execute(statement).rowcount == 1

    def mark_reviewed(
        self,
        tenant: str,
        grant_id: str,
        *,
        at: float,
        by: str,
        outcome: ReviewOutcome,
        note: bytes | None,
    ) -> bool:
        """Review unless already reviewed; whether this call did it."""
        _check(tenant, grant_id, "grant")
        statement = (
            update(grants)
            .where(
                and_(
                    grants.c.tenant == tenant,
                    grants.c.grant_id == grant_id,
                    grants.c.reviewed_at.is_(None),
                )
            )
            .values(
                reviewed_at=_micros(at),
                reviewed_by=by,
                review_outcome=outcome.value,
                review_note=note,
            )
        )
        with self._connection("review", write=True) as conn:
            return conn.execute(statement).rowcount == 1


class SqlGrantElements(_OnEngine):
    """:class:`~phivault.crypto.ports.SealedElementStore` over the grants' sealed columns.

    Used by DEK rotation only: the elements carry no blind index, so the token methods do
    nothing. ``replace`` is a compare-and-swap on the one column, so a justification or note
    written meanwhile (a review) is never overwritten with the old text.
    """

    def scan(
        self, tenant: str, *, patient: str | None, after: int, limit: int
    ) -> Sequence[SealedElement]:
        p, g = grant_positions.c, grants.c
        # The grant holding element ``after + 1`` is at ``after // 2``; one grant more than
        # ``limit`` so that a grant whose elements are all at or before ``after`` cannot
        # leave the batch empty while later grants exist.
        statement = (
            select(p.position, g.grant_id, g.patient, g.justification, g.review_note)
            .join(grants, and_(g.tenant == p.tenant, g.grant_id == p.grant_id))
            .where(
                p.tenant == tenant,
                p.position >= after // 2,
                or_(g.justification.is_not(None), g.review_note.is_not(None)),
            )
            .order_by(p.position)
            .limit(limit + 1)
        )
        if patient is not None:
            statement = statement.where(g.patient == patient)
        with self._connection("scan") as conn:
            rows = conn.execute(statement).all()
        found: list[SealedElement] = []
        for row in rows:
            for offset, (what, column) in enumerate(_SEALED):
                position = 2 * int(row.position) + offset
                value = getattr(row, column)
                if value is None or position <= after:
                    continue
                found.append(
                    SealedElement(
                        position=position,
                        ref=justification_ref(tenant, row.patient, row.grant_id, what),
                        patient=row.patient,
                        ciphertext=bytes(value),
                    )
                )
        return found[:limit]

    def replace(self, element: SealedElement, ciphertext: bytes) -> bool:
        grant_position, offset = divmod(element.position, 2)
        column = grants.c[_SEALED[offset][1]]
        p = grant_positions.c
        grant_id = (
            select(p.grant_id)
            .where(p.position == grant_position, p.tenant == element.ref.tenant)
            .scalar_subquery()
        )
        statement = (
            update(grants)
            .where(
                grants.c.tenant == element.ref.tenant,
                grants.c.grant_id == grant_id,
                column == element.ciphertext,
            )
            .values({column.name: ciphertext})
        )
        with self._connection("re-seal", write=True) as conn:
            return conn.execute(statement).rowcount == 1

    def add_tokens(self, element: SealedElement, tokens: Sequence[BlindToken]) -> None:
        """Nothing: grant texts are not searchable."""

    def drop_token_version(self, tenant: str, version: int) -> int:
        return 0

    def drop_patient_tokens(self, tenant: str, patient: str) -> int:
        return 0


if TYPE_CHECKING:  # mypy holds the adapter to its port

    def _port(engine: Engine) -> SealedElementStore:
        return SqlGrantElements(engine)
