"""Precise, typed ledger failures. Verification never answers "true-ish": it raises."""

from __future__ import annotations

from enum import StrEnum

from phivault.errors import PhivaultError, StoreUnavailable

__all__ = [
    "InvalidProof",
    "LedgerError",
    "LedgerLocked",
    "LedgerTampered",
    "LedgerUnavailable",
    "TamperKind",
]


class LedgerError(PhivaultError):
    """Base class for ledger errors."""


class LedgerUnavailable(LedgerError, StoreUnavailable):
    """The ledger cannot take events right now (disk full, store down, closed).

    PHI interactions must fail closed on this: no disclosure, no change.
    """


class LedgerLocked(LedgerError):
    """Another process holds the ledger open for writing (one writer per data directory)."""


class TamperKind(StrEnum):
    MODIFIED = "modified"
    MISSING = "missing"
    REORDERED = "reordered"
    TRUNCATED = "truncated"
    FORKED = "forked"
    BAD_SIGNATURE = "bad-signature"


class LedgerTampered(LedgerError):
    """Verification found the ledger altered. ``index`` is the first bad entry index."""

    def __init__(self, index: int, kind: TamperKind, detail: str) -> None:
        super().__init__(f"ledger {kind.value} at index {index}: {detail}")
        self.index = index
        self.kind = kind
        self.detail = detail


class InvalidProof(LedgerError):
    """An inclusion or consistency proof, or a signed note, does not verify."""
