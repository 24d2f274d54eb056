"""Tampering with an exported ledger is always detected, and named.

Each test starts from a genuine evidence bundle (40 events, checkpoints at 10, 25 and 40)
and changes it the way an attacker or a failing disk would. ``verify`` must raise
LedgerTampered with the right kind and the first bad index, for every input hypothesis tries.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.crypto.signing import Ed25519NoteSigner
from phivault.datadir import DataDir
from phivault.ledger.bundle import Bundle, read_bundle, verify_bundle, write_bundle
from phivault.ledger.canonical import canonical_json
from phivault.ledger.checkpoint import Checkpoint, sign_checkpoint
from phivault.ledger.errors import LedgerTampered, TamperKind
from phivault.ledger.merkle import MerkleTree, leaf_hash
from phivault.ledger.service import initialize_ledger, open_ledger, open_ledger_readonly
from phivault.ledger.testing import sample_event
from phivault.ledger.verify import Damaged
from phivault.settings import LedgerSettings

SIZE = 40
CHECKPOINT_SIZES = (10, 25, 40)


@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, str]:
    directory = DataDir.create(
        tmp_path_factory.mktemp("tamper") / "data", dev=True, origin="phivault.test/tamper"
    )
    key = initialize_ledger(directory)

    async def fill() -> None:
        async with open_ledger(directory, LedgerSettings(checkpoint_interval_s=60)) as ledger:
            for i in range(SIZE):
                await ledger.record(sample_event(i, patient=f"Patient/p-{i % 4}"))
                if i + 1 in CHECKPOINT_SIZES:
                    await ledger.checkpoint()

    asyncio.run(fill())
    out = io.StringIO()
    with open_ledger_readonly(directory) as store:
        write_bundle(out, store, origin=directory.origin, verifier_key=key)
    path = Path(tmp_path_factory.mktemp("bundle")) / "bundle.json"
    path.write_text(out.getvalue())
    return read_bundle(path), key


def _with_entries(bundle: Bundle, entries: list[bytes | Damaged]) -> Bundle:
    return dataclasses.replace(bundle, entries=entries)


def _tampered(bundle: Bundle, key: str) -> LedgerTampered:
    with pytest.raises(LedgerTampered) as caught:
        verify_bundle(bundle, key)
    return caught.value


def test_the_genuine_bundle_verifies(genuine: tuple[Bundle, str]) -> None:
    bundle, key = genuine
    report = verify_bundle(bundle, key)
    assert (report.entries, report.checkpoints, report.uncovered) == (SIZE, 3, 0)


@settings(max_examples=150, deadline=None)
@given(index=st.integers(0, SIZE - 1), data=st.data())
def test_changing_any_byte_of_any_entry_is_detected(
    genuine: tuple[Bundle, str], index: int, data: st.DataObject
) -> None:
    bundle, key = genuine
    entries = list(bundle.entries)
    leaf = bytearray(entries[index])  # type: ignore[arg-type]
    position = data.draw(st.integers(0, len(leaf) - 1))
    leaf[position] ^= data.draw(st.integers(1, 255))
    entries[index] = bytes(leaf)
    found = _tampered(_with_entries(bundle, entries), key)
    if index == SIZE - 1:
        # Nothing chains to the newest entry: only the signed root can tell, and it cannot
        # say whether one entry or a longer tail was rewritten.
        assert found.kind in (TamperKind.MODIFIED, TamperKind.FORKED)
        assert found.index <= index
    else:
        assert found.kind is TamperKind.MODIFIED
        # A changed "chain" field is blamed on the link or on the entry it points to.
        assert found.index in (index - 1, index)


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, SIZE - 2))
def test_deleting_an_entry_is_named_missing(genuine: tuple[Bundle, str], index: int) -> None:
    bundle, key = genuine
    entries = list(bundle.entries)
    del entries[index]
    found = _tampered(_with_entries(bundle, entries), key)
    assert (found.kind, found.index) == (TamperKind.MISSING, index)


@settings(max_examples=60, deadline=None)
@given(pair=st.lists(st.integers(0, SIZE - 1), min_size=2, max_size=2, unique=True))
def test_swapping_two_entries_is_named_reordered(
    genuine: tuple[Bundle, str], pair: list[int]
) -> None:
    bundle, key = genuine
    first, second = sorted(pair)
    entries = list(bundle.entries)
    entries[first], entries[second] = entries[second], entries[first]
    found = _tampered(_with_entries(bundle, entries), key)
    assert (found.kind, found.index) == (TamperKind.REORDERED, first)


@settings(max_examples=20, deadline=None)
@given(keep=st.integers(0, SIZE - 1))
def test_truncation_below_a_signed_size_is_named(genuine: tuple[Bundle, str], keep: int) -> None:
    bundle, key = genuine
    found = _tampered(_with_entries(bundle, list(bundle.entries[:keep])), key)
    assert (found.kind, found.index) == (TamperKind.TRUNCATED, keep)


def _forged_tail(bundle: Bundle, start: int) -> list[bytes | Damaged]:
    """A consistent alternative history from ``start`` on: every seq and chain is right."""
    entries: list[bytes | Damaged] = list(bundle.entries[:start])
    previous = leaf_hash(entries[-1]) if entries else bytes(32)  # type: ignore[arg-type]
    for index in range(start, SIZE):
        document = json.loads(bundle.entries[index])  # type: ignore[arg-type]
        document["request_id"] = f"forged-{index}"
        document["chain"] = base64.b64encode(previous).decode()
        leaf = canonical_json(document)
        entries.append(leaf)
        previous = leaf_hash(leaf)
    return entries


@settings(max_examples=20, deadline=None)
@given(start=st.integers(0, SIZE - 1))
def test_a_rewritten_tail_is_named_forked(genuine: tuple[Bundle, str], start: int) -> None:
    bundle, key = genuine
    found = _tampered(_with_entries(bundle, _forged_tail(bundle, start)), key)
    assert found.kind is TamperKind.FORKED
    previous_checkpoint = max([0, *(s for s in CHECKPOINT_SIZES if s <= start)])
    assert found.index == previous_checkpoint


def test_a_history_rewritten_and_resigned_with_another_key_fails(
    genuine: tuple[Bundle, str],
) -> None:
    bundle, key = genuine
    entries = _forged_tail(bundle, 0)
    tree = MerkleTree(b"".join(leaf_hash(e) for e in entries))  # type: ignore[arg-type]
    impostor = Ed25519NoteSigner.generate(bundle.origin)
    notes = [
        sign_checkpoint(Checkpoint(bundle.origin, size, tree.root(size)), impostor)
        for size in CHECKPOINT_SIZES
    ]
    forged = Bundle(bundle.origin, impostor.verifier_key, entries, notes)
    # Its own key would accept it; the key the verifier trusts does not.
    assert verify_bundle(forged, impostor.verifier_key).entries == SIZE
    assert _tampered(forged, key).kind is TamperKind.BAD_SIGNATURE
    # Swapping only the hint inside the bundle back to the trusted key does not help.
    hinted = dataclasses.replace(forged, verifier_key=key)
    assert _tampered(hinted, key).kind is TamperKind.BAD_SIGNATURE


@pytest.mark.parametrize("which", [0, 1, 2])
def test_an_altered_checkpoint_is_a_bad_signature(genuine: tuple[Bundle, str], which: int) -> None:
    bundle, key = genuine
    notes = list(bundle.checkpoints)
    lines = notes[which].split("\n")
    lines[1] = str(int(lines[1]) - 1)  # claim a smaller tree
    notes[which] = "\n".join(lines)
    found = _tampered(dataclasses.replace(bundle, checkpoints=notes), key)
    assert found.kind is TamperKind.BAD_SIGNATURE


def test_reordered_checkpoints_are_a_rollback(genuine: tuple[Bundle, str]) -> None:
    bundle, key = genuine
    notes = [bundle.checkpoints[0], bundle.checkpoints[2], bundle.checkpoints[1]]
    found = _tampered(dataclasses.replace(bundle, checkpoints=notes), key)
    assert found.kind is TamperKind.FORKED


def test_appended_entries_not_covered_by_a_checkpoint_fail(genuine: tuple[Bundle, str]) -> None:
    bundle, key = genuine
    # Even a well-formed entry, chained to the last one, is refused: nothing signed covers it.
    last = bundle.entries[-1]
    assert isinstance(last, bytes)
    chain = base64.b64encode(leaf_hash(last)).decode()
    extra = canonical_json({"seq": SIZE, "chain": chain})
    found = _tampered(_with_entries(bundle, [*bundle.entries, extra]), key)
    assert (found.kind, found.index) == (TamperKind.MODIFIED, SIZE)
    assert "not covered by any checkpoint" in found.detail


def test_a_changed_bundle_origin_fails(genuine: tuple[Bundle, str]) -> None:
    bundle, key = genuine
    with pytest.raises(LedgerTampered):
        verify_bundle(dataclasses.replace(bundle, origin="elsewhere.example/log"), key)


def test_a_trusted_checkpoint_detects_a_rollback_of_everything(
    genuine: tuple[Bundle, str],
) -> None:
    # An attacker restores an older copy: entries and checkpoints both cut back to size 25.
    bundle, key = genuine
    older = Bundle(bundle.origin, bundle.verifier_key, bundle.entries[:25], bundle.checkpoints[:2])
    assert verify_bundle(older, key).entries == 25  # consistent on its own...
    with pytest.raises(LedgerTampered) as caught:  # ...but not with what a witness saw
        verify_bundle(older, key, trusted_checkpoint=bundle.checkpoints[2])
    assert (caught.value.kind, caught.value.index) == (TamperKind.TRUNCATED, 25)


def test_thorough_verification_finds_a_malformed_history_that_was_signed(
    genuine: tuple[Bundle, str],
) -> None:
    # A faulty (or dishonest) writer signs a history whose entry 7 repeats seq 6. The signed
    # roots match the entries, so the default check passes; --thorough finds the entry.
    bundle, _key = genuine
    entries: list[bytes | Damaged] = []
    previous = bytes(32)
    for index, original in enumerate(bundle.entries):
        assert isinstance(original, bytes)
        document = json.loads(original)
        document["chain"] = base64.b64encode(previous).decode()
        if index == 7:
            document["seq"] = 6
        leaf = canonical_json(document)
        entries.append(leaf)
        previous = leaf_hash(leaf)
    tree = MerkleTree(b"".join(leaf_hash(e) for e in entries))  # type: ignore[arg-type]
    writer = Ed25519NoteSigner.generate(bundle.origin)
    signed = Bundle(
        bundle.origin,
        writer.verifier_key,
        entries,
        [sign_checkpoint(Checkpoint(bundle.origin, SIZE, tree.root(SIZE)), writer)],
    )
    assert verify_bundle(signed, writer.verifier_key).entries == SIZE
    with pytest.raises(LedgerTampered) as caught:
        verify_bundle(signed, writer.verifier_key, thorough=True)
    assert (caught.value.kind, caught.value.index) == (TamperKind.MODIFIED, 7)
