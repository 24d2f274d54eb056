"""Fewer round trips per write unit on PostgreSQL (docs/decisions/records-postgres-round-
trips.md): the write pool pings a connection only after it sat idle, and a create's group and
index inserts go to the server as one pipeline. What must still hold: a lost connection fails
one unit cleanly (``RecordStoreUnavailable``, never a driver exception) and the next works;
an error among the pipelined inserts fails the unit as a whole, with nothing of it committed."""

from __future__ import annotations

from dataclasses import replace

import pytest
from records_store_support import StoreFactory
from test_records_store import obs

from phivault.records.store import ResourceKey, SqlRecordStore
from phivault.records.store.ports import RecordStoreUnavailable
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


def test_an_error_among_the_pipelined_inserts_fails_the_whole_unit(stores: StoreFactory) -> None:
    """A group with no ciphertext breaks its NOT NULL constraint inside the pipeline: the
    unit fails with the store's own error and nothing of it (head, version, index) is
    committed; the store then writes as before."""
    _postgres_only(stores)
    store = stores.open()
    broken = replace(obs("o1"), groups={"clinical": None})  # type: ignore[dict-item]
    with pytest.raises(RecordStoreUnavailable) as raised:
        store.write_unit(lambda uow: uow.create_many([broken]))
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
