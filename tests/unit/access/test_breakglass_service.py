"""The break-glass service and its SQL store on a real SQLite database (migrated by the records
migrations), with a fixed clock, an in-memory ledger and fixed patient keys."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phivault.access.breakglass import (
    BreakGlassReason,
    BreakGlassService,
    GrantConflict,
    GrantNotFound,
    GrantRecord,
    NotPermitted,
    PatientNotFound,
    ReviewOutcome,
    ReviewStatus,
    SelfReview,
    can_break_glass,
    parse_reason,
    review_status,
)
from phivault.access.decision import compile_policy
from phivault.access.grant_store import SqlGrantStore
from phivault.access.policy import default_policy
from phivault.crypto.elements import PatientCipher
from phivault.errors import InvalidInput
from phivault.identity.principal import Role
from phivault.ledger.events import (
    EventKind,
)
from phivault.ledger.testing import InMemoryAuditSink
from phivault.records.store import NewVersion, ResourceKey, SqlRecordStore
from phivault.records.store.schema import HEAD_REVISION, VERSION_TABLE, metadata
from phivault.records.testing import FixedCallerTrail

T0 = 1_800_000_000.0
SECRET = "Zebulon Quackenbush, found unconscious"


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class Ciphers:
    """Fixed data keys per patient (the key ring's face the service uses)."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], AESGCM] = {}

    async def patient_cipher(
        self, tenant: str, patient: str, *, create: bool = False
    ) -> PatientCipher:
        key = self._keys.setdefault((tenant, patient), AESGCM(AESGCM.generate_key(256)))
        return PatientCipher(tenant, patient, {1: key}, 1)


def _trail(sink: InMemoryAuditSink, clock: Clock, who: str = "dr-er") -> FixedCallerTrail:
    """Builds events as the API's AuditContext does, for one fixed user."""
    return FixedCallerTrail(
        sink, who, tenant="t1", observer="unit",
        clock=lambda: datetime.fromtimestamp(clock(), UTC),
    )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlRecordStore]:
    records = SqlRecordStore(f"sqlite:///{tmp_path}/records.db")
    with records.unit_of_work() as uow:
        for patient in ("p1", "p2", "p3"):
            uow.write(
                NewVersion(
                    key=ResourceKey("t1", "Patient", patient),
                    version=1,
                    last_updated=datetime.fromtimestamp(T0, UTC),
                    key_subject=patient,
                    groups={"demographics": b"sealed"},
                    index=(),
                ),
                previous=None,
            )
        uow.delete(
            ResourceKey("t1", "Patient", "p3"),
            version=2,
            last_updated=datetime.fromtimestamp(T0, UTC),
            previous=1,
        )
        uow.commit()
    try:
        yield records
    finally:
        records.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sink() -> InMemoryAuditSink:
    return InMemoryAuditSink()


@pytest.fixture
def service(store: SqlRecordStore, clock: Clock) -> BreakGlassService:
    return BreakGlassService(
        SqlGrantStore(store.engine),
        Ciphers(),
        compile_policy(default_policy()),
        clock=clock,
        duration_s=3600,
        overdue_s=24 * 3600,
    )


async def _grant(
    service: BreakGlassService, trail: FixedCallerTrail, patient: str = "p1", subject: str = "dr-er"
) -> GrantRecord:
    return await service.request(
        trail,
        tenant="t1",
        subject=subject,
        roles=frozenset({Role.CLINICIAN}),
        patient=patient,
        reason=BreakGlassReason.EMERGENCY_TREATMENT,
        justification=SECRET,
    )


def test_the_migration_creates_exactly_the_declared_table(store: SqlRecordStore) -> None:
    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        head = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar_one()
    assert [d for d in diffs if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)] == []
    assert head == HEAD_REVISION


def test_review_status_is_pure_on_the_clock() -> None:
    record = GrantRecord("t1", "bg-1", "u", "p1", BreakGlassReason.URGENT_CONSULT, T0, T0, T0 + 60)
    assert review_status(record, T0 + 10, overdue_s=100) is ReviewStatus.UNREVIEWED
    assert review_status(record, T0 + 100, overdue_s=100) is ReviewStatus.OVERDUE
    done = GrantRecord(
        "t1", "bg-1", "u", "p1", BreakGlassReason.URGENT_CONSULT, T0, T0, T0 + 60, reviewed_at=T0
    )
    assert review_status(done, T0 + 1000, overdue_s=100) is ReviewStatus.REVIEWED
    assert record.state(T0 + 59) == "active" and record.state(T0 + 60) == "expired"


def test_only_break_glass_roles_and_the_closed_vocabulary() -> None:
    policy = compile_policy(default_policy())
    assert can_break_glass(policy, frozenset({Role.CLINICIAN}))
    assert not can_break_glass(policy, frozenset({Role.NURSE, Role.PRIVACY_OFFICER}))
    assert parse_reason("urgent-consult") is BreakGlassReason.URGENT_CONSULT
    with pytest.raises(InvalidInput) as caught:
        parse_reason("Quackenbush")
    assert "Quackenbush" not in str(caught.value)


async def test_a_grant_is_recorded_before_it_is_stored_and_its_text_is_sealed(
    service: BreakGlassService, store: SqlRecordStore, sink: InMemoryAuditSink, clock: Clock
) -> None:
    trail = _trail(sink, clock)
    record = await _grant(service, trail)
    assert record.expires_at == T0 + 3600
    [event] = sink.events
    assert (event.kind, event.subtype, event.break_glass_grant) == (
        EventKind.BREAK_GLASS,
        "grant",
        record.grant_id,
    )
    assert event.purpose_of_use == ("ETREAT",)
    assert SECRET not in event.model_dump_json()
    with store.engine.connect() as conn:
        raw = conn.exec_driver_sql("SELECT justification, reason FROM bg_grants").one()
    assert SECRET.encode() not in raw[0] and b"Quackenbush" not in raw[0]
    assert raw[1] == "emergency-treatment"


async def test_a_refused_ledger_leaves_no_grant(
    service: BreakGlassService, sink: InMemoryAuditSink, clock: Clock
) -> None:
    sink.failing = True
    with pytest.raises(Exception, match="simulated"):
        await _grant(service, _trail(sink, clock))
    sink.failing = False
    assert await service.active_grants("t1", "dr-er") == ()


async def test_active_grants_follow_the_server_clock(
    service: BreakGlassService, sink: InMemoryAuditSink, clock: Clock
) -> None:
    trail = _trail(sink, clock)
    record = await _grant(service, trail)
    await _grant(service, trail, subject="dr-other")
    [grant] = await service.active_grants("t1", "dr-er")
    assert grant.grant_id == record.grant_id and grant.active(clock())
    clock.t += 3600
    [ended] = await service.active_grants("t1", "dr-er")
    assert not ended.active(clock())  # still seen, so a refusal says break-glass-expired
    clock.t += 3600
    assert await service.active_grants("t1", "dr-er") == ()
    # a caller whose roles cannot use grants is not even looked up
    assert await service.active_grants("t1", "dr-other", roles=frozenset({Role.NURSE})) == ()


async def test_unknown_or_deleted_patients_get_no_grant(
    service: BreakGlassService, sink: InMemoryAuditSink, clock: Clock
) -> None:
    for patient in ("p9", "p3"):
        with pytest.raises(PatientNotFound):
            await _grant(service, _trail(sink, clock), patient=patient)
    assert [e.outcome_reason for e in sink.events] == ["patient-not-found"] * 2
    with pytest.raises(InvalidInput):
        await service.request(
            _trail(sink, clock),
            tenant="t1",
            subject="dr-er",
            roles=frozenset({Role.CLINICIAN}),
            patient="p1",
            reason=BreakGlassReason.EMERGENCY_TREATMENT,
            justification="  ",
        )


async def test_revocation_is_the_grantees_or_a_reviewers_and_happens_once(
    service: BreakGlassService, sink: InMemoryAuditSink, clock: Clock
) -> None:
    record = await _grant(service, _trail(sink, clock))
    with pytest.raises(GrantNotFound):
        await service.revoke(_trail(sink, clock), tenant="t1", grant_id=record.grant_id, by="x")
    with pytest.raises(GrantNotFound):
        await service.revoke(
            _trail(sink, clock), tenant="t1", grant_id=record.grant_id, by="dr-er", patient="p2"
        )
    clock.t += 60
    revoked = await service.revoke(
        _trail(sink, clock), tenant="t1", grant_id=record.grant_id, by="dr-er"
    )
    assert revoked.revoked_at == T0 + 60
    [grant] = await service.active_grants("t1", "dr-er")
    assert grant.revoked and not grant.active(clock())
    with pytest.raises(GrantConflict):
        await service.revoke(
            _trail(sink, clock, "po"),
            tenant="t1",
            grant_id=record.grant_id,
            by="po",
            any_subject=True,
        )
    assert [e.subtype for e in sink.events] == ["grant", "revoke"]


async def test_queue_overdue_review_once_and_tenant_isolation(
    service: BreakGlassService, sink: InMemoryAuditSink, clock: Clock
) -> None:
    old = await _grant(service, _trail(sink, clock))
    clock.t += 25 * 3600
    new = await _grant(service, _trail(sink, clock), patient="p2")
    po = _trail(sink, clock, "po")
    queue = await service.queue(po, tenant="t1", status="unreviewed")
    assert [(v.record.grant_id, v.status) for v in queue] == [
        (new.grant_id, ReviewStatus.UNREVIEWED),
        (old.grant_id, ReviewStatus.OVERDUE),
    ]
    assert all(v.justification is None for v in queue)
    assert [v.record.grant_id for v in await service.queue(po, tenant="t1", status="overdue")] == [
        old.grant_id
    ]
    assert await service.queue(po, tenant="t2", status="all") == []
    with pytest.raises(InvalidInput):
        await service.queue(po, tenant="t1", status="Quackenbush")
    with pytest.raises(GrantNotFound):
        await service.detail(po, tenant="t2", grant_id=old.grant_id)

    view = await service.review(
        po, tenant="t1", grant_id=old.grant_id, by="po", outcome=ReviewOutcome.INAPPROPRIATE
    )
    assert view.status is ReviewStatus.REVIEWED and view.justification == SECRET
    with pytest.raises(GrantConflict):
        await service.review(
            po, tenant="t1", grant_id=old.grant_id, by="po", outcome=ReviewOutcome.APPROPRIATE
        )
    assert [v.record.grant_id for v in await service.queue(po, tenant="t1", status="reviewed")] == [
        old.grant_id
    ]
    reviews = [e for e in sink.events if e.subtype == "review"]
    assert len(reviews) == 1 and reviews[0].break_glass_grant == old.grant_id


async def test_a_justification_that_no_longer_opens_is_reported_not_raised(
    store: SqlRecordStore, sink: InMemoryAuditSink, clock: Clock
) -> None:
    ciphers = Ciphers()
    service = BreakGlassService(
        SqlGrantStore(store.engine), ciphers, compile_policy(default_policy()), clock=clock
    )
    record = await _grant(service, _trail(sink, clock))
    ciphers._keys.clear()  # another data key now: as after a retirement or a shred
    view = await service.detail(_trail(sink, clock, "po"), tenant="t1", grant_id=record.grant_id)
    assert view.unreadable and view.justification is None


async def test_nobody_reviews_their_own_grant(
    service: BreakGlassService, sink: InMemoryAuditSink, clock: Clock
) -> None:
    record = await _grant(service, _trail(sink, clock))
    with pytest.raises(SelfReview):
        await service.review(
            _trail(sink, clock),
            tenant="t1",
            grant_id=record.grant_id,
            by="dr-er",
            outcome=ReviewOutcome.APPROPRIATE,
        )
    assert [(e.subtype, e.outcome_reason) for e in sink.events] == [
        ("grant", None),
        ("review", "self-review"),
    ]


async def test_a_role_without_break_glass_is_refused_and_recorded(
    service: BreakGlassService, sink: InMemoryAuditSink, clock: Clock
) -> None:
    with pytest.raises(NotPermitted):
        await service.request(
            _trail(sink, clock, "nurse-1"),
            tenant="t1",
            subject="nurse-1",
            roles=frozenset({Role.NURSE}),
            patient="p1",
            reason=BreakGlassReason.EMERGENCY_TREATMENT,
            justification=SECRET,
        )
    [event] = sink.events
    assert (event.subtype, event.outcome_reason) == ("grant", "role-not-permitted")
    assert await service.active_grants("t1", "nurse-1") == ()


async def test_a_grant_look_up_does_not_wait_for_the_write_lock(
    store: SqlRecordStore, tmp_path: Path
) -> None:
    """Grant look-ups are reads (every clinician request makes one): while another connection
    holds SQLite's write lock (a group commit, say), they answer from a snapshot instead of
    queueing behind it (with BEGIN IMMEDIATE they waited the busy timeout, then failed)."""
    import sqlite3

    grants = SqlGrantStore(store.engine)
    writer = sqlite3.connect(tmp_path / "records.db", timeout=0.1, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # the write lock, held
        assert grants.for_subject("t1", "Practitioner/p1", ending_after=0.0) == []
        assert grants.get("t1", "g1") is None
    finally:
        writer.execute("ROLLBACK")
        writer.close()
