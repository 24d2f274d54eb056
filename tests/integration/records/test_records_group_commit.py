"""Group commit (docs/decisions/records-group-commit.md): write units submitted while a group
is being written are committed together, each in its own savepoint. A unit that fails is
rolled back alone; a group whose transaction breaks is written again unit by unit; nothing of
a unit is ever half written. Real stores (SQLite groups; PostgreSQL commits a unit submitted
alone by itself, and the units one thread submits together as one group)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from records_store_support import StoreFactory
from test_records_store import obs

from phivault.records.store import (
    IntentSettled,
    ResourceKey,
    SqlRecordStore,
    SqlUnitOfWork,
    VersionConflict,
)

Work = Callable[[SqlUnitOfWork], None]


class CountingStore(SqlRecordStore):
    """The real store, counting the writing transactions it opens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writing_transactions = 0

    def unit_of_work(self, **options: Any) -> Any:
        if not options.get("read_only", False):
            self.writing_transactions += 1
        return super().unit_of_work(**options)


def submit(store: SqlRecordStore, work: Work) -> tuple[threading.Thread, list[BaseException]]:
    """``store.write_unit(work)`` on a thread of its own; the list gets what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            store.write_unit(work)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def create(the_id: str) -> Work:
    return lambda uow: uow.create_many([obs(the_id)])


def exists(store: SqlRecordStore, the_id: str) -> bool:
    with store.unit_of_work(read_only=True) as uow:
        return uow.read(ResourceKey("t1", "Observation", the_id)) is not None


def held_group(
    store: CountingStore, works: list[Work]
) -> list[tuple[threading.Thread, list[BaseException]]]:
    """Hold a first unit open, submit ``works`` meanwhile (they wait as one group), then let
    the first one commit; each submission's thread and errors, the first unit's first."""
    holding, release = threading.Event(), threading.Event()

    def first(uow: SqlUnitOfWork) -> None:
        uow.create_many([obs("first")])
        holding.set()
        assert release.wait(30)

    started = [submit(store, first)]
    assert holding.wait(30)
    started += [submit(store, work) for work in works]
    deadline = time.monotonic() + 30
    while len(store._group_commit._group_pending) < len(works):
        assert time.monotonic() < deadline, "the units never queued"
        time.sleep(0.01)
    release.set()
    for thread, _ in started:
        thread.join(30)
    return started


@pytest.fixture
def sqlite_store(stores: StoreFactory) -> CountingStore:
    if stores.engine != "sqlite":
        pytest.skip("PostgreSQL commits each write unit in its own transaction")
    return CountingStore(stores.url)


def test_units_that_wait_together_commit_in_one_transaction(sqlite_store: CountingStore) -> None:
    store = sqlite_store
    results = held_group(store, [create("a"), create("b"), create("c")])
    assert all(not raised for _, raised in results)
    assert all(exists(store, i) for i in ("first", "a", "b", "c"))
    assert store.writing_transactions == 2  # the first unit, then one group of three


def test_a_failing_unit_is_rolled_back_alone(sqlite_store: CountingStore) -> None:
    """Its own writes before it failed are undone; the units around it commit."""
    store = sqlite_store

    def conflicting(uow: SqlUnitOfWork) -> None:
        uow.create_many([obs("partial")])
        uow.write(obs("first", 6), previous=5)  # not the current version: VersionConflict

    results = held_group(store, [create("a"), conflicting, create("c")])
    (_, first), (_, a), (_, bad), (_, c) = results
    assert not first and not a and not c
    assert len(bad) == 1 and isinstance(bad[0], VersionConflict)
    assert exists(store, "a") and exists(store, "c")
    assert not exists(store, "partial")
    assert store.writing_transactions == 2


def test_a_unit_whose_claim_is_taken_fails_alone(sqlite_store: CountingStore) -> None:
    """The database refuses a unit's statement (its intent claim is held already, as after
    the reconciler settled it absent): that unit alone is rolled back (IntentSettled)."""
    store = sqlite_store
    store.write_unit(lambda uow: uow.claim_intents("t1", ["c" * 64], at=1))

    def claimed(uow: SqlUnitOfWork) -> None:
        uow.claim_intents("t1", ["c" * 64], at=2)
        uow.create_many([obs("claimed")])

    results = held_group(store, [create("a"), claimed, create("c")])
    (_, first), (_, a), (_, bad), (_, c) = results
    assert not first and not a and not c
    assert len(bad) == 1 and isinstance(bad[0], IntentSettled)
    assert exists(store, "a") and exists(store, "c") and not exists(store, "claimed")
    assert store.writing_transactions == 3  # the claim, the first unit, one group


def test_a_group_whose_transaction_breaks_is_written_unit_by_unit(
    sqlite_store: CountingStore,
) -> None:
    """SQLite ends a transaction on its own after some errors (a full disk): the savepoint
    is gone and the earlier units' work with it. The group is written again, unit by unit,
    and only the unit that failed fails."""
    store = sqlite_store

    def breaking(uow: SqlUnitOfWork) -> None:
        uow.create_many([obs("broken")])
        uow._conn.exec_driver_sql("ROLLBACK")  # what SQLite does after SQLITE_FULL
        raise OSError("database or disk is full")

    results = held_group(store, [create("a"), breaking, create("c")])
    (_, first), (_, a), (_, bad), (_, c) = results
    assert not first and not a and not c
    assert len(bad) == 1 and isinstance(bad[0], OSError)
    assert exists(store, "a") and exists(store, "c")
    assert not exists(store, "broken")
    with store.unit_of_work(read_only=True) as uow:  # written once, as version 1
        found = uow.history("t1", "Observation", "a", count=10)
    assert [v.version for v in found] == [1]
    # the first unit, the broken group, then a, the breaking unit and c alone
    assert store.writing_transactions == 5


def test_a_failing_commit_fails_every_unit_of_the_group(
    sqlite_store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    real_commit = SqlUnitOfWork.commit
    commits = 0

    def commit(self: SqlUnitOfWork) -> None:
        nonlocal commits
        commits += 1
        if commits == 2:  # the group's
            raise OSError("disk I/O error")
        real_commit(self)

    monkeypatch.setattr(SqlUnitOfWork, "commit", commit)
    results = held_group(store, [create("a"), create("b")])
    (_, first), (_, a), (_, b) = results
    assert not first
    assert len(a) == 1 and len(b) == 1 and isinstance(a[0], OSError)
    assert not exists(store, "a") and not exists(store, "b")


def test_a_unit_that_waits_too_long_fails_closed_and_is_never_written(
    sqlite_store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit still waiting for its turn when the busy timeout passes is withdrawn (503):
    no later group may write it after its submitter was told it failed."""
    from phivault.records.store import group_commit
    from phivault.records.store.ports import RecordStoreUnavailable

    store = sqlite_store
    monkeypatch.setattr(group_commit, "_WRITER_WAIT_S", 0.3)
    holding, release = threading.Event(), threading.Event()

    def first(uow: SqlUnitOfWork) -> None:
        uow.create_many([obs("first")])
        holding.set()
        assert release.wait(30)

    thread, first_raised = submit(store, first)
    assert holding.wait(30)
    late, late_raised = submit(store, create("late"))
    late.join(30)
    assert len(late_raised) == 1 and isinstance(late_raised[0], RecordStoreUnavailable)
    assert store._group_commit._group_pending == []
    release.set()
    thread.join(30)
    assert not first_raised
    store.write_unit(create("after"))
    assert exists(store, "after") and not exists(store, "late")


def test_a_writer_whose_unit_is_not_in_the_group_it_writes_stays_until_it_is(
    sqlite_store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More units wait than a group takes: the thread that writes a group without its own
    unit in it writes the next one too, and returns only once its own unit is committed."""
    from phivault.records.store import group_commit

    store = sqlite_store
    monkeypatch.setattr(group_commit, "_GROUP_MAX", 2)
    seen_at_return: dict[str, bool] = {}
    real_write_unit = store.write_unit

    def write_unit(work: Work, *, session: str | None = None) -> None:
        real_write_unit(work, session=session)
        name = getattr(work, "name", None)
        if name is not None:  # committed by the time its submitter is told so
            seen_at_return[name] = exists(store, name)

    monkeypatch.setattr(store, "write_unit", write_unit)
    works = []
    for i in range(5):
        work = create(f"u{i}")
        work.name = f"u{i}"  # type: ignore[attr-defined]
        works.append(work)
    results = held_group(store, works)
    assert all(not raised for _, raised in results)
    assert seen_at_return == {f"u{i}": True for i in range(5)}
    assert store.writing_transactions == 4  # the first unit, then groups of 2, 2 and 1


def test_write_unit_commits_and_rolls_back_on_both_engines(stores: StoreFactory) -> None:
    store = stores.open()
    store.write_unit(create("one"))

    def failing(uow: SqlUnitOfWork) -> None:
        uow.create_many([obs("two")])
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        store.write_unit(failing)
    assert exists(store, "one") and not exists(store, "two")


def test_units_submitted_together_commit_together_and_fail_alone(stores: StoreFactory) -> None:
    """write_units (the repository's batch of one event-loop turn): each unit's own outcome,
    in order; the failing one alone is rolled back, the others commit, in one transaction
    (PostgreSQL too, without replicas)."""
    store = CountingStore(stores.url, schema=stores.schema)

    def failing(uow: SqlUnitOfWork) -> None:
        uow.create_many([obs("two")])
        raise RuntimeError("no")

    errors = store.write_units([create("one"), failing, create("three")])
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], RuntimeError)
    assert exists(store, "one") and exists(store, "three") and not exists(store, "two")
    assert store.writing_transactions == 1


def test_units_submitted_together_one_refused_by_the_database_fail_alone(
    stores: StoreFactory,
) -> None:
    """A unit whose statement the database refuses (its intent claim is held already, as
    after the reconciler settled it absent; PostgreSQL then fails the transaction until it is
    rolled back to the unit's savepoint): that unit alone fails (IntentSettled), in the one
    transaction of its batch."""
    store = CountingStore(stores.url, schema=stores.schema)
    store.write_unit(lambda uow: uow.claim_intents("t1", ["c" * 64], at=1))

    def claimed(uow: SqlUnitOfWork) -> None:
        uow.create_many([obs("claimed-before")])
        uow.claim_intents("t1", ["c" * 64], at=2)
        uow.create_many([obs("claimed")])

    errors = store.write_units([create("a"), claimed, create("c")])
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], IntentSettled)
    assert exists(store, "a") and exists(store, "c")
    assert not exists(store, "claimed") and not exists(store, "claimed-before")
    assert store.writing_transactions == 2  # the claim, then the batch


def test_units_submitted_together_whose_transaction_ends_are_written_one_by_one(
    stores: StoreFactory,
) -> None:
    """A unit ends the batch's transaction (SQLite after a full disk; on PostgreSQL, any end of
    the transaction under the unit): the savepoint is gone, the batch is written again unit by
    unit, and only the unit that failed fails."""
    store = CountingStore(stores.url, schema=stores.schema)

    def breaking(uow: SqlUnitOfWork) -> None:
        uow.create_many([obs("broken")])
        uow._conn.exec_driver_sql("ROLLBACK")
        raise OSError("database or disk is full")

    errors = store.write_units([create("a"), breaking, create("c")])
    assert errors[0] is None and errors[2] is None and isinstance(errors[1], OSError)
    assert exists(store, "a") and exists(store, "c") and not exists(store, "broken")
    with store.unit_of_work(read_only=True) as uow:  # written once, as version 1
        assert [v.version for v in uow.history("t1", "Observation", "a", count=10)] == [1]
    assert store.writing_transactions == 4  # the batch, then each unit alone


def test_units_submitted_together_all_fail_when_their_commit_fails(
    stores: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CountingStore(stores.url, schema=stores.schema)

    def commit(self: SqlUnitOfWork) -> None:
        raise OSError("disk I/O error")

    monkeypatch.setattr(SqlUnitOfWork, "commit", commit)
    errors = store.write_units([create("a"), create("b")])
    assert all(isinstance(e, OSError) for e in errors)
    monkeypatch.undo()
    assert not exists(store, "a") and not exists(store, "b")


def test_units_submitted_together_that_wait_too_long_all_fail_closed(
    sqlite_store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch still waiting when the busy timeout passes is withdrawn whole (each unit a
    503), and no later group writes any of it."""
    from phivault.records.store import group_commit
    from phivault.records.store.ports import RecordStoreUnavailable

    store = sqlite_store
    monkeypatch.setattr(group_commit, "_WRITER_WAIT_S", 0.3)
    holding, release = threading.Event(), threading.Event()

    def first(uow: SqlUnitOfWork) -> None:
        uow.create_many([obs("first")])
        holding.set()
        assert release.wait(30)

    thread, first_raised = submit(store, first)
    assert holding.wait(30)
    errors = store.write_units([create("late1"), create("late2")])
    assert all(isinstance(e, RecordStoreUnavailable) for e in errors)
    assert store._group_commit._group_pending == []
    release.set()
    thread.join(30)
    assert not first_raised
    assert not exists(store, "late1") and not exists(store, "late2")
