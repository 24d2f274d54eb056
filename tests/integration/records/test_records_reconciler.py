"""The intent reconciler of the scaled shape: one worker at a time (a PostgreSQL advisory
lock), intents settled only once old enough, and a pass that fails never stops the loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from records_store_support import StoreFactory, fresh_schema, postgres_url
from repository_support import TENANT, loader, open_kit
from sqlalchemy import create_engine, text

from phivault.ledger.errors import LedgerUnavailable
from phivault.ledger.service import initialize_ledger, open_ledger
from phivault.records.reconciler import IntentReconciler, ReconcileLeadership, reconcile_lock
from phivault.records.repository import RecordsRepository
from phivault.records.results import Caller
from phivault.records.testing import FixedCallerTrail


@pytest.fixture
def two_workers(postgres: str) -> Iterator[tuple[Any, Any]]:
    """Two workers' engines on a schema of the test's own (the lock is per schema)."""
    with fresh_schema(postgres, "pv_lead") as schema:
        options = {"options": f"-c search_path={schema}"}
        engines = (
            create_engine(postgres_url(), connect_args=options),
            create_engine(postgres_url(), connect_args=options),
        )
        try:
            yield engines
        finally:
            for engine in engines:
                engine.dispose()


def test_one_worker_at_a_time_holds_the_reconcile_lock(two_workers: tuple[Any, Any]) -> None:
    first, second = two_workers
    with reconcile_lock(first) as mine:
        assert mine
        with reconcile_lock(second) as theirs:
            assert not theirs  # another worker is reconciling: skip this pass
    with reconcile_lock(second) as now_theirs:
        assert now_theirs  # released with the block


def _lead_holder(admin: str, engine: Any) -> int | None:
    """The backend pid holding the reconcile lock of ``engine``'s schema, if any."""
    import psycopg

    from phivault.pg_advisory import advisory_key

    with engine.connect() as conn:
        schema = conn.execute(text("SELECT current_schema()")).scalar()
    key = advisory_key(f"phivault.records.reconcile:{schema}") & 0xFFFFFFFFFFFFFFFF
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
            (key >> 32, key & 0xFFFFFFFF),
        ).fetchone()
    return None if row is None else int(row[0])


def test_the_lead_is_kept_across_passes_until_given_up(
    postgres: str, two_workers: tuple[Any, Any]
) -> None:
    """One worker scans the ledger for everyone: it keeps the lead between passes (another
    only tries), and gives it up on close."""
    first_engine, second_engine = two_workers
    first, second = ReconcileLeadership(first_engine), ReconcileLeadership(second_engine)
    try:
        assert first.try_lead()
        holder = _lead_holder(postgres, first_engine)
        assert holder is not None
        assert not second.try_lead()
        assert first.try_lead()  # kept: the same session still holds it
        assert _lead_holder(postgres, first_engine) == holder
        assert not second.try_lead()
        first.close()
        assert second.try_lead()
        assert not first.leading
    finally:
        first.close()
        second.close()


def test_a_leader_that_loses_its_session_loses_the_lead_and_another_takes_it(
    postgres: str, two_workers: tuple[Any, Any]
) -> None:
    """The lock lives with its session: if the server ends it (a restart, a kill), the lead
    is free; the next worker to try takes it, and the old leader notices and does not lead."""
    import psycopg

    first_engine, second_engine = two_workers
    first, second = ReconcileLeadership(first_engine), ReconcileLeadership(second_engine)
    try:
        assert first.try_lead()
        holder = _lead_holder(postgres, first_engine)
        assert holder is not None
        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (holder,))
        deadline = time.monotonic() + 10
        while _lead_holder(postgres, first_engine) is not None:
            assert time.monotonic() < deadline, "the killed session kept its lock"
            time.sleep(0.05)
        assert second.try_lead()
        assert not first.try_lead()  # its session is gone, and the lead is taken
        assert not first.leading
        second.close()
        assert first.try_lead()  # and it can lead again once free
    finally:
        first.close()
        second.close()


async def test_a_pass_settles_old_intents_and_a_failed_pass_does_not_stop_the_loop(
    stores: StoreFactory, tmp_path: Path
) -> None:
    from phivault.datadir import DataDir

    data_dir = DataDir.create(tmp_path / "data", dev=True)
    initialize_ledger(data_dir)
    async with open_kit(stores, tmp_path) as kit, open_ledger(data_dir) as ledger:
        real_record = RecordsRepository._record_writes

        async def no_outcome(
            self: RecordsRepository, caller: Any, events: Any, **kwargs: Any
        ) -> None:  # the intent only: the process dies before the outcome event
            intents = [e for e in events if getattr(e, "outcome_reason", None) == "intent"]
            await real_record(self, caller, intents, **kwargs)

        RecordsRepository._record_writes = no_outcome  # type: ignore[method-assign]
        try:
            await kit.repo.create(loader(ledger), {"resourceType": "Organization", "name": "A"})
        finally:
            RecordsRepository._record_writes = real_record  # type: ignore[method-assign]
        engine = kit.repo._store.engine  # type: ignore[attr-defined]
        reconciler = IntentReconciler(
            kit.repo, ledger, ledger, engine, cursor=tmp_path / "cursor",
            every_s=0.01, settle_after_s=60,
        )  # fmt: skip
        young = await reconciler.run_once()
        assert young is not None and (young.committed, young.absent) == (0, 0)
        kit.clock.t += 61
        old = await reconciler.run_once()
        assert old is not None and (old.committed, old.absent) == (1, 0)

        calls = 0
        real_once = reconciler.run_once

        async def flaky() -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("the database went away")
            return await real_once()

        reconciler.run_once = flaky  # type: ignore[method-assign]
        loop = asyncio.create_task(reconciler.run())
        while calls < 3:
            await asyncio.sleep(0.01)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


def _organization(name: str) -> dict[str, Any]:
    return {"resourceType": "Organization", "name": name}


@contextlib.contextmanager
def _outcomes_lost() -> Iterator[None]:
    """The writer records its intents, then dies before the outcome events."""
    real_record = RecordsRepository._record_writes

    async def no_outcome(self: RecordsRepository, caller: Any, events: Any, **kwargs: Any) -> None:
        intents = [e for e in events if getattr(e, "outcome_reason", None) == "intent"]
        await real_record(self, caller, intents, **kwargs)

    RecordsRepository._record_writes = no_outcome  # type: ignore[method-assign]
    try:
        yield
    finally:
        RecordsRepository._record_writes = real_record  # type: ignore[method-assign]


async def test_a_pass_reads_only_what_came_since_the_last_not_again_from_the_cursor(
    stores: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the oldest young intent holds the cursor, a worker's next pass reads only the
    entries appended since its last one (the IntentScan memo), not again from the cursor, and
    finds what a scan from the cursor would: the old intent settled once, the young one left
    open, every outcome seen."""
    from phivault.datadir import DataDir

    data_dir = DataDir.create(tmp_path / "data", dev=True)
    initialize_ledger(data_dir)
    async with open_kit(stores, tmp_path) as kit, open_ledger(data_dir) as ledger:

        def loader_now(request: str) -> Caller:  # events recorded at the kit's clock
            trail = FixedCallerTrail(
                ledger, "loader", tenant=TENANT, observer="repository-test", request_id=request,
                clock=lambda: datetime.fromtimestamp(kit.clock.t, UTC),
            )  # fmt: skip
            return Caller(loader(ledger).access, trail)

        await kit.repo.create(loader_now("req-0"), _organization("0"))
        with _outcomes_lost():
            await kit.repo.create(loader_now("req-a"), _organization("A"))
        first_open = ledger.size - 1
        reads: list[tuple[int, int]] = []
        real_read = ledger.read_range_matching

        def spy(start: int, stop: int, may_match: Any) -> Any:
            reads.append((start, stop))
            return real_read(start, stop, may_match)

        monkeypatch.setattr(ledger, "read_range_matching", spy)
        engine = kit.repo._store.engine  # type: ignore[attr-defined]
        reconciler = IntentReconciler(
            kit.repo, ledger, ledger, engine, cursor=tmp_path / "cursor",
            every_s=0.01, settle_after_s=60,
        )  # fmt: skip
        young = await reconciler.run_once()
        assert young is not None and (young.scanned_to, young.committed) == (first_open, 0)
        assert reads == [(0, ledger.size)]
        seen = ledger.size

        kit.clock.t += 30
        await kit.repo.create(loader_now("req-b"), _organization("B"))
        with _outcomes_lost():
            await kit.repo.create(loader_now("req-c"), _organization("C"))
        second_open = ledger.size - 1
        kit.clock.t += 31  # the first open intent is 61 s old, the second 31 s
        reads.clear()
        before = ledger.size
        settled = await reconciler.run_once()
        assert reads == [(seen, before)]  # not again from the cursor (the first open intent)
        assert settled is not None
        assert (settled.scanned_from, settled.scanned_to) == (first_open, second_open)
        assert (settled.committed, settled.absent) == (1, 0)

        reads.clear()
        again = await reconciler.run_once()  # sees the outcome the last pass recorded
        assert reads == [(before, ledger.size)]
        assert again is not None and (again.committed, again.absent) == (0, 0)
        assert again.scanned_to == second_open
        reasons = [e.event.outcome_reason for e in ledger.read_range(0, ledger.size)]
        assert reasons.count("reconciled-committed") == 1
        assert reasons.count("intent") == 4 and reasons.count("committed") == 2

        # A scan that fails half way leaves nothing behind: the next pass reads it all again.
        def failing(start: int, stop: int, may_match: Any) -> Any:
            raise LedgerUnavailable("the ledger store went away")

        await kit.repo.create(loader_now("req-d"), _organization("D"))
        monkeypatch.setattr(ledger, "read_range_matching", failing)
        with pytest.raises(LedgerUnavailable):
            await reconciler.run_once()
        monkeypatch.setattr(ledger, "read_range_matching", spy)
        reads.clear()
        await reconciler.run_once()
        assert reads == [(second_open, ledger.size)]


async def test_a_retry_under_the_same_request_id_is_reconciled_despite_the_first_outcome(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """A client retried an update with the same X-Request-ID after its first try rolled back:
    both intents have the same key (request id, version written). The worker died between
    the retry's commit and its outcome: the reconciler must settle the retry's intent, which
    the first try's ``rolled-back`` outcome (recorded before it) does not settle."""
    from phivault.datadir import DataDir

    data_dir = DataDir.create(tmp_path / "data", dev=True)
    initialize_ledger(data_dir)
    async with open_kit(stores, tmp_path) as kit, open_ledger(data_dir) as ledger:

        def loader_now(request: str) -> Caller:
            trail = FixedCallerTrail(
                ledger, "loader", tenant=TENANT, observer="repository-test", request_id=request,
                clock=lambda: datetime.fromtimestamp(kit.clock.t, UTC),
            )  # fmt: skip
            return Caller(loader(ledger).access, trail)

        created = await kit.repo.create(loader_now("req-0"), _organization("A"))
        org_id = created.record.id
        changed = {**_organization("A2"), "id": org_id}
        real_unit = kit.repo._commit_unit

        def failing_unit(*args: Any, **kwargs: Any) -> Any:
            def unit(uow: Any) -> None:
                raise RuntimeError("the database went away mid-commit")

            return unit

        kit.repo._commit_unit = failing_unit  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await kit.repo.update(loader_now("req-retried"), "Organization", org_id, changed)
        kit.repo._commit_unit = real_unit  # type: ignore[method-assign]
        kit.clock.t += 1
        with _outcomes_lost():
            await kit.repo.update(loader_now("req-retried"), "Organization", org_id, changed)
        reasons = [
            (e.event.request_id, e.event.outcome_reason) for e in ledger.read_range(0, ledger.size)
        ]
        assert reasons[-3:] == [
            ("req-retried", "intent"), ("req-retried", "rolled-back"), ("req-retried", "intent")
        ]  # fmt: skip

        kit.clock.t += 61
        engine = kit.repo._store.engine  # type: ignore[attr-defined]
        reconciler = IntentReconciler(
            kit.repo, ledger, ledger, engine, cursor=tmp_path / "cursor",
            every_s=0.01, settle_after_s=60,
        )  # fmt: skip
        report = await reconciler.run_once()
        assert report is not None and (report.committed, report.absent) == (1, 0)
        last = ledger.read_range(ledger.size - 1, ledger.size)[0].event
        assert (last.request_id, last.outcome_reason) == ("req-retried", "reconciled-committed")
