"""Write-intent claims: an intent is never settled "absent" and then committed.

The reconciler of the scaled shape settles intents older than the settle age while other
workers serve; a write can be slower than that (a busy thread pool, a slow database). Each
test holds a real write at one point of its way -- before its transaction begins, with its
transaction open, after its commit but before its outcome event -- runs a reconcile pass
with settle age 0 from another repository (another worker) on the same database, then lets
the write go on. Whatever the interleaving, every outcome the ledger records for the intent
must agree with the store (docs/decisions/records-intent-claims.md).

The store is the real one (SQLite and PostgreSQL), held by a test-only subclass at the
chosen point with a ``threading.Event``; the ledger is the real embedded ledger.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from records_store_support import StoreFactory, fresh_schema
from repository_support import TENANT, Kit, loader, open_kit
from sqlalchemy import delete, func, select, update

from phivault.access.decision import compile_policy
from phivault.access.policy import default_policy
from phivault.api.problems import problem_for
from phivault.datadir import DataDir
from phivault.ledger.events import AuditEvent, EventKind
from phivault.ledger.service import Ledger, initialize_ledger, open_ledger
from phivault.records.errors import TransactionConflict, http_status
from phivault.records.repository import RecordsRepository
from phivault.records.store import (
    IntentSettled,
    ReadClass,
    ResourceKey,
    SqlRecordStore,
    SqlUnitOfWork,
    VersionConflict,
)
from phivault.records.store.schema import CLAIMS_SINCE, intent_claims

COMMITTED = {"committed", "reconciled-committed"}
ABSENT = {"rolled-back", "reconciled-absent"}
STAGES = ("before-begin", "before-commit", "before-outcome", "after")
FATES = ("commits", "fails", "dies")


class HeldStore(SqlRecordStore):
    """The real store, whose next writing unit of work stops at ``hold`` ("begin": before its
    transaction begins; "commit": with the transaction open, its claims and changes made)
    until ``release`` is set; with ``fail``, that unit then fails as a write conflict would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold: str | None = None
        self.fail = False
        self.arrived = threading.Event()
        self.release = threading.Event()

    def wait_here(self) -> None:
        self.arrived.set()
        if not self.release.wait(timeout=60):
            raise TimeoutError("the test never released the held write")

    @contextmanager
    def unit_of_work(
        self,
        *,
        read_only: bool = False,
        reads: ReadClass = ReadClass.PHI,
        session: str | None = None,
    ) -> Iterator[SqlUnitOfWork]:
        hold = None if read_only else self.hold
        if read_only or (hold is None and not self.fail):
            with super().unit_of_work(read_only=read_only, reads=reads, session=session) as uow:
                yield uow
            return
        self.hold = None
        if hold == "begin":
            self.wait_here()
        with super().unit_of_work(session=session) as uow:
            real_commit = uow.commit

            def held_commit() -> None:
                if hold == "commit":
                    self.wait_here()
                if self.fail:
                    raise VersionConflict("Organization", "(held)", 1, 2)
                real_commit()

            uow.commit = held_commit  # type: ignore[method-assign]
            yield uow


class OutcomeGate:
    """The writer's audit sink: the real ledger, except that outcome events wait for
    ``release`` (when ``hold``) and are lost (when ``lose``: the process died after its
    commit, before the outcome reached the ledger)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.hold = False
        self.lose = False
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def record(self, event: AuditEvent) -> int:
        if event.outcome_reason in COMMITTED | ABSENT:
            if self.hold:
                self.arrived.set()
                await self.release.wait()
            if self.lose:
                return -1
        return await self.ledger.record(event)


@dataclass
class Race:
    kit: Kit  # kit.repo: the reconciling worker
    ledger: Ledger
    store: HeldStore
    writer: RecordsRepository  # the writing worker, on the held store
    gate: OutcomeGate

    async def reconcile(self) -> tuple[int, int]:
        report = await self.kit.repo.reconcile(self.ledger, sink=self.ledger, settle_after_s=0)
        return report.committed, report.absent

    def intents(self) -> list[AuditEvent]:
        return [e for e in self.events() if e.outcome_reason == "intent"]

    def outcomes(self) -> list[str]:
        return [
            e.outcome_reason
            for e in self.events()
            if e.outcome_reason is not None and e.outcome_reason in COMMITTED | ABSENT
        ]

    def events(self) -> list[AuditEvent]:
        events = [self.ledger.read(i).event for i in range(self.ledger.size)]
        return [e for e in events if e.kind is EventKind.REST]

    def in_store(self, intent: AuditEvent) -> bool:
        with self.kit.repo._store.unit_of_work(read_only=True, reads=ReadClass.FRESH) as uow:
            found = []
            for entity in intent.entities:
                if entity.what is None or "/_history/" not in entity.what:
                    continue
                kind, ident, _, version = entity.what.split("/")
                found.append(uow.vread(ResourceKey(TENANT, kind, ident), int(version)) is not None)
        assert found and len(set(found)) == 1  # all or nothing
        return found[0]

    def claim_rows(self) -> int:
        engine = self.kit.repo._store.engine  # type: ignore[attr-defined]
        with engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(intent_claims.c.tenant == TENANT)
                ).scalar_one()
            )


@asynccontextmanager
async def race(stores: StoreFactory, tmp_path: Path) -> AsyncIterator[Race]:
    data_dir = DataDir.create(tmp_path / "data", dev=True)
    initialize_ledger(data_dir)
    async with open_kit(stores, tmp_path) as kit, open_ledger(data_dir) as ledger:
        store = HeldStore(stores.url, schema=stores.schema)
        try:
            writer = RecordsRepository(
                store, kit.ring, compile_policy(default_policy()), clock=kit.clock
            )
            yield Race(kit, ledger, store, writer, OutcomeGate(ledger))
        finally:
            store.release.set()
            store.close()


def writing(r: Race) -> asyncio.Task[Any]:
    org = {"resourceType": "Organization", "name": "Slow"}
    return asyncio.ensure_future(r.writer.create(loader(r.gate), org))


async def settled(task: asyncio.Task[Any]) -> BaseException | None:
    """The writer's end: None if it succeeded, else what it raised."""
    try:
        await asyncio.wait_for(task, 60)
    except Exception as exc:
        return exc
    return None


def assert_ledger_agrees_with_store(r: Race) -> bool:
    """The property: the intent has outcomes, and every one agrees with the store."""
    (intent,) = r.intents()
    present = r.in_store(intent)
    outcomes = r.outcomes()
    assert outcomes, "the intent was never settled"
    assert set(outcomes) <= (COMMITTED if present else ABSENT), (outcomes, present)
    return present


def wait_on_claim_lock(r: Race) -> None:
    """Until a PostgreSQL backend waits on a lock while inserting into the claims table."""
    engine = r.kit.repo._store.engine  # type: ignore[attr-defined]
    while True:
        with engine.connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'INSERT INTO rec_intent_claims%%'"
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.05)


async def test_a_reconciler_waits_for_an_open_write_and_reports_it_committed(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """The write's transaction is open (its claim and changes made, not committed) while
    the reconciler settles its intent: the reconciler waits, and says committed."""
    async with race(stores, tmp_path) as r:
        r.store.hold = "commit"
        write = writing(r)
        await asyncio.to_thread(r.store.arrived.wait, 30)
        reconciling = asyncio.ensure_future(r.reconcile())
        if stores.engine == "postgresql":  # seen waiting on the writer's claim in the server
            await asyncio.wait_for(asyncio.to_thread(wait_on_claim_lock, r), 30)
        else:  # SQLite: waiting for the writer's write lock (no way to see it from outside)
            await asyncio.sleep(0.5)
        assert not reconciling.done()  # waiting for the writer's transaction, not guessing
        r.store.release.set()
        assert await settled(write) is None
        assert await asyncio.wait_for(reconciling, 30) == (1, 0)
        assert assert_ledger_agrees_with_store(r)
        assert sorted(r.outcomes()) == ["committed", "reconciled-committed"]


async def test_a_write_settled_absent_before_it_began_can_no_longer_commit(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """The write is slower than the settle age (its transaction has not begun): the
    reconciler settles it absent, and then the write fails cleanly (503), writing nothing."""
    async with race(stores, tmp_path) as r:
        r.store.hold = "begin"
        write = writing(r)
        await asyncio.to_thread(r.store.arrived.wait, 30)
        assert await r.reconcile() == (0, 1)
        r.store.release.set()
        failure = await settled(write)
        assert isinstance(failure, IntentSettled)
        assert http_status(failure) == 503 and problem_for(failure).status == 503
        assert not assert_ledger_agrees_with_store(r)
        assert sorted(r.outcomes()) == ["reconciled-absent", "rolled-back"]
        assert await r.reconcile() == (0, 0)  # settled once


async def test_a_write_that_fails_while_the_reconciler_waits_is_settled_absent(
    stores: StoreFactory, tmp_path: Path
) -> None:
    async with race(stores, tmp_path) as r:
        r.store.hold, r.store.fail = "commit", True
        write = writing(r)
        await asyncio.to_thread(r.store.arrived.wait, 30)
        reconciling = asyncio.ensure_future(r.reconcile())
        await asyncio.sleep(0.3)
        r.store.release.set()
        assert isinstance(await settled(write), VersionConflict | TransactionConflict)
        assert await asyncio.wait_for(reconciling, 30) == (0, 1)
        assert not assert_ledger_agrees_with_store(r)


@pytest.mark.parametrize("fate", FATES)
@pytest.mark.parametrize("stage", STAGES)
async def test_every_interleaving_leaves_a_ledger_that_agrees_with_the_store(
    stores: StoreFactory, tmp_path: Path, stage: str, fate: str
) -> None:
    """All interleavings of one reconcile pass (settle age 0) with one write: at each stage
    of the write, for each fate (it commits; its transaction fails; it commits and the
    process dies before its outcome event). Then a second pass settles what is left."""
    async with race(stores, tmp_path) as r:
        r.store.fail = fate == "fails"
        r.gate.lose = fate == "dies"
        if stage in ("before-begin", "before-commit"):
            r.store.hold = "begin" if stage == "before-begin" else "commit"
        elif stage == "before-outcome":
            r.gate.hold = True
        write = writing(r)
        if stage == "after":
            await settled(write)
            await r.reconcile()
        elif stage == "before-outcome":
            # A write that failed at its commit has an outcome to hold too (rolled back).
            await asyncio.wait_for(r.gate.arrived.wait(), 30)
            await r.reconcile()
            r.gate.release.set()
        else:
            await asyncio.to_thread(r.store.arrived.wait, 30)
            reconciling = asyncio.ensure_future(r.reconcile())
            await asyncio.sleep(0.2)
            r.store.release.set()
            await asyncio.wait_for(reconciling, 30)
        failure = await settled(write)
        await r.reconcile()  # a later pass: the same verdict, or the one still missing
        present = assert_ledger_agrees_with_store(r)
        assert present == (failure is None and fate != "fails")
        assert len(r.outcomes()) <= 2  # the writer's and at most one reconciler's


async def test_a_write_past_its_deadline_gives_up(stores: StoreFactory, tmp_path: Path) -> None:
    """A write that gets to its transaction more than an hour after it began does not
    commit (the reconciler's claims outlive that, so a write never outlives them)."""
    async with race(stores, tmp_path) as r:
        r.store.hold = "begin"
        write = writing(r)
        await asyncio.to_thread(r.store.arrived.wait, 30)
        r.kit.clock.t += 3601
        r.store.release.set()
        assert isinstance(await settled(write), IntentSettled)
        assert r.outcomes() == ["rolled-back"]
        assert await r.reconcile() == (0, 0)
        assert not assert_ledger_agrees_with_store(r)


async def test_multi_patient_transactions_claim_every_intent(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """One transaction, one intent event per patient: every one is claimed with it."""
    async with race(stores, tmp_path) as r:
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{n}",
                    "resource": {"resourceType": "Patient", "name": [{"family": f"F{n}"}]},
                    "request": {"method": "POST", "url": "Patient"},
                }
                for n in (
                    "00000000-0000-4000-8000-000000000001",
                    "00000000-0000-4000-8000-00000000002a",
                )
            ],
        }
        r.store.hold = "commit"
        write = asyncio.ensure_future(r.writer.transaction(loader(r.gate), bundle))
        await asyncio.to_thread(r.store.arrived.wait, 30)
        reconciling = asyncio.ensure_future(r.reconcile())
        await asyncio.sleep(0.3)
        r.store.release.set()
        assert await settled(write) is None
        assert await asyncio.wait_for(reconciling, 30) == (2, 0)
        assert len(r.intents()) == 2 and all(r.in_store(i) for i in r.intents())
        assert r.claim_rows() == 2


async def test_claims_are_pruned_and_old_or_unclaimed_intents_are_judged_by_the_store(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """Claims older than ``keep_claims_s`` go (the migration's own row stays); an intent
    whose claim may be gone, or that was made before claims existed, is judged by whether
    its versions are in the store, as before claims."""
    async with race(stores, tmp_path) as r:
        r.gate.lose = True  # committed; the outcome never reaches the ledger
        await settled(writing(r))
        assert r.claim_rows() == 1
        day = 86_400.0
        r.kit.clock.t += 2 * day
        young = await r.kit.repo.reconcile(
            r.ledger, sink=r.ledger, settle_after_s=10 * day, keep_claims_s=day
        )
        assert (young.committed, young.absent) == (0, 0)  # still "in flight": not settled
        assert r.claim_rows() == 0  # but its claim, two days old, was pruned
        old = await r.kit.repo.reconcile(
            r.ledger, sink=r.ledger, settle_after_s=0, keep_claims_s=day
        )
        assert (old.committed, old.absent) == (1, 0)  # judged by its versions
        assert assert_ledger_agrees_with_store(r)
        engine = r.kit.repo._store.engine  # type: ignore[attr-defined]
        with engine.connect() as conn:
            since = conn.execute(
                select(intent_claims.c.claimed_at).where(intent_claims.c.claim == CLAIMS_SINCE[1])
            ).scalar_one()
        assert since > 0

    async with race(stores, tmp_path / "legacy") as r:
        # A write made before the migration: no claim, and claims began after its intent.
        r.gate.lose = True
        await settled(writing(r))
        engine = r.kit.repo._store.engine  # type: ignore[attr-defined]
        with engine.begin() as conn:
            conn.execute(delete(intent_claims).where(intent_claims.c.tenant == TENANT))
            conn.execute(
                update(intent_claims)
                .where(intent_claims.c.claim == CLAIMS_SINCE[1])
                .values(claimed_at=2**62)
            )
        assert await r.reconcile() == (1, 0)
        assert assert_ledger_agrees_with_store(r)


@pytest.fixture
def pg_stores(postgres: str, tmp_path: Path) -> Iterator[StoreFactory]:
    """PostgreSQL only: a fresh schema, dropped afterwards."""
    with fresh_schema(postgres, "pv_records") as schema:
        factory = StoreFactory("postgresql", tmp_path, schema)
        try:
            yield factory
        finally:
            factory.close_all()


async def test_a_write_stuck_open_does_not_hold_the_reconciler_hostage(
    pg_stores: StoreFactory, tmp_path: Path
) -> None:
    """PostgreSQL: a writer whose transaction stays open past ``claim_wait_s`` leaves its
    intent open (the cursor stays at it) instead of blocking the pass, and the next pass
    after it ends settles it truthfully."""
    async with race(pg_stores, tmp_path) as r:
        r.store.hold = "commit"
        r.gate.lose = True  # and its outcome never comes: only a reconciler can settle it
        write = writing(r)
        await asyncio.to_thread(r.store.arrived.wait, 30)
        (intent,) = r.intents()
        at = next(i for i in range(r.ledger.size) if r.ledger.read(i).event == intent)
        stuck = await r.kit.repo.reconcile(
            r.ledger, sink=r.ledger, settle_after_s=0, claim_wait_s=0.3
        )
        assert (stuck.committed, stuck.absent, stuck.scanned_to) == (0, 0, at)
        assert r.outcomes() == []
        r.store.release.set()
        assert await settled(write) is None
        assert await r.reconcile() == (1, 0)
        assert assert_ledger_agrees_with_store(r)


@pytest.mark.parametrize("fate", ["commits", "dies-before-commit", "dies-after-commit"])
async def test_writes_committed_as_one_group_each_keep_their_intent_claim_and_outcome(
    stores: StoreFactory, tmp_path: Path, fate: str
) -> None:
    """Group commit (SQLite; PostgreSQL: POST creates): two writes that waited while another
    was written go in as one transaction. Each has its own intent, claim and outcome; if the
    process dies with the group's transaction open (nothing committed) or after its commit (no
    outcome recorded), the reconciler settles each intent by its own claim
    (docs/decisions/records-group-commit.md)."""
    async with race(stores, tmp_path) as r:
        if stores.engine == "postgresql":  # the two wait behind the first batch on the loop
            r.writer._writes._in_flight = 1  # type: ignore[union-attr]
        r.store.hold = "begin"  # the first write holds the writer's turn before its begin
        first = writing(r)
        await asyncio.to_thread(r.store.arrived.wait, 30)
        grouped = [writing(r), writing(r)]
        deadline = time.monotonic() + 30
        while _queued(r) < 2:
            assert time.monotonic() < deadline, "the writes never queued"
            await asyncio.sleep(0.01)
        # The group: held with its transaction open (both writes made), then it ends.
        r.store.hold, released = "commit", r.store.release
        r.store.arrived, r.store.release = threading.Event(), threading.Event()
        released.set()
        assert await settled(first) is None
        await asyncio.to_thread(r.store.arrived.wait, 30)
        r.store.fail = fate == "dies-before-commit"  # its transaction never commits
        assert r.store._group_commit._group_pending == []  # both in the group being written
        r.gate.lose = fate != "commits"  # the process dies: no outcome reaches the ledger
        r.store.release.set()
        failures = [await settled(task) for task in grouped]
        assert (failures == [None, None]) == (fate != "dies-before-commit")
        committed, absent = await r.reconcile()
        if fate == "commits":
            assert (committed, absent) == (0, 0)
        elif fate == "dies-after-commit":
            assert (committed, absent) == (2, 0)
        else:
            assert (committed, absent) == (0, 2)
        intents = r.intents()
        assert len(intents) == 3 and len({_claim_of(i) for i in intents}) == 3
        stored = [r.in_store(i) for i in intents]
        assert stored == [True, *([fate != "dies-before-commit"] * 2)]
        assert r.claim_rows() == 3
        assert await r.reconcile() == (0, 0)  # settled once


def _queued(r: Race) -> int:
    """Writes waiting for the group in flight: at the store, or on the event loop for the
    repository's batch in flight to end (records-group-commit.md)."""
    batches = r.writer._writes
    waiting = sum(len(p) for p in batches._pending.values()) if batches is not None else 0
    return len(r.store._group_commit._group_pending) + waiting


def _claim_of(intent: AuditEvent) -> str:
    from phivault.records.repository import _intent_claim

    return _intent_claim(intent)
