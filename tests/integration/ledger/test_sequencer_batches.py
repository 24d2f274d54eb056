"""Grouped audit messages on real NATS JetStream and PostgreSQL: a stream mixing single-event
messages (as older workers send them) and batch messages is appended event by event, in order,
exactly once, leaf for leaf what the embedded ledger makes, and ``ledger verify`` accepts it;
a batch published twice under its id is stored once; a takeover that finds a message only
partly appended completes it without repeating anything."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from stream_support import (  # noqa: F401
    NATS_URL,
    ORIGIN,
    AuditStream,
    eventually,
    ledger_size,
    read_leaves,
    seq_ledger_fixture,
    signer_fixture,
    stream_fixture,
    verify,
)
from test_postgres_support import PgLedger, pg_fixture  # noqa: F401

from phivault.crypto.signing import Ed25519NoteSigner
from phivault.datadir import DataDir
from phivault.ledger.canonical import canonical_json_of_plain_document
from phivault.ledger.events import AuditEvent
from phivault.ledger.postgres_store import PostgresLedgerStore
from phivault.ledger.sequencer import InvalidStreamMessage, Sequencer
from phivault.ledger.service import initialize_ledger, open_ledger, open_ledger_on
from phivault.ledger.stream import (
    BATCH_HEADER,
    ENCODING_BATCH,
    ENCODING_HEADER,
    JetStreamAuditSink,
)
from phivault.ledger.testing import sample_event

pytestmark = pytest.mark.integration


def _sequencer(stream: AuditStream, pg: PgLedger, signer: Ed25519NoteSigner) -> Sequencer:
    return Sequencer(
        nats_urls=[NATS_URL],
        stream=stream.name,
        subject=stream.subject,
        ledger_conninfo=pg.app,
        ledger_schema=pg.schema,
        signer=signer,
        origin=ORIGIN,
        lock_retry_s=0.1,
    )


@contextlib.asynccontextmanager
async def _running(worker: Sequencer) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.shield(task), 15)


def _request_ids(pg: PgLedger) -> list[str]:
    return [json.loads(leaf).get("request_id", "") for leaf in read_leaves(pg)]


def _batch(events: list[AuditEvent]) -> tuple[bytes, dict[str, str]]:
    payload = b"\n".join(canonical_json_of_plain_document(e.to_document()) for e in events)
    return payload, {
        ENCODING_HEADER: ENCODING_BATCH,
        BATCH_HEADER: ",".join(["event"] * len(events)),
    }


async def test_single_and_batch_messages_mixed_are_appended_once_each_and_verify(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner, tmp_path: Path
) -> None:
    calls: list[AuditEvent | dict[str, Any]] = []
    async with await JetStreamAuditSink.connect(
        [NATS_URL], name="t", stream=audit_stream.name, subject=audit_stream.subject
    ) as sink:
        # Old workers' messages: one event each.
        for i in range(5):
            event = sample_event(i, patient=f"Patient/p-{i % 2}")
            calls.append(event)
            await sink.record(event)
        # Grouped: 30 events and two documents recorded together (one message).
        group: list[AuditEvent | dict[str, Any]] = [
            sample_event(i, patient=f"Patient/p-{i % 3}") for i in range(5, 35)
        ]
        group.insert(7, {"kind": "ledger", "subtype": "note", "n": 1})
        group.append({"kind": "ledger", "subtype": "note", "patient": "Patient/p-1", "n": 2})
        seqs = await asyncio.gather(
            *(
                sink.record(item) if isinstance(item, AuditEvent) else sink.record_document(item)
                for item in group
            )
        )
        assert set(seqs) == {6}
        calls += group
        stored = await audit_stream.js.get_msg(audit_stream.name, 6)
        assert stored.headers is not None and stored.headers[ENCODING_HEADER] == ENCODING_BATCH
        # A batch published twice under one id (a publisher's retry after a lost ack).
        twice = [sample_event(i, patient="Patient/p-2") for i in range(35, 39)]
        payload, headers = _batch(twice)
        headers["Nats-Msg-Id"] = "batch-retried"
        first = await audit_stream.js.publish(audit_stream.subject, payload, headers=headers)
        again = await audit_stream.js.publish(audit_stream.subject, payload, headers=headers)
        assert first.seq == again.seq == 7 and again.duplicate
        calls += twice
        # And singles again after.
        for i in range(39, 42):
            event = sample_event(i)
            calls.append(event)
            await sink.record(event)

    worker = _sequencer(audit_stream, seq_ledger, signer)
    async with _running(worker):
        await eventually(lambda: ledger_size(seq_ledger) == len(calls), what="every event")
        await asyncio.sleep(0.3)  # anything that would be a duplicate arrives meanwhile
    assert ledger_size(seq_ledger) == len(calls) == 44
    assert worker.progress.last_applied_seq == 10
    report = verify(seq_ledger, signer)
    assert report.entries == report.covered == 44

    data_dir = DataDir.create(tmp_path / "data", dev=True, origin=ORIGIN)
    initialize_ledger(data_dir)
    async with open_ledger(data_dir) as embedded:
        for item in calls:
            if isinstance(item, AuditEvent):
                await embedded.record(item)
            else:
                await embedded.record_document(item)
        expected = [entry.leaf for entry in embedded.read_range(0, len(calls))]
    assert read_leaves(seq_ledger) == expected


async def test_a_takeover_completes_a_partly_appended_message_once(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    before = [sample_event(i) for i in range(3)]
    batch = [sample_event(i) for i in range(3, 11)]
    after = [sample_event(i) for i in range(11, 13)]
    for event in before:
        await audit_stream.js.publish(
            audit_stream.subject,
            canonical_json_of_plain_document(event.to_document()),
            headers={ENCODING_HEADER: "event"},
        )
    payload, headers = _batch(batch)
    await audit_stream.js.publish(audit_stream.subject, payload, headers=headers)
    # What a sequencer that crashed in the middle of appending the batch message left: the
    # messages before it and 5 of its 8 events, and no cursor row at all.
    async with open_ledger_on(
        lambda: PostgresLedgerStore(seq_ledger.app, schema=seq_ledger.schema, writable=True),
        signer,
        ORIGIN,
    ) as direct:
        for event in before + batch[:5]:
            await direct.record(event)
    for event in after:
        await audit_stream.js.publish(
            audit_stream.subject,
            canonical_json_of_plain_document(event.to_document()),
            headers={ENCODING_HEADER: "event"},
        )

    worker = _sequencer(audit_stream, seq_ledger, signer)
    async with _running(worker):
        await eventually(lambda: ledger_size(seq_ledger) == 13, what="13 entries")
        await asyncio.sleep(0.3)
    assert _request_ids(seq_ledger) == [f"req-{i}" for i in range(13)]
    assert verify(seq_ledger, signer).entries == 13
    rows = seq_ledger.admin_sql(
        "SELECT ledger_size, stream_seq FROM {s}.stream_cursor ORDER BY ledger_size"
    )
    # The cursor only ever names whole messages: 11 entries are messages 1..4.
    assert [(int(str(a)), int(str(b))) for a, b in rows] == [(11, 4), (13, 6)]

    # A second takeover from that cursor finds the message whole and adds nothing.
    worker = _sequencer(audit_stream, seq_ledger, signer)
    async with _running(worker):
        await eventually(lambda: worker.progress.role == "active", what="active")
        await asyncio.sleep(0.5)
    assert ledger_size(seq_ledger) == 13


async def test_a_batch_with_one_bad_event_is_refused_whole(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    payload, headers = _batch([sample_event(0), sample_event(1)])
    payload += b'\n{"kind":"rest"}'
    headers[BATCH_HEADER] += ",event"
    await audit_stream.js.publish(audit_stream.subject, payload, headers=headers)
    worker = _sequencer(audit_stream, seq_ledger, signer)
    with pytest.raises(InvalidStreamMessage) as raised:
        await asyncio.wait_for(worker.run(asyncio.Event()), 10)
    assert raised.value.seq == 1
    assert ledger_size(seq_ledger) == 0
