"""Fewer round trips per write unit on PostgreSQL (docs/decisions/records-postgres-round-
trips.md): the write pool pings a connection only after it sat idle, and a create's group and
index inserts go to the server as one pipeline. What must still hold: a lost connection fails
one unit cleanly (``RecordStoreUnavailable``, never a driver exception) and the next works;
an error among the pipelined inserts fails the unit as a whole, with nothing of it committed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from records_store_support import StoreFactory
from sqlalchemy.exc import DBAPIError
from test_records_store import obs

from phivault.crypto.blind_index import BlindToken
from phivault.records.search_params import BlindEntry, StringEntry, TokenEntry
from phivault.records.store import ResourceKey, SqlRecordStore
from phivault.records.store.ports import (
    NewVersion,
    RecordStoreUnavailable,
    RecordUnitOfWork,
    VersionConflict,
)
from phivault.records.store.schema import idx_date, idx_token


def _terminate_the_write_connection(store: SqlRecordStore, admin: str) -> None:
    """Kill (on the server) the one pooled connection the store's write units use."""
    import psycopg

    with store.engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _postgres_only(stores: StoreFactory) -> None:
    if stores.engine != "postgresql":
        pytest.skip("SQLite has no server and no pipeline")


def test_a_pooled_write_connection_lost_while_idle_is_replaced_before_use(
    stores: StoreFactory, postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phivault.records.store import _driver

    _postgres_only(stores)
    monkeypatch.setattr(_driver, "_PING_IDLE_S", 0.0)  # every checkout counts as idle
    store = stores.open()
    _terminate_the_write_connection(store, postgres)
    store.write_unit(lambda uow: uow.create_many([obs("o1")]))  # pinged, found dead, replaced
    with store.unit_of_work(read_only=True) as uow:
        assert uow.read(ResourceKey("t1", "Observation", "o1")) is not None


def test_a_pooled_write_connection_lost_between_uses_fails_one_unit_cleanly_then_recovers(
    stores: StoreFactory, postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phivault.records.store import _driver

    _postgres_only(stores)
    monkeypatch.setattr(_driver, "_PING_IDLE_S", 3600.0)  # never pinged
    store = stores.open()
    store.write_unit(lambda uow: uow.create_many([obs("o1")]))
    _terminate_the_write_connection(store, postgres)
    with pytest.raises(RecordStoreUnavailable):
        store.write_unit(lambda uow: uow.create_many([obs("o2")]))
    store.write_unit(lambda uow: uow.create_many([obs("o3")]))  # the pool replaced it
    with store.unit_of_work(read_only=True) as uow:
        assert uow.read(ResourceKey("t1", "Observation", "o2")) is None
        assert uow.read(ResourceKey("t1", "Observation", "o3")) is not None


@pytest.mark.parametrize("others", [0, 2], ids=["single", "bundle"])
def test_an_error_among_the_pipelined_inserts_fails_the_whole_unit(
    stores: StoreFactory, others: int
) -> None:
    """A group with no ciphertext breaks its NOT NULL constraint inside the pipeline (a
    bundle's) or the one statement (a single create): the unit fails with the store's own
    error and nothing of it (head, version, index) is committed; the store then writes as
    before."""
    _postgres_only(stores)
    store = stores.open()
    broken = replace(obs("o1"), groups={"clinical": None})  # type: ignore[dict-item]
    bundle = [broken, *(obs(f"other{i}") for i in range(others))]
    with pytest.raises(RecordStoreUnavailable) as raised:
        store.write_unit(lambda uow: uow.create_many(bundle))
    assert "NotNullViolation" in str(raised.value)
    with store.unit_of_work(read_only=True) as uow:
        assert uow.read(ResourceKey("t1", "Observation", "o1")) is None
    with store.engine.connect() as conn:
        for table in ("rec_resources", "rec_versions", "rec_groups", idx_token.name, idx_date.name):
            assert conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one() == 0
    store.write_unit(lambda uow: uow.create_many([obs("o1")]))
    with store.unit_of_work(read_only=True) as uow:
        found = uow.read(ResourceKey("t1", "Observation", "o1"))
        assert found is not None and found.version == 1


# A single create on PostgreSQL is one statement on psycopg's cursor (the head unless the id
# is taken, and from the inserted head its version, groups and index rows).

_TABLES = (
    "rec_resources", "rec_versions", "rec_groups",
    "rec_idx_token", "rec_idx_string", "rec_idx_date", "rec_idx_reference", "rec_idx_blind",
)  # fmt: skip


def _every_kind(the_id: str, token: str = "tok-1") -> NewVersion:
    """An Observation with an index row in every index table (and a repeated token)."""
    new = obs(the_id, patient="p9")
    return replace(
        new,
        index=[
            *new.index,
            TokenEntry("code", "http://loinc.org", "8302-2"),  # a repeat: one row
            StringEntry("note", "hello"),
            BlindEntry("name", BlindToken("exact", 3, token)),
        ],
    )


def _rows(store: SqlRecordStore, the_id: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of one resource, by table, without its own id and generated numbers."""
    found: dict[str, list[tuple[object, ...]]] = {}
    with store.engine.connect() as conn:
        for table in _TABLES:
            if table == "rec_groups":
                sql = (
                    "SELECT g.tenant, g.key_subject, g.grp, g.ciphertext FROM rec_groups g "
                    "JOIN rec_versions v ON v.seq = g.version_seq WHERE v.resource_id = %(id)s"
                )
            else:
                sql = f"SELECT * FROM {table} WHERE resource_id = %(id)s"
            rows = conn.exec_driver_sql(sql, {"id": the_id}).all()
            found[table] = sorted(
                tuple(the_id if v == the_id else v for v in row if not isinstance(v, int))
                for row in rows
            )
    return found


def test_a_single_create_writes_the_same_rows_as_a_bundle_create(stores: StoreFactory) -> None:
    _postgres_only(stores)
    store = stores.open()
    store.write_unit(lambda uow: uow.create_many([_every_kind("one")]))  # one statement
    store.write_unit(lambda uow: uow.create_many([_every_kind("two"), obs("x")]))  # the bulk path
    alone, bulk = _rows(store, "one"), _rows(store, "two")
    for table in _TABLES:
        assert alone[table], table  # something in every table
        renamed = [tuple("two" if v == "one" else v for v in row) for row in alone[table]]
        if table == "rec_groups":
            bulk[table] = [tuple(v.replace(b"two", b"one") if isinstance(v, bytes) else v
                                 for v in row) for row in bulk[table]]  # fmt: skip
            renamed = [tuple(v.replace(b"two", b"one") if isinstance(v, bytes) else v
                             for v in row) for row in renamed]  # fmt: skip
        assert sorted(renamed) == sorted(bulk[table]), table
    with store.unit_of_work(read_only=True) as uow:
        found = uow.read(ResourceKey("t1", "Observation", "one"))
        assert found is not None and found.version == 1 and found.key_subject == "p9"
        assert found.groups == {"clinical": b"sealed-one-1", "administrative": b"meta"}


def test_a_single_create_of_a_taken_id_is_a_precise_conflict_and_writes_nothing(
    stores: StoreFactory,
) -> None:
    _postgres_only(stores)
    store = stores.open()
    store.write_unit(lambda uow: uow.create_many([obs("o1")]))
    before = _rows(store, "o1")
    with pytest.raises(VersionConflict) as taken:
        store.write_unit(lambda uow: uow.create_many([_every_kind("o1")]))
    assert (taken.value.resource_id, taken.value.expected, taken.value.actual) == ("o1", None, 1)
    assert _rows(store, "o1") == before  # no version, group or index row of the second


def test_a_single_create_that_fails_in_its_statement_names_no_value_and_leaves_nothing(
    stores: StoreFactory,
) -> None:
    """The one statement fails on its last part (a group with no ciphertext): nothing of it
    is written, and neither the store's error nor SQLAlchemy's under it shows a value."""
    _postgres_only(stores)
    store = stores.open()
    broken = replace(_every_kind("secret-id-42", "tok-secret"), groups={"clinical": None})  # type: ignore[dict-item]
    with pytest.raises(RecordStoreUnavailable) as raised:
        store.write_unit(lambda uow: uow.create_many([broken]))
    assert "NotNullViolation" in str(raised.value)
    cause = raised.value.__cause__
    assert isinstance(cause, DBAPIError)
    assert "parameters hidden" in str(cause)  # SQLAlchemy's message shows none of them
    for shown in (str(raised.value), str(cause)):
        assert "secret-id-42" not in shown and "tok-secret" not in shown, shown
    assert all(not rows for rows in _rows(store, "secret-id-42").values())


def test_a_write_connection_lost_before_the_intent_claim_fails_one_unit_then_recovers(
    stores: StoreFactory, postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim runs on psycopg's cursor: a lost connection is a 503 (not "settled"), the
    connection is replaced, and the next unit claims and writes."""
    from phivault.records.store import _driver

    _postgres_only(stores)
    monkeypatch.setattr(_driver, "_PING_IDLE_S", 3600.0)  # never pinged
    store = stores.open()

    def unit(the_id: str) -> Callable[[RecordUnitOfWork], None]:
        def work(uow: RecordUnitOfWork) -> None:
            uow.claim_intents("t1", [f"claim-{the_id}"], at=1)
            uow.create_many([obs(the_id)])

        return work

    store.write_unit(unit("o1"))
    _terminate_the_write_connection(store, postgres)
    with pytest.raises(RecordStoreUnavailable) as raised:
        store.write_unit(unit("o2"))
    assert "claim intent" in str(raised.value)
    store.write_unit(unit("o3"))
    with store.unit_of_work(read_only=True) as uow:
        assert uow.read(ResourceKey("t1", "Observation", "o2")) is None
        assert uow.read(ResourceKey("t1", "Observation", "o3")) is not None
    with store.engine.connect() as conn:
        claims = conn.exec_driver_sql("SELECT claim FROM rec_intent_claims ORDER BY claim").all()
    assert [c[0] for c in claims if c[0].startswith("claim-")] == ["claim-o1", "claim-o3"]
