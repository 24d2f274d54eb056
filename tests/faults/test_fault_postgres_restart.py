"""Restart the records PostgreSQL under load: requests fail cleanly, then recover by themselves.

The repository runs on a private PostgreSQL (never the machine's) while writers and readers
hammer it; the server is restarted (a fast shutdown, as an operator or a failover does) or
killed (SIGKILL of postmaster and backends, a crash) and started again. While it is down,
every failing request fails with the store's "unavailable" error (a StoreUnavailable, which
the API answers as 503 OperationOutcome) and nothing else; afterwards the same repository,
never reopened, serves again, and the checks of fault_records_support hold: every
acknowledged write present, every failed write absent with its intent settled, every
disclosure with its event, the ledger verifying.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from fault_records_support import (
    Tally,
    check_records_afterwards,
    create_schema,
    open_records_kit,
    run_records_load,
)
from fault_support import Harness, await_until

from phivault.records.store import SqlRecordStore

pytestmark = pytest.mark.faults
FAULT_TIMEOUT_S = 90


@pytest.mark.parametrize("how", ["restart", "crash"])
async def test_postgres_restart_under_load_fails_cleanly_then_recovers(
    harness: Harness, how: str
) -> None:
    pg = harness.postgres()
    schema = create_schema(pg.conninfo)
    async with open_records_kit(
        harness.tmpdir(), lambda: SqlRecordStore(pg.url, schema=schema)
    ) as kit:
        tally = Tally()
        stop = asyncio.Event()
        load = asyncio.create_task(run_records_load(kit, tally, stop))
        try:
            await await_until(lambda: tally.reads >= 20, 20, what="reads before the fault")
            before = (tally.writes, tally.reads)
            if how == "restart":
                await asyncio.to_thread(pg.stop, "fast")
            else:
                await asyncio.to_thread(pg.kill)
            down_since = time.monotonic()
            # Down for a while, so that requests really meet the outage.
            await await_until(
                lambda: sum(tally.failures.values()) >= 5, 20, what="requests failing while down"
            )
            await asyncio.sleep(0.5)
            await asyncio.to_thread(pg.start)
            up_at = time.monotonic()
            await await_until(
                lambda: tally.writes > before[0] + 10 and tally.reads > before[1] + 10
                and tally.last_ok > up_at,
                20,
                what="the same repository to serve again",
            )  # fmt: skip
        finally:
            stop.set()
            await asyncio.wait_for(load, 30)
        assert sum(tally.failures.values()) > 0, "the outage was never seen"
        assert set(tally.failures) <= {"RecordStoreUnavailable"}, tally.failures
        assert up_at - down_since > 0.5
    report = check_records_afterwards(kit, tally)
    assert report.entries > 0
