"""DEK rotation re-seals break-glass justifications and review notes (bg_grants) before it
destroys the old data keys, on real SQLite and PostgreSQL records stores with a real key ring:
the texts stay readable audit evidence after a patient's or a whole tenant's rotation, a text
re-sealed concurrently under an old key is re-sealed again (not left under a destroyed key),
and shredding still makes them unreadable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from records_store_support import StoreFactory
from sqlalchemy import insert, select, update

from phivault.access.breakglass import (
    BreakGlassReason,
    BreakGlassService,
    GrantRecord,
    ReviewOutcome,
)
from phivault.access.decision import compile_policy
from phivault.access.grant_store import SqlGrantElements, SqlGrantStore, grants
from phivault.access.policy import default_policy
from phivault.crypto.elements import PatientCipher, key_version_of
from phivault.crypto.errors import RotationInProgress
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.ports import KeyPurpose, KeyState, SealedElement, SealedElementStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.identity.principal import Role
from phivault.ledger.testing import InMemoryAuditSink
from phivault.records.classification import ElementGroup
from phivault.records.split import Envelope, group_element_ref
from phivault.records.store import NewVersion, ResourceKey, SqlRecordStore
from phivault.records.store.schema import upgrade
from phivault.records.testing import FixedCallerTrail

TENANT = "t1"
T0 = 1_800_000_000.0
REASON = "Zebulon Quackenbush, found unconscious in the car park"
NOTE = "Appropriate: the patient was unresponsive and alone"


def trail(sink: InMemoryAuditSink, who: str) -> FixedCallerTrail:
    """Builds events as the API's AuditContext does, for one fixed user."""
    return FixedCallerTrail(
        sink, who, tenant=TENANT, observer="grant-rotation-test",
        clock=lambda: datetime.fromtimestamp(T0, UTC),
    )  # fmt: skip


@pytest.fixture
async def ring(tmp_path: Path) -> AsyncIterator[KeyRing]:
    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=2)
    keystore = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    ring = KeyRing(
        store=keystore, provider=SealedLocalProvider(keys_dir), audit=InMemoryAuditSink(),
        observer="grant-rotation-test",
    )  # fmt: skip
    await ring.unseal(shares)
    try:
        yield ring
    finally:
        keystore.close()


def service_on(store: SqlRecordStore, ring: KeyRing) -> BreakGlassService:
    return BreakGlassService(
        SqlGrantStore(store.engine), ring, compile_policy(default_policy()), clock=lambda: T0
    )


async def add_patient(store: SqlRecordStore, ring: KeyRing, patient: str) -> None:
    """A Patient head whose one group is really sealed under the patient's data key."""
    cipher = await ring.patient_cipher(TENANT, patient, create=True)
    ref = group_element_ref(TENANT, Envelope("Patient", patient, "1"), ElementGroup.DEMOGRAPHICS)
    with store.unit_of_work() as uow:
        uow.write(
            NewVersion(
                key=ResourceKey(TENANT, "Patient", patient),
                version=1,
                last_updated=datetime.fromtimestamp(T0, UTC),
                key_subject=patient,
                groups={"demographics": cipher.seal(ref, b'{"gender":"other"}')},
                index=(),
            ),
            previous=None,
        )
        uow.commit()


async def reviewed_grant(service: BreakGlassService, patient: str) -> GrantRecord:
    sink = InMemoryAuditSink()
    record = await service.request(
        trail(sink, "dr-er"),
        tenant=TENANT,
        subject="dr-er",
        roles=frozenset({Role.CLINICIAN}),
        patient=patient,
        reason=BreakGlassReason.EMERGENCY_TREATMENT,
        justification=REASON,
    )
    await service.review(
        trail(sink, "po-1"),
        tenant=TENANT,
        grant_id=record.grant_id,
        by="po-1",
        outcome=ReviewOutcome.APPROPRIATE,
        note=NOTE,
    )
    return record


async def opened(service: BreakGlassService, grant_id: str) -> tuple[str | None, str | None]:
    view = await service.detail(
        trail(InMemoryAuditSink(), "po-1"), tenant=TENANT, grant_id=grant_id
    )
    assert not view.unreadable
    return view.justification, view.review_note


def dek_states(ring: KeyRing, patient: str) -> dict[int, KeyState]:
    records = ring._store.records(TENANT, KeyPurpose.DEK, patient)
    return {r.version: r.state for r in records}


def stored_texts(store: SqlRecordStore, grant_id: str) -> tuple[bytes, bytes]:
    g = grants.c
    with store.engine.connect() as conn:
        row = conn.execute(
            select(g.justification, g.review_note).where(g.grant_id == grant_id)
        ).one()
    return bytes(row.justification), bytes(row.review_note)


@pytest.mark.parametrize("scope", ["patient", "tenant"])
async def test_rotation_reseals_justifications_and_review_notes(
    store: SqlRecordStore, ring: KeyRing, scope: str
) -> None:
    service = service_on(store, ring)
    for patient in ("p1", "p2"):
        await add_patient(store, ring, patient)
    first = await reviewed_grant(service, "p1")
    second = await reviewed_grant(service, "p1")
    other = await reviewed_grant(service, "p2")
    before = stored_texts(store, first.grant_id)
    assert {key_version_of(c) for c in before} == {1}
    stores = [store.sealed_elements(), SqlGrantElements(store.engine)]
    report = await ring.rotate_deks(
        TENANT, stores, patient="p1" if scope == "patient" else None, batch=1
    )
    # records: one group per patient; grants: a justification and a note per grant
    rotated = ("p1",) if scope == "patient" else ("p1", "p2")
    assert report.processed == len(rotated) * 1 + 2 * (2 if scope == "patient" else 3)
    for patient in rotated:
        assert dek_states(ring, patient) == {1: KeyState.DESTROYED, 2: KeyState.ACTIVE}
    after = stored_texts(store, first.grant_id)
    assert {key_version_of(c) for c in after} == {2} and after != before
    ring.drop_all()  # nothing cached: the texts open from the store under the new key only
    for record in (first, second, other):
        assert await opened(service, record.grant_id) == (REASON, NOTE)
    if scope == "patient":
        assert dek_states(ring, "p2") == {1: KeyState.ACTIVE}


class ConcurrentReseal:
    """The real grant store, with a second writer that re-seals each element once, under the
    old data key (a worker whose cached cipher predates the rotation), between the rotation's
    scan and its compare-and-swap."""

    def __init__(self, inner: SqlGrantElements, store: SqlRecordStore, stale: PatientCipher):
        self.inner = inner
        self.store = store
        self.stale = stale
        self.raced: list[int] = []

    def scan(
        self, tenant: str, *, patient: str | None, after: int, limit: int
    ) -> Sequence[SealedElement]:
        return self.inner.scan(tenant, patient=patient, after=after, limit=limit)

    def replace(self, element: SealedElement, ciphertext: bytes) -> bool:
        if element.position not in self.raced:
            self.raced.append(element.position)
            what = element.ref.path.rsplit("/", 1)[1]
            column = "justification" if what == "reason" else "review_note"
            grant_id = element.ref.path.split("/")[1]
            text = self.stale.open(element.ref, element.ciphertext)
            with self.store.engine.begin() as conn:
                conn.execute(
                    update(grants)
                    .where(grants.c.tenant == TENANT, grants.c.grant_id == grant_id)
                    .values({column: self.stale.seal(element.ref, text)})
                )
        return self.inner.replace(element, ciphertext)

    def add_tokens(self, element: SealedElement, tokens: Sequence[object]) -> None:
        raise AssertionError("DEK rotation adds no tokens")

    def drop_token_version(self, tenant: str, version: int) -> int:
        return self.inner.drop_token_version(tenant, version)

    def drop_patient_tokens(self, tenant: str, patient: str) -> int:
        return self.inner.drop_patient_tokens(tenant, patient)


async def test_a_text_resealed_under_the_old_key_meanwhile_is_resealed_again(
    store: SqlRecordStore, ring: KeyRing
) -> None:
    service = service_on(store, ring)
    await add_patient(store, ring, "p1")
    record = await reviewed_grant(service, "p1")
    stale = await ring.patient_cipher(TENANT, "p1")
    assert stale.active_version == 1
    racing = ConcurrentReseal(SqlGrantElements(store.engine), store, stale)
    elements: SealedElementStore = racing  # type: ignore[assignment]
    report = await ring.rotate_deks(TENANT, [store.sealed_elements(), elements], patient="p1")
    assert len(racing.raced) == 2  # both texts lost their first compare-and-swap
    assert dek_states(ring, "p1") == {1: KeyState.DESTROYED, 2: KeyState.ACTIVE}
    assert report.retired
    assert {key_version_of(c) for c in stored_texts(store, record.grant_id)} == {2}
    ring.drop_all()
    assert await opened(service, record.grant_id) == (REASON, NOTE)


async def test_a_rotation_resumed_in_the_grants_pass_finishes_them(
    store: SqlRecordStore, ring: KeyRing
) -> None:
    """The job's phase names the store it was walking; a resumed job goes on from there."""
    service = service_on(store, ring)
    await add_patient(store, ring, "p1")
    records = [await reviewed_grant(service, "p1") for _ in range(3)]
    grant_elements = SqlGrantElements(store.engine)

    class Crash(Exception):
        pass

    def crash_after_two(done: int, total: int | None) -> None:
        if done >= 3:  # the patient's group, then two grant texts
            raise Crash

    stores = [store.sealed_elements(), grant_elements]
    with pytest.raises(Crash):
        await ring.rotate_deks(TENANT, stores, batch=1, progress=crash_after_two)
    [job] = ring.open_rotations(TENANT)
    assert job.phase == "reencrypt:1" and job.cursor > 0
    assert dek_states(ring, "p1") == {1: KeyState.DECRYPT_ONLY, 2: KeyState.ACTIVE}
    # resumed without the grants: refused, nothing destroyed
    with pytest.raises(RotationInProgress, match="same element stores"):
        await ring.rotate_deks(TENANT, stores[:1], batch=1)
    assert dek_states(ring, "p1") == {1: KeyState.DECRYPT_ONLY, 2: KeyState.ACTIVE}
    report = await ring.rotate_deks(TENANT, stores, batch=1)
    assert report.job_id == job.job_id and report.processed == 1 + 2 * len(records)
    assert dek_states(ring, "p1") == {1: KeyState.DESTROYED, 2: KeyState.ACTIVE}
    ring.drop_all()
    for record in records:
        assert await opened(service, record.grant_id) == (REASON, NOTE)


async def test_shredding_still_makes_the_texts_unreadable(
    store: SqlRecordStore, ring: KeyRing
) -> None:
    service = service_on(store, ring)
    await add_patient(store, ring, "p1")
    record = await reviewed_grant(service, "p1")
    await ring.rotate_deks(TENANT, [store.sealed_elements(), SqlGrantElements(store.engine)])
    await ring.shred_patient(TENANT, "p1", reason="erasure", elements=store.sealed_elements())
    view = await service.detail(
        trail(InMemoryAuditSink(), "po-1"), tenant=TENANT, grant_id=record.grant_id
    )
    assert view.unreadable and view.justification is None and view.review_note is None
    # and a later rotation passes over the shredded patient's texts without failing
    await add_patient(store, ring, "p2")
    await ring.rotate_deks(TENANT, [store.sealed_elements(), SqlGrantElements(store.engine)])


def test_scan_positions_increase_and_resume_mid_grant(store: SqlRecordStore) -> None:
    """Element positions are a strictly increasing cursor, also across a grant with one text."""
    engine_store = SqlGrantStore(store.engine)
    for number, note in enumerate((b"\x01n", None, b"\x01m")):
        engine_store.insert(
            GrantRecord(
                TENANT, f"bg-{number}", "dr-er", "p1", BreakGlassReason.URGENT_CONSULT,
                T0, T0, T0 + 60, justification=b"\x01j%d" % number,
            )
        )  # fmt: skip
        if note is not None:
            engine_store.mark_reviewed(
                TENANT, f"bg-{number}", at=T0, by="po", outcome=ReviewOutcome.APPROPRIATE,
                note=note,
            )  # fmt: skip
    elements = SqlGrantElements(store.engine)
    everything = elements.scan(TENANT, patient=None, after=0, limit=100)
    positions = [e.position for e in everything]
    assert len(positions) == 5 and positions == sorted(set(positions))
    for limit in (1, 2, 3):
        walked: list[int] = []
        cursor = 0
        while batch := elements.scan(TENANT, patient="p1", after=cursor, limit=limit):
            assert len(batch) <= limit
            walked += [e.position for e in batch]
            cursor = batch[-1].position
        assert walked == positions
    assert elements.scan(TENANT, patient="p9", after=0, limit=10) == []
    assert elements.scan("t2", patient=None, after=0, limit=10) == []
    # a swap changes its one column; a stale one (the text changed since the scan) nothing
    assert elements.replace(everything[1], b"\x01new")
    assert not elements.replace(everything[1], b"\x01again")
    again = elements.scan(TENANT, patient=None, after=0, limit=100)
    assert [e.ciphertext for e in again] == [b"\x01j0", b"\x01new", b"\x01j1", b"\x01j2", b"\x01m"]


def test_grants_made_before_migration_0005_get_positions_in_creation_order(
    stores: StoreFactory,
) -> None:
    store = stores.open(migrate=False)
    with store.engine.begin() as conn:
        upgrade(conn, "0004")
    with store.engine.begin() as conn:
        for grant_id, created in (("bg-late", 20), ("bg-early", 10)):
            conn.execute(
                insert(grants).values(
                    tenant=TENANT, grant_id=grant_id, subject="dr-er", patient="p1",
                    reason="urgent-consult", justification=b"\x01" + grant_id.encode(),
                    created_at=created, starts_at=created, expires_at=created + 60,
                )
            )  # fmt: skip
    with store.engine.begin() as conn:
        upgrade(conn)
    found = SqlGrantElements(store.engine).scan(TENANT, patient=None, after=0, limit=10)
    assert [e.ref.path for e in found] == [
        "break-glass/bg-early/reason",
        "break-glass/bg-late/reason",
    ]
