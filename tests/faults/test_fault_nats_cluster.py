"""A 3-node NATS JetStream cluster under the audit sink's load: kill one node, then all, then
bring them back.

The cluster is private (loopback ports of its own, never the machine's NATS on 4222); the
audit stream has 3 file-storage replicas, as in production. Several tasks publish through one
:class:`JetStreamAuditSink` the whole time, with the production default publish timeout.

* One node SIGKILLed (one that does not lead the stream): no publish fails.
* The node that leads the stream SIGKILLed: JetStream elects a new leader only after its Raft
  election timeout (4 to 9 s in nats-server 2.9), longer than the publish timeout (2 s). With
  the production settings no publish fails: while NATS is connected and the stream exists, a
  publish waits for the new leader (``ledger.leader_election_wait_s``, 10 s). With that wait
  switched off the sink fails closed meanwhile (LedgerUnavailable only, each after trying for
  its whole timeout: NATS answers "no responders" at once while there is no leader) and
  publishes again by itself once a leader is elected.
* All nodes SIGKILLed: every publish started afterwards raises LedgerUnavailable (fail
  closed), each within the publish timeout (plus scheduling slack), none succeeds; all started
  again: the same sink object publishes again by itself.
* Afterwards every acknowledged event is in the stream exactly once, at the sequence number
  its acknowledgement gave (message ids make retries idempotent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fault_stream_support import (
    Publication,
    PublishTally,
    admin_client,
    create_stream,
    exactly_once,
    exactly_once_grouped,
    publish_load,
    read_stream,
    stream_name,
)
from fault_support import Harness, NatsCluster, await_until
from nats.js import JetStreamContext

from phivault.ledger.stream import JetStreamAuditSink
from phivault.settings import LedgerSettings

pytestmark = pytest.mark.faults
FAULT_TIMEOUT_S = 90

PUBLISH_TIMEOUT_S = LedgerSettings().publish_timeout_s  # what production runs with
LEADER_WAIT_S = LedgerSettings().leader_election_wait_s
ELECTION_MAX_S = 9.0  # nats-server 2.9's longest Raft election timeout
SLACK_S = 0.75  # event-loop scheduling on a busy 2-core machine


@asynccontextmanager
async def loaded(
    cluster: NatsCluster, name: str, leader_waits: dict[str, float], *, grouped: bool = False
) -> AsyncIterator[tuple[JetStreamContext, dict[str, PublishTally]]]:
    """The stream (3 replicas) and one publishing sink per entry of ``leader_waits`` (its
    ``leader_election_wait_s``; the production publish timeout); afterwards every
    acknowledged event is checked in the stream, exactly once."""
    admin = await admin_client(cluster.urls)
    js = admin.jetstream(timeout=5)
    tallies = {label: PublishTally() for label in leader_waits}
    stop = asyncio.Event()
    sinks: list[JetStreamAuditSink] = []
    loads: list[asyncio.Future[None]] = []
    try:
        await create_stream(js, name, replicas=3)
        for label, leader_wait in leader_waits.items():
            sink = await JetStreamAuditSink.connect(
                cluster.urls,
                name=f"fault-{label}",
                stream=name,
                publish_timeout_s=PUBLISH_TIMEOUT_S,
                leader_election_wait_s=leader_wait,
            )
            sinks.append(sink)
            # Grouped: more publishers, no message ids: the sink sends batch messages.
            load = publish_load(
                sink, tallies[label], stop, publishers=16 if grouped else 4, keyed=not grouped
            )
            loads.append(asyncio.ensure_future(load))
        await await_until(
            lambda: all(len(t.acked) >= 50 for t in tallies.values()),
            20,
            what="publishes before the fault",
        )
        yield js, tallies
    finally:
        stop.set()
        if loads:
            await asyncio.wait_for(asyncio.gather(*loads), 30)
        for sink in sinks:
            await sink.aclose()
    try:
        # Every node back first: a consumer to read with cannot be placed on a dead one.
        await asyncio.to_thread(cluster.start)
        acked = [seq for t in tallies.values() for seq in t.acked.values()]
        messages = await read_stream(js, name, at_least=max(acked, default=0))
        for tally in tallies.values():
            assert tally.unexpected == [], tally.unexpected[:3]
            if grouped:
                exactly_once_grouped(tally.acked, messages)
            else:
                exactly_once(tally.acked, messages)
    finally:
        await admin.close()


async def stream_leader(js: JetStreamContext, name: str) -> int:
    leader = (await js.stream_info(name)).cluster.leader
    return int(str(leader).removeprefix("n"))


def describe(failed: list[Publication]) -> str:
    return f"{len(failed)} publishes failed, the first with: {failed[0].error}" if failed else ""


async def test_audit_stream_survives_a_node_fails_closed_without_all_and_resumes(
    harness: Harness,
) -> None:
    cluster = harness.nats(3)
    name = stream_name()
    async with loaded(cluster, name, {"worker": LEADER_WAIT_S}) as (js, tallies):
        tally = tallies["worker"]

        # 1. Kill a node that does not lead the stream, under load: nothing fails.
        leader = await stream_leader(js, name)
        victim = next(i for i in range(3) if i != leader)
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, victim)
        await await_until(
            lambda: len(tally.successes(since=killed_at + 1)) >= 100,
            30,
            what="publishing to go on after one node died",
        )
        assert tally.failures() == [], describe(tally.failures())
        # It rejoins (and catches up) under load: still nothing fails.
        await asyncio.to_thread(cluster.restart, victim, wait_healthy=False)
        rejoined_at = time.monotonic()
        await await_until(
            lambda: len(tally.successes(since=rejoined_at)) >= 50,
            30,
            what="publishing while the node rejoins",
        )
        assert tally.failures() == [], describe(tally.failures())

        # 2. Kill every node: every publish fails closed, within the timeout.
        await asyncio.to_thread(cluster.kill_all)
        all_dead_at = time.monotonic()
        await await_until(
            lambda: len(tally.failures(since=all_dead_at)) >= 4,
            PUBLISH_TIMEOUT_S * 4 + 10,
            what="publishes to fail with every node down",
        )
        down = tally.started_since(all_dead_at)
        assert down and all(p.seq is None for p in down), "a publish succeeded with NATS down"
        slowest = max(p.finished - p.started for p in down)
        assert slowest <= PUBLISH_TIMEOUT_S + SLACK_S, f"a failing publish took {slowest:.2f} s"

        # 3. Bring every node back: the same sink publishes again by itself.
        await asyncio.to_thread(cluster.start)
        back_at = time.monotonic()
        await await_until(
            lambda: len(tally.successes(since=back_at)) >= 50,
            30,
            what="publishing to resume on the same sink",
        )


@pytest.mark.parametrize("grouped", [False, True], ids=["keyed", "grouped"])
async def test_losing_the_stream_leader_fails_no_publish(harness: Harness, grouped: bool) -> None:
    """Production settings: the publishes of the election's seconds wait for the new leader
    (grouped: batch messages retried whole, under their ids, never regrouped)."""
    cluster = harness.nats(3)
    name = stream_name()
    async with loaded(cluster, name, {"worker": LEADER_WAIT_S}, grouped=grouped) as (
        js,
        tallies,
    ):
        tally = tallies["worker"]
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, await stream_leader(js, name))
        await await_until(
            lambda: len(tally.successes(since=killed_at + 0.5)) >= 50,
            ELECTION_MAX_S + 10,
            what="a new stream leader and publishing again",
        )
        assert tally.failures() == [], describe(tally.failures())
        slowest = max(p.finished - p.started for p in tally.successes(since=killed_at))
        assert slowest <= LEADER_WAIT_S + SLACK_S, f"a publish took {slowest:.2f} s"
        resumed = min(p.finished for p in tally.successes(since=killed_at + 0.5))
        assert resumed - killed_at < ELECTION_MAX_S + PUBLISH_TIMEOUT_S


async def test_without_the_leader_wait_losing_the_leader_fails_closed_until_one_is_elected(
    harness: Harness,
) -> None:
    cluster = harness.nats(3)
    name = stream_name()
    async with loaded(cluster, name, {"worker": 0.0}) as (js, tallies):
        tally = tallies["worker"]
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, await stream_leader(js, name))
        await await_until(
            lambda: len(tally.successes(since=killed_at + 0.5)) >= 50,
            ELECTION_MAX_S + 10,
            what="a new stream leader and publishing again",
        )
        # Fail closed meanwhile: LedgerUnavailable only (the load notes anything else as
        # unexpected), each within the timeout; then publishing resumes by itself.
        failed = tally.failures()
        assert all(p.finished - p.started <= PUBLISH_TIMEOUT_S + SLACK_S for p in failed)
        resumed = min(p.finished for p in tally.successes(since=killed_at + 0.5))
        assert resumed - killed_at < ELECTION_MAX_S + PUBLISH_TIMEOUT_S


async def test_a_publish_keeps_trying_for_its_whole_timeout_while_the_stream_has_no_leader(
    harness: Harness,
) -> None:
    cluster = harness.nats(3)
    name = stream_name()
    async with loaded(cluster, name, {"worker": 0.0}) as (js, tallies):
        tally = tallies["worker"]
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, await stream_leader(js, name))
        # The election takes at least 4 s, twice the publish timeout: publishes fail.
        await await_until(
            lambda: len(tally.failures(since=killed_at)) >= 5, 10, what="failing publishes"
        )
        # (the last wait between tries, up to 0.1 s, may end the try just short of it)
        early = [p for p in tally.failures() if p.finished - p.started < PUBLISH_TIMEOUT_S - 0.25]
        assert early == [], (
            f"{len(early)} publishes failed before their {PUBLISH_TIMEOUT_S} s timeout, "
            f"the quickest after {min(p.finished - p.started for p in early):.2f} s"
        )
