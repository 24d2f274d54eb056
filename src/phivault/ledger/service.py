"""The embedded audit ledger: durable appends with group commit, checkpoints, proofs.

:class:`Ledger` implements :class:`~phivault.ledger.ports.AuditSink`. ``await record(event)``
returns the event's index only once the event is on disk (invariant 1: no effect without a
record). Concurrent callers share one fsync: whoever arrives while a batch is being written
joins the next batch (group commit).

Each leaf is the RFC 8785 canonical JSON of the event's document plus three ledger fields:

* ``seq``: the entry's own index, so a missing or reordered entry is named exactly;
* ``chain``: base64 of the previous entry's RFC 9162 leaf hash, so a modified entry is named
  exactly by its successor (the Merkle root alone would only say "something changed");
* ``patient_prev``: the index of the previous event of the same patient (the back-link), so a
  patient's history is a chain inside the tree that reports follow without scanning.

A signed C2SP checkpoint is issued at most ``checkpoint_interval_s`` after an event arrives,
and on demand. Before signing, the ledger proves the new tree consistent with the last
checkpoint it signed; it refuses to open a store whose entries no longer match that checkpoint.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

from phivault._handoff import run_and_settle
from phivault.crypto.signing import Ed25519NoteSigner
from phivault.datadir import DataDir
from phivault.ledger.canonical import canonical_json, canonical_json_of_plain_document
from phivault.ledger.checkpoint import Checkpoint, sign_checkpoint, unverified_checkpoint
from phivault.ledger.errors import LedgerError, LedgerTampered, LedgerUnavailable, TamperKind
from phivault.ledger.events import LEDGER_FIELDS, AuditEvent
from phivault.ledger.file_store import FileLedgerStore, TornTailRecovery, create_store_files
from phivault.ledger.merkle import EMPTY_ROOT, MerkleTree, leaf_hash, verify_consistency
from phivault.ledger.note import NoteSigner
from phivault.ledger.ports import LedgerReader, LedgerStore
from phivault.ledger.report import ReportEvent, walk_patient_chain
from phivault.settings import LedgerSettings

__all__ = [
    "Ledger",
    "LedgerEntry",
    "LedgerReading",
    "check_matches_checkpoint",
    "initialize_ledger",
    "open_ledger",
    "open_ledger_on",
    "open_ledger_readonly",
    "patient_heads",
    "signer_path",
    "verifier_key_of",
]

_ZERO_HASH: Final = bytes(32)
# Canonical leaves sort their keys and escape every quote inside strings, so this byte
# pattern can only match the top-level field (no nested object has this name).
_PATIENT_RE: Final = re.compile(rb'[{,]"patient":"([^"]+)"')


# An event document waiting for the next group commit: (document, plain, acknowledgement).
_Pending = tuple[dict[str, Any], bool, "asyncio.Future[int]"]


def signer_path(data_dir: DataDir) -> Path:
    return data_dir.ledger_dir / "signing.key"


def _verifier_path(data_dir: DataDir) -> Path:
    return data_dir.ledger_dir / "verifier.key"


def initialize_ledger(data_dir: DataDir) -> str:
    """Create the store files and the checkpoint signing key; return the verifier key."""
    create_store_files(data_dir.ledger_dir)
    signer = Ed25519NoteSigner.generate(data_dir.origin)
    signer.save(signer_path(data_dir))
    # The public verifier key, kept apart so that reading it never loads the private key.
    _verifier_path(data_dir).write_text(signer.verifier_key + "\n")
    return signer.verifier_key


def verifier_key_of(data_dir: DataDir) -> str:
    """The ledger's verifier key (public). Pin it elsewhere to verify against it later."""
    try:
        return _verifier_path(data_dir).read_text().strip()
    except FileNotFoundError as exc:
        raise LedgerError(f"{_verifier_path(data_dir)} is missing") from exc


@dataclass(frozen=True)
class LedgerEntry:
    """One entry as read back: its index, the exact leaf bytes, and the parsed document."""

    index: int
    leaf: bytes
    document: dict[str, Any]

    @property
    def event(self) -> AuditEvent:
        doc = {k: v for k, v in self.document.items() if k not in LEDGER_FIELDS}
        return AuditEvent.from_document(doc)

    @property
    def patient_prev(self) -> int | None:
        value = self.document.get("patient_prev")
        return int(value) if value is not None else None


def patient_of_leaf(leaf: bytes) -> str | None:
    """The patient reference of a canonical leaf, without a full parse."""
    match = _PATIENT_RE.search(leaf)
    return match.group(1).decode() if match else None


class LedgerReading:
    """What the ledger and its read-only views share: the Merkle tree over the store's leaves,
    the patient heads (newest event of each patient), reads, proofs and back-link walks.

    The tree grows in place while other threads read it (request handlers read from worker
    threads), so :attr:`size` is published only after the tree is complete up to it, and
    every read works at a size no larger than the published one.
    """

    def __init__(self, store: LedgerStore) -> None:
        self._store = store
        self._tree = MerkleTree(store.leaf_hashes())
        self._heads: dict[str, int] = {}
        self._heads.update(patient_heads(store.scan(), 0))
        self._size = self._tree.size

    def _grow(self, hashes: bytes, heads: dict[str, int]) -> None:
        """Extend the tree by ``hashes`` (already durable) and move the patients' heads."""
        self._tree.extend(hashes)
        self._size = self._tree.size
        self._heads.update(heads)

    @property
    def size(self) -> int:
        return self._size

    def read(self, index: int) -> LedgerEntry:
        if not 0 <= index < self._size:
            raise LedgerError(f"no entry at index {index} (the ledger holds {self._size})")
        return read_entry(self._store, index)

    def read_range(self, start: int, stop: int) -> list[LedgerEntry]:
        """Entries ``start`` (inclusive) to ``stop`` (exclusive), in one store read: for
        scans (reconciliation, audit searches), which one read per entry made slow."""
        return self.read_range_matching(start, stop, _every_leaf)

    def read_range_matching(
        self, start: int, stop: int, may_match: Callable[[bytes], bool]
    ) -> list[LedgerEntry]:
        """The entries ``start`` to ``stop`` whose leaf bytes ``may_match`` accepts, parsed, in
        one store read: for scans that look for a few entries among many (the intent
        reconciler). The others are read and checked by the store as :meth:`read_range`
        does (a PostgreSQL leaf against its hash) but never parsed. ``may_match`` must accept
        every leaf the caller could want: a false positive costs a parse, a false negative
        loses an entry."""
        if not 0 <= start <= stop <= self._size:
            raise LedgerError(f"no entries {start}..{stop} (the ledger holds {self._size})")
        leaves = self._store.read(start, stop)
        return [
            LedgerEntry(index=start + offset, leaf=leaf, document=json.loads(leaf))
            for offset, leaf in enumerate(leaves)
            if may_match(leaf)
        ]

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return self._tree.inclusion_proof(index, self._size if size is None else size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        return self._tree.consistency_proof(old_size, new_size)

    def root(self, size: int | None = None) -> bytes:
        return self._tree.root(self._size if size is None else size)

    def leaf_hash(self, index: int) -> bytes:
        return self._tree.leaf_hash_at(index)

    def patient_head(self, patient: str) -> int | None:
        return self._heads.get(patient)

    def patient_chain(self, patient: str) -> Iterator[ReportEvent]:
        """The patient's events, newest first, by following the back-links."""
        yield from walk_patient_chain(self._store, self._heads.get(patient), patient)


def patient_heads(leaves: Iterable[bytes], first: int) -> dict[str, int]:
    """The newest index of each patient among ``leaves`` (the first at index ``first``)."""
    heads: dict[str, int] = {}
    for index, leaf in enumerate(leaves, first):
        patient = patient_of_leaf(leaf)
        if patient is not None:
            heads[patient] = index
    return heads


def check_matches_checkpoint(tree: MerkleTree, size: int, checkpoint: Checkpoint) -> None:
    """Raise :class:`LedgerTampered` unless the first ``size`` entries extend ``checkpoint``:
    never extend (sign, or serve proofs of) a history that differs from one already signed."""
    if checkpoint.size > size:
        raise LedgerTampered(
            size,
            TamperKind.TRUNCATED,
            f"the store holds {size} entries but a checkpoint was signed at size {checkpoint.size}",
        )
    if tree.root(checkpoint.size) != checkpoint.root_hash:
        raise LedgerTampered(
            0,
            TamperKind.FORKED,
            f"the entries do not match the checkpoint signed at size {checkpoint.size}",
        )


class Ledger(LedgerReading):
    """The audit ledger over a :class:`~phivault.ledger.ports.LedgerStore`.

    Build it with :func:`open_ledger`. Appends and checkpoints run on the event loop of the
    caller; blocking I/O runs in one dedicated thread, which also keeps writes in order.
    """

    def __init__(
        self,
        store: LedgerStore,
        signer: NoteSigner,
        origin: str,
        settings: LedgerSettings,
    ) -> None:
        super().__init__(store)
        self._signer = signer
        self.origin = origin
        self._settings = settings
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-io")
        self._last_hash = (
            self._tree.leaf_hash_at(self._tree.size - 1) if self._tree.size else _ZERO_HASH
        )
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._checkpoint_timer: asyncio.TimerHandle | None = None
        self._checkpoint_lock = asyncio.Lock()
        self._background: set[asyncio.Future[None]] = set()
        self._closed = False
        self.batches_committed = 0  # group commits so far (one fsync each), for metrics
        self.checkpoint_failure: LedgerError | None = None  # the last background failure
        notes = store.checkpoints()
        self._last_checkpoint: Checkpoint | None = (
            unverified_checkpoint(notes[-1]) if notes else None
        )
        if self._last_checkpoint is not None:
            check_matches_checkpoint(self._tree, self._tree.size, self._last_checkpoint)

    # -- opening ----------------------------------------------------------------------------

    @property
    def recovery(self) -> TornTailRecovery | None:
        """What opening cut from a torn tail after a crash, if anything."""
        return self._store.recovery

    async def refresh(self) -> None:
        """Nothing to do: this ledger is the only writer, so it is always current. (Readers
        call ``refresh()`` on any :class:`~phivault.ledger.ports.LedgerReader`.)"""

    # -- appending --------------------------------------------------------------------------

    async def record(self, event: AuditEvent) -> int:
        """Append ``event`` durably; return its index. Raises LedgerUnavailable if it cannot."""
        # The model's grammars make its document plain (see canonical_json_of_plain_document).
        return await self._enqueue(event.to_document(), plain=True)

    async def record_document(self, document: dict[str, Any]) -> int:
        """Append an event document from elsewhere; it is canonicalized with every check."""
        for field in LEDGER_FIELDS:
            if field in document:
                raise LedgerError(f"an event document may not set the ledger field {field!r}")
        return await self._enqueue(document, plain=False)

    async def record_documents(self, documents: Sequence[tuple[dict[str, Any], bool]]) -> int:
        """Append several event documents in one group commit, in order; return the first's
        index (the others follow it). For the sequencer: one future for the lot, where a
        ``record_document`` call each cost a task and a future per event.

        Each comes with ``plain``: True only if the caller vouches that
        :func:`~phivault.ledger.canonical.canonical_json_of_plain_document` writes its JCS
        bytes with the ledger's fields added; False encodes it with every check, as
        :meth:`record_document` does. All or none are durable when this returns or raises.
        """
        if not documents:
            raise LedgerError("nothing to append")
        for document, _plain in documents:
            for field in LEDGER_FIELDS:
                if field in document:
                    raise LedgerError(f"an event document may not set the ledger field {field!r}")
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # Queued together, so one flush takes them all: one INSERT, one transaction. The
        # shared future is settled by the first of them (its index, or the batch's failure).
        self._pending.extend((document, plain, future) for document, plain in documents)
        self._schedule_checkpoint()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _enqueue(self, document: dict[str, Any], *, plain: bool) -> int:
        if self._closed:
            raise LedgerUnavailable("the ledger is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((document, plain, future))
        self._schedule_checkpoint()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        window = self._settings.group_commit_window_s
        while self._pending:
            if window:
                await asyncio.sleep(window)
            batch, self._pending = self._pending, []
            leaves, heads, last_hash = self._encode(batch)
            try:
                hashes = await self._appended(loop, leaves)
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, LedgerUnavailable)
                    else LedgerUnavailable(f"cannot append to the ledger: {type(exc).__name__}")
                )
                for _doc, _plain, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            first = self._tree.size
            self.batches_committed += 1
            self._grow(hashes, heads)
            self._last_hash = last_hash
            for offset, (_doc, _plain, future) in enumerate(batch):
                if not future.done():
                    future.set_result(first + offset)
            if self._last_checkpoint is None or self._last_checkpoint.size < self._tree.size:
                self._schedule_checkpoint()  # if the timer fired before this batch was durable

    def _appended(
        self, loop: asyncio.AbstractEventLoop, leaves: list[bytes]
    ) -> asyncio.Future[bytes]:
        """``self._store.append(leaves)`` on the I/O thread, as a future of this loop that
        the thread settles itself (one ``call_soon_threadsafe``): ``run_in_executor``
        chains the executor's future to an asyncio one, which cost each group commit about
        forty calls on the event loop. As with the executor, an append that has begun runs
        to its end, and one whose flusher was cancelled before it began is skipped."""
        future: asyncio.Future[bytes] = loop.create_future()
        self._io.submit(run_and_settle, loop, future, partial(self._store.append, leaves))
        return future

    def _encode(self, batch: list[_Pending]) -> tuple[list[bytes], dict[str, int], bytes]:
        """Assign indexes and ledger fields; nothing in ``self`` changes until it is durable."""
        index = self._tree.size
        heads: dict[str, int] = {}
        prev_hash = self._last_hash
        leaves: list[bytes] = []
        for document, plain, _future in batch:
            encode = canonical_json_of_plain_document if plain else canonical_json
            doc = dict(document)
            doc["seq"] = index
            doc["chain"] = base64.b64encode(prev_hash).decode("ascii")
            patient = doc.get("patient")
            if patient is not None:
                prev = heads.get(patient, self._heads.get(patient))
                if prev is not None:
                    doc["patient_prev"] = prev
                heads[patient] = index
            leaf = encode(doc)
            leaves.append(leaf)
            prev_hash = leaf_hash(leaf)
            index += 1
        return leaves, heads, prev_hash

    # -- checkpoints ------------------------------------------------------------------------

    def _schedule_checkpoint(self) -> None:
        # Called when an event arrives and again after each commit: the timer runs from the
        # earliest event not yet covered, and leaves a tenth of the interval for signing and
        # storing, so the covering checkpoint exists within the interval of the arrival.
        if self._checkpoint_timer is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._checkpoint_timer = loop.call_later(
                self._settings.checkpoint_interval_s * 0.9, self._checkpoint_due
            )

    def _checkpoint_due(self) -> None:
        self._checkpoint_timer = None
        task = asyncio.ensure_future(self._checkpoint_in_background())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _checkpoint_in_background(self) -> None:
        # A timer-driven checkpoint that fails must not fail the appends that triggered it,
        # but it must not vanish either: it is kept for health checks and metrics, and the
        # next append schedules another attempt. `verify` reports how far checkpoints reach.
        try:
            await self.checkpoint()
        except LedgerError as exc:
            self.checkpoint_failure = exc
        else:
            self.checkpoint_failure = None

    async def checkpoint(self) -> str:
        """Sign and store a checkpoint covering every durable entry; return the note."""
        async with self._checkpoint_lock:
            size = self._tree.size
            last = self._last_checkpoint
            if last is not None and last.size == size:
                return self._store.checkpoints()[-1]
            root = self._tree.root(size)
            if last is not None and last.size == 0:
                # RFC 9162 has no consistency proof from the empty tree: any tree extends it.
                if last.root_hash != EMPTY_ROOT:
                    raise LedgerTampered(
                        0, TamperKind.FORKED, "the empty checkpoint has a bad root"
                    )
            elif last is not None:
                proof = self._tree.consistency_proof(last.size, size)
                verify_consistency(last.size, size, proof, last.root_hash, root)
            checkpoint = Checkpoint(origin=self.origin, size=size, root_hash=root)
            note = sign_checkpoint(checkpoint, self._signer)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._io, self._store.add_checkpoint, note)
            self._last_checkpoint = checkpoint
            return note

    @property
    def latest_checkpoint(self) -> Checkpoint | None:
        return self._last_checkpoint

    def checkpoint_notes(self) -> list[str]:
        return self._store.checkpoints()

    # -- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop taking events, finish the ones already taken, sign a final checkpoint."""
        if self._closed:
            return
        self._closed = True  # first: nothing may start a flusher this method does not await
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
            self._checkpoint_timer = None
        for task in list(self._background):
            await asyncio.gather(task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        try:
            # Leave nothing unsigned behind; a failure here is reported to the caller.
            if self._tree.size:
                await self.checkpoint()
        finally:
            await loop.run_in_executor(self._io, self._store.close)
            self._io.shutdown(wait=True)


def read_entry(store: LedgerStore, index: int) -> LedgerEntry:
    if not 0 <= index < store.size():
        raise LedgerError(f"no entry at index {index} (the ledger holds {store.size()})")
    (leaf,) = store.read(index, index + 1)
    return LedgerEntry(index=index, leaf=leaf, document=json.loads(leaf))


@contextlib.asynccontextmanager
async def open_ledger_on(
    open_store: Callable[[], LedgerStore],
    signer: NoteSigner,
    origin: str,
    settings: LedgerSettings | None = None,
    *,
    on_recovery: Callable[[TornTailRecovery], None] | None = None,
) -> AsyncIterator[Ledger]:
    """Open a ledger on any store (file, PostgreSQL, ...); close it (final checkpoint) after.

    Opening reads every leaf (tree, patient heads), so it runs off the event loop.
    """
    settings = settings or LedgerSettings()
    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(None, open_store)
    try:
        ledger = await loop.run_in_executor(None, Ledger, store, signer, origin, settings)
    except BaseException:
        store.close()
        raise
    if ledger.recovery is not None and on_recovery is not None:
        on_recovery(ledger.recovery)
    try:
        yield ledger
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def open_ledger(
    data_dir: DataDir,
    settings: LedgerSettings | None = None,
    *,
    on_recovery: Callable[[TornTailRecovery], None] | None = None,
) -> AsyncIterator[Ledger]:
    """Open the embedded ledger of ``data_dir`` for writing (one writer per data directory)."""
    signer = Ed25519NoteSigner.load(signer_path(data_dir))
    async with open_ledger_on(
        lambda: FileLedgerStore(data_dir.ledger_dir, writable=True),
        signer,
        data_dir.origin,
        settings,
        on_recovery=on_recovery,
    ) as ledger:
        yield ledger


@contextlib.contextmanager
def open_ledger_readonly(data_dir: DataDir) -> Iterator[FileLedgerStore]:
    """Open the store for reading beside a running writer (verify, report, export, prove)."""
    store = FileLedgerStore(data_dir.ledger_dir, writable=False)
    try:
        yield store
    finally:
        store.close()


def _conforms(ledger: Ledger) -> LedgerReader:
    """Type-checks that the ledger implements the reader port (mypy fails here if it drifts)."""
    return ledger


def _every_leaf(_leaf: bytes) -> bool:
    return True
