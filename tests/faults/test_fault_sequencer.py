"""Kill the active ledger sequencer under load: the standby takes over, with no gap and no
duplicate.

Two real ``phivault sequencer`` processes feed one PostgreSQL ledger (a private cluster) from
the audit stream on a private 3-node NATS cluster (3 replicas) while API-worker-like tasks
publish through the JetStream audit sink. The active one (the one holding the ledger's
advisory lock) is SIGKILLed in the middle of its work; the standby must take the lock over,
resume exactly where the ledger ends, and catch up. Afterwards the ledger holds the stream's
messages one for one in stream order -- every acknowledged event exactly once -- and verifies
against its signed checkpoints, the last one signed by the standby when it is stopped cleanly.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from fault_sequencer_support import SequencerSetup, check_ledger_matches_stream
from fault_stream_support import (
    PublishTally,
    admin_client,
    create_stream,
    publish_load,
    read_stream,
    stream_name,
)
from fault_support import Harness, await_until

from phivault.ledger.stream import JetStreamAuditSink

pytestmark = pytest.mark.faults
FAULT_TIMEOUT_S = 90


@pytest.mark.parametrize("grouped", [False, True], ids=["keyed", "grouped"])
async def test_sigkill_of_the_active_sequencer_under_load_hands_over_with_no_gap(
    harness: Harness, grouped: bool
) -> None:
    cluster = harness.nats(3)
    pg = harness.postgres()
    name = stream_name()
    admin = await admin_client(cluster.urls)
    try:
        js = admin.jetstream(timeout=5)
        await create_stream(js, name, replicas=3)
        setup = SequencerSetup.create(
            harness, nats_urls=cluster.urls, stream=name, replicas=3, conninfo=pg.conninfo
        )
        first = setup.start("sequencer-a")
        await await_until(first.active, 30, what="the first sequencer to be active")
        second = setup.start("sequencer-b")
        await await_until(second.standing_by, 30, what="the second sequencer to stand by")

        sink = await JetStreamAuditSink.connect(cluster.urls, name="fault-worker", stream=name)
        tally = PublishTally()
        stop = asyncio.Event()
        # Grouped: 16 publishers with no message ids, so the sink sends batch messages.
        load = asyncio.ensure_future(
            publish_load(sink, tally, stop, publishers=16 if grouped else 4, keyed=not grouped)
        )
        try:
            await await_until(
                lambda: first.last_applied() >= 200, 30, what="the active one to append"
            )
            await asyncio.to_thread(first.process.kill)  # SIGKILL, mid-work
            killed_at = time.monotonic()
            await await_until(second.active, 30, what="the standby to take over")
            took_over = time.monotonic() - killed_at
            await await_until(
                lambda: (
                    len(tally.successes(since=time.monotonic() - 0.5)) > 0
                    and second.last_applied() > max(tally.acked.values()) - 50
                ),
                30,
                what="the new active one to keep up",
            )
        finally:
            stop.set()
            await asyncio.wait_for(load, 30)
            await sink.aclose()
        assert tally.unexpected == [] and tally.failures() == []
        last = max(tally.acked.values())
        await await_until(
            lambda: second.last_applied() >= last, 30, what="the ledger to hold every event"
        )
        # A clean stop: the last batch, the cursor and a final checkpoint.
        second.process.stop(signal.SIGTERM, timeout=20)
        assert second.process.returncode == 0, "the sequencer did not stop cleanly"
        messages = await read_stream(js, name, at_least=last)
    finally:
        await admin.close()
    report = check_ledger_matches_stream(setup, messages, tally.acked, grouped=grouped)
    assert report.covered == report.entries
    if grouped:
        assert report.entries > len(messages), "no message held more than one event"
    else:  # keyed events are grouped with one another too (write outcomes)
        assert report.entries >= len(messages)
    assert took_over < 10, f"the standby took {took_over:.1f} s to take over"
