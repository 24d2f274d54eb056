"""The intent reconciler of the scaled shape: one worker at a time (a PostgreSQL advisory
lock), intents settled only once old enough, and a pass that fails never stops the loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from records_store_support import StoreFactory, postgres_url
from repository_support import loader, open_kit
from sqlalchemy import create_engine

from phivault.ledger.service import initialize_ledger, open_ledger
from phivault.records.reconciler import IntentReconciler, reconcile_lock
from phivault.records.repository import RecordsRepository


def test_one_worker_at_a_time_holds_the_reconcile_lock() -> None:
    first = create_engine(postgres_url())
    second = create_engine(postgres_url())
    try:
        with reconcile_lock(first) as mine:
            assert mine
            with reconcile_lock(second) as theirs:
                assert not theirs  # another worker is reconciling: skip this pass
        with reconcile_lock(second) as now_theirs:
            assert now_theirs  # released with the block
    finally:
        first.dispose()
        second.dispose()


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
