"""LedgerView: the ledger as API workers read it in the scaled shape, over real PostgreSQL.

The writer is a real :class:`Ledger` over a writable PostgreSQL store (as the sequencer runs
it), in the same test or in a subprocess; the view reads through a read-only store of the same
schema (see test_postgres_support for the per-test schema and application role).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_ledger_view_support
from test_ledger_view_support import ORIGIN, CountingStore, superuser_change, writer
from test_postgres_support import PgLedger, pg_fixture  # noqa: F401

from phivault.crypto.signing import Ed25519NoteSigner
from phivault.datadir import DataDir
from phivault.ledger.checkpoint import Checkpoint, sign_checkpoint, unverified_checkpoint
from phivault.ledger.errors import LedgerTampered, LedgerUnavailable, TamperKind
from phivault.ledger.merkle import leaf_hash, verify_inclusion
from phivault.ledger.note import NoteVerifier
from phivault.ledger.ports import LedgerReader, StoreGrowth
from phivault.ledger.postgres_store import LedgerRowDamaged, PostgresLedgerStore
from phivault.ledger.service import Ledger, initialize_ledger, open_ledger
from phivault.ledger.testing import sample_event
from phivault.ledger.view import LedgerView, open_ledger_view
from phivault.settings import LedgerSettings

pytestmark = pytest.mark.integration

QUIET = LedgerSettings(checkpoint_interval_s=60)  # checkpoints only when a test asks


@pytest.fixture
def signer() -> Ed25519NoteSigner:
    return Ed25519NoteSigner.generate(ORIGIN)


def _view(pg: PgLedger, **options: Any) -> contextlib.AbstractAsyncContextManager[LedgerView]:
    return open_ledger_view(lambda: pg.store(writable=False), **options)


async def _record(ledger: Ledger, numbers: range, patients: int = 3) -> None:
    for i in numbers:
        await ledger.record(sample_event(i, patient=f"Patient/p-{i % patients}"))


def _same_reads(view: LedgerReader, ledger: Ledger, patients: int = 3) -> None:
    """Everything the AuditEvent reader and reconciliation read is identical."""
    assert view.size == ledger.size
    assert view.read_range(0, view.size) == ledger.read_range(0, ledger.size)
    assert view.read(view.size - 1) == ledger.read(ledger.size - 1)
    for p in range(patients):
        reference = f"Patient/p-{p}"
        assert list(view.patient_chain(reference)) == list(ledger.patient_chain(reference))
    for index in range(view.size):
        for size in (index + 1, view.size):
            assert view.inclusion_proof(index, size) == ledger.inclusion_proof(index, size)


async def test_a_view_sees_what_a_separate_writer_appends(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    async with writer(pg, signer, QUIET) as ledger, _view(pg) as view:
        assert view.size == 0 and view.checkpoint_notes() == []
        await _record(ledger, range(10))
        assert view.size == 0  # nothing until it refreshes
        await view.refresh()
        _same_reads(view, ledger)
        await ledger.checkpoint()
        await _record(ledger, range(10, 17))
        await view.refresh()
        _same_reads(view, ledger)
        assert isinstance(view, LedgerView)
        assert view.root() == ledger.root()
        assert view.patient_head("Patient/p-1") == ledger.patient_head("Patient/p-1") == 16
        assert view.checkpoint_notes() == ledger.checkpoint_notes()
        assert view.latest_checkpoint == ledger.latest_checkpoint
        assert view.consistency_proof(10, 17) == ledger.consistency_proof(10, 17)
        # Back-links written before the view opened and after it continue one chain.
        chain = [event.index for event in view.patient_chain("Patient/p-2")]
        assert chain == [14, 11, 8, 5, 2]


async def test_a_view_opened_on_an_existing_ledger_matches_it(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    async with writer(pg, signer, QUIET) as ledger:
        await _record(ledger, range(40), patients=4)
        await ledger.checkpoint()
        async with _view(pg, verifier=NoteVerifier.from_verifier_key(signer.verifier_key)) as v:
            _same_reads(v, ledger, patients=4)
            assert v.latest_checkpoint is not None and v.latest_checkpoint.size == 40


async def test_refresh_reads_only_the_rows_committed_since_the_last(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    counting = CountingStore(pg.store(writable=False))
    async with writer(pg, signer, QUIET) as ledger, open_ledger_view(lambda: counting) as view:
        await _record(ledger, range(5))
        await view.refresh()
        await _record(ledger, range(5, 8))
        await ledger.checkpoint()
        await view.refresh()
        await view.refresh()  # nothing new
        assert counting.growths == [(0, 5, 0), (5, 3, 1), (8, 0, 0)]
        assert view.size == 8 and len(view.checkpoint_notes()) == 1


async def test_concurrent_refreshes_share_one_read_of_the_rows(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    counting = CountingStore(pg.store(writable=False))
    async with writer(pg, signer, QUIET) as ledger, open_ledger_view(lambda: counting) as view:
        await _record(ledger, range(6))
        await asyncio.gather(*(view.refresh() for _ in range(20)))
        assert view.size == 6
        # The first caller refreshes; everyone who called while it ran needs one more (its
        # snapshot may predate their call), and that one covers all of them.
        assert len(counting.growths) <= 2
        assert sum(grown for _first, grown, _notes in counting.growths) == 6


async def test_reads_from_many_threads_at_once(pg: PgLedger, signer: Ed25519NoteSigner) -> None:
    async with writer(pg, signer, QUIET) as ledger, _view(pg) as view:
        await _record(ledger, range(60))
        await view.refresh()
        expected = ledger.read_range(0, 60)
        failures: list[BaseException] = []

        def reader(offset: int) -> None:
            try:
                for i in range(20):
                    start = (offset * 7 + i) % 50
                    assert view.read_range(start, start + 10) == expected[start : start + 10]
                    assert list(view.patient_chain(f"Patient/p-{i % 3}"))
            except BaseException as exc:  # collected and re-raised in the test thread
                failures.append(exc)

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures


async def test_a_view_keeps_up_with_a_writer_appending_while_it_reads(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    # The writer appends and checkpoints (every 50 ms) while the view refreshes and proves:
    # every checkpoint the view holds covers only entries it has, and its proofs verify.
    fast = LedgerSettings(checkpoint_interval_s=0.05)
    async with writer(pg, signer, fast) as ledger, _view(pg) as view:

        async def append() -> None:
            for start in range(0, 120, 6):
                await asyncio.gather(
                    *(ledger.record(sample_event(i, patient=f"Patient/p-{i % 5}"))
                      for i in range(start, start + 6))
                )  # fmt: skip
                await asyncio.sleep(0.005)

        appending = asyncio.create_task(append())
        sizes = []
        while not appending.done() or view.size < ledger.size:
            await view.refresh()
            sizes.append(view.size)
            latest = view.latest_checkpoint
            if latest is not None and latest.size:
                assert latest.size <= view.size
                index = latest.size - 1
                proof = view.inclusion_proof(index, latest.size)
                leaf = await asyncio.to_thread(view.read, index)
                verify_inclusion(leaf_hash(leaf.leaf), index, latest.size, proof, latest.root_hash)
            await asyncio.sleep(0.002)
        await appending
        assert sizes == sorted(sizes) and len(set(sizes)) > 3  # it grew in steps
        await ledger.checkpoint()
        await view.refresh()
        _same_reads(view, ledger, patients=5)


async def test_a_view_can_refresh_itself_in_the_background(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    async with writer(pg, signer, QUIET) as ledger, _view(pg, refresh_every_s=0.05) as view:
        await _record(ledger, range(4))
        deadline = time.monotonic() + 3
        while view.size < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert view.size == 4 and view.refresh_failure is None


async def test_checkpoint_waits_for_the_writers_checkpoint(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    async with (
        writer(pg, signer, LedgerSettings(checkpoint_interval_s=0.5)) as ledger,
        _view(pg, checkpoint_wait_s=3.0) as view,
    ):
        await _record(ledger, range(4))
        started = time.monotonic()
        note = await view.checkpoint()
        waited = time.monotonic() - started
        assert unverified_checkpoint(note).size == 4
        assert note == view.checkpoint_notes()[-1]
        assert 0.05 < waited < 2.0  # it waited for the writer's timer; it did not sign
        # Already covered: answers at once, without waiting.
        started = time.monotonic()
        assert await view.checkpoint() == note
        assert time.monotonic() - started < 0.5
        # A proof from the view verifies against the checkpoint the writer signed.
        checkpoint = unverified_checkpoint(note)
        entry = view.read(2)
        verify_inclusion(
            leaf_hash(entry.leaf),
            2,
            checkpoint.size,
            view.inclusion_proof(2, 4),
            checkpoint.root_hash,
        )


async def test_checkpoint_times_out_when_the_writer_is_gone(
    pg: PgLedger, signer: Ed25519NoteSigner, tmp_path: Path
) -> None:
    # A writer process appends, then dies before its checkpoint is due (SIGKILL: no final one).
    signer.save(tmp_path / "signing.key")
    process = subprocess.Popen(
        [
            sys.executable,
            test_ledger_view_support.__file__,
            pg.app,
            pg.schema,
            str(tmp_path / "signing.key"),
            "5",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "appended 5"
        process.kill()
        process.wait(timeout=10)
        async with _view(pg, checkpoint_wait_s=0.6) as view:
            assert view.size == 5  # what it committed is there
            started = time.monotonic()
            with pytest.raises(LedgerUnavailable, match="sequencer running"):
                await view.checkpoint()
            assert 0.5 < time.monotonic() - started < 2.0
            # A standby writer takes over; its checkpoint covers everything: the wait ends.
            async with writer(pg, signer, QUIET) as standby:
                await standby.record(sample_event(5))
                waiting = asyncio.create_task(view.checkpoint())
                await asyncio.sleep(0.2)
                await standby.checkpoint()
                assert unverified_checkpoint(await waiting).size == 6
    finally:
        if process.poll() is None:
            process.kill()


async def test_a_view_recovers_after_its_connections_are_cut(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    async with writer(pg, signer, QUIET) as ledger, _view(pg) as view:
        await _record(ledger, range(3))
        await view.refresh()
        pg.admin_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE usename = '{pg.role}' AND application_name = 'phivault-ledger-reader'"
        )
        await _record(ledger, range(3, 6))
        try:
            await view.refresh()
        except LedgerUnavailable as exc:
            assert "connection was lost" in str(exc)  # this one used a dead connection
            await view.refresh()  # the next one opens a fresh connection
        assert view.size == 6
        assert [e.index for e in view.read_range(0, 6)] == list(range(6))


async def test_a_changed_leaf_is_never_served(pg: PgLedger, signer: Ed25519NoteSigner) -> None:
    async with writer(pg, signer, QUIET) as ledger, _view(pg) as view:
        await _record(ledger, range(6))
        await view.refresh()
        superuser_change(pg, 2, b'"req-2"', b'"req-X"')
        with pytest.raises(LedgerRowDamaged, match="damaged at 2"):
            view.read(2)
        with pytest.raises(LedgerRowDamaged, match="damaged at 2"):
            list(view.patient_chain("Patient/p-2"))
        assert view.read(1).index == 1  # the rest is still served


async def test_damage_in_new_rows_stops_the_view_and_a_checkpoint_past_it_is_tampering(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    async with writer(pg, signer, QUIET) as ledger, _view(pg) as view:
        await _record(ledger, range(3))
        await view.refresh()
        await _record(ledger, range(3, 8))
        # Rewritten without its stored hash, before the view loaded it.
        superuser_change(pg, 5, b'"req-5"', b'"req-Y"', hash_too=False)
        await view.refresh()
        assert view.size == 5  # the good prefix
        store = view._refreshable
        assert isinstance(store, PostgresLedgerStore)
        assert store.damage == (5, "stored leaf hash does not match the leaf")
        await ledger.checkpoint()  # the writer still holds the original: signs size 8
        with pytest.raises(LedgerTampered) as caught:
            await view.refresh()
        assert (caught.value.kind, caught.value.index) == (TamperKind.TRUNCATED, 5)
        with pytest.raises(LedgerTampered):
            await view.checkpoint()  # never answers with a history it cannot prove


async def test_a_checkpoint_signed_by_another_key_is_refused(
    pg: PgLedger, signer: Ed25519NoteSigner
) -> None:
    verifier = NoteVerifier.from_verifier_key(signer.verifier_key)
    async with writer(pg, signer, QUIET) as ledger, _view(pg, verifier=verifier) as view:
        await _record(ledger, range(2))
        await ledger.checkpoint()
        await view.refresh()
        assert view.latest_checkpoint is not None
        # Someone with INSERT appends a checkpoint signed by a key the view does not trust.
        forger = Ed25519NoteSigner.generate(ORIGIN)
        note = sign_checkpoint(Checkpoint(ORIGIN, 2, view.root(2)), forger)
        pg.admin_sql(f"INSERT INTO {{s}}.checkpoints (seq, note) VALUES (1, '{note}')")
        with pytest.raises(LedgerTampered) as caught:
            await view.refresh()
        assert caught.value.kind is TamperKind.BAD_SIGNATURE


def test_store_refresh_loads_only_new_rows_and_keeps_the_damage_semantics(pg: PgLedger) -> None:
    def leaves(numbers: range) -> list[bytes]:
        return [f'{{"n":{i}}}'.encode() for i in numbers]

    writable, reader = pg.store(), pg.store(writable=False)
    try:
        assert writable.refresh() == StoreGrowth(0, [], b"", [])  # the writer is always current
        writable.append(leaves(range(3)))
        writable.add_checkpoint("one\n")
        growth = reader.refresh()
        assert (growth.first, growth.leaves, growth.notes) == (0, leaves(range(3)), ["one\n"])
        assert growth.hashes == b"".join(leaf_hash(leaf) for leaf in leaves(range(3)))
        assert reader.refresh() == StoreGrowth(3, [], b"", [])
        writable.append(leaves(range(3, 7)))
        writable.add_checkpoint("two\n")
        assert reader.refresh().leaves == leaves(range(3, 7))
        assert (reader.size(), reader.checkpoints()) == (7, ["one\n", "two\n"])
        assert reader.leaf_hashes() == writable.leaf_hashes()
        # A row deleted by a superuser before a reader loaded it: growth stops right there.
        writable.append(leaves(range(7, 10)))
        pg.admin_sql(
            "ALTER TABLE {s}.leaves DISABLE TRIGGER leaves_append_only",
            "DELETE FROM {s}.leaves WHERE idx = 8",
            "ALTER TABLE {s}.leaves ENABLE ALWAYS TRIGGER leaves_append_only",
        )
        assert reader.refresh().leaves == leaves(range(7, 8))
        assert (reader.size(), reader.damage) == (8, (8, "entry missing"))
        writable.add_checkpoint("three\n")
        after = reader.refresh()  # checkpoints still come (evidence), leaves no longer
        assert (after.leaves, after.notes, reader.size()) == ([], ["three\n"], 8)
    finally:
        writable.close()
        reader.close()


async def test_the_embedded_ledger_is_a_reader_too(tmp_path: Path) -> None:
    directory = DataDir.create(tmp_path / "data", dev=True, origin=ORIGIN)
    initialize_ledger(directory)
    async with open_ledger(directory, QUIET) as ledger:
        reader: LedgerReader = ledger
        await ledger.record(sample_event(0))
        await reader.refresh()  # always current: nothing to do
        assert reader.size == 1
        note = await reader.checkpoint()
        assert reader.checkpoint_notes()[-1] == note


async def test_a_closed_view_refuses_to_refresh(pg: PgLedger) -> None:
    async with _view(pg) as view:
        pass
    with pytest.raises(LedgerUnavailable, match="closed"):
        await view.refresh()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    leaked = {t.name for t in threading.enumerate()} - before
    assert not {name for name in leaked if name.startswith("ledger-view")}
