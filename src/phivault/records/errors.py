"""The records repository's errors, and the HTTP status of each.

Why a module of its own: the API (``phivault.api.fhir``) maps them to responses and the
tests raise and catch them without needing the repository's machinery; they are part of the
records core's public surface, beside the store's own (:mod:`phivault.records.store.ports`).
Messages carry ids and paths, never values (invariant: no PHI in errors). :func:`http_status`
gives the status of any records error (batch entries, the API's error map).
"""

from __future__ import annotations

from typing import Final

from phivault.errors import InvalidInput, PhivaultError, StoreUnavailable
from phivault.records.bundles import AmbiguousReference, PreconditionFailed
from phivault.records.classification import UnsupportedResourceType
from phivault.records.store.ports import VersionConflict

__all__ = [
    "AccessDenied",
    "IfMatchFailed",
    "IntegrityFailure",
    "RecordGone",
    "RecordNotFound",
    "TransactionConflict",
    "http_status",
]


# --- errors (the API maps each to a status; messages carry ids and paths, never values) --


class RecordNotFound(PhivaultError):
    """404: no such resource, *or* one the caller may not see (the answer is the same)."""

    def __init__(self, resource_type: str, resource_id: str, version: str | None = None) -> None:
        what = f"{resource_type}/{resource_id}" + (f"/_history/{version}" if version else "")
        super().__init__(f"{what} is not known")


class RecordGone(PhivaultError):
    """410: the resource (or that version) was deleted."""

    def __init__(self, resource_type: str, resource_id: str, version: int) -> None:
        super().__init__(f"{resource_type}/{resource_id} was deleted (version {version})")
        self.version = version


class AccessDenied(PhivaultError):
    """403: the caller may not perform this interaction on this type (or write these element
    groups). Never raised for a *specific* resource the caller may not see: that is a 404."""


class IfMatchFailed(PhivaultError):
    """412: ``If-Match`` names a version that is not the current one."""


class TransactionConflict(PhivaultError):
    """409: a concurrent write changed what this transaction was planned on; retry it."""


class IntegrityFailure(PhivaultError):
    """500: a stored element failed its integrity check (tampered or mis-keyed ciphertext).
    Nothing of that resource is disclosed; the event is in the ledger."""


def http_status(exc: BaseException) -> int:
    """The HTTP status of a records error (for batch entries and the API's error map)."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


_STATUS: Final[tuple[tuple[type[BaseException], int], ...]] = (
    (RecordNotFound, 404),
    (RecordGone, 410),
    (AccessDenied, 403),
    (IfMatchFailed, 412),
    (TransactionConflict, 409),
    (VersionConflict, 409),
    (PreconditionFailed, 412),
    (AmbiguousReference, 412),
    (UnsupportedResourceType, 404),
    (IntegrityFailure, 500),
    (InvalidInput, 400),
    (StoreUnavailable, 503),
)
