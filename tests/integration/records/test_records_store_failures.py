"""Failures and concurrency: driver errors never cross the port, racing writers on both
engines (several connections, as several workers would have)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from records_store_support import StoreFactory
from sqlalchemy import text
from test_records_store import obs

from phivault.records.store import (
    RecordStoreUnavailable,
    ResourceKey,
    SqlRecordStore,
    VersionConflict,
)


def test_unreachable_databases_are_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(RecordStoreUnavailable) as pg:
        SqlRecordStore("postgresql://postgres:s3cret@127.0.0.1:1/test")
    assert "s3cret" not in str(pg.value)
    with pytest.raises(RecordStoreUnavailable):
        SqlRecordStore(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'records.db'}")


def test_driver_errors_become_store_unavailable_without_values(stores: StoreFactory) -> None:
    store = stores.open()
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE rec_idx_token"))
    with store.unit_of_work() as uow, pytest.raises(RecordStoreUnavailable) as failed:
        uow.write(obs("o1", code="SECRET-CODE"), previous=None)
    assert failed.value.__cause__ is not None
    assert "SECRET" not in str(failed.value) and "sealed-" not in str(failed.value)
    with store.unit_of_work() as uow:  # the failed unit rolled back; the store still works
        assert uow.read(ResourceKey("t1", "Observation", "o1")) is None


def test_concurrent_writers_all_commit(stores: StoreFactory) -> None:
    workers = [stores.open(migrate=index == 0) for index in range(4)]
    errors: list[BaseException] = []

    def run(store: SqlRecordStore, worker: int) -> None:
        try:
            for n in range(10):
                with store.unit_of_work() as uow:
                    uow.write(obs(f"w{worker}-{n}"), previous=None)
                    uow.commit()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s, i)) for i, s in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with workers[0].unit_of_work(read_only=True) as uow:
        assert len(uow.history("t1", "Observation", count=100)) == 40


def test_racing_updates_from_one_version_have_exactly_one_winner(stores: StoreFactory) -> None:
    workers = [stores.open(migrate=index == 0) for index in range(4)]
    with workers[0].unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
        uow.commit()
    barrier = threading.Barrier(len(workers))
    outcomes: list[str] = []

    def run(store: SqlRecordStore, worker: int) -> None:
        barrier.wait()
        try:
            with store.unit_of_work() as uow:
                uow.write(obs("o1", 2, code=f"c{worker}"), previous=1)
                uow.commit()
            outcomes.append("won")
        except VersionConflict as conflict:
            outcomes.append(f"conflict {conflict.expected}->{conflict.actual}")

    threads = [threading.Thread(target=run, args=(s, i)) for i, s in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict 1->2"] * 3 + ["won"]
    with workers[0].unit_of_work(read_only=True) as uow:
        history = uow.history("t1", "Observation", "o1")
    assert [h.version for h in history] == [2, 1]


def test_the_driver_error_kept_as_cause_holds_no_parameters(stores: StoreFactory) -> None:
    store = stores.open()
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE rec_idx_token"))
    with store.unit_of_work() as uow, pytest.raises(RecordStoreUnavailable) as failed:
        uow.write(obs("o1", code="SECRET-CODE"), previous=None)
    chain = f"{failed.value.__cause__!r} {failed.value.__cause__}"
    assert "SECRET-CODE" not in chain and "hidden due to hide_parameters" in chain
