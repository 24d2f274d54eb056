"""AuditEvents served read-only from the ledger: who saw which record, for those allowed to ask.

Why here, beside the records repository: an audit event says that a person looked at a
patient's record, which is itself PHI (``access.vocabulary.PHI_OPERATIONS``). So reading the
trail is decided by the same policy (the ``audit-events`` operation: privacy officers and
auditors; ``own-access-report``: a patient, for events about themselves), is tenant-isolated,
and is recorded in the ledger like any disclosure, before anything is returned.

The ledger is the only source: nothing is copied into the records database. A search by
patient follows that patient's back-link chain (newest first, each step checked by the
ledger); a search without a patient walks the ledger backwards from its newest entry, at most
:data:`MAX_SCAN` entries per page, and says so when it stops early.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import anyio.to_thread

from phivault.access.decision import CompiledPolicy, allows_operation, scopes_allow
from phivault.access.vocabulary import Operation
from phivault.errors import InvalidInput
from phivault.identity.scopes import Permission
from phivault.ledger.access_report import build_access_report
from phivault.ledger.events import Action, AuditEvent, Entity, EventKind, Outcome
from phivault.ledger.fhir import audit_event_to_fhir
from phivault.records.errors import AccessDenied, RecordNotFound
from phivault.records.results import Caller
from phivault.records.search_params import DateRange, date_range

if TYPE_CHECKING:
    from phivault.ledger.ports import LedgerReader

__all__ = ["MAX_SCAN", "AuditEventPage", "AuditEventQuery", "AuditEventReader", "parse_audit_query"]

#: How many ledger entries a search without a patient examines per page at most.
MAX_SCAN: Final = 50_000
_PREFIXES: Final = ("eq", "ne", "gt", "lt", "ge", "le")
_ID_PREFIX: Final = "ledger-"
_SCAN_CHUNK: Final = 512  # ledger entries read at once when walking back


@dataclass(frozen=True, slots=True)
class AuditEventQuery:
    """``GET /fhir/AuditEvent?patient=&agent=&date=``: every criterion optional."""

    patient: str | None = None
    agent: str | None = None
    dates: tuple[tuple[str, DateRange], ...] = ()
    count: int = 50


@dataclass(frozen=True, slots=True)
class AuditEventPage:
    """Matches newest first, as FHIR AuditEvents; ``next_before``: the ledger index to continue
    below (None: no more); ``scan_limited``: the walk stopped at :data:`MAX_SCAN`."""

    events: list[dict[str, Any]]
    next_before: int | None
    scan_limited: bool = False


def parse_audit_query(pairs: list[tuple[str, str]]) -> tuple[AuditEventQuery, int | None]:
    """Parse search parameters; returns the query and the ``_before`` paging cursor."""
    patient = agent = None
    dates: list[tuple[str, DateRange]] = []
    count = 50
    before: int | None = None
    for name, value in pairs:
        if name == "patient":
            patient = value.removeprefix("Patient/")
            if not patient or "/" in patient:
                raise InvalidInput("must be a Patient id or reference", path="patient")
        elif name == "agent":
            agent = value
        elif name == "date":
            prefix = value[:2] if value[:2] in _PREFIXES else "eq"
            text = value[2:] if value[:2] in _PREFIXES else value
            dates.append((prefix, date_range(text, path="date")))
        elif name == "_count":
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise InvalidInput("must be a number from 1 to 1000", path="_count")
            count = int(value)
        elif name == "_before":
            if not value.isdigit():
                raise InvalidInput("must be a ledger index", path="_before")
            before = int(value)
        elif name not in ("_format", "_pretty"):
            # Never the caller's parameter name: it could be anything they typed.
            raise InvalidInput(
                "unknown search parameter (AuditEvent supports patient, agent, date, _count)",
                path="(parameter)",
            )
    return AuditEventQuery(patient, agent, tuple(dates), count), before


class AuditEventReader:
    """Reads and searches the ledger as FHIR AuditEvents, decided and audited."""

    def __init__(
        self, ledger: LedgerReader, policy: CompiledPolicy, *, clock: Callable[[], float]
    ) -> None:
        # The embedded ledger, or (scaled shape) a view of the sequencer's ledger, refreshed
        # before each answer so that it includes every event committed so far.
        self._ledger = ledger
        self._policy = policy
        self._clock = clock

    async def read(self, caller: Caller, event_id: str) -> dict[str, Any]:
        """``GET /fhir/AuditEvent/ledger-<n>``; 404 for anything the caller may not see."""
        await self._ledger.refresh()
        index = _index_of(event_id)
        if index is None or index >= self._ledger.size:
            await self._record(caller, "read", (), outcome_reason="not-found")
            raise RecordNotFound("AuditEvent", event_id if index is not None else "?")
        entry = await anyio.to_thread.run_sync(self._ledger.read, index)
        event = entry.event
        if not self._may_see(caller, event):
            await self._record(caller, "read", (), outcome_reason="not-permitted")
            raise RecordNotFound("AuditEvent", event_id)
        await self._record(caller, "read", (index,), patient=event.patient)
        return audit_event_to_fhir(event, index=index, patient_prev=entry.patient_prev)

    async def search(
        self, caller: Caller, query: AuditEventQuery, *, before: int | None = None
    ) -> AuditEventPage:
        """Events matching ``query``, newest first, that the caller may see."""
        access = caller.access
        if not _scoped(caller, Permission.SEARCH):
            await self._record(caller, "search", (), outcome_reason="scope-not-granted")
            raise AccessDenied("the token's scopes do not grant searching AuditEvent")
        auditor = allows_operation(self._policy, access, Operation.AUDIT_EVENTS)
        patient = query.patient
        if not auditor:
            own = access.fhir_user.removeprefix("Patient/") if access.fhir_user else None
            own_allowed = own is not None and allows_operation(
                self._policy, access, Operation.OWN_ACCESS_REPORT, patient=own
            )
            if not own_allowed or (patient is not None and patient != own):
                await self._record(caller, "search", (), outcome_reason="not-permitted")
                raise AccessDenied("searching audit events is not allowed for this caller")
            patient = own
        await self._ledger.refresh()
        page = await anyio.to_thread.run_sync(self._search, caller, query, patient, before)
        indexes = tuple(int(e["id"].removeprefix(_ID_PREFIX)) for e in page.events)
        await self._record(
            caller,
            "search",
            indexes,
            patient=None if patient is None else f"Patient/{patient}",
        )
        return page

    async def access_report(
        self,
        caller: Caller,
        patient: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> dict[str, Any]:
        """``$access-report``: the patient's accounting of disclosures, provable offline
        (:mod:`phivault.ledger.access_report`). Privacy officers for any patient; a patient
        for themselves. The report itself is a disclosure: recorded before it is answered."""
        access = caller.access
        allowed = _scoped(caller, Permission.READ, patient) and (
            allows_operation(self._policy, access, Operation.ACCESS_REPORTS)
            or allows_operation(self._policy, access, Operation.OWN_ACCESS_REPORT, patient=patient)
        )
        reference = f"Patient/{patient}"
        if not allowed:
            await self._record(caller, "access-report", (), outcome_reason="not-permitted")
            raise AccessDenied("this caller may not have this patient's access report")
        await self._ledger.refresh()
        await self._ledger.checkpoint()  # cover every event up to now

        def build() -> dict[str, Any]:
            notes = self._ledger.checkpoint_notes()
            return build_access_report(
                list(self._ledger.patient_chain(reference)),
                patient=reference,
                tenant=access.tenant,
                checkpoint_note=notes[-1],
                proof_of=self._ledger.inclusion_proof,
                start=start,
                end=end,
            )

        report = await anyio.to_thread.run_sync(build)
        shown = tuple(
            int(e["resource"]["id"].removeprefix(_ID_PREFIX)) for e in report["entry"][1:]
        )
        await self._record(caller, "access-report", shown, patient=reference)
        return report

    # --- internals -------------------------------------------------------------------------

    def _may_see(self, caller: Caller, event: AuditEvent) -> bool:
        access = caller.access
        about = None if event.patient is None else event.patient.removeprefix("Patient/")
        if event.tenant != access.tenant or not _scoped(caller, Permission.READ, about):
            return False
        if allows_operation(self._policy, access, Operation.AUDIT_EVENTS):
            return True
        if event.patient is None:
            return False
        return allows_operation(
            self._policy,
            access,
            Operation.OWN_ACCESS_REPORT,
            patient=event.patient.removeprefix("Patient/"),
        )

    def _search(
        self, caller: Caller, query: AuditEventQuery, patient: str | None, before: int | None
    ) -> AuditEventPage:
        """Runs on a worker thread: it reads ledger files."""
        found: list[dict[str, Any]] = []
        for scanned, (index, event, prev) in enumerate(self._candidates(patient, before), start=1):
            if self._matches(caller, event, query):
                found.append(audit_event_to_fhir(event, index=index, patient_prev=prev))
                if len(found) > query.count:
                    break
            if patient is None and scanned >= MAX_SCAN:
                more = index > 0
                return AuditEventPage(found[: query.count], index if more else None, more)
        if len(found) > query.count:
            next_before = int(found[query.count - 1]["id"].removeprefix(_ID_PREFIX))
            return AuditEventPage(found[: query.count], next_before)
        return AuditEventPage(found, None)

    def _candidates(
        self, patient: str | None, before: int | None
    ) -> Iterator[tuple[int, AuditEvent, int | None]]:
        if patient is not None:
            for item in self._ledger.patient_chain(f"Patient/{patient}"):
                if before is not None and item.index >= before:
                    continue
                document = {k: v for k, v in item.document.items() if k not in _LEDGER_FIELDS}
                prev = item.document.get("patient_prev")
                yield item.index, AuditEvent.from_document(document), prev
            return
        stop = self._ledger.size if before is None else min(before, self._ledger.size)
        while stop > 0:  # newest first, a chunk at a time
            start = max(0, stop - _SCAN_CHUNK)
            for entry in reversed(self._ledger.read_range(start, stop)):
                yield entry.index, entry.event, entry.patient_prev
            stop = start

    def _matches(self, caller: Caller, event: AuditEvent, query: AuditEventQuery) -> bool:
        if not self._may_see(caller, event):
            return False
        if query.patient is not None and event.patient != f"Patient/{query.patient}":
            return False
        if query.agent is not None and not any(
            query.agent in (a.who, a.client_id) for a in event.agents
        ):
            return False
        return all(_date_matches(prefix, wanted, event.recorded) for prefix, wanted in query.dates)

    async def _record(
        self,
        caller: Caller,
        subtype: str,
        indexes: tuple[int, ...],
        *,
        patient: str | None = None,
        outcome_reason: str | None = None,
    ) -> None:
        """Reading the trail is a disclosure too: recorded before the answer leaves."""
        event = caller.audit.event(
            kind=EventKind.REST,
            subtype=subtype,
            action=Action.READ if subtype == "read" else Action.EXECUTE,
            outcome=Outcome.SUCCESS if outcome_reason is None else Outcome.MINOR_FAILURE,
            outcome_reason=outcome_reason,
            patient=patient,
            entities=tuple(Entity(what=f"AuditEvent/{_ID_PREFIX}{i}") for i in indexes),
        )
        await caller.audit.record(event)


_LEDGER_FIELDS: Final = ("seq", "chain", "patient_prev")


def _scoped(caller: Caller, permission: Permission, patient: str | None = None) -> bool:
    """The token's SMART scopes must grant AuditEvent too: scopes narrow, never widen."""
    return scopes_allow(caller.access, "AuditEvent", permission, patient)


def _index_of(event_id: str) -> int | None:
    digits = event_id.removeprefix(_ID_PREFIX)
    if event_id == digits or not digits.isdigit() or len(digits) > 15:
        return None
    return int(digits)


def _date_matches(prefix: str, wanted: DateRange, recorded: datetime) -> bool:
    """FHIR date prefixes on an instant against the range a date covers (open ends match)."""
    low, high = wanted.low, wanted.high
    inside = (low is None or recorded >= low) and (high is None or recorded < high)
    if prefix == "eq":
        return inside
    if prefix == "ne":
        return not inside
    if prefix == "ge":
        return low is None or recorded >= low
    if prefix == "gt":
        return high is not None and recorded >= high
    if prefix == "le":
        return high is None or recorded < high
    return low is not None and recorded < low  # lt
