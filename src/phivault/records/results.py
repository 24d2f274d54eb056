"""What the records repository takes and gives back: its public value types.

Why a module of its own: callers (the API, the CLI, the reconciler, tests) build a
:class:`Caller` and read :class:`RecordVersion`, :class:`SearchResult` and the Bundle outcomes
without depending on how :class:`~phivault.records.repository.RecordsRepository` decides,
seals and audits. Here: who is asking (:class:`Caller`, the :class:`AuditTrail` port it
records through, the benchmark-only :class:`RecordControls`) and the results (a version as
the caller may see it, search and history pages, write and Bundle outcomes, the reconciler's
:class:`ReconcileReport`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from phivault.access.decision import AccessContext
from phivault.errors import PhivaultError
from phivault.ledger.events import Action, AuditEvent, Entity, EventKind, Outcome
from phivault.records.query import SearchQuery

__all__ = [
    "AuditTrail",
    "BundleEntryOutcome",
    "BundleOutcome",
    "Caller",
    "HistoryPage",
    "ReconcileReport",
    "RecordControls",
    "RecordVersion",
    "SearchResult",
    "WriteResult",
]


# --- who is asking ------------------------------------------------------------------------


class AuditTrail(Protocol):
    """Builds and records the request's audit events (``phivault.api.context.AuditContext``
    is one): the repository says *what*; the trail knows who, from where, in which request."""

    def event(
        self,
        *,
        kind: EventKind,
        subtype: str,
        action: Action,
        outcome: Outcome = Outcome.SUCCESS,
        outcome_reason: str | None = None,
        patient: str | None = None,
        entities: tuple[Entity, ...] = (),
        purpose_of_use: tuple[str, ...] | None = None,
        break_glass_grant: str | None = None,
    ) -> AuditEvent: ...

    async def record(self, event: AuditEvent) -> int: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """The access context of one request: what the caller may do, and where to record it."""

    access: AccessContext
    audit: AuditTrail


@dataclass(frozen=True, slots=True)
class RecordControls:
    """Benchmark-only switches (``bench/fhir_bench.py`` measures what the controls cost).
    Production settings refuse anything but all-on (``phivault.settings``)."""

    audit: bool = True
    encryption: bool = True
    policy: bool = True

    @property
    def all_on(self) -> bool:
        return self.audit and self.encryption and self.policy


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordVersion:
    """One version as the caller may see it.

    ``resource`` is the FHIR resource with ``id``, ``meta.versionId`` and ``meta.lastUpdated``
    (and ``meta.security`` REDACTED when groups were withheld, then ``redacted`` is true); it
    is None for a tombstone (``deleted``) and for a write whose result the caller may not read.
    """

    resource_type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool = False
    resource: dict[str, Any] | None = field(default=None, repr=False)
    redacted: bool = False

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"

    @property
    def versioned_reference(self) -> str:
        return f"{self.resource_type}/{self.id}/_history/{self.version}"

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


@dataclass(frozen=True, slots=True)
class SearchResult:
    """A page of matches (current versions) and their ``_include``\\d resources."""

    query: SearchQuery
    matches: list[RecordVersion]
    included: list[RecordVersion]
    offset: int
    next_offset: int | None
    total: int | None


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Versions newest first (tombstones have ``deleted`` and no resource)."""

    versions: list[RecordVersion]
    offset: int
    count: int
    next_offset: int | None


@dataclass(frozen=True, slots=True)
class WriteResult:
    """``created``: a new resource (201); false for an update, or for a create whose
    ``If-None-Exist`` matched an existing resource (200, nothing written)."""

    record: RecordVersion
    created: bool


@dataclass(frozen=True, slots=True)
class BundleEntryOutcome:
    """What happened to one entry of a batch or transaction, in the Bundle's order.

    ``status`` is the HTTP status of the entry; exactly one of ``record`` (read, vread, writes),
    ``search`` (a GET search entry) or ``error`` (batch entries that failed) is set, except for
    deletes, which may carry none.
    """

    index: int
    status: int
    record: RecordVersion | None = None
    search: SearchResult | None = None
    error: PhivaultError | None = None


@dataclass(frozen=True, slots=True)
class BundleOutcome:
    kind: str  # "transaction" or "batch"
    entries: list[BundleEntryOutcome]


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What :meth:`RecordsRepository.reconcile` found: intents settled either way."""

    scanned_from: int
    scanned_to: int
    committed: int
    absent: int
