"""Kill the records replica under read load: reads move to the primary with no error; bring it
back: they return to it.

A private primary (never the machine's PostgreSQL) and a real streaming replica of it
(``pg_basebackup -R``, a hot standby on its own loopback port; fault_support). Readers read
patients through the repository, each in its own read-your-writes session so that the router
may send them to the replica, while a writer keeps writing; a probe reads through the store
and notes ``served_by``. The replica is SIGKILLed (postmaster and backends), then started
again on the same data directory.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from fault_records_support import (
    TENANT,
    Tally,
    check_records_afterwards,
    create_schema,
    open_records_kit,
    patient_resource,
    run_records_load,
    writer_caller,
)
from fault_support import Harness, await_until

from phivault.records.store import ResourceKey, SqlRecordStore
from phivault.records.store.routing import PRIMARY, caller_session

pytestmark = pytest.mark.faults
FAULT_TIMEOUT_S = 90


async def test_reads_leave_a_killed_replica_for_the_primary_and_come_back(
    harness: Harness,
) -> None:
    pg = harness.postgres()
    schema = create_schema(pg.conninfo)
    replica = harness.replica_of(pg)

    def open_store() -> SqlRecordStore:
        return SqlRecordStore(
            pg.url, schema=schema, replica_urls=[replica.url], replica_retry_s=0.5
        )

    async with open_records_kit(harness.tmpdir(), open_store) as kit:
        # Patients the replica has surely replayed: the readers read these.
        seeded = [f"seeded-{n}" for n in range(10)]
        for n, patient_id in enumerate(seeded):
            await kit.repo.update(
                writer_caller(kit.ledger), "Patient", patient_id, patient_resource(patient_id, n)
            )
        await asyncio.to_thread(pg.wait_replayed_by, replica)

        served: Counter[str] = Counter()
        probe_errors: list[str] = []
        stop = asyncio.Event()

        def probe_once() -> str:
            with kit.store.unit_of_work(read_only=True, session="probe") as uow:
                assert uow.read(ResourceKey(TENANT, "Patient", seeded[0])) is not None
                return uow.served_by

        async def probe() -> None:
            while not stop.is_set():
                try:
                    served[await asyncio.to_thread(probe_once)] += 1
                except Exception as exc:
                    probe_errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)

        def served_by_replica() -> int:
            return served[replica.served_by_name]

        tally = Tally()
        load = asyncio.gather(
            run_records_load(
                kit, tally, stop, writers=1, readers=3, read_ids=seeded,
                reader_context=lambda n: caller_session(f"reader-{n}"),
            ),
            probe(),
        )  # fmt: skip
        try:
            await await_until(lambda: served_by_replica() >= 20, 20, what="reads on the replica")
            await asyncio.to_thread(replica.kill)
            reads_at_kill, primary_at_kill = tally.reads, served[PRIMARY]
            await await_until(
                lambda: (
                    served[PRIMARY] >= primary_at_kill + 20 and tally.reads >= reads_at_kill + 20
                ),
                20,
                what="reads to move to the primary",
            )
            on_replica_while_down = served_by_replica()
            await asyncio.to_thread(replica.start)
            await await_until(
                lambda: served_by_replica() >= on_replica_while_down + 20,
                20,
                what="reads to return to the replica",
            )
        finally:
            stop.set()
            await asyncio.wait_for(load, 30)
        assert probe_errors == []
        assert tally.failures == Counter(), f"requests failed: {tally.details}"
        assert tally.reads > 0 and tally.writes > 0
    check_records_afterwards(kit, tally)
