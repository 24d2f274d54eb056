"""PostgreSQL pools are bounded (``records.pool_size``) and make no overflow connections:
units beyond the pool wait for a connection instead of each opening (and closing) a backend
of their own (docs/decisions/records-storage.md, "Connection pools")."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from records_store_support import StoreFactory, postgres_url
from test_records_store import obs

from phivault.errors import ConfigurationError
from phivault.records.store import ResourceKey, SqlRecordStore


def test_units_beyond_the_read_pool_wait_for_a_connection_and_none_is_made_extra(
    stores: StoreFactory,
) -> None:
    if stores.engine != "postgresql":
        pytest.skip("SQLite's pool is not a server's backends")
    store = SqlRecordStore(stores.url, schema=stores.schema, pool_size=2)
    try:
        store.write_unit(lambda uow: uow.create_many([obs("o1")]))
        inside = 0
        most_inside = 0
        lock = threading.Lock()
        release = threading.Event()

        def hold() -> None:
            nonlocal inside, most_inside
            with store.unit_of_work(read_only=True) as uow:
                assert uow.read(ResourceKey("t1", "Observation", "o1")) is not None
                with lock:
                    inside += 1
                    most_inside = max(most_inside, inside)
                release.wait(10)
                with lock:
                    inside -= 1

        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(hold) for _ in range(5)]
            time.sleep(1.0)  # ample time for all five to get a connection, had there been any
            with lock:
                assert inside == 2  # two hold the pool's two connections; three wait
            release.set()
            for future in futures:
                future.result(timeout=30)  # the waiting three got connections in turn
        assert most_inside == 2
    finally:
        store.close()


def test_a_pool_size_below_one_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="pool_size"):
        SqlRecordStore(postgres_url(), pool_size=0)
