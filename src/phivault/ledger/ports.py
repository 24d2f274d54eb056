"""The ledger's ports: small typed interfaces that adapters implement.

* :class:`AuditSink` is what the rest of phivault depends on to record events (the API,
  the records repository, key management). The embedded :class:`~phivault.ledger.Ledger`
  implements it; the scaled shape implements it with a JetStream publisher.
* :class:`LedgerStore` is the durable, append-only storage of leaves and checkpoints under
  the ledger: the embedded file store now, a PostgreSQL store in the scaled shape.
  :class:`RefreshableLedgerStore` is one that a reader can bring up to date with what another
  process appended (:class:`~phivault.ledger.view.LedgerView` reads through it), and
  :class:`VerifiableStore` one that hands every stored leaf, damaged or not, to the verifier.
* :class:`LedgerReader` is what reads the ledger (AuditEvent searches, access reports,
  reconciliation): the embedded :class:`~phivault.ledger.service.Ledger`, or in the scaled
  shape a :class:`~phivault.ledger.view.LedgerView` of the ledger the sequencer writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from phivault.ledger.events import AuditEvent

if TYPE_CHECKING:
    from phivault.ledger.file_store import TornTailRecovery
    from phivault.ledger.report import ReportEvent
    from phivault.ledger.service import LedgerEntry

__all__ = [
    "AuditSink",
    "LedgerReader",
    "LedgerStore",
    "RefreshableLedgerStore",
    "StoreGrowth",
    "VerifiableStore",
]


class AuditSink(Protocol):
    """Records audit events durably. ``record`` returns only when the event is durable.

    Raises :class:`~phivault.ledger.errors.LedgerUnavailable` when it cannot; callers serving
    PHI must then fail closed.
    """

    async def record(self, event: AuditEvent) -> int:
        """Record ``event`` durably; return its ledger index (embedded) or its audit stream
        sequence number (scaled: the sequencer assigns the index later, in that order)."""
        ...


class LedgerStore(Protocol):
    """Durable append-only storage of leaf bytes and signed checkpoint notes.

    Methods block (they do file or network I/O) and are called from a worker thread. The store
    offers no update and no delete.
    """

    @property
    def recovery(self) -> TornTailRecovery | None:
        """What opening cut from a torn tail after a crash (stores that can have one)."""
        ...

    def size(self) -> int:
        """Number of leaves durably stored."""
        ...

    def append(self, leaves: Sequence[bytes]) -> bytes:
        """Append ``leaves`` in order, durably (one fsync); return their leaf hashes.

        The store computes the RFC 9162 leaf hashes itself (it is the source of truth) and
        returns them concatenated, so the ledger can extend its tree without hashing twice.
        """
        ...

    def read(self, start: int, stop: int) -> list[bytes]:
        """Leaves ``start`` (inclusive) to ``stop`` (exclusive)."""
        ...

    def scan(self, start: int = 0) -> Iterator[bytes]:
        """Every leaf from ``start`` on, in order, read from storage (not from a cache)."""
        ...

    def leaf_hashes(self) -> bytes:
        """The concatenated 32-byte leaf hashes of every leaf (a rebuildable cache)."""
        ...

    def checkpoints(self) -> list[str]:
        """Every checkpoint note stored, oldest first."""
        ...

    def add_checkpoint(self, note: str) -> None:
        """Durably store a signed checkpoint note."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StoreGrowth:
    """What a reader's refresh found appended since the last one, from one snapshot.

    ``leaves`` are entries ``first`` .. ``first + len(leaves) - 1`` with their concatenated leaf
    hashes; ``notes`` are the checkpoints stored since (none covers an entry the reader cannot
    see yet).
    """

    first: int
    leaves: list[bytes]
    hashes: bytes
    notes: list[str]


class RefreshableLedgerStore(LedgerStore, Protocol):
    """A store another process writes, which a reader brings up to date incrementally."""

    def refresh(self) -> StoreGrowth:
        """Load what was committed since the last refresh (only the new rows); return it."""
        ...


class VerifiableStore(LedgerStore, Protocol):
    """A store that hands every stored leaf to the verifier, damaged ones included."""

    def raw_frames(self) -> Iterator[tuple[int, bytes | None, str | None]]:
        """(position, leaf or None, damage reason or None) for every stored leaf, in order."""
        ...


class LedgerReader(Protocol):
    """What reads the ledger: exactly what the AuditEvent reader and reconciliation use.

    Reads are blocking (store I/O) and are called from worker threads; ``checkpoint`` and
    ``refresh`` are coroutines. Call ``refresh()`` before a read that must see every event
    committed so far (a view of another process's ledger only sees what it loaded; the
    embedded ledger is always current and does nothing).
    """

    @property
    def size(self) -> int:
        """Entries visible to this reader."""
        ...

    def read(self, index: int) -> LedgerEntry: ...

    def read_range(self, start: int, stop: int) -> list[LedgerEntry]: ...

    def read_range_matching(
        self, start: int, stop: int, may_match: Callable[[bytes], bool]
    ) -> list[LedgerEntry]:
        """Entries ``start`` to ``stop`` whose leaf bytes (canonical JSON) ``may_match``
        accepts; the others are read (and checked) but not parsed."""
        ...

    def patient_chain(self, patient: str) -> Iterator[ReportEvent]:
        """The patient's events, newest first, by following the back-links."""
        ...

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]: ...

    def checkpoint_notes(self) -> list[str]:
        """Every signed checkpoint note this reader holds, oldest first."""
        ...

    async def checkpoint(self) -> str:
        """A signed checkpoint note covering every entry visible when called.

        The embedded ledger signs one; a view waits for the writer's, and raises
        :class:`~phivault.ledger.errors.LedgerUnavailable` if none comes in time.
        """
        ...

    async def refresh(self) -> None:
        """Load what the writer appended since the last refresh."""
        ...
