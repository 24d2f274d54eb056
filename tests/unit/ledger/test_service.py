"""The embedded ledger: group commit, back-links, the hash chain, checkpoints, proofs."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from phivault.datadir import DataDir
from phivault.ledger.checkpoint import open_checkpoint
from phivault.ledger.errors import LedgerError, LedgerTampered, LedgerUnavailable, TamperKind
from phivault.ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from phivault.ledger.note import NoteVerifier
from phivault.ledger.service import open_ledger, verifier_key_of
from phivault.ledger.testing import sample_event
from phivault.settings import LedgerSettings


async def test_concurrent_records_get_unique_consecutive_indexes(data_dir: DataDir) -> None:
    async with open_ledger(data_dir) as ledger:
        indexes = await asyncio.gather(*(ledger.record(sample_event(i)) for i in range(300)))
        assert sorted(indexes) == list(range(300))
        assert ledger.size == 300
        for index in (0, 150, 299):
            doc = ledger.read(index).document
            assert doc["seq"] == index
            assert doc["request_id"] == f"req-{indexes.index(index)}"


async def test_each_entry_chains_to_the_previous_leaf(data_dir: DataDir) -> None:
    async with open_ledger(data_dir) as ledger:
        for i in range(5):
            await ledger.record(sample_event(i))
        previous = bytes(32)
        for index in range(5):
            entry = ledger.read(index)
            assert base64.b64decode(entry.document["chain"]) == previous
            previous = leaf_hash(entry.leaf)


async def test_back_links_chain_each_patients_events(data_dir: DataDir) -> None:
    async with open_ledger(data_dir) as ledger:
        patients = ["Patient/a", "Patient/b", None, "Patient/a", "Patient/b", "Patient/a"]
        for i, patient in enumerate(patients):
            await ledger.record(sample_event(i, patient=patient))
        chain = [entry.index for entry in ledger.patient_chain("Patient/a")]
        assert chain == [5, 3, 0]
        assert [e.index for e in ledger.patient_chain("Patient/b")] == [4, 1]
        assert ledger.read(0).patient_prev is None
        assert "patient_prev" not in ledger.read(2).document
    # The heads survive a restart (rebuilt from the entries).
    async with open_ledger(data_dir) as ledger:
        await ledger.record(sample_event(6, patient="Patient/a"))
        assert ledger.read(6).patient_prev == 5


async def test_leaves_are_canonical_json_of_the_event(data_dir: DataDir) -> None:
    from phivault.ledger.canonical import canonical_json

    async with open_ledger(data_dir) as ledger:
        await ledger.record(sample_event(0))
        entry = ledger.read(0)
        assert entry.leaf == canonical_json(json.loads(entry.leaf))
        assert entry.event == sample_event(0)


async def test_a_checkpoint_is_issued_soon_after_an_event(data_dir: DataDir) -> None:
    settings = LedgerSettings(checkpoint_interval_s=0.05)
    verifier = NoteVerifier.from_verifier_key(verifier_key_of(data_dir))
    async with open_ledger(data_dir, settings) as ledger:
        index = await ledger.record(sample_event(0))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if ledger.latest_checkpoint is not None:
                break
        checkpoint = ledger.latest_checkpoint
        assert checkpoint is not None and checkpoint.size == 1
        note = ledger.checkpoint_notes()[-1]
        assert open_checkpoint(note, verifier, origin=data_dir.origin) == checkpoint
        proof = ledger.inclusion_proof(index, checkpoint.size)
        verify_inclusion(ledger.leaf_hash(index), index, 1, proof, checkpoint.root_hash)


async def test_checkpoints_on_demand_are_consistent_with_each_other(data_dir: DataDir) -> None:
    async with open_ledger(data_dir, LedgerSettings(checkpoint_interval_s=60)) as ledger:
        for i in range(7):
            await ledger.record(sample_event(i))
        first = await ledger.checkpoint()
        assert await ledger.checkpoint() == first  # nothing new: the same note
        for i in range(7, 20):
            await ledger.record(sample_event(i))
        await ledger.checkpoint()
        notes = ledger.checkpoint_notes()
        assert len(notes) == 2
        verify_consistency(7, 20, ledger.consistency_proof(7, 20), ledger.root(7), ledger.root(20))


async def test_close_signs_a_final_checkpoint(data_dir: DataDir) -> None:
    async with open_ledger(data_dir, LedgerSettings(checkpoint_interval_s=60)) as ledger:
        await ledger.record(sample_event(0))
    async with open_ledger(data_dir) as ledger:
        assert ledger.latest_checkpoint is not None
        assert ledger.latest_checkpoint.size == 1


async def test_refuses_to_extend_a_history_that_differs_from_a_signed_one(
    data_dir: DataDir,
) -> None:
    async with open_ledger(data_dir) as ledger:
        for i in range(3):
            await ledger.record(sample_event(i))
    # Rewrite the store behind the ledger's back: a different history of the same length.
    path = data_dir.ledger_dir / "entries.log"
    data = path.read_bytes().replace(b'"req-1"', b'"req-9"')
    import struct
    import zlib

    # Re-frame the rewritten leaf so that the file itself looks intact.
    out = bytearray(data[:8])
    pos = 8
    while pos < len(data):
        length, _crc = struct.unpack_from("<II", data, pos)
        leaf = data[pos + 8 : pos + 8 + length]
        out += struct.pack("<II", length, zlib.crc32(leaf)) + leaf
        pos += 8 + length
    path.write_bytes(bytes(out))
    for cache in ("entries.idx", "leaves.hash"):
        (data_dir.ledger_dir / cache).unlink()
    with pytest.raises(LedgerTampered) as caught:
        async with open_ledger(data_dir):
            pass
    assert caught.value.kind is TamperKind.FORKED


async def test_ledger_fields_cannot_be_forged_by_callers(data_dir: DataDir) -> None:
    async with open_ledger(data_dir) as ledger:
        doc = sample_event(0).to_document() | {"seq": 99}
        with pytest.raises(LedgerError, match="ledger field 'seq'"):
            await ledger.record_document(doc)
        assert ledger.size == 0


async def test_a_closed_ledger_fails_closed(data_dir: DataDir) -> None:
    async with open_ledger(data_dir) as ledger:
        pass
    with pytest.raises(LedgerUnavailable):
        await ledger.record(sample_event(0))


async def test_a_checkpoint_of_the_empty_ledger_does_not_stop_later_ones(data_dir: DataDir) -> None:
    # Regression: the empty tree has no consistency proof, and a failing check was swallowed,
    # so after one empty checkpoint no checkpoint was ever signed again.
    async with open_ledger(data_dir, LedgerSettings(checkpoint_interval_s=0.02)) as ledger:
        empty = await ledger.checkpoint()
        assert empty.split("\n")[1] == "0"
        await ledger.record(sample_event(0))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if ledger.latest_checkpoint is not None and ledger.latest_checkpoint.size == 1:
                break
        assert ledger.latest_checkpoint is not None and ledger.latest_checkpoint.size == 1
        assert ledger.checkpoint_failure is None


async def test_a_failed_append_fails_its_batch_and_the_next_batch_goes_on(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The I/O thread hands the store's failure to the waiting records (fail closed), and
    nothing of the failed batch is counted: the next batch takes the same indexes."""
    async with open_ledger(data_dir) as ledger:
        await ledger.record(sample_event(0))
        store = ledger._store
        real_append = store.append

        def broken(leaves: object) -> bytes:
            raise OSError("disk gone")

        monkeypatch.setattr(store, "append", broken)
        results = await asyncio.gather(
            *(ledger.record(sample_event(i)) for i in range(1, 4)), return_exceptions=True
        )
        assert all(isinstance(r, LedgerUnavailable) for r in results)
        assert ledger.size == 1
        monkeypatch.setattr(store, "append", real_append)
        assert await ledger.record(sample_event(9)) == 1
        assert ledger.read(1).document["seq"] == 1


async def test_record_documents_appends_a_batch_in_one_commit_as_record_would(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The sequencer's batch append: one group commit, indexes from the returned first, and
    leaves byte for byte those of record() (plain) and record_document() (exact encoder)."""
    from phivault.ledger.service import initialize_ledger

    dirs = []
    for name in ("one-by-one", "batch"):
        data_dir = DataDir.create(tmp_path_factory.mktemp(name) / "data", dev=True, origin="o")
        initialize_ledger(data_dir)
        dirs.append(data_dir)
    events = [sample_event(i, patient=f"Patient/p-{i % 2}") for i in range(6)]
    other = {"kind": "ledger", "subtype": "note", "x": 0.5, "text": "é"}
    async with open_ledger(dirs[0]) as ledger:
        for event in events:
            await ledger.record(event)
        await ledger.record_document(other)
        expected = [entry.leaf for entry in ledger.read_range(0, 7)]
    async with open_ledger(dirs[1]) as ledger:
        batches_before = ledger.batches_committed
        first = await ledger.record_documents(
            [*((event.to_document(), True) for event in events), (other, False)]
        )
        assert first == 0 and ledger.size == 7
        assert ledger.batches_committed == batches_before + 1
        assert [entry.leaf for entry in ledger.read_range(0, 7)] == expected
        assert await ledger.record_documents([(events[0].to_document(), True)]) == 7
        with pytest.raises(LedgerError, match="ledger field"):
            await ledger.record_documents([({"kind": "x", "seq": 1}, False)])
        with pytest.raises(LedgerError):
            await ledger.record_documents([])
        assert ledger.size == 8
