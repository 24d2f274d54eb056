"""The ledger sequencer on real NATS JetStream and PostgreSQL: in-order appends that match the
embedded ledger leaf for leaf, checkpoints within a second, one active sequencer with a standby
that takes over (after a clean stop and after SIGKILL) with no gap and no duplicate, and a stop
on a message that is not an event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from nats.js import api
from stream_support import (  # noqa: F401
    NATS_URL,
    ORIGIN,
    AuditStream,
    PrivateNats,
    checkpoint_count,
    eventually,
    ledger_size,
    private_nats_fixture,
    read_leaves,
    seq_ledger_fixture,
    signer_fixture,
    stream_fixture,
    verify,
)
from test_postgres_support import PgLedger, pg_fixture  # noqa: F401

from phivault.crypto.signing import Ed25519NoteSigner
from phivault.datadir import DataDir
from phivault.errors import ConfigurationError
from phivault.ledger.checkpoint import unverified_checkpoint
from phivault.ledger.errors import LedgerUnavailable
from phivault.ledger.events import AuditEvent
from phivault.ledger.postgres_store import PostgresLedgerStore
from phivault.ledger.sequencer import (
    InvalidStreamMessage,
    LedgerStreamMismatch,
    Sequencer,
    StreamGap,
    create_cursor_table,
)
from phivault.ledger.service import initialize_ledger, open_ledger, open_ledger_on, signer_path
from phivault.ledger.stream import (
    ENCODING_HEADER,
    JetStreamAuditSink,
    audit_subject,
    connect_nats,
    ensure_audit_stream,
)
from phivault.ledger.testing import sample_event
from ports_support import free_port

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def _sequencer(
    stream: AuditStream, pg: PgLedger, signer: Ed25519NoteSigner, **options: Any
) -> Sequencer:
    options.setdefault("lock_retry_s", 0.1)
    return Sequencer(
        nats_urls=[NATS_URL],
        stream=stream.name,
        subject=stream.subject,
        ledger_conninfo=pg.app,
        ledger_schema=pg.schema,
        signer=signer,
        origin=ORIGIN,
        **options,
    )


@contextlib.asynccontextmanager
async def _running(worker: Sequencer) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.shield(task), 15)


async def _sink(stream: AuditStream) -> JetStreamAuditSink:
    return await JetStreamAuditSink.connect(
        [NATS_URL], name="test-publisher", stream=stream.name, subject=stream.subject
    )


def _any_active(workers: list[Sequencer]) -> bool:
    return any(w.progress.role == "active" for w in workers)


def _free_port() -> int:
    return free_port()


def _request_ids(pg: PgLedger) -> list[str]:
    return [json.loads(leaf).get("request_id", "") for leaf in read_leaves(pg)]


def _mixed_calls(count: int) -> list[tuple[str, AuditEvent | dict[str, Any]]]:
    """Events of three patients, and now and then a plain document (some with a patient)."""
    calls: list[tuple[str, AuditEvent | dict[str, Any]]] = []
    for i in range(count):
        if i % 7 == 3:
            doc: dict[str, Any] = {"kind": "ledger", "subtype": "note", "n": i, "x": 0.25}
            if i % 2:
                doc["patient"] = f"Patient/p-{i % 3}"
            calls.append(("document", doc))
        else:
            calls.append(("event", sample_event(i, patient=f"Patient/p-{i % 3}")))
    return calls


async def test_appends_in_order_exactly_what_the_embedded_ledger_would(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner, tmp_path: Path
) -> None:
    calls = _mixed_calls(60)
    async with await _sink(audit_stream) as sink:
        seqs = []
        for _kind, item in calls:
            if isinstance(item, AuditEvent):
                seqs.append(await sink.record(item))
            else:
                seqs.append(await sink.record_document(item))
        assert seqs == list(range(1, 61))

        worker = _sequencer(audit_stream, seq_ledger, signer)
        async with _running(worker):
            await eventually(lambda: ledger_size(seq_ledger) == 60, what="60 entries")
            # One more event while running: a checkpoint covers it within about a second.
            extra = sample_event(60, patient="Patient/p-0")
            calls.append(("event", extra))
            await sink.record(extra)
            took = await eventually(
                lambda: _last_checkpoint_size(seq_ledger) == 61, what="a checkpoint of 61"
            )
            assert took < 1.5
            assert worker.progress.role == "active"
            assert worker.progress.last_applied_seq == 61
            assert worker.progress.ledger_size == 61
            assert worker.progress.lag == 0

    report = verify(seq_ledger, signer)
    assert report.entries == 61 and report.covered == 61

    # The embedded ledger fed the same calls holds the same leaves, byte for byte: the same
    # documents, chain and patient back-links.
    data_dir = DataDir.create(tmp_path / "data", dev=True, origin=ORIGIN)
    initialize_ledger(data_dir)
    async with open_ledger(data_dir) as embedded:
        for _kind, item in calls:
            if isinstance(item, AuditEvent):
                await embedded.record(item)
            else:
                await embedded.record_document(item)
        expected = [entry.leaf for entry in embedded.read_range(0, 61)]
    leaves = read_leaves(seq_ledger)
    assert leaves == expected
    assert any(b'"patient_prev"' in leaf for leaf in leaves)


def _last_checkpoint_size(pg: PgLedger) -> int:
    rows = pg.admin_sql("SELECT note FROM {s}.checkpoints ORDER BY seq DESC LIMIT 1")
    return unverified_checkpoint(str(rows[0][0])).size if rows else -1


async def test_a_standby_takes_over_when_the_active_one_stops(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    first = _sequencer(audit_stream, seq_ledger, signer)
    second = _sequencer(audit_stream, seq_ledger, signer, lock_retry_s=0.5)
    async with await _sink(audit_stream) as sink:
        stop_first = asyncio.Event()
        first_task = asyncio.create_task(first.run(stop_first))
        try:
            await eventually(lambda: first.progress.role == "active", what="an active one")
            async with _running(second):
                await eventually(lambda: second.progress.role == "standby", what="a standby")
                for i in range(50):
                    await sink.record(sample_event(i))
                await eventually(lambda: ledger_size(seq_ledger) == 50, what="50 entries")
                assert second.progress.role == "standby"

                stop_first.set()
                await asyncio.wait_for(first_task, 10)
                assert first.progress.role == "stopped"
                for i in range(50, 100):
                    await sink.record(sample_event(i))
                took = await eventually(
                    lambda: ledger_size(seq_ledger) == 100, what="the standby's appends"
                )
                assert took < 3
                assert second.progress.role == "active"
                assert second.progress.takeovers == 1
        finally:
            stop_first.set()
            await asyncio.wait_for(first_task, 10)

    assert _request_ids(seq_ledger) == [f"req-{i}" for i in range(100)]
    assert verify(seq_ledger, signer).entries == 100


async def test_sigkill_of_the_active_sequencer_under_load_loses_and_repeats_nothing(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner, tmp_path: Path
) -> None:
    key = tmp_path / "signing.key"
    signer.save(key)
    config = {
        "nats": NATS_URL,
        "stream": audit_stream.name,
        "subject": audit_stream.subject,
        "conninfo": seq_ledger.app,
        "schema": seq_ledger.schema,
        "signer_path": str(key),
        "origin": ORIGIN,
        # The cursor is written only when it starts: after the kill, the standby must match
        # the whole tail against the stream, including appends the kill interrupted.
        "cursor_interval_s": 3600,
        "batch_max": 16,
    }
    total = 400
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "sequencer_proc.py"), json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    standby = _sequencer(audit_stream, seq_ledger, signer)
    try:
        async with await _sink(audit_stream) as sink:

            async def publish() -> None:
                for i in range(total):
                    await sink.record(sample_event(i))
                    await asyncio.sleep(0.002)

            publisher = asyncio.create_task(publish())
            await eventually(lambda: ledger_size(seq_ledger) > 0, what="the process appending")
            async with _running(standby):
                await eventually(lambda: standby.progress.role == "standby", what="a standby")
                await eventually(lambda: ledger_size(seq_ledger) >= 100, what="100 entries")
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                killed_at = ledger_size(seq_ledger)
                assert killed_at < total, "the publisher finished before the kill"
                await asyncio.wait_for(publisher, 30)
                await eventually(
                    lambda: ledger_size(seq_ledger) == total, timeout_s=20, what="all entries"
                )
                assert standby.progress.role == "active"
                # Let anything that would be a duplicate arrive before counting.
                await asyncio.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert _request_ids(seq_ledger) == [f"req-{i}" for i in range(total)]
    assert verify(seq_ledger, signer).entries == total
    # The standby resumed by matching the tail the cursor did not cover.
    rows = seq_ledger.admin_sql("SELECT ledger_size FROM {s}.stream_cursor ORDER BY ledger_size")
    assert int(str(rows[0][0])) == 0
    assert any(int(str(r[0])) >= killed_at for r in rows)


async def test_a_message_that_is_not_an_event_stops_the_sequencer_and_is_not_dropped(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    async with await _sink(audit_stream) as sink:
        for i in range(3):
            await sink.record(sample_event(i))
    await audit_stream.js.publish(
        audit_stream.subject, b'{"kind":"rest"}', headers={ENCODING_HEADER: "event"}
    )
    async with await _sink(audit_stream) as sink:
        await sink.record(sample_event(4))

    for _attempt in range(2):  # a restart stops at the same message: nothing is skipped
        worker = _sequencer(audit_stream, seq_ledger, signer)
        with pytest.raises(InvalidStreamMessage) as raised:
            await asyncio.wait_for(worker.run(asyncio.Event()), 10)
        assert raised.value.seq == 4
        assert "invalid event fields" in str(raised.value)
        assert worker.progress.role == "stopped"
        assert ledger_size(seq_ledger) == 3
        assert _last_checkpoint_size(seq_ledger) == 3  # the final checkpoint on the way out
    assert verify(seq_ledger, signer).entries == 3


async def test_the_command_runs_until_sigterm(
    audit_stream: AuditStream, seq_ledger: PgLedger, tmp_path: Path
) -> None:
    data_dir = DataDir.create(tmp_path / "data", dev=True, origin=ORIGIN)
    initialize_ledger(data_dir)
    # The command reads the stream's default subject; workers add it to the stream as they
    # start (the command does too).
    await ensure_audit_stream(
        audit_stream.js,
        name=audit_stream.name,
        subject=audit_subject(audit_stream.name),
        replicas=1,
    )
    async with await JetStreamAuditSink.connect(
        [NATS_URL], name="test-publisher", stream=audit_stream.name
    ) as sink:
        assert sink.subject == audit_subject(audit_stream.name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
        metrics_port = _free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "phivault.cli.main",
                "sequencer",
                "--nats",
                NATS_URL,
                "--stream",
                audit_stream.name,
                "--ledger-postgres",
                seq_ledger.app,
                "--ledger-schema",
                seq_ledger.schema,
                "--data-dir",
                str(data_dir.path),
                "--metrics-port",
                str(metrics_port),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        try:
            for i in range(20):
                await sink.record(sample_event(i))
            await eventually(lambda: ledger_size(seq_ledger) == 20, what="20 entries")
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
            assert b"phivault_sequencer_ledger_size 20.0" in metrics
            assert b"phivault_sequencer_active 1.0" in metrics
            assert b"phivault_sequencer_lag 0.0" in metrics
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.to_thread(proc.communicate, timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["ok"] is True
    assert summary["ledger_size"] == 20 and summary["last_applied_seq"] == 20
    assert summary["role"] == "stopped"
    log = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert any(entry.get("role") == "active" for entry in log)
    assert checkpoint_count(seq_ledger) >= 1
    assert _last_checkpoint_size(seq_ledger) == 20
    verifier = Ed25519NoteSigner.load(signer_path(data_dir))
    assert verify(seq_ledger, verifier).entries == 20


def test_the_command_explains_missing_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "phivault.cli.main", "sequencer", "--data-dir", str(tmp_path)],
        capture_output=True,
        check=False,
        env=env,
        cwd=REPO,
        timeout=30,
    )
    assert result.returncode == 1
    assert "no ledger database" in result.stderr.decode()
    assert time.monotonic() - started < 30


async def test_a_message_gone_from_the_stream_stops_the_sequencer(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    # Our streams deny deletes; this one, made by hand, does not.
    name = audit_stream.name + "_LOOSE"
    subject = audit_stream.subject + ".loose"
    await audit_stream.js.add_stream(
        api.StreamConfig(name=name, subjects=[subject], storage=api.StorageType.FILE)
    )
    try:
        async with await JetStreamAuditSink.connect(
            [NATS_URL], name="test-publisher", stream=name, subject=subject
        ) as sink:
            for i in range(4):
                await sink.record(sample_event(i))
        await audit_stream.js.delete_msg(name, 3)
        loose = AuditStream(name, subject, audit_stream.js)
        worker = _sequencer(loose, seq_ledger, signer)
        with pytest.raises(StreamGap, match=r"messages 3\.\.3 are gone"):
            await asyncio.wait_for(worker.run(asyncio.Event()), 10)
        assert _request_ids(seq_ledger) == ["req-0", "req-1"]
    finally:
        await audit_stream.js.delete_stream(name)


async def test_a_ledger_that_disagrees_with_the_stream_is_refused(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    # Entries that did not come from this stream: written by a ledger opened directly.
    async with open_ledger_on(
        lambda: PostgresLedgerStore(seq_ledger.app, schema=seq_ledger.schema, writable=True),
        signer,
        ORIGIN,
    ) as direct:
        await direct.record(sample_event(100))
    worker = _sequencer(audit_stream, seq_ledger, signer)
    async with await _sink(audit_stream) as sink:
        # An empty stream cannot account for the entry...
        with pytest.raises(LedgerStreamMismatch, match="the stream does not have"):
            await asyncio.wait_for(worker.run(asyncio.Event()), 10)
        # ...and a different first message does not match it.
        await sink.record(sample_event(0))
        with pytest.raises(LedgerStreamMismatch, match="ledger entry 0 is not stream message 1"):
            await asyncio.wait_for(worker.run(asyncio.Event()), 10)
    assert ledger_size(seq_ledger) == 1


async def test_the_sequencer_recovers_when_its_consumer_disappears(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    worker = _sequencer(audit_stream, seq_ledger, signer)
    async with await _sink(audit_stream) as sink, _running(worker):
        for i in range(10):
            await sink.record(sample_event(i))
        await eventually(lambda: ledger_size(seq_ledger) == 10, what="10 entries")
        # As when the server holding the ephemeral consumer goes away.
        for info in await audit_stream.js.consumers_info(audit_stream.name):
            await audit_stream.js.delete_consumer(audit_stream.name, info.name)
        for i in range(10, 20):
            await sink.record(sample_event(i))
        await eventually(lambda: ledger_size(seq_ledger) == 20, timeout_s=8, what="20 entries")
    assert _request_ids(seq_ledger) == [f"req-{i}" for i in range(20)]


async def test_the_sequencer_rides_out_a_nats_restart(
    private_nats: PrivateNats, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    name = "PV_PRIVATE"
    setup = await connect_nats([private_nats.url], name="test-setup")
    await ensure_audit_stream(setup.jetstream(), name=name, subject=audit_subject(name), replicas=1)
    await setup.close()
    worker = Sequencer(
        nats_urls=[private_nats.url],
        stream=name,
        ledger_conninfo=seq_ledger.app,
        ledger_schema=seq_ledger.schema,
        signer=signer,
        origin=ORIGIN,
        lock_retry_s=0.1,
    )
    async with (
        await JetStreamAuditSink.connect(
            [private_nats.url], name="test-publisher", stream=name, publish_timeout_s=1.0
        ) as sink,
        _running(worker),
    ):
        for i in range(10):
            await sink.record(sample_event(i))
        await eventually(lambda: ledger_size(seq_ledger) == 10, what="10 entries")
        private_nats.stop()
        await asyncio.sleep(1.0)
        private_nats.start()
        for i in range(10, 20):
            while True:
                try:
                    await sink.record(sample_event(i), msg_id=f"evt-{i}")
                    break
                except LedgerUnavailable:
                    await asyncio.sleep(0.1)
        await eventually(lambda: ledger_size(seq_ledger) == 20, timeout_s=10, what="20 entries")
        assert worker.progress.role == "active"
    assert _request_ids(seq_ledger) == [f"req-{i}" for i in range(20)]
    assert verify(seq_ledger, signer).entries == 20


async def test_a_recreated_stream_is_refused_rather_than_its_first_messages_skipped(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    async with await _sink(audit_stream) as sink:
        for i in range(5):
            await sink.record(sample_event(i))
    worker = _sequencer(audit_stream, seq_ledger, signer)
    async with _running(worker):
        await eventually(lambda: ledger_size(seq_ledger) == 5, what="5 entries")

    await audit_stream.js.delete_stream(audit_stream.name)
    await ensure_audit_stream(
        audit_stream.js, name=audit_stream.name, subject=audit_stream.subject, replicas=1
    )
    async with await _sink(audit_stream) as sink:
        for i in range(100, 103):
            await sink.record(sample_event(i))
        with pytest.raises(LedgerStreamMismatch, match="ends at message 3"):
            await asyncio.wait_for(
                _sequencer(audit_stream, seq_ledger, signer).run(asyncio.Event()), 10
            )
        for i in range(103, 107):
            await sink.record(sample_event(i))
        with pytest.raises(LedgerStreamMismatch, match="is not stream message 5"):
            await asyncio.wait_for(
                _sequencer(audit_stream, seq_ledger, signer).run(asyncio.Event()), 10
            )
    assert ledger_size(seq_ledger) == 5


async def test_a_schema_without_the_cursor_table_is_explained(
    audit_stream: AuditStream, pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    worker = _sequencer(audit_stream, pg, signer)
    with pytest.raises(ConfigurationError, match="cursor table is missing"):
        await asyncio.wait_for(worker.run(asyncio.Event()), 10)
    # Set up as the owner, the same ledger then runs.
    create_cursor_table(pg.admin, schema=pg.schema, app_role=pg.role)
    async with await _sink(audit_stream) as sink, _running(worker):
        await sink.record(sample_event(0))
        await eventually(lambda: ledger_size(pg) == 1, what="1 entry")


async def test_repeated_takeovers_under_load_keep_every_event_once_and_in_order(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    total = 300
    rng = random.Random(7)
    async with await _sink(audit_stream) as sink:

        async def publish() -> None:
            for i in range(total):
                await sink.record(sample_event(i))
                if i % 10 == 0:
                    await asyncio.sleep(0.01)

        publisher = asyncio.create_task(publish())
        takeovers = 0
        while not publisher.done() or ledger_size(seq_ledger) < total:
            # Three sequencers start together; the active one is stopped after a while.
            workers = [
                _sequencer(
                    audit_stream,
                    seq_ledger,
                    signer,
                    cursor_interval_s=rng.choice((0.0, 0.05, 3600.0)),
                    batch_max=rng.choice((1, 7, 50)),
                )
                for _ in range(3)
            ]
            stops = [asyncio.Event() for _ in workers]
            tasks = [asyncio.create_task(w.run(s)) for w, s in zip(workers, stops, strict=True)]
            await eventually(partial(_any_active, workers), what="an active one")
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            actives = [i for i, w in enumerate(workers) if w.progress.role == "active"]
            assert len(actives) == 1
            takeovers += 1
            for stop in stops:
                stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            if takeovers > 60:
                pytest.fail("the ledger did not catch up")
        await publisher
    assert takeovers >= 3
    assert _request_ids(seq_ledger) == [f"req-{i}" for i in range(total)]
    assert verify(seq_ledger, signer).entries == total


async def test_the_sequencer_rides_out_losing_its_database_sessions(
    audit_stream: AuditStream, seq_ledger: PgLedger, signer: Ed25519NoteSigner
) -> None:
    worker = _sequencer(audit_stream, seq_ledger, signer)
    async with await _sink(audit_stream) as sink, _running(worker):
        for i in range(20):
            await sink.record(sample_event(i))
        await eventually(lambda: ledger_size(seq_ledger) == 20, what="20 entries")
        # As when PostgreSQL restarts: every session of the sequencer's role is cut.
        seq_ledger.admin_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE usename = '{seq_ledger.role}'"
        )
        for i in range(20, 40):
            await sink.record(sample_event(i))
        await eventually(lambda: ledger_size(seq_ledger) == 40, what="40 entries")
        await eventually(lambda: worker.progress.takeovers == 2, what="a second takeover")
    assert _request_ids(seq_ledger) == [f"req-{i}" for i in range(40)]
    assert verify(seq_ledger, signer).entries == 40
