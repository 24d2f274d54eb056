"""The records store on SQLite and PostgreSQL: schema, versions, conflicts, history,
tombstones, tenant isolation and atomic units of work. Ciphertext here is opaque test bytes:
sealing is tested with real keys in test_records_synthea_store.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from records_store_support import StoreFactory

from phivault.errors import InvalidInput
from phivault.records.query import parse_search
from phivault.records.search_params import DateEntry, ReferenceEntry, TokenEntry, date_range
from phivault.records.store import (
    DIRECTORY_SUBJECT,
    NewVersion,
    RecordStoreUnavailable,
    ResourceKey,
    SqlRecordStore,
    VersionConflict,
)
from phivault.records.store.schema import HEAD_REVISION, VERSION_TABLE, metadata

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def obs(
    the_id: str,
    version: int = 1,
    *,
    tenant: str = "t1",
    patient: str = "p1",
    code: str = "8302-2",
    when: str = "2020-05-01",
    stamp: datetime = T0,
) -> NewVersion:
    return NewVersion(
        key=ResourceKey(tenant, "Observation", the_id),
        version=version,
        last_updated=stamp,
        key_subject=patient,
        groups={"clinical": f"sealed-{the_id}-{version}".encode(), "administrative": b"meta"},
        index=[
            TokenEntry("_id", None, the_id),
            TokenEntry("code", "http://loinc.org", code),
            ReferenceEntry("patient", "Patient", patient),
            ReferenceEntry("subject", "Patient", patient),
            DateEntry("date", date_range(when)),
        ],
    )


def test_migrations_create_exactly_the_declared_schema(stores: StoreFactory) -> None:
    import phivault.access.grant_store  # noqa: F401  (declares bg_grants on the records metadata)

    store = stores.open()
    stores.open()  # a second open (another worker) finds it at head and changes nothing
    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        head = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar_one()
    assert [d for d in diffs if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)] == []
    assert head == HEAD_REVISION


def test_create_read_update_vread(store: SqlRecordStore) -> None:
    key = ResourceKey("t1", "Observation", "o1")
    with store.unit_of_work() as uow:
        stored = uow.write(obs("o1"), previous=None)
        uow.commit()
    assert stored.version == 1
    with store.unit_of_work() as uow:
        uow.write(obs("o1", 2, stamp=T0 + timedelta(seconds=1)), previous=1)
        uow.commit()
    with store.unit_of_work(read_only=True) as uow:
        current = uow.read(key)
        first = uow.vread(key, 1)
        only_clinical = uow.read(key, groups={"clinical"})
        none = uow.read(key, groups=set())
        missing = uow.vread(key, 3)
    assert current is not None and first is not None and only_clinical is not None
    assert current.version == 2 and current.last_updated == T0 + timedelta(seconds=1)
    assert current.groups == {"clinical": b"sealed-o1-2", "administrative": b"meta"}
    assert first.groups["clinical"] == b"sealed-o1-1" and not first.deleted
    assert only_clinical.groups == {"clinical": b"sealed-o1-2"}
    assert none is not None and none.groups == {}
    assert missing is None


def test_version_conflicts_are_precise(store: SqlRecordStore) -> None:
    with store.unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
        uow.commit()
    with store.unit_of_work() as uow, pytest.raises(VersionConflict) as created_twice:
        uow.write(obs("o1"), previous=None)
    assert (created_twice.value.expected, created_twice.value.actual) == (None, 1)
    with store.unit_of_work() as uow:
        uow.write(obs("o1", 2), previous=1)
        uow.commit()
    with store.unit_of_work() as uow, pytest.raises(VersionConflict) as stale:
        uow.write(obs("o1", 2), previous=1)  # If-Match: W/"1" after someone wrote 2
    assert (stale.value.expected, stale.value.actual) == (1, 2)
    assert "Observation/o1" in str(stale.value)
    with store.unit_of_work() as uow, pytest.raises(VersionConflict) as absent:
        uow.write(obs("nope", 2), previous=1)
    assert absent.value.actual is None
    with store.unit_of_work() as uow, pytest.raises(InvalidInput):
        uow.write(obs("o1", 5), previous=2)  # versions follow each other


def test_create_many_of_one_taken_id_is_a_precise_conflict(store: SqlRecordStore) -> None:
    """A single create (the head inserted unless it exists, no SELECT before) over a taken
    id: the conflict names the version that holds it."""
    with store.unit_of_work() as uow:
        uow.create_many([obs("o1")])
        uow.write(obs("o1", 2), previous=1)
        uow.commit()
    with store.unit_of_work() as uow:
        with pytest.raises(VersionConflict) as taken:
            uow.create_many([obs("o1")])
        assert (taken.value.expected, taken.value.actual) == (None, 2)
    with store.unit_of_work(read_only=True) as uow:
        current = uow.read(ResourceKey("t1", "Observation", "o1"))
        first = uow.vread(ResourceKey("t1", "Observation", "o1"), 1)
    assert current is not None and current.version == 2
    assert first is not None and first.groups["clinical"] == b"sealed-o1-1"


def test_two_writers_from_the_same_version_cannot_both_win(stores: StoreFactory) -> None:
    a, b = stores.open(), stores.open(migrate=False)
    with a.unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
        uow.commit()
    with a.unit_of_work() as first:
        first.write(obs("o1", 2), previous=1)
        first.commit()
    with b.unit_of_work() as second, pytest.raises(VersionConflict):
        second.write(obs("o1", 2), previous=1)


def test_a_transaction_failing_on_its_last_write_leaves_nothing(store: SqlRecordStore) -> None:
    with store.unit_of_work() as uow:
        uow.write(obs("existing"), previous=None)
        uow.commit()
    with pytest.raises(VersionConflict), store.unit_of_work() as uow:
        for index in range(5):
            uow.write(obs(f"new{index}"), previous=None)
        uow.write(obs("existing"), previous=None)  # the last entry conflicts
        uow.commit()
    with store.unit_of_work(read_only=True) as uow:
        assert all(uow.read(ResourceKey("t1", "Observation", f"new{i}")) is None for i in range(5))
        page = uow.search("t1", parse_search("Observation", "code=8302-2&_total=accurate"))
        history = uow.history("t1", "Observation")
    assert [m.key.resource_id for m in page.matches] == ["existing"] and page.total == 1
    assert [h.key.resource_id for h in history] == ["existing"]


def test_leaving_without_commit_rolls_back(store: SqlRecordStore) -> None:
    with store.unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
    with store.unit_of_work() as uow:
        assert uow.read(ResourceKey("t1", "Observation", "o1")) is None


def test_history_is_newest_first_and_keeps_tombstones(store: SqlRecordStore) -> None:
    key = ResourceKey("t1", "Observation", "o1")
    with store.unit_of_work() as uow:
        uow.write(obs("o1", stamp=T0), previous=None)
        uow.write(obs("o2", stamp=T0 + timedelta(seconds=1)), previous=None)
        uow.write(obs("o1", 2, stamp=T0 + timedelta(seconds=2)), previous=1)
        uow.delete(key, version=3, last_updated=T0 + timedelta(seconds=3), previous=2)
        uow.commit()
    with store.unit_of_work(read_only=True) as uow:
        instance = uow.history("t1", "Observation", "o1")
        by_type = uow.history("t1", "Observation")
        paged = uow.history("t1", "Observation", count=2, offset=1)
        current = uow.read(key)
        before = uow.vread(key, 2)
        page = uow.search("t1", parse_search("Observation", "code=8302-2"))
        by_id = uow.search("t1", parse_search("Observation", "_id=o1"))
    assert [(h.version, h.deleted) for h in instance] == [(3, True), (2, False), (1, False)]
    assert instance[0].groups == {}
    assert [(h.key.resource_id, h.version) for h in by_type] == [
        ("o1", 3), ("o1", 2), ("o2", 1), ("o1", 1),
    ]  # fmt: skip
    assert [(h.key.resource_id, h.version) for h in paged] == [("o1", 2), ("o2", 1)]
    assert current is not None and current.deleted and current.version == 3
    assert before is not None and before.groups["clinical"] == b"sealed-o1-2"
    assert [m.key.resource_id for m in page.matches] == ["o2"]
    assert by_id.matches == ()
    # re-created after the delete: a new version, searchable again
    with store.unit_of_work() as uow:
        uow.write(obs("o1", 4), previous=3)
        uow.commit()
    with store.unit_of_work(read_only=True) as uow:
        again = uow.search("t1", parse_search("Observation", "code=8302-2"))
    assert [m.key.resource_id for m in again.matches] == ["o1", "o2"]


def test_other_tenants_find_nothing(store: SqlRecordStore) -> None:
    with store.unit_of_work() as uow:
        uow.write(obs("o1", tenant="t1"), previous=None)
        uow.write(obs("o9", tenant="t2"), previous=None)
        uow.commit()
    key_in_t2 = ResourceKey("t2", "Observation", "o1")
    with store.unit_of_work(read_only=True) as uow:
        assert uow.read(key_in_t2) is None
        assert uow.vread(key_in_t2, 1) is None
        assert uow.history("t2", "Observation", "o1") == []
        assert [h.key.resource_id for h in uow.history("t2", "Observation")] == ["o9"]
        for query in ("code=8302-2", "_id=o1", "patient=Patient/p1", "date=2020-05-01"):
            page = uow.search("t2", parse_search("Observation", query + "&_total=accurate"))
            expected = [] if query.startswith("_id") else ["o9"]  # o1 lives in t1 only
            assert [m.key.resource_id for m in page.matches] == expected, query
            assert page.total == len(expected)
            assert uow.find_ids("t3", parse_search("Observation", query)) == []
    # the same id in another tenant is another resource
    with store.unit_of_work() as uow:
        uow.write(obs("o1", tenant="t2"), previous=None)
        uow.commit()


def test_bad_keys_and_reserved_subjects_are_refused(store: SqlRecordStore) -> None:
    patient = NewVersion(
        ResourceKey("t1", "Patient", DIRECTORY_SUBJECT), 1, T0, DIRECTORY_SUBJECT,
        {"direct-identifiers": b"x"}, [],
    )  # fmt: skip
    foreign = NewVersion(
        ResourceKey("t1", "Patient", "p1"), 1, T0, "p2", {"direct-identifiers": b"x"}, []
    )
    with store.unit_of_work() as uow:
        with pytest.raises(InvalidInput):
            uow.write(patient, previous=None)
        with pytest.raises(InvalidInput):
            uow.write(foreign, previous=None)
        with pytest.raises(InvalidInput):
            uow.write(obs("bad id!"), previous=None)
        with pytest.raises(InvalidInput):
            uow.read(ResourceKey("t1", "Observation", "o1"), groups={"secrets"})
        with pytest.raises(InvalidInput):
            uow.write(obs("o1", tenant=""), previous=None)


def test_read_only_units_refuse_writes_on_both_engines(store: SqlRecordStore) -> None:
    key = ResourceKey("t1", "Observation", "o1")
    with store.unit_of_work(read_only=True) as uow:
        with pytest.raises(InvalidInput):
            uow.write(obs("o1"), previous=None)
        with pytest.raises(InvalidInput):
            uow.delete(key, version=2, last_updated=T0, previous=1)
        with pytest.raises(InvalidInput):
            uow.reindex(key, version=1, index=[])
    with store.unit_of_work() as uow:
        uow.commit()
        with pytest.raises(InvalidInput):  # a finished unit cannot be reused
            uow.read(key)


def test_a_postgresql_read_only_unit_is_refused_writes_by_the_server_too(
    stores: StoreFactory,
) -> None:
    """Read-only units on PostgreSQL run in autocommit on connections whose transactions are
    read-only by default: a write that got past the unit's own check (a bug calling the
    connection directly) is refused by the server, and commits nothing."""
    from sqlalchemy import insert

    from phivault.records.store.ports import RecordStoreUnavailable
    from phivault.records.store.schema import care_assignments

    if stores.engine != "postgresql":
        pytest.skip("SQLite's read-only units are refused writes by the unit's own check")
    store = stores.open()
    row = {
        "tenant": "t1",
        "practitioner_type": "Practitioner",
        "practitioner_id": "pr1",
        "patient_id": "p1",
        "assigned_by": "attacker",
        "assigned_at": 0,
    }
    with store.unit_of_work(read_only=True) as uow:
        with pytest.raises(RecordStoreUnavailable), uow._translate("write"):
            uow._live().execute(insert(care_assignments), row)
        # the unit still reads after the refusal (no aborted transaction to roll back)
        assert uow.read(ResourceKey("t1", "Observation", "o1")) is None
        assert uow.care_related("t1", ("Practitioner", "pr1"), ["p1"]) == set()
    with store.unit_of_work(read_only=True) as uow:
        assert uow.care_related("t1", ("Practitioner", "pr1"), ["p1"]) == set()


def _terminate_the_read_connection(store: SqlRecordStore, admin: str) -> None:
    """Kill (on the server) the one pooled connection the store's read units use."""
    import psycopg

    assert store._reader is not None
    with store._reader.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_pooled_read_connection_lost_while_idle_is_replaced_before_use(
    stores: StoreFactory, postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phivault.records.store import _driver

    if stores.engine != "postgresql":
        pytest.skip("SQLite has no server to lose")
    monkeypatch.setattr(_driver, "_PING_IDLE_S", 0.0)  # every checkout counts as idle
    store = stores.open()
    key = ResourceKey("t1", "Observation", "o1")
    with store.unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
        uow.commit()
    _terminate_the_read_connection(store, postgres)
    with store.unit_of_work(read_only=True) as uow:  # pinged, found dead, replaced
        assert uow.read(key) is not None


def test_a_pooled_read_connection_lost_while_in_use_fails_one_unit_cleanly_then_recovers(
    stores: StoreFactory, postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phivault.records.store import _driver
    from phivault.records.store.ports import RecordStoreUnavailable

    if stores.engine != "postgresql":
        pytest.skip("SQLite has no server to lose")
    monkeypatch.setattr(_driver, "_PING_IDLE_S", 3600.0)  # never pinged
    store = stores.open()
    key = ResourceKey("t1", "Observation", "o1")
    with store.unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
        uow.commit()
    _terminate_the_read_connection(store, postgres)
    with pytest.raises(RecordStoreUnavailable), store.unit_of_work(read_only=True) as uow:
        uow.read(key)
    with store.unit_of_work(read_only=True) as uow:  # the pool replaced its connections
        assert uow.read(key) is not None


@pytest.mark.parametrize("direct", [True, False], ids=["driver-cursor", "sqlalchemy"])
def test_a_postgresql_read_only_unit_reads_each_version_with_its_groups_in_one_statement(
    stores: StoreFactory, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """A read or vread on PostgreSQL is one statement (the version outer-joined with the
    groups asked for), whatever groups are asked for; on the driver's cursor (the read pool)
    or through SQLAlchemy (where that is off, or after a driver error), with the same
    results."""
    from sqlalchemy import event

    from phivault.records.store import unit_of_work

    if stores.engine != "postgresql":
        pytest.skip("SQLite: see the driver-begun read unit test below")
    store = stores.open()
    key = ResourceKey("t1", "Observation", "o1")
    with store.unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
        uow.commit()
    statements: list[str] = []
    engine = store._reader
    assert engine is not None

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    direct_texts: list[str] = []
    run_direct = unit_of_work._direct

    def spied(conn: Any, statement: Any, params: Any) -> Any:
        # Off: as after a driver error, the ordinary path runs the statement.
        rows = run_direct(conn, statement, params) if direct else None
        if rows is not None:
            direct_texts.append(str(statement))
        return rows

    monkeypatch.setattr(unit_of_work, "_direct", spied)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        with store.unit_of_work(read_only=True) as uow:
            every = uow.read(key)
            clinical = uow.read(key, groups={"clinical"})
            unknown_version = uow.vread(key, 2)
            first = uow.vread(key, 1, groups={"administrative"})
            bare = uow.vread(key, 1, groups=set())
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(statements) + len(direct_texts) == 5
    assert len(direct_texts) == (5 if direct else 0)
    assert every is not None and every.groups == {
        "clinical": b"sealed-o1-1",
        "administrative": b"meta",
    }
    assert clinical is not None and clinical.groups == {"clinical": b"sealed-o1-1"}
    assert unknown_version is None
    assert first is not None and first.groups == {"administrative": b"meta"}
    assert bare is not None and bare.groups == {} and bare.version == 1


@pytest.mark.parametrize("driver", [True, False], ids=["driver-cursor", "sqlalchemy"])
def test_a_sqlite_read_only_unit_reads_on_the_driver_until_it_needs_more(
    stores: StoreFactory, monkeypatch: pytest.MonkeyPatch, driver: bool
) -> None:
    """A read-only unit on SQLite begins on the driver: a read or vread of every group (or
    of none) is one statement on the driver's cursor. A read of some groups, or anything
    else, adopts a SQLAlchemy connection in the same transaction (one snapshot for the whole
    unit: a write committed meanwhile is not seen). After a driver error the statement runs
    through SQLAlchemy, with the same results; every connection goes back to the pool."""
    from sqlalchemy import event

    from phivault.records.store import _driver

    if stores.engine != "sqlite":
        pytest.skip("PostgreSQL read-only units run on the read pool")
    store = stores.open()
    key = ResourceKey("t1", "Observation", "o1")
    with store.unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
        uow.commit()
    driven: list[str] = []
    run_rows = _driver._DriverRead.rows

    def spied(self: Any, statement: Any, params: Any) -> Any:
        rows = run_rows(self, statement, params) if driver else None  # off: a driver error
        if rows is not None:
            driven.append(str(statement))
        return rows

    monkeypatch.setattr(_driver._DriverRead, "rows", spied)
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", seen)
    try:
        with store.unit_of_work(read_only=True) as uow:
            every = uow.read(key)
            bare = uow.vread(key, 1, groups=set())
            unknown_version = uow.vread(key, 2)
            with store.unit_of_work() as writer:  # committed while the reader is open
                writer.write(obs("o1", 2), previous=1)
                writer.commit()
            clinical = uow.read(key, groups={"clinical"})
            again = uow.read(key)
    finally:
        event.remove(store.engine, "before_cursor_execute", seen)
    assert len(driven) == (3 if driver else 0)
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(reads) == (3 if driver else 6)  # some groups: two statements
    assert every is not None and every.version == 1
    assert every.groups == {"clinical": b"sealed-o1-1", "administrative": b"meta"}
    assert bare is not None and bare.groups == {} and bare.version == 1
    assert unknown_version is None
    assert clinical is not None and clinical.version == 1  # the unit's snapshot
    assert clinical.groups == {"clinical": b"sealed-o1-1"}
    assert again == every
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with store.unit_of_work(read_only=True) as uow:
        latest = uow.read(key)
    assert latest is not None and latest.version == 2
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_sqlite_read_only_unit_that_cannot_begin_on_the_driver_begins_as_before(
    store: SqlRecordStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the driver-level begin fails, the unit begins through SQLAlchemy (which would say
    why, as a store error, if it failed too) and reads the same."""
    if store.dialect != "sqlite":
        pytest.skip("PostgreSQL read-only units run on the read pool")
    key = ResourceKey("t1", "Observation", "o1")
    with store.unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
        uow.commit()

    checkout = store.engine.raw_connection
    tries: list[int] = []

    def refused_once() -> Any:
        tries.append(1)
        if len(tries) == 1:  # the driver-level begin's checkout
            raise OSError("no connection")
        return checkout()

    monkeypatch.setattr(store.engine, "raw_connection", refused_once)
    with store.unit_of_work(read_only=True) as uow:
        found = uow.read(key)
    assert len(tries) == 2
    assert found is not None and found.groups["clinical"] == b"sealed-o1-1"


def test_a_sqlite_read_unit_that_cannot_adopt_its_connection_fails_closed_and_returns_it(
    store: SqlRecordStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If SQLAlchemy cannot take over a driver-begun unit's connection, the unit fails with
    the store's own error (a 503 at the API), and the connection goes back to the pool."""
    from sqlalchemy import Connection
    from sqlalchemy.exc import OperationalError

    from phivault.records.store.ports import RecordStoreUnavailable

    if store.dialect != "sqlite":
        pytest.skip("PostgreSQL read-only units run on the read pool")
    key = ResourceKey("t1", "Observation", "o1")
    with store.unit_of_work() as uow:
        uow.write(obs("o1"), previous=None)
        uow.commit()

    def refused(self: Connection) -> Any:
        raise OperationalError("BEGIN", {}, Exception("disk I/O error"))

    with store.unit_of_work(read_only=True) as uow:
        assert uow.read(key) is not None  # on the driver
        monkeypatch.setattr(Connection, "begin", refused)
        with pytest.raises(RecordStoreUnavailable, match="begin failed"):
            uow.read(key, groups={"clinical"})  # needs SQLAlchemy: adopts
    monkeypatch.undo()
    assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with store.unit_of_work(read_only=True) as uow:
        assert uow.read(key, groups={"clinical"}) is not None


def test_concurrent_writers_all_commit_without_the_busy_handler(stores: StoreFactory) -> None:
    """Sixteen threads writing at once: every write commits, and on SQLite a writer waits
    for the one before it on the store's lock, not in SQLite's busy handler (which sleeps up
    to 100 ms between tries: the slowest of these writes took seconds under load)."""
    import threading
    import time

    store = stores.open()
    waits: list[float] = []

    def write(n: int) -> None:
        for k in range(5):
            started = time.perf_counter()
            with store.unit_of_work() as uow:
                uow.write(obs(f"c{n}-{k}"), previous=None)
                uow.commit()
            waits.append(time.perf_counter() - started)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with store.unit_of_work(read_only=True) as uow:
        page = uow.search("t1", parse_search("Observation", "code=8302-2&_total=accurate"))
    assert page.total == 80 and len(waits) == 80


def test_a_sqlite_writer_waiting_too_long_fails_closed(
    stores: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that cannot get its turn within the busy timeout gets the store's own error
    (503 at the API), as SQLite's busy handler gave it, and leaves nothing behind."""
    import threading

    from phivault.records.store import sql_store
    from phivault.records.store.ports import RecordStoreUnavailable

    if stores.engine != "sqlite":
        pytest.skip("PostgreSQL has row locks, not one writer at a time")
    monkeypatch.setattr(sql_store, "_WRITER_WAIT_S", 0.2)
    store = stores.open()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.unit_of_work() as uow:
            uow.write(obs("first"), previous=None)
            holding.set()
            release.wait(10)
            uow.commit()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        with pytest.raises(RecordStoreUnavailable), store.unit_of_work() as uow:
            uow.write(obs("second"), previous=None)
            uow.commit()
    finally:
        release.set()
        holder.join()
    with store.unit_of_work() as uow:  # the lock is free again
        uow.write(obs("third"), previous=None)
        uow.commit()
    with store.unit_of_work(read_only=True) as uow:
        assert uow.read(ResourceKey("t1", "Observation", "second")) is None
        assert uow.read(ResourceKey("t1", "Observation", "first")) is not None


def test_create_many_over_a_taken_id_names_it_and_writes_none_of_them(
    store: SqlRecordStore,
) -> None:
    """A bulk create with one taken id in the middle: the conflict names that id and the
    version holding it (SQLite: no look before the insert, the taken key found only when
    the insert is refused), none of the bulk is written, and the transaction goes on (what
    it wrote before stays: SQLite rolls the refused insert back to a savepoint; PostgreSQL
    looks first)."""
    with store.unit_of_work() as uow:
        uow.create_many([obs("taken")])
        uow.write(obs("taken", 2), previous=1)
        uow.commit()
    with store.unit_of_work() as uow:
        uow.create_many([obs("before")])
        with pytest.raises(VersionConflict) as refused:
            uow.create_many([obs("a"), obs("b"), obs("taken"), obs("c")])
        assert refused.value.resource_id == "taken"
        assert (refused.value.expected, refused.value.actual) == (None, 2)
        uow.create_many([obs("d"), obs("e")])
        uow.commit()
    with store.unit_of_work(read_only=True) as uow:
        present = {
            name
            for name in ("before", "a", "b", "c", "d", "e", "taken")
            if uow.read(ResourceKey("t1", "Observation", name)) is not None
        }
        page = uow.search("t1", parse_search("Observation", "code=8302-2&_total=accurate"))
        d = uow.read(ResourceKey("t1", "Observation", "d"))
    assert present == {"before", "d", "e", "taken"}
    assert page.total == 4
    assert d is not None and d.groups["clinical"] == b"sealed-d-1"  # seqs line up


def test_create_many_fails_closed_if_sqlite_numbered_versions_out_of_order(
    store: SqlRecordStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: a bulk create's version seqs are worked out from the first and the last
    (AUTOINCREMENT rises with each row, one writer at a time); if they ever disagreed with
    the row count, nothing is written rather than groups sealed to the wrong version."""
    if store.dialect != "sqlite":
        pytest.skip("PostgreSQL returns each seq")
    import phivault.records.store.unit_of_work as unit_of_work

    real = unit_of_work._on_driver

    def off_by_one(conn: Any, sql: str, params: Any, *, many: bool = False) -> Any:
        ran = real(conn, sql, params, many=many)
        if sql == "SELECT last_insert_rowid()":
            return ran._replace(rows=[(ran.rows[0][0] + 1,)])
        return ran

    monkeypatch.setattr(unit_of_work, "_on_driver", off_by_one)
    with pytest.raises(RecordStoreUnavailable), store.unit_of_work() as uow:
        uow.create_many([obs("a"), obs("b"), obs("c")])
        uow.commit()
    monkeypatch.undo()
    with store.unit_of_work(read_only=True) as uow:
        assert all(uow.read(ResourceKey("t1", "Observation", n)) is None for n in "abc")
