"""The ledger's ports: small typed interfaces that adapters implement.

* :class:`AuditSink` is what the rest of phivault depends on to record events (the API,
  the records repository, key management). The embedded :class:`~phivault.ledger.Ledger`
  implements it; the scaled shape implements it with a JetStream publisher.
* :class:`LedgerStore` is the durable, append-only storage of leaves and checkpoints under
  the ledger: the embedded file store now, a PostgreSQL store in the scaled shape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from phivault.ledger.events import AuditEvent

if TYPE_CHECKING:
    from phivault.ledger.file_store import TornTailRecovery

__all__ = ["AuditSink", "LedgerStore"]


class AuditSink(Protocol):
    """Records audit events durably. ``record`` returns only when the event is durable.

    Raises :class:`~phivault.ledger.errors.LedgerUnavailable` when it cannot; callers serving
    PHI must then fail closed.
    """

    async def record(self, event: AuditEvent) -> int:
        """Record ``event``; return its ledger index once durable."""
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
