"""Offline verification of a ledger: entries and signed checkpoints, nothing else trusted.

:func:`verify_ledger` re-hashes every entry, rebuilds the RFC 9162 tree, checks every
checkpoint's signature against a verifier key the *caller* trusts, and checks that the tree
matches every checkpoint (which implies the checkpoints are consistent with each other). It
returns a :class:`VerificationReport` only if everything holds, and otherwise raises
:class:`~phivault.ledger.errors.LedgerTampered` naming the first bad index and the kind:

* ``modified``: an entry's bytes changed (damaged frame, or its successor's ``chain`` field no
  longer matches its hash);
* ``missing``: the entry at a position carries a later ``seq`` and the expected one never comes;
* ``reordered``: the expected ``seq`` appears, but somewhere else;
* ``truncated``: fewer entries than a signed checkpoint covers;
* ``forked``: the entries chain together but do not hash to a signed root (a rewritten history);
* ``bad-signature``: a checkpoint that does not verify under the trusted key.

:func:`verify_store` verifies a store as it is stored (the embedded files or the PostgreSQL
tables, through their ``raw_frames``), the same way whichever it is.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from phivault.ledger.checkpoint import Checkpoint, open_checkpoint
from phivault.ledger.errors import InvalidProof, LedgerTampered, TamperKind
from phivault.ledger.merkle import MerkleTree, leaf_hash
from phivault.ledger.note import NoteVerifier
from phivault.ledger.ports import VerifiableStore

__all__ = ["Damaged", "VerificationReport", "verify_ledger", "verify_store"]

_SEQ_RE: Final = re.compile(rb'[{,]"seq":(\d+)[,}]')
_CHAIN_RE: Final = re.compile(rb'[{,]"chain":"([A-Za-z0-9+/=]{44})"')
_ZERO_CHAIN: Final = base64.b64encode(bytes(32))
_PROGRESS_EVERY: Final = 8192


@dataclass(frozen=True)
class Damaged:
    """Stands in for an entry that could not even be read (a damaged frame)."""

    reason: str


@dataclass(frozen=True)
class VerificationReport:
    entries: int
    checkpoints: int
    covered: int  # entries covered by the latest valid checkpoint
    root_hash: bytes  # root over all entries

    @property
    def uncovered(self) -> int:
        return self.entries - self.covered


@dataclass
class _Finding:
    index: int
    kind: TamperKind
    detail: str
    limit: int = 0  # for a signed-root failure: the checkpoint size whose range it covers

    def raise_(self) -> None:
        raise LedgerTampered(self.index, self.kind, self.detail)


def _open_checkpoints(
    notes: Iterable[str], verifier: NoteVerifier, origin: str | None
) -> list[Checkpoint]:
    checkpoints: list[Checkpoint] = []
    for number, note in enumerate(notes):
        try:
            checkpoint = open_checkpoint(note, verifier, origin=origin)
        except InvalidProof as exc:
            # Name the size the bad note claims, if it can be read at all.
            size = _claimed_size(note)
            raise LedgerTampered(
                size, TamperKind.BAD_SIGNATURE, f"checkpoint #{number} does not verify: {exc}"
            ) from exc
        if checkpoints:
            previous = checkpoints[-1]
            if checkpoint.size < previous.size:
                raise LedgerTampered(
                    checkpoint.size,
                    TamperKind.FORKED,
                    f"checkpoint #{number} (size {checkpoint.size}) is older than the one "
                    f"before it (size {previous.size}): the checkpoint history was rolled back",
                )
            if checkpoint.size == previous.size and checkpoint.root_hash != previous.root_hash:
                raise LedgerTampered(
                    checkpoint.size,
                    TamperKind.FORKED,
                    f"two checkpoints sign different roots for size {checkpoint.size}",
                )
        checkpoints.append(checkpoint)
    return checkpoints


def _claimed_size(note: str) -> int:
    lines = note.split("\n")
    if len(lines) > 1 and lines[1].isdigit():
        return int(lines[1])
    return 0


LeafSource = Sequence["bytes | Damaged"] | Callable[[], Iterable["bytes | Damaged"]]


def verify_ledger(
    leaves: LeafSource,
    checkpoint_notes: Iterable[str],
    verifier: NoteVerifier,
    *,
    origin: str | None = None,
    trusted_checkpoint: str | None = None,
    progress: Callable[[int], None] | None = None,
    thorough: bool = False,
) -> VerificationReport:
    """Verify entries (in ledger order) against signed checkpoints; raise on any failure.

    ``leaves`` is a sequence, or a function returning a fresh iterable each call (a second
    pass reads them again). ``origin`` defaults to the verifier key's name.
    ``trusted_checkpoint`` is a checkpoint the verifier saw earlier by other means (a witness,
    a previous export): the ledger must still contain its history, which detects a rollback of
    entries *and* checkpoints together.

    The first pass hashes every leaf and compares the rebuilt tree with every signed root:
    for entries a checkpoint covers, that alone proves they are exactly what was signed. The
    structural pass (``seq`` and ``chain`` of every entry) then runs over entries no
    checkpoint covers yet, over everything when the first pass failed (to name the first bad
    index and the kind), and over everything when ``thorough`` is set (to check that what was
    signed is itself well-formed).
    """
    if not callable(leaves) and not isinstance(leaves, Sequence):
        raise TypeError("leaves must be a sequence or a function returning a fresh iterable")
    read = leaves if callable(leaves) else (lambda: leaves)
    origin = origin if origin is not None else verifier.name
    notes = list(checkpoint_notes)
    if trusted_checkpoint is not None:
        notes.append(trusted_checkpoint)
    checkpoints = _open_checkpoints(notes, verifier, origin)

    hashes = bytearray()
    damaged = False
    for position, item in enumerate(read()):
        if progress is not None and position % _PROGRESS_EVERY == 0:
            progress(position)
        if isinstance(item, Damaged):
            damaged = True
            break
        hashes += leaf_hash(item)
    count = len(hashes) // 32
    tree = MerkleTree(bytes(hashes))
    signed_finding, covered = _compare_with_checkpoints(tree, count, checkpoints)
    if progress is not None:
        progress(count)

    failed = damaged or signed_finding is not None
    start = 0 if failed or thorough else covered
    if failed or start < count:
        entry_finding = _structural_pass(read(), start, tree)
        finding = _first(entry_finding, signed_finding)
        if finding is not None:
            finding.raise_()
    return VerificationReport(
        entries=count,
        checkpoints=len(checkpoints),
        covered=covered,
        root_hash=tree.root(count),
    )


def verify_store(
    store: VerifiableStore,
    verifier: NoteVerifier,
    *,
    origin: str | None = None,
    trusted_checkpoint: str | None = None,
    progress: Callable[[int], None] | None = None,
    thorough: bool = False,
) -> VerificationReport:
    """Verify every entry as stored, damaged ones included, against the store's checkpoints
    (see :func:`verify_ledger`); raise :class:`LedgerTampered` naming the first failure.

    The entries are read from storage on each pass, never from what the store loaded: a
    damaged frame or row is named where it is, not silently left out.
    """

    def leaves() -> Iterator[bytes | Damaged]:
        for _position, leaf, reason in store.raw_frames():
            yield leaf if leaf is not None else Damaged(reason or "damaged entry")

    return verify_ledger(
        leaves,
        store.checkpoints(),
        verifier,
        origin=origin,
        trusted_checkpoint=trusted_checkpoint,
        progress=progress,
        thorough=thorough,
    )


def _compare_with_checkpoints(
    tree: MerkleTree, count: int, checkpoints: list[Checkpoint]
) -> tuple[_Finding | None, int]:
    """The first signed root the entries fail, and the largest size they verified against."""
    verified_size = 0
    for checkpoint in checkpoints:
        if checkpoint.size > count:
            return _Finding(
                count,
                TamperKind.TRUNCATED,
                f"{count} entries, but a checkpoint was signed at size {checkpoint.size}",
                limit=checkpoint.size,
            ), verified_size
        if tree.root(checkpoint.size) != checkpoint.root_hash:
            return _Finding(
                verified_size,
                TamperKind.FORKED,
                f"entries {verified_size} to {checkpoint.size - 1} do not match the history "
                f"signed at size {checkpoint.size}",
                limit=checkpoint.size,
            ), verified_size
        verified_size = checkpoint.size
    return None, verified_size


def _first(entry: _Finding | None, signed: _Finding | None) -> _Finding | None:
    # An entry-level finding inside the failing checkpoint's range explains the mismatch and
    # is more precise; keep it. Otherwise the signed root is the first thing that fails.
    if entry is None:
        return signed
    if signed is None:
        return entry
    return entry if entry.index < signed.limit else signed


def _structural_pass(
    items: Iterable[bytes | Damaged], start: int, tree: MerkleTree
) -> _Finding | None:
    """Check every entry's ``seq`` and ``chain`` from ``start``; name the first that fails."""
    prev_chain = base64.b64encode(tree.leaf_hash_at(start - 1)) if start else _ZERO_CHAIN
    finding: _Finding | None = None
    seq_anomaly: tuple[int, int] | None = None  # (position, seq found there)
    seqs_after_anomaly: set[int] = set()
    next_seq: int | None = None  # the seq of the entry right after the anomaly
    for position, item in enumerate(items):
        if position < start:
            continue
        if isinstance(item, Damaged):
            finding = finding or _Finding(position, TamperKind.MODIFIED, item.reason)
            break
        chain_now = base64.b64encode(leaf_hash(item))
        if finding is not None:
            continue
        seq_match = _SEQ_RE.search(item)
        chain_match = _CHAIN_RE.search(item)
        if seq_match is None or chain_match is None:
            finding = _Finding(position, TamperKind.MODIFIED, "entry is not a ledger leaf")
        elif seq_anomaly is not None:
            seq = int(seq_match.group(1))
            if next_seq is None:
                next_seq = seq
            seqs_after_anomaly.add(seq)
        elif int(seq_match.group(1)) != position:
            seq_anomaly = (position, int(seq_match.group(1)))
        elif chain_match.group(1) != prev_chain:
            bad = max(position - 1, 0)
            finding = _Finding(
                bad,
                TamperKind.MODIFIED,
                f"entry {position} does not chain to entry {bad}: "
                f"entry {bad} (or the link in entry {position}) was modified",
            )
        prev_chain = chain_now

    if seq_anomaly is not None:
        at, found = seq_anomaly
        if at in seqs_after_anomaly:
            candidate = _Finding(at, TamperKind.REORDERED, f"entry {at} holds entry {found}")
        elif next_seq == at + 1:
            # The sequence resumes right after: this one entry's own bytes were changed.
            candidate = _Finding(at, TamperKind.MODIFIED, f"entry {at} claims to be entry {found}")
        elif found > at:
            candidate = _Finding(at, TamperKind.MISSING, f"entries {at} to {found - 1} are missing")
        else:
            candidate = _Finding(at, TamperKind.MODIFIED, f"entry {at} repeats entry {found}")
        if finding is None or candidate.index <= finding.index:
            finding = candidate
    return finding
