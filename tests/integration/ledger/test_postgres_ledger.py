"""The Ledger service over the LedgerStore port: the same scenarios on the file store and on
the PostgreSQL store, then tampering by a superuser who bypasses the database's triggers.

The ledger is built as ``Ledger(store, signer, origin, settings)`` directly: ``open_ledger``
opens the embedded file store of a data directory only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psycopg
import pytest
from psycopg import sql
from test_postgres_support import PgLedger, pg_fixture  # noqa: F401

from phivault.crypto.signing import Ed25519NoteSigner
from phivault.datadir import DataDir
from phivault.ledger import report as report_module
from phivault.ledger.bundle import read_bundle, verify_bundle, write_bundle
from phivault.ledger.checkpoint import open_checkpoint
from phivault.ledger.errors import LedgerError, LedgerTampered, LedgerUnavailable, TamperKind
from phivault.ledger.file_store import FileLedgerStore
from phivault.ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from phivault.ledger.note import NoteVerifier
from phivault.ledger.ports import LedgerStore
from phivault.ledger.report import BackLinkReader, patient_report
from phivault.ledger.service import Ledger, initialize_ledger, open_ledger_on, signer_path
from phivault.ledger.testing import sample_event
from phivault.ledger.verify import Damaged, VerificationReport, verify_ledger
from phivault.settings import LedgerSettings

pytestmark = pytest.mark.integration

ORIGIN = "phivault.test/ledger"


class VerifiableStore(LedgerStore, Protocol):
    """Both stores also hand every stored leaf, damaged or not, to the verifier."""

    def raw_frames(self) -> Iterator[tuple[int, bytes | None, str | None]]: ...


@dataclass
class Backend:
    """One ledger: how to open its store for writing and for reading, and its signer."""

    name: str
    signer: Ed25519NoteSigner
    open_writer: Callable[[], VerifiableStore]
    open_reader: Callable[[], VerifiableStore]
    rewrite: Callable[[int, bytes, bytes], None]  # a consistent rewrite of one leaf

    @property
    def verifier(self) -> NoteVerifier:
        return NoteVerifier.from_verifier_key(self.signer.verifier_key)

    @contextlib.contextmanager
    def reader(self) -> Iterator[VerifiableStore]:
        store = self.open_reader()
        try:
            yield store
        finally:
            store.close()


def _file_backend(tmp_path: Path) -> Backend:
    directory = DataDir.create(tmp_path / "data", dev=True, origin=ORIGIN)
    initialize_ledger(directory)

    def rewrite(index: int, old: bytes, new: bytes) -> None:
        # Rewrite the frame and its checksum so that the file itself looks intact.
        path = directory.ledger_dir / "entries.log"
        data = path.read_bytes()
        out, pos, position = bytearray(data[:8]), 8, 0
        while pos < len(data):
            length, _crc = struct.unpack_from("<II", data, pos)
            leaf = data[pos + 8 : pos + 8 + length]
            if position == index:
                leaf = leaf.replace(old, new)
            out += struct.pack("<II", len(leaf), zlib.crc32(leaf)) + leaf
            pos += 8 + length
            position += 1
        path.write_bytes(bytes(out))
        for cache in ("entries.idx", "leaves.hash"):
            (directory.ledger_dir / cache).unlink()

    return Backend(
        "file",
        Ed25519NoteSigner.load(signer_path(directory)),
        lambda: FileLedgerStore(directory.ledger_dir, writable=True),
        lambda: FileLedgerStore(directory.ledger_dir, writable=False),
        rewrite,
    )


def _postgres_backend(pg: PgLedger) -> Backend:
    def rewrite(index: int, old: bytes, new: bytes) -> None:
        superuser_rewrite(pg, index, old, new)

    return Backend(
        "postgres",
        Ed25519NoteSigner.generate(ORIGIN),
        pg.store,
        lambda: pg.store(writable=False),
        rewrite,
    )


def superuser_rewrite(
    pg: PgLedger, index: int, old: bytes, new: bytes, *, hash_too: bool = True
) -> None:
    """A superuser disables the append-only trigger and rewrites one leaf in place."""
    schema = sql.Identifier(pg.schema)
    with psycopg.connect(pg.admin, autocommit=True) as conn, conn.transaction():
        conn.execute(
            sql.SQL("ALTER TABLE {}.leaves DISABLE TRIGGER leaves_append_only").format(schema)
        )
        if not hash_too:
            conn.execute(
                sql.SQL("ALTER TABLE {}.leaves DROP CONSTRAINT leaf_hash_is_rfc9162").format(schema)
            )
        row = conn.execute(
            sql.SQL("SELECT leaf FROM {}.leaves WHERE idx = %s").format(schema), (index,)
        ).fetchone()
        assert row is not None
        leaf = bytes(row[0])
        changed = leaf.replace(old, new)
        assert changed != leaf
        assignment = "leaf = %s, leaf_hash = %s" if hash_too else "leaf = %s"
        params = (changed, leaf_hash(changed), index) if hash_too else (changed, index)
        conn.execute(
            sql.SQL("UPDATE {}.leaves SET " + assignment + " WHERE idx = %s").format(schema),
            params,
        )
        conn.execute(
            sql.SQL("ALTER TABLE {}.leaves ENABLE ALWAYS TRIGGER leaves_append_only").format(schema)
        )


def superuser_delete(pg: PgLedger, where: str) -> None:
    pg.admin_sql(
        "ALTER TABLE {s}.leaves DISABLE TRIGGER leaves_append_only",
        f"DELETE FROM {{s}}.leaves WHERE {where}",
        "ALTER TABLE {s}.leaves ENABLE ALWAYS TRIGGER leaves_append_only",
    )


@pytest.fixture(params=["file", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return _file_backend(tmp_path)
    return _postgres_backend(request.getfixturevalue("pg"))


def running(
    backend: Backend, settings: LedgerSettings | None = None
) -> contextlib.AbstractAsyncContextManager[Ledger]:
    """The ledger over either store, opened the way the service opens it."""
    return open_ledger_on(backend.open_writer, backend.signer, ORIGIN, settings)


def leaves_for_verification(store: VerifiableStore) -> Callable[[], Iterable[bytes | Damaged]]:
    def read() -> Iterator[bytes | Damaged]:
        for _index, leaf, reason in store.raw_frames():
            yield leaf if leaf is not None else Damaged(reason or "damaged")

    return read


def verify(backend: Backend) -> VerificationReport:
    with backend.reader() as store:
        return verify_ledger(
            leaves_for_verification(store),
            store.checkpoints(),
            backend.verifier,
            origin=ORIGIN,
        )


# -- the Ledger service scenarios, on both stores ---------------------------------------------


async def test_concurrent_records_get_unique_consecutive_indexes(backend: Backend) -> None:
    async with running(backend) as ledger:
        indexes = await asyncio.gather(*(ledger.record(sample_event(i)) for i in range(300)))
        assert sorted(indexes) == list(range(300))
        assert ledger.size == 300
        for index in (0, 150, 299):
            doc = ledger.read(index).document
            assert doc["seq"] == index
            assert doc["request_id"] == f"req-{indexes.index(index)}"
    with backend.reader() as store:
        assert store.size() == 300


async def test_each_entry_chains_to_the_previous_leaf(backend: Backend) -> None:
    async with running(backend) as ledger:
        for i in range(5):
            await ledger.record(sample_event(i))
        previous = bytes(32)
        for index in range(5):
            entry = ledger.read(index)
            assert base64.b64decode(entry.document["chain"]) == previous
            previous = leaf_hash(entry.leaf)


async def test_back_links_chain_each_patients_events_across_restarts(backend: Backend) -> None:
    async with running(backend) as ledger:
        patients = ["Patient/a", "Patient/b", None, "Patient/a", "Patient/b", "Patient/a"]
        for i, patient in enumerate(patients):
            await ledger.record(sample_event(i, patient=patient))
        assert [e.index for e in ledger.patient_chain("Patient/a")] == [5, 3, 0]
        assert [e.index for e in ledger.patient_chain("Patient/b")] == [4, 1]
        assert ledger.read(0).patient_prev is None
        assert "patient_prev" not in ledger.read(2).document
    async with running(backend) as ledger:  # the heads are rebuilt from the store
        await ledger.record(sample_event(6, patient="Patient/a"))
        assert ledger.read(6).patient_prev == 5
        assert ledger.read(6).document["chain"] == base64.b64encode(ledger.leaf_hash(5)).decode()


async def test_a_checkpoint_is_issued_within_the_interval(backend: Backend) -> None:
    interval = 0.5
    async with running(backend, LedgerSettings(checkpoint_interval_s=interval)) as ledger:
        started = time.monotonic()
        index = await ledger.record(sample_event(0))
        while ledger.latest_checkpoint is None and time.monotonic() - started < 5:
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
        checkpoint = ledger.latest_checkpoint
        assert checkpoint is not None and checkpoint.size == 1
        # Due at 0.9 of the interval; the slack only absorbs a busy test machine's scheduling.
        assert elapsed < interval + 0.1, f"the checkpoint took {elapsed:.3f} s"
        note = ledger.checkpoint_notes()[-1]
        assert open_checkpoint(note, backend.verifier, origin=ORIGIN) == checkpoint
        proof = ledger.inclusion_proof(index, checkpoint.size)
        verify_inclusion(ledger.leaf_hash(index), index, 1, proof, checkpoint.root_hash)


async def test_checkpoints_are_consistent_and_close_signs_the_last(backend: Backend) -> None:
    async with running(backend, LedgerSettings(checkpoint_interval_s=60)) as ledger:
        for i in range(7):
            await ledger.record(sample_event(i))
        first = await ledger.checkpoint()
        assert await ledger.checkpoint() == first  # nothing new: the same note
        for i in range(7, 20):
            await ledger.record(sample_event(i))
        await ledger.checkpoint()
        assert len(ledger.checkpoint_notes()) == 2
        verify_consistency(7, 20, ledger.consistency_proof(7, 20), ledger.root(7), ledger.root(20))
        await ledger.record(sample_event(20))
    async with running(backend) as ledger:
        assert ledger.latest_checkpoint is not None
        assert ledger.latest_checkpoint.size == 21
        assert len(ledger.checkpoint_notes()) == 3


async def test_reopening_refuses_entries_that_differ_from_the_last_checkpoint(
    backend: Backend,
) -> None:
    async with running(backend) as ledger:
        for i in range(3):
            await ledger.record(sample_event(i))
    backend.rewrite(1, b'"req-1"', b'"req-9"')
    with pytest.raises(LedgerTampered) as caught:
        async with running(backend):
            pass
    assert caught.value.kind is TamperKind.FORKED


async def test_verify_and_an_exported_bundle_verify_offline(
    backend: Backend, tmp_path: Path
) -> None:
    async with running(backend, LedgerSettings(checkpoint_interval_s=60)) as ledger:
        for i in range(25):
            await ledger.record(sample_event(i, patient=f"Patient/p-{i % 3}"))
            if i + 1 in (10, 20):
                await ledger.checkpoint()
    report = verify(backend)
    assert (report.entries, report.checkpoints, report.uncovered) == (25, 3, 0)
    out = io.StringIO()
    with backend.reader() as store:
        size = write_bundle(
            out,
            store,
            origin=ORIGIN,
            verifier_key=backend.signer.verifier_key,
        )
    assert size == 25
    path = tmp_path / "bundle.json"
    path.write_text(out.getvalue())
    bundle = read_bundle(path)
    assert verify_bundle(bundle, backend.signer.verifier_key).entries == 25
    # The bundle carries the exact leaves, in ledger order, whichever store they came from.
    leaves = [leaf for leaf in bundle.entries if isinstance(leaf, bytes)]
    assert [json.loads(leaf)["seq"] for leaf in leaves] == list(range(25))


async def test_a_patient_report_follows_back_links_with_a_proof(backend: Backend) -> None:
    async with running(backend, LedgerSettings(checkpoint_interval_s=60)) as ledger:
        for i, patient in enumerate(["Patient/a", "Patient/b", "Patient/a", None, "Patient/a"]):
            await ledger.record(sample_event(i, patient=patient))
    with backend.reader() as store:
        report = patient_report(store, "Patient/a")
        assert report.chain == [4, 2, 0]
        assert [event.index for event in report.events] == [4, 2, 0]
        assert report.checkpoint_note is not None and report.proof is not None
        checkpoint = open_checkpoint(report.checkpoint_note, backend.verifier, origin=ORIGIN)
        newest = report.events[0].leaf
        verify_inclusion(leaf_hash(newest), 4, checkpoint.size, report.proof, checkpoint.root_hash)


async def test_ledger_fields_cannot_be_forged_and_a_closed_ledger_fails_closed(
    backend: Backend,
) -> None:
    async with running(backend) as ledger:
        with pytest.raises(LedgerError, match="ledger field 'seq'"):
            await ledger.record_document(sample_event(0).to_document() | {"seq": 99})
        assert ledger.size == 0
    with pytest.raises(LedgerUnavailable):
        await ledger.record(sample_event(0))


# -- a superuser bypassing the triggers is still caught ---------------------------------------


@pytest.fixture
def pg_backend(pg: PgLedger) -> Backend:
    return _postgres_backend(pg)


async def _filled(backend: Backend, size: int = 12, checkpoints: tuple[int, ...] = (6, 12)) -> None:
    async with running(backend, LedgerSettings(checkpoint_interval_s=60)) as ledger:
        for i in range(size):
            await ledger.record(sample_event(i, patient=f"Patient/p-{i % 2}"))
            if i + 1 in checkpoints:
                await ledger.checkpoint()


async def test_a_leaf_rewritten_by_a_superuser_is_detected(
    pg: PgLedger, pg_backend: Backend, tmp_path: Path
) -> None:
    await _filled(pg_backend)
    out = io.StringIO()
    with pg_backend.reader() as store:
        write_bundle(out, store, origin=ORIGIN, verifier_key=pg_backend.signer.verifier_key)
    # Triggers disabled, leaf and stored hash rewritten together: the row itself looks fine.
    superuser_rewrite(pg, 4, b'"req-4"', b'"req-X"')
    with pytest.raises(LedgerTampered) as caught:
        verify(pg_backend)
    assert caught.value.kind is TamperKind.MODIFIED
    assert caught.value.index in (3, 4)  # entry 5 no longer chains to it
    # The ledger refuses to extend it: the entries no longer match the signed root.
    with pytest.raises(LedgerTampered) as refused:
        async with running(pg_backend):
            pass
    assert refused.value.kind is TamperKind.FORKED
    # An export taken afterwards fails offline; the one taken before still verifies.
    later = io.StringIO()
    with pg_backend.reader() as store:
        write_bundle(later, store, origin=ORIGIN, verifier_key=pg_backend.signer.verifier_key)
    for name, text in (("before", out), ("after", later)):
        (tmp_path / name).write_text(text.getvalue())
    assert verify_bundle(read_bundle(tmp_path / "before"), pg_backend.signer.verifier_key)
    with pytest.raises(LedgerTampered):
        verify_bundle(read_bundle(tmp_path / "after"), pg_backend.signer.verifier_key)


async def test_the_newest_leaf_rewritten_is_a_fork_of_the_signed_root(
    pg: PgLedger, pg_backend: Backend
) -> None:
    await _filled(pg_backend)
    superuser_rewrite(pg, 11, b'"req-11"', b'"req-XX"')
    with pytest.raises(LedgerTampered) as caught:
        verify(pg_backend)
    assert caught.value.kind is TamperKind.FORKED  # nothing chains to the newest entry


async def test_a_leaf_changed_without_its_hash_is_named_modified(
    pg: PgLedger, pg_backend: Backend
) -> None:
    await _filled(pg_backend)
    superuser_rewrite(pg, 7, b'"req-7"', b'"req-Y"', hash_too=False)
    with pytest.raises(LedgerTampered) as caught:
        verify(pg_backend)
    assert (caught.value.kind, caught.value.index) == (TamperKind.MODIFIED, 7)
    assert "stored leaf hash does not match" in caught.value.detail


async def test_a_row_deleted_by_a_superuser_is_named_missing(
    pg: PgLedger, pg_backend: Backend
) -> None:
    await _filled(pg_backend)
    superuser_delete(pg, "idx = 5")
    with pytest.raises(LedgerTampered) as caught:
        verify(pg_backend)
    assert (caught.value.kind, caught.value.index) == (TamperKind.MISSING, 5)


async def test_rows_cut_from_the_end_are_named_truncated(pg: PgLedger, pg_backend: Backend) -> None:
    await _filled(pg_backend)
    superuser_delete(pg, "idx >= 9")
    with pytest.raises(LedgerTampered) as caught:
        verify(pg_backend)
    assert (caught.value.kind, caught.value.index) == (TamperKind.TRUNCATED, 9)
    with pytest.raises(LedgerTampered) as refused:
        async with running(pg_backend):
            pass
    assert refused.value.kind is TamperKind.TRUNCATED


async def test_a_ledger_that_loses_its_session_fails_closed_and_a_standby_continues(
    pg: PgLedger, pg_backend: Backend
) -> None:
    # Issue 7's sequencer failover, in one process: the active writer's session is killed; it
    # refuses every record from then on, and a standby takes the lock and continues the same
    # history with no gap and no duplicate.
    with pytest.raises(LedgerUnavailable):
        async with running(pg_backend, LedgerSettings(checkpoint_interval_s=60)) as active:
            for i in range(5):
                await active.record(sample_event(i))
            pg.admin_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE usename = '{pg.role}' AND application_name = 'phivault-ledger-writer'"
            )
            with pytest.raises(LedgerUnavailable):
                await active.record(sample_event(5))
            with pytest.raises(LedgerUnavailable):
                await active.record(sample_event(6))
            # Leaving the block: close cannot sign its final checkpoint, and says so.
    async with running(pg_backend) as standby:
        assert standby.size == 5
        assert await standby.record(sample_event(5)) == 5
    report = verify(pg_backend)
    assert (report.entries, report.uncovered) == (6, 0)
    with pg_backend.reader() as store:
        assert [json.loads(leaf)["request_id"] for leaf in store.read(0, 6)] == [
            f"req-{i}" for i in range(6)
        ]


# -- a patient's back-link chain, read in batches where the store follows links itself ------


async def test_a_long_chain_is_walked_in_batches_across_their_boundaries(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_module, "_BACK_LINK_BATCH", 3)  # boundaries at every third link
    patients = ["Patient/a" if i % 3 else "Patient/b" for i in range(20)]
    async with running(backend, LedgerSettings(checkpoint_interval_s=60)) as ledger:
        for i, patient in enumerate(patients):
            await ledger.record(sample_event(i, patient=patient))
    with backend.reader() as store:
        assert isinstance(store, BackLinkReader) == (backend.name == "postgres")
        for patient in ("Patient/a", "Patient/b"):
            expected = [i for i in reversed(range(20)) if patients[i] == patient]
            assert patient_report(store, patient).chain == expected


async def test_a_back_link_rewritten_to_another_patient_is_caught(
    pg: PgLedger, pg_backend: Backend
) -> None:
    async with running(pg_backend, LedgerSettings(checkpoint_interval_s=60)) as ledger:
        for i, patient in enumerate(["Patient/a", "Patient/b", "Patient/a", None, "Patient/a"]):
            await ledger.record(sample_event(i, patient=patient))
    superuser_rewrite(pg, 4, b'"patient_prev":2', b'"patient_prev":1')  # 1 is Patient/b's
    with pg_backend.reader() as store, pytest.raises(LedgerTampered) as caught:
        patient_report(store, "Patient/a")
    assert (caught.value.kind, caught.value.index) == (TamperKind.MODIFIED, 1)


async def test_a_back_link_rewritten_to_point_forward_ends_the_walk_with_an_error(
    pg: PgLedger, pg_backend: Backend
) -> None:
    async with running(pg_backend, LedgerSettings(checkpoint_interval_s=60)) as ledger:
        for i, patient in enumerate(["Patient/a", "Patient/b", "Patient/a", None, "Patient/a"]):
            await ledger.record(sample_event(i, patient=patient))
    # Entry 2 now links up to 4, which links down to 2: a loop the database must not follow.
    superuser_rewrite(pg, 2, b'"patient_prev":0', b'"patient_prev":4')
    with pg_backend.reader() as store, pytest.raises(LedgerTampered) as caught:
        patient_report(store, "Patient/a")
    assert (caught.value.kind, caught.value.index) == (TamperKind.MODIFIED, 2)
    assert "does not point back" in caught.value.detail
