"""The records repository: the only way to reach PHI, always with an access context.

Why one door (Cosmic Python's repository; STYLE.md habit 1): every FHIR interaction -- read,
vread, search, history, create, update, delete, batch and transaction -- comes through a
:class:`RecordsRepository` method that takes a :class:`Caller`. Each method

1. decides access with the access policy (``phivault.access.decision``): tenant isolation,
   roles, relationships, purpose of use and the token's SMART scopes; searches and type
   histories are scoped **in SQL** (:class:`PolicyScope`), single resources are decided on
   their clear envelope;
2. opens only the element groups the decision allows (the others are never decrypted);
3. records the audit event and waits until it is durable, **before** any plaintext leaves
   (reads) or any change is committed (writes: an *intent* event before the commit and an
   *outcome* event after it; :func:`reconcile` settles intents a crash left open);
4. hands every decrypted PHI value to the request's scrubber (:func:`phivault.privacy.scrub.
   taint`) so that no log line can carry it.

Storage calls are synchronous (SQLAlchemy) and run on worker threads; no database
transaction is held across an ``await`` (a write re-checks the version it was based on, by
compare-and-swap, when it commits).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import hashlib
import re
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pydantic import ValidationError
from sqlalchemy import ColumnElement, FromClause, and_, false, or_, true

from phivault.access.decision import (
    CompiledPolicy,
    Decision,
    RelationshipFacts,
    SearchScope,
    allows_operation,
    decide,
    search_scope,
)
from phivault.access.vocabulary import Interaction, Operation, Relationship
from phivault.crypto.blind_index import BlindIndexer
from phivault.crypto.errors import DecryptionFailed
from phivault.crypto.keyring import KeyRing
from phivault.errors import ConfigurationError, InvalidInput, PhivaultError
from phivault.ledger.events import (
    Action,
    Agent,
    AuditEvent,
    Entity,
    EntityRole,
    EventKind,
    Outcome,
    Source,
)
from phivault.ledger.idempotency import idempotency_key
from phivault.privacy.scrub import taint_tree
from phivault.records.bundles import (
    BatchPlan,
    ConditionalLookup,
    InvalidBundle,
    Method,
    PlannedEntry,
    PreconditionFailed,
    TransactionPlan,
    parse_conditional,
    plan_batch,
    plan_transaction,
)
from phivault.records.bundles import Outcome as PlanOutcome
from phivault.records.classification import Classification, ElementGroup, default_classification
from phivault.records.errors import (
    AccessDenied,
    IfMatchFailed,
    IntegrityFailure,
    RecordGone,
    RecordNotFound,
    TransactionConflict,
    http_status,
)
from phivault.records.query import Include, SearchQuery
from phivault.records.results import (
    BundleEntryOutcome,
    BundleOutcome,
    Caller,
    HistoryPage,
    ReconcileReport,
    RecordControls,
    RecordVersion,
    SearchResult,
    WriteResult,
)
from phivault.records.search_params import index_entries, patient_of, search_param
from phivault.records.split import Envelope, GroupContent, assemble, group_element_ref, split
from phivault.records.storage_threads import (
    ReadOutcome,
    _blocking,
    _PointReads,
    _ReadBatches,
    _reading,
    _WriteBatches,
)
from phivault.records.store.ports import (
    DIRECTORY_SUBJECT,
    IntentClaim,
    IntentSettled,
    NewVersion,
    ReadClass,
    RecordStore,
    RecordUnitOfWork,
    ResourceKey,
    StoredVersion,
    VersionConflict,
    blind_terms,
)
from phivault.records.store.routing import PRIMARY as PRIMARY_NODE
from phivault.records.store.search import CareRelationshipScope

if TYPE_CHECKING:
    from phivault.ledger.ports import AuditSink, LedgerReader

__all__ = ["RecordsRepository"]


# --- access in SQL --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyScope:
    """A :class:`~phivault.access.decision.SearchScope` compiled into a SQL predicate over the
    current-version (or version) table: exactly the rows ``SearchScope.admits`` admits, so
    searches, totals, paging, ``_include`` and histories never see anything else.

    A scope narrowed to the launch patient (only ``patient/`` SMART scopes grant the
    interaction) admits rows of at most two key subjects, that patient and the directory.
    When every clause can be judged for those two subjects here, without the database (a
    tenant-wide role, the caller's own compartment, break-glass grants without a care
    relationship to weigh), the predicate is that judgement: ``key_subject = :patient`` for
    a patient's own app instead of the clauses ANDed with the compartment test. Same rows;
    the shorter expression costs a search less to build, to key in SQLAlchemy's statement
    cache and to evaluate (``docs/decisions/access-policy.md``)."""

    scope: SearchScope
    practitioner: tuple[str, str] | None

    def predicate(self, resources: FromClause) -> ColumnElement[bool]:
        scope = self.scope
        subject = resources.c.key_subject
        if scope.patient_only and not scope.directory:
            judged = self._judged_subjects()
            if judged is not None:
                if len(judged) == 1:
                    return subject == judged[0]
                return or_(false(), *(subject == s for s in judged))
        has_patient = subject != DIRECTORY_SUBJECT
        admitted: list[ColumnElement[bool]] = []
        for clause in scope.clauses:
            if scope.directory:
                if clause.by_relationship:
                    admitted.append(true())
                continue
            related = self._related(clause.relationship, resources)
            if clause.by_relationship and related is not None:
                admitted.append(related)
            if clause.granted:
                granted = and_(has_patient, subject.in_(sorted(clause.granted)))
                # A grant stands in only where the relationship does not hold: a related
                # caller is judged by the purposes claimed, grant or no grant (``decide``).
                if not clause.by_relationship and related is not None:
                    granted = and_(granted, ~related)
                admitted.append(granted)
        predicate = or_(false(), *admitted)
        if scope.patient_only:
            context = [] if scope.patient_context is None else [subject == scope.patient_context]
            predicate = and_(predicate, or_(~has_patient, *context))
        return predicate

    def _judged_subjects(self) -> tuple[str, ...] | None:
        """For a scope narrowed to the launch patient (``patient_only``, a patient type): the
        key subjects it admits, of the two it can (the launch patient, the directory), when
        every clause can be judged for both without the database; None when some clause
        needs the database (a care relationship of the launch patient)."""
        scope = self.scope
        context = scope.patient_context
        if context == DIRECTORY_SUBJECT:  # no patient has that id: the directory alone
            context = None
        at_patient = at_directory = False
        for clause in scope.clauses:
            required = clause.relationship
            # whether the relationship holds for the launch patient (None: ask the database)
            related: bool | None
            if required is Relationship.TENANT:
                related = True
            elif required is Relationship.OWN and self._own_patient() is not None:
                related = context is not None and self._own_patient() == context
            elif required is Relationship.CARE and self.practitioner is not None:
                related = None if context is not None else False
            else:  # no relationship can hold (``_related`` answers None)
                related = False
            exists = required is not None and self._related_exists(required)
            if clause.by_relationship and exists:
                if related is None:
                    return None
                at_patient = at_patient or related
                at_directory = at_directory or required is Relationship.TENANT
            if clause.granted and context in clause.granted:
                if not clause.by_relationship and exists:
                    if related is None:
                        return None
                    at_patient = at_patient or not related
                else:
                    at_patient = True
        judged: list[str] = []
        if at_patient and context is not None:
            judged.append(context)
        if at_directory:
            judged.append(DIRECTORY_SUBJECT)
        return tuple(judged)

    def _own_patient(self) -> str | None:
        """The caller's own patient id; never the directory's subject (no patient has it)."""
        own = self.scope.own_patient
        return None if own == DIRECTORY_SUBJECT else own

    def _related_exists(self, required: Relationship) -> bool:
        """Whether :meth:`_related` gives a predicate (not None) for ``required``."""
        if required is Relationship.TENANT:
            return True
        if required is Relationship.CARE:
            return self.practitioner is not None
        if required is Relationship.OWN:
            return self._own_patient() is not None
        return False

    def _related(
        self, required: Relationship | None, resources: FromClause
    ) -> ColumnElement[bool] | None:
        """Rows whose patient relates to the caller by ``required``; None: none can."""
        subject = resources.c.key_subject
        if required is Relationship.TENANT:
            return true()
        if required is Relationship.CARE and self.practitioner is not None:
            care = _care_predicate(self.practitioner, resources)
            return and_(subject != DIRECTORY_SUBJECT, care)
        own = self._own_patient()
        if required is Relationship.OWN and own is not None:
            return subject == own
        return None


@functools.lru_cache(maxsize=256)
def _care_predicate(practitioner: tuple[str, str], resources: FromClause) -> ColumnElement[bool]:
    """:class:`CareRelationshipScope`'s predicate for one practitioner, built once per
    practitioner and table: building its subqueries cost a clinician's search about 1 ms,
    more than running them. An expression is immutable, so sharing it is safe; the cache
    holds ids (a practitioner's type and id), nothing else."""
    return CareRelationshipScope(*practitioner).predicate(resources)


def practitioner_of(fhir_user: str | None) -> tuple[str, str] | None:
    """``Practitioner/123`` -> ``("Practitioner", "123")``; anything else -> None."""
    if fhir_user is None:
        return None
    kind, sep, ident = fhir_user.partition("/")
    if not sep or kind not in ("Practitioner", "PractitionerRole") or not ident:
        return None
    return kind, ident


def _only_care_admits(scopes: Sequence[PolicyScope], subject: str) -> bool:
    """Whether ``scopes`` (a search's, as :meth:`RecordsRepository._scopes` gives them) can
    admit a row of patient ``subject`` only through the caller's care relationship with that
    patient: then a row it admitted proves the relationship (``SearchScope.admits``)."""
    if subject == DIRECTORY_SUBJECT or len(scopes) != 1:
        return False
    (policy_scope,) = scopes
    scope = policy_scope.scope
    if scope.directory or policy_scope.practitioner is None:
        return False
    care = False
    for clause in scope.clauses:
        if subject in clause.granted:
            return False  # a break-glass grant may have admitted it instead
        if not clause.by_relationship:
            continue
        if clause.relationship is Relationship.CARE:
            care = True
        elif clause.relationship is Relationship.TENANT or (
            clause.relationship is Relationship.OWN and scope.own_patient == subject
        ):
            return False  # admitted without any relationship to weigh
    return care


# --- the repository -------------------------------------------------------------------------

_INTERACTION_ACTION: Final = {
    Interaction.CREATE: Action.CREATE,
    Interaction.UPDATE: Action.UPDATE,
    Interaction.DELETE: Action.DELETE,
}
_Check = tuple[ConditionalLookup, tuple[str, ...]]  # a lookup and what it found
_INTENT: Final = "intent"
_COMMITTED: Final = "committed"
_ROLLED_BACK: Final = "rolled-back"
_SYSTEM_AGENT: Final = "system:phivault"


@dataclass(slots=True)
class _Write:
    """One change to make, prepared (decided, sealed, indexed) outside any transaction."""

    index: int
    interaction: Interaction
    key: ResourceKey
    previous: int | None
    version: int
    last_updated: datetime
    subject: str
    groups: dict[str, bytes] = field(repr=False)
    entries: list[Any] = field(repr=False)
    resource: dict[str, Any] | None = field(repr=False)
    decision: Decision
    created: bool
    checks: tuple[_Check, ...] = ()
    new_id: bool = False  # a POST: an id the server just chose, which nobody else can write

    @property
    def patient(self) -> str | None:
        return None if self.subject == DIRECTORY_SUBJECT else self.subject

    @property
    def what(self) -> str:
        k = self.key
        return f"{k.resource_type}/{k.resource_id}/_history/{self.version}"


@dataclass(frozen=True, slots=True)
class _PointRead:
    """A read or vread waiting for its batch (:meth:`RecordsRepository._serve_reads`)."""

    caller: Caller
    key: ResourceKey
    version: int | None  # None: the current version
    interaction: Interaction


#: What a point read hands back from its storage thread: the version (groups dropped unless
#: allowed), the decision on it (None: not found), and the database nodes that served it.
_Loaded = tuple[StoredVersion | None, Decision | None, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class _EventPart:
    """One patient's share of a write's intent and outcome events."""

    patient: str | None
    entities: tuple[Entity, ...]
    purposes: tuple[str, ...] | None
    grant: str | None


class RecordsRepository:
    """FHIR interactions over the records store, each decided, audited and encrypted.

    Build it once in the composition root (``phivault.api.serve``) around the store, the key
    ring and the compiled policy; every method takes the request's :class:`Caller`.
    """

    def __init__(
        self,
        store: RecordStore,
        keyring: KeyRing,
        policy: CompiledPolicy,
        *,
        clock: Callable[[], float] = time.time,
        classification: Classification | None = None,
        controls: RecordControls = RecordControls(),
        max_bundle_entries: int = 10_000,
        observer: str = "phivault",
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._policy = policy
        self._clock = clock
        self._table = classification or default_classification()
        self._controls = controls
        self._max_entries = max_bundle_entries
        self._observer = observer
        self._settling: set[asyncio.Future[None]] = set()
        # Embedded (SQLite, in this process's memory and page cache): the point reads of
        # one turn of the event loop go to a storage thread together (_ReadBatches).
        self._batched = _ReadBatches() if getattr(store, "dialect", None) == "sqlite" else None
        # ... and so do the write units of one turn, into the store's group commit. PostgreSQL
        # without replicas: the plain creates of one turn, in one transaction (_groupable).
        self._grouped_creates = getattr(store, "dialect", None) == "postgresql" and (
            getattr(store, "router", None) is None
        )
        self._writes = (
            _WriteBatches(store)
            if self._batched is not None
            else _WriteBatches(store, in_flight=_PG_BATCHES_IN_FLIGHT)
            if self._grouped_creates
            else None
        )
        # Scaled (PostgreSQL): the point reads of one turn are served together, in one unit
        # of work and one statement per routing (_serve_reads).
        self._grouped = _PointReads(self._serve_reads) if self._batched is None else None

    # --- reads ---------------------------------------------------------------------------

    async def read(self, caller: Caller, resource_type: str, resource_id: str) -> RecordVersion:
        self._check_type(resource_type)
        _check_auditable(resource_type, resource_id)
        key = ResourceKey(caller.access.tenant, resource_type, resource_id)
        stored, decision, node = await self._point_read(caller, key, None, Interaction.READ)
        return await self._disclose_one(
            caller, key, version=None, stored=stored, decision=decision, subtype="read", node=node
        )

    async def vread(
        self, caller: Caller, resource_type: str, resource_id: str, version: str
    ) -> RecordVersion:
        self._check_type(resource_type)
        _check_auditable(resource_type, resource_id)
        key = ResourceKey(caller.access.tenant, resource_type, resource_id)
        number = _version_number(version)
        if number is None:  # a version that cannot exist is simply not known
            await self._record_miss(caller, "vread", Action.READ, None, "not-found")
            raise RecordNotFound(resource_type, resource_id, "?")
        stored, decision, node = await self._point_read(caller, key, number, Interaction.VREAD)
        return await self._disclose_one(
            caller,
            key,
            version=number,
            stored=stored,
            decision=decision,
            subtype="vread",
            node=node,
        )

    def _point_read(
        self, caller: Caller, key: ResourceKey, version: int | None, interaction: Interaction
    ) -> asyncio.Future[_Loaded] | Coroutine[Any, Any, _Loaded]:
        grouped = self._grouped
        if grouped is not None:
            return grouped.add(_PointRead(caller, key, version, interaction))
        batches = self._batched
        work = functools.partial(self._load_one, caller, key, version, interaction)
        return _reading(work) if batches is None else batches.add(work)

    def _load_one(
        self, caller: Caller, key: ResourceKey, version: int | None, interaction: Interaction
    ) -> _Loaded:
        """The version with its sealed groups (one query), the decision on its envelope, and
        the database node that served it. Ciphertext of a refused caller is dropped
        unopened; only allowed groups are opened."""
        with self._store.unit_of_work(read_only=True, session=_session(caller)) as uow:
            found = uow.read(key) if version is None else uow.vread(key, version)
            return self._judged(uow, caller, found, interaction)

    def _judged(
        self,
        uow: RecordUnitOfWork,
        caller: Caller,
        found: StoredVersion | None,
        interaction: Interaction,
    ) -> _Loaded:
        """A point read's outcome: its version and the decision on it, in its unit."""
        if found is None:
            return None, None, uow.nodes
        decision = self._decide_rows(uow, caller, [found], interaction)[0]
        if not decision.allowed:
            return dataclasses.replace(found, groups={}), decision, uow.nodes
        return found, decision, uow.nodes

    def _serve_reads(
        self, reads: list[tuple[_PointRead, contextvars.Context]]
    ) -> list[ReadOutcome]:
        """On a storage thread: a batch of point reads (:class:`_PointReads`), each outcome
        what :meth:`_load_one` would give that read alone, or the exception it would raise.

        Reads that may be routed alike share a unit of work and one statement
        (``read_many``), and each one's decision is made in that unit, in its caller's
        context. Without replicas every read-only unit goes to the primary; with them, the
        route depends on the caller's read-your-writes session, so each session gets its own
        unit. If a unit fails as a whole (the statement, or the store), its reads run again
        one by one, each in a unit of its own: every caller gets the answer or the error it
        would have got alone."""
        outcomes: list[ReadOutcome] = [(None, None)] * len(reads)
        routed = getattr(self._store, "router", None) is not None
        by_session: dict[str | None, list[int]] = {}
        for at, (read, _) in enumerate(reads):
            by_session.setdefault(_session(read.caller) if routed else None, []).append(at)
        for session, positions in by_session.items():
            try:
                served = self._serve_unit(session, [reads[at] for at in positions])
            except Exception:  # the unit as a whole failed: each read alone says how
                served = [
                    self._alone(read, context) for read, context in (reads[at] for at in positions)
                ]
            for at, outcome in zip(positions, served, strict=True):
                outcomes[at] = outcome
        return outcomes

    def _serve_unit(
        self, session: str | None, reads: list[tuple[_PointRead, contextvars.Context]]
    ) -> list[ReadOutcome]:
        """Reads of one routing in one unit: one statement, then each one's decision."""
        if session is None:  # no replicas: the unit goes to the primary whatever the session
            session = _session(reads[0][0].caller)
        with self._store.unit_of_work(read_only=True, session=session) as uow:
            found = uow.read_many([(read.key, read.version) for read, _ in reads])
            judged: list[ReadOutcome] = []
            for (read, context), version in zip(reads, found, strict=True):
                try:
                    judged.append(
                        (
                            context.run(self._judged, uow, read.caller, version, read.interaction),
                            None,
                        )
                    )
                except Exception as exc:  # that caller's alone (a care check that failed)
                    judged.append((None, exc))
        return judged

    def _alone(self, read: _PointRead, context: contextvars.Context) -> ReadOutcome:
        try:
            return context.run(
                self._load_one, read.caller, read.key, read.version, read.interaction
            ), None
        except Exception as exc:  # handed to that caller only
            return None, exc

    async def _disclose_one(
        self,
        caller: Caller,
        key: ResourceKey,
        *,
        version: int | None,
        stored: StoredVersion | None,
        decision: Decision | None,
        subtype: str,
        node: tuple[str, ...],
    ) -> RecordVersion:
        shown_version = None if version is None else str(version)
        if stored is None or decision is None or not decision.allowed:
            patient = None if stored is None else _patient_of_subject(stored.key_subject)
            reason = "not-found" if decision is None else str(decision.reason or "denied")
            await self._record_miss(caller, subtype, Action.READ, patient, reason)
            raise RecordNotFound(key.resource_type, key.resource_id, shown_version)
        record = self._visible(stored, decision)
        await self._record_disclosure(
            caller, subtype, Action.READ, [(stored, decision, record)], node=node
        )
        if stored.deleted:
            raise RecordGone(key.resource_type, key.resource_id, stored.version)
        return await self._opened(caller, stored, decision, record)

    async def search(self, caller: Caller, query: SearchQuery, *, offset: int = 0) -> SearchResult:
        resource_type = query.resource_type
        self._check_type(resource_type)
        scopes = self._scopes(caller, resource_type, Interaction.SEARCH)
        if scopes is None:
            await self._record_miss(caller, "search", Action.EXECUTE, None, "scope-not-granted")
            raise AccessDenied(f"searching {resource_type} is not allowed for this caller")
        blind = None
        if query.blind_lookups():
            indexer = await self._keyring.blind_indexer(caller.access.tenant)
            blind = blind_terms(query, indexer.tokens)

        def run() -> tuple[
            Any, list[StoredVersion], list[Decision], list[Decision], tuple[str, ...]
        ]:
            with self._store.unit_of_work(read_only=True, session=_session(caller)) as uow:
                page = uow.search(
                    caller.access.tenant, query, blind=blind, scopes=scopes, offset=offset
                )
                # the scopes each type's rows were admitted under (the proof of care below)
                admitted_by: dict[str, list[list[PolicyScope]]] = {resource_type: [scopes]}
                included: list[StoredVersion] = []
                for include in query.includes:
                    for target in self._include_targets(include):
                        target_scopes = self._scopes(caller, target, Interaction.SEARCH)
                        if target_scopes is None:
                            continue  # what the caller cannot search, an include cannot show
                        admitted_by.setdefault(target, []).append(target_scopes)
                        included.extend(
                            uow.included(
                                caller.access.tenant,
                                list(page.matches),
                                dataclasses.replace(include, target_type=target),
                                scopes=target_scopes,
                            )
                        )
                included = _unique_versions(included, page.matches)
                # A decision depends on the row only through its type and patient: one per
                # distinct pair (a page of one patient's Observations is one decision).
                rows = [*page.matches, *included]
                distinct = {(v.key.resource_type, v.key_subject): v for v in rows}
                proven = self._care_proven(uow, admitted_by, distinct)
                decided = dict(
                    zip(
                        distinct,
                        self._decide_rows(
                            uow, caller, list(distinct.values()), Interaction.SEARCH, proven
                        ),
                        strict=True,
                    )
                )
                each = [decided[(v.key.resource_type, v.key_subject)] for v in rows]
                matched = len(page.matches)
                return page, included, each[:matched], each[matched:], uow.nodes

        page, included, decisions, included_decisions, node = await _reading(run)
        # SQL admitted exactly what the policy admits; a row the decision refuses now would be
        # a disagreement between the two, and is withheld rather than shown.
        shown = [(v, d) for v, d in zip(page.matches, decisions, strict=True) if d.allowed]
        shown_included = [
            (v, d) for v, d in zip(included, included_decisions, strict=True) if d.allowed
        ]
        disclosed = [(v, d, self._visible(v, d)) for v, d in shown + shown_included]
        await self._record_disclosure(
            caller,
            "search",
            Action.EXECUTE,
            disclosed,
            query_hash=await self._query_hash(caller, query),
            node=node,
        )
        opened = [await self._opened(caller, v, d, r) for v, d, r in disclosed]
        return SearchResult(
            query=query,
            matches=opened[: len(shown)],
            included=opened[len(shown) :],
            offset=page.offset,
            next_offset=page.next_offset,
            total=page.total,
        )

    async def history(
        self,
        caller: Caller,
        resource_type: str,
        resource_id: str | None = None,
        *,
        count: int = 50,
        offset: int = 0,
    ) -> HistoryPage:
        self._check_type(resource_type)
        if resource_id is not None:
            _check_auditable(resource_type, resource_id)
        if not 0 <= count <= 1000:
            raise InvalidInput("must be between 0 and 1000", path="_count")
        if offset < 0:
            raise InvalidInput("must not be negative", path="_offset")
        scopes = self._scopes(caller, resource_type, Interaction.HISTORY)
        if scopes is None:
            if resource_id is not None:
                await self._record_miss(caller, "history", Action.READ, None, "scope-not-granted")
                raise RecordNotFound(resource_type, resource_id)
            await self._record_miss(caller, "history", Action.READ, None, "scope-not-granted")
            raise AccessDenied(f"the history of {resource_type} is not allowed for this caller")

        def run() -> tuple[list[StoredVersion], list[Decision], tuple[str, ...]]:
            with self._store.unit_of_work(read_only=True, session=_session(caller)) as uow:
                found = uow.history(
                    caller.access.tenant,
                    resource_type,
                    resource_id,
                    count=count + 1,
                    offset=offset,
                    scopes=scopes,
                )
                decisions = self._decide_rows(uow, caller, found[:count], Interaction.HISTORY)
                return found, decisions, uow.nodes

        found, decisions, node = await _reading(run)
        if resource_id is not None and not found and offset == 0:
            await self._record_miss(caller, "history", Action.READ, None, "not-found")
            raise RecordNotFound(resource_type, resource_id)
        rows = [(v, d) for v, d in zip(found[:count], decisions, strict=True) if d.allowed]
        disclosed = [(v, d, self._visible(v, d)) for v, d in rows]
        await self._record_disclosure(caller, "history", Action.READ, disclosed, node=node)
        versions = [
            await self._opened(caller, v, d, r) if not v.deleted else r for v, d, r in disclosed
        ]
        more = len(found) > count
        return HistoryPage(versions, offset, count, offset + count if more else None)

    # --- writes --------------------------------------------------------------------------

    async def create(
        self, caller: Caller, resource: Mapping[str, Any], *, if_none_exist: str | None = None
    ) -> WriteResult:
        resource_type = _resource_type_of(resource, path="resourceType")
        self._check_type(resource_type)
        checks: list[_Check] = []
        if if_none_exist is not None:
            lookup = parse_conditional(f"{resource_type}?{if_none_exist}", path="If-None-Exist")
            found = await self._resolve_now(caller, lookup)
            if len(found) > 1:
                raise PreconditionFailed(
                    "If-None-Exist matches more than one resource", path="If-None-Exist"
                )
            if found:
                key = ResourceKey(caller.access.tenant, resource_type, found[0])
                existing = await self._existing(caller, key, 0)
                assert existing.record is not None
                return WriteResult(existing.record, created=False)
            checks.append((lookup, ()))
        body = {k: v for k, v in resource.items() if k != "id"}
        entry = PlannedEntry(
            0, Method.POST, PlanOutcome.CREATE, resource_type, str(uuid.uuid4()), body,
            lookups=tuple(checks),
        )  # fmt: skip
        return _single_result(await self._write(caller, [entry]))

    async def update(
        self,
        caller: Caller,
        resource_type: str,
        resource_id: str,
        resource: Mapping[str, Any],
        *,
        if_match: int | None = None,
    ) -> WriteResult:
        self._check_type(resource_type)
        _check_auditable(resource_type, resource_id)
        if _resource_type_of(resource, path="resourceType") != resource_type:
            raise InvalidInput("does not match the resource type in the URL", path="resourceType")
        if resource.get("id") != resource_id:
            raise InvalidInput("must match the id in the URL", path="id")
        entry = PlannedEntry(
            0,
            Method.PUT,
            PlanOutcome.UPDATE,
            resource_type,
            resource_id,
            dict(resource),
            if_match=None if if_match is None else f'W/"{if_match}"',
        )
        return _single_result(await self._write(caller, [entry]))

    async def conditional_update(
        self, caller: Caller, resource_type: str, criteria: str, resource: Mapping[str, Any]
    ) -> WriteResult:
        self._check_type(resource_type)
        if _resource_type_of(resource, path="resourceType") != resource_type:
            raise InvalidInput("does not match the resource type in the URL", path="resourceType")
        lookup = parse_conditional(f"{resource_type}?{criteria}", path="url")
        found = await self._resolve_now(caller, lookup)
        if len(found) > 1:
            raise PreconditionFailed("the criteria match more than one resource", path="url")
        given = resource.get("id")
        outcome = PlanOutcome.UPDATE
        if found:
            if given is not None and given != found[0]:
                raise InvalidInput("does not match the resource the criteria found", path="id")
            target = found[0]
        elif isinstance(given, str):
            target = given  # FHIR: no match and an id is an update-as-create of that id
        else:
            # No match and no id: a create with a server-assigned id, like a POST (it names
            # no existing id, so it is not update-as-create and reveals nothing).
            target, outcome = str(uuid.uuid4()), PlanOutcome.CREATE
        entry = PlannedEntry(
            0, Method.PUT, outcome, resource_type, target, {**resource, "id": target},
            lookups=((lookup, tuple(found)),),
        )  # fmt: skip
        return _single_result(await self._write(caller, [entry]))

    async def delete(
        self, caller: Caller, resource_type: str, resource_id: str
    ) -> RecordVersion | None:
        self._check_type(resource_type)
        _check_auditable(resource_type, resource_id)
        # Refused for the type before looking (no read of the head at all).
        await self._check_may_write(caller, resource_type, Interaction.DELETE)
        entry = PlannedEntry(0, Method.DELETE, PlanOutcome.DELETE, resource_type, resource_id)
        outcome = await self._write(caller, [entry])
        return outcome.entries[0].record

    async def transaction(self, caller: Caller, bundle: Mapping[str, Any]) -> BundleOutcome:
        """All or nothing: plan (references rewritten, lookups resolved), decide and seal
        every entry, record the intent, write everything in one database transaction that
        re-checks every lookup and version, record the outcome; then the reads."""
        indexer = await self._keyring.blind_indexer(caller.access.tenant)

        def plan() -> TransactionPlan:
            with self._store.unit_of_work(read_only=True, reads=ReadClass.FRESH) as uow:
                return plan_transaction(
                    bundle,
                    lambda lookup: self._resolve(uow, caller, lookup, indexer.tokens),
                    max_entries=self._max_entries,
                )

        planned = await _blocking(plan)
        writes = [e for e in planned.entries if e.outcome not in _READ_OUTCOMES]
        reads = [e for e in planned.entries if e.outcome in _READ_OUTCOMES]
        outcome = await self._write(caller, writes, checks=planned.lookups, kind="transaction")
        results = list(outcome.entries)
        for entry in reads:
            results.append(await self._read_entry(caller, entry))
        results.sort(key=lambda r: r.index)
        return BundleOutcome("transaction", results)

    async def batch(self, caller: Caller, bundle: Mapping[str, Any]) -> BundleOutcome:
        """Entry by entry: each succeeds or fails on its own (FHIR batch semantics)."""
        indexer = await self._keyring.blind_indexer(caller.access.tenant)

        def plan() -> BatchPlan:
            with self._store.unit_of_work(read_only=True, reads=ReadClass.FRESH) as uow:
                return plan_batch(
                    bundle,
                    lambda lookup: self._resolve(uow, caller, lookup, indexer.tokens),
                    max_entries=self._max_entries,
                )

        planned = await _blocking(plan)
        results: list[BundleEntryOutcome] = []
        writes: list[PlannedEntry] = []
        seen: set[tuple[str, str | None]] = set()
        for position, item in enumerate(planned.entries):
            if isinstance(item, InvalidInput):
                results.append(BundleEntryOutcome(position, http_status(item), error=item))
            elif item.outcome in _READ_OUTCOMES:
                continue
            elif item.id is not None and (item.resource_type, item.id) in seen:
                # two entries changing one resource: the later one fails alone
                error = InvalidBundle(
                    "another entry of this batch changes the same resource",
                    path=f"Bundle.entry[{item.index}].request.url",
                )
                results.append(BundleEntryOutcome(item.index, 400, error=error))
            else:
                seen.add((item.resource_type, item.id))
                writes.append(item)
        if writes:
            results.extend((await self._write(caller, writes, independent=True)).entries)
        for item in planned.entries:  # reads after writes, as in a transaction
            if not isinstance(item, InvalidInput) and item.outcome in _READ_OUTCOMES:
                results.append(await self._read_entry(caller, item))
        results.sort(key=lambda r: r.index)
        return BundleOutcome("batch", results)

    async def _read_entry(self, caller: Caller, entry: PlannedEntry) -> BundleEntryOutcome:
        """A GET entry of a batch or transaction (after its writes)."""
        try:
            if entry.outcome is PlanOutcome.SEARCH and entry.conditional is not None:
                found = await self.search(caller, entry.conditional.query)
                return BundleEntryOutcome(entry.index, 200, search=found)
            if entry.id is None:
                raise InvalidBundle("a read needs an id", path=f"Bundle.entry[{entry.index}]")
            if entry.version is not None:
                record = await self.vread(caller, entry.resource_type, entry.id, entry.version)
            else:
                record = await self.read(caller, entry.resource_type, entry.id)
            return BundleEntryOutcome(entry.index, 200, record=record)
        except PhivaultError as exc:
            return BundleEntryOutcome(entry.index, http_status(exc), error=exc)

    async def _write(
        self,
        caller: Caller,
        entries: Sequence[PlannedEntry],
        *,
        checks: Sequence[_Check] | None = None,
        kind: str | None = None,
        independent: bool = False,
    ) -> BundleOutcome:
        """The write path shared by every interaction (one entry, a transaction, a batch).

        ``checks``: the lookups the request relied on (default: the entries' own); the
        writing transaction re-runs them and refuses (409) if an answer changed meanwhile.
        ``independent`` (a batch): an entry that fails fails alone; the others are written
        together in one database transaction, or one by one if that one fails.
        """
        for entry in entries:
            if entry.outcome is PlanOutcome.PATCH:
                raise InvalidBundle(
                    "PATCH is not supported", path=f"Bundle.entry[{entry.index}].request.method"
                )
        found, related = await self._heads(caller, entries)
        now = datetime.fromtimestamp(self._clock(), UTC)
        writes: list[_Write] = []
        results: list[BundleEntryOutcome] = []
        for entry in entries:
            try:
                results.extend(
                    await self._prepare_entry(
                        caller, entry, found=found, related=related, now=now, writes=writes
                    )
                )
            except PhivaultError as exc:
                if not independent:
                    raise
                results.append(BundleEntryOutcome(entry.index, http_status(exc), error=exc))
        if writes and not independent:
            relied_on = (
                list(checks) if checks is not None else [c for w in writes for c in w.checks]
            )
            await self._apply(caller, writes, relied_on, kind=kind, entries=entries)
            results.extend(_written_outcome(w) for w in writes)
        elif writes:
            results.extend(await self._apply_independently(caller, writes))
        results.sort(key=lambda r: r.index)
        return BundleOutcome(kind or "write", results)

    async def _heads(
        self, caller: Caller, entries: Sequence[PlannedEntry]
    ) -> tuple[dict[ResourceKey, StoredVersion | None], set[str]]:
        """The current envelope of every resource the entries name, and which of their
        patients the caller has a care relationship with (one read-only transaction)."""
        tenant = caller.access.tenant
        # A POST gets a fresh server-assigned id: it has no head to read (if one appears by
        # a freak collision, the bulk insert's compare-and-swap refuses it).
        keys = {
            ResourceKey(tenant, e.resource_type, e.id)
            for e in entries
            if e.id and not (e.method is Method.POST and e.outcome is PlanOutcome.CREATE)
        }
        if not keys and not self._may_need_care(caller):
            # Nothing to read (creates, by a caller no care relationship admits): no hop to a
            # thread, no transaction. The entries' patients are still worked out, for the
            # same refusals of malformed references as below.
            for entry in entries:
                _patients_touched(entry, None)
            return {}, set()

        def run() -> tuple[dict[ResourceKey, StoredVersion | None], set[str]]:
            with self._store.unit_of_work(read_only=True, reads=ReadClass.FRESH) as uow:
                found = {key: uow.read(key, groups=()) for key in keys}
                patients = {
                    p
                    for e in entries
                    for p in _patients_touched(
                        e, found.get(ResourceKey(tenant, e.resource_type, e.id or ""))
                    )
                }
                return found, self._care_related(uow, caller, patients)

        return await _blocking(run)

    async def _prepare_entry(
        self,
        caller: Caller,
        entry: PlannedEntry,
        *,
        found: Mapping[ResourceKey, StoredVersion | None],
        related: set[str],
        now: datetime,
        writes: list[_Write],
    ) -> list[BundleEntryOutcome]:
        """Prepare one entry into ``writes``; the outcomes of entries that write nothing."""
        key = ResourceKey(caller.access.tenant, entry.resource_type, entry.id or "")
        if entry.outcome is PlanOutcome.EXISTS:
            return [await self._existing(caller, key, entry.index)]
        prepared = await self._prepare(caller, entry, found.get(key), now, related)
        if prepared is None:  # a delete of nothing: FHIR answers success, nothing is written
            return [BundleEntryOutcome(entry.index, 204)]
        writes.append(prepared)
        return []

    async def _apply(
        self,
        caller: Caller,
        writes: Sequence[_Write],
        checks: Sequence[_Check],
        *,
        kind: str | None,
        entries: Sequence[PlannedEntry] = (),
    ) -> None:
        """Intent event, one database transaction, outcome event.

        The transaction and its outcome event run as one shielded task: if the request is
        cancelled meanwhile (client gone, shutdown, timeout), the database transaction goes
        on in its thread regardless, so the outcome must wait for it and say what really
        happened (committed or rolled back), never guess from the cancellation.
        """
        subtype = kind or writes[0].interaction.value
        action = Action.EXECUTE if kind else _INTERACTION_ACTION[writes[0].interaction]
        indexer = await self._keyring.blind_indexer(caller.access.tenant) if checks else None
        started = self._clock()
        # The entities (one per written version) are the same in the intent and the outcome:
        # built and validated once.
        parts = self._event_parts(writes)
        intents = self._write_events(caller, subtype, action, parts, reason=_INTENT)
        await self._record_writes(caller, intents)
        # The transaction claims its intents first thing: if the reconciler has settled one as
        # absent (this write waited longer than the settle age), it cannot commit, and a
        # reconciler that comes while it is open waits for it (records-intent-claims.md).
        claims = [(e.tenant, _intent_claim(e)) for e in intents]

        unit = self._commit_unit(caller, writes, checks, indexer, claims=claims, started=started)
        batches = self._writes if self._groupable(writes, checks) else None

        async def settle() -> None:
            try:
                if batches is not None:
                    await batches.add(unit)
                else:
                    await _blocking(lambda: self._store.write_unit(unit, session=_session(caller)))
            except BaseException:
                await self._record_writes(
                    caller,
                    self._write_events(
                        caller, subtype, action, parts, reason=_ROLLED_BACK,
                        outcome=Outcome.SERIOUS_FAILURE,
                    ),
                    fail_quietly=True,
                )  # fmt: skip
                raise
            # Built once, each with its idempotency key: a retry records the same events.
            outcomes = [
                (event, uuid.uuid4().hex)
                for event in self._write_events(caller, subtype, action, parts, reason=_COMMITTED)
            ]
            try:
                await self._record_writes(caller, outcomes)
            except Exception:
                # Committed, but the ledger refused the outcome: the request fails (503, the
                # client is not told it worked), and the outcome is recorded as soon as the
                # ledger takes events again (reconcile() settles it if the process dies first).
                self._keep(self._record_later(caller, outcomes))
                raise

        settling = self._keep(settle())
        try:
            await asyncio.shield(settling)
        except VersionConflict as exc:
            if any(e.if_match for e in entries):
                raise IfMatchFailed(
                    f"{exc.resource_type}/{exc.resource_id}: If-Match does not name "
                    "the current version"
                ) from None
            raise

    def _groupable(self, writes: Sequence[_Write], checks: Sequence[_Check]) -> bool:
        """Whether this write unit goes to the store with the others of its turn of the event
        loop (records-group-commit.md). SQLite: always (one writer at a time anyway).
        PostgreSQL: only creates of ids the server chose (POST) relying on no lookup. Their
        rows are new keys that no other writer waits for, so one transaction for many couples
        nothing. A PUT of a new id (another writer may insert it too), an update's row lock
        or a conditional write's advisory lock would be held for the whole group (and two
        groups could wait for each other), so those keep a transaction of their own."""
        if not self._grouped_creates:
            return self._writes is not None
        return not checks and all(w.new_id and w.previous is None for w in writes)

    def _keep(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Run ``work`` as a task the repository holds until it is done."""
        task = asyncio.ensure_future(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _record_later(
        self, caller: Caller, outcomes: Sequence[tuple[AuditEvent, str]]
    ) -> None:
        """Retry a committed write's outcome events until the ledger takes them (backing off
        to one try every 5 s); give up silently at shutdown, where reconcile() takes over.

        Every try records the very events of the first one, under their idempotency keys: an
        attempt that reached the audit stream although it failed to say so is not recorded
        twice (the stream's duplicate window drops the repeat)."""
        delay = 0.2
        while True:
            await asyncio.sleep(delay)
            try:
                await self._record_writes(caller, outcomes)
                return
            except Exception:
                delay = min(delay * 2, 5.0)

    async def _apply_independently(
        self, caller: Caller, writes: Sequence[_Write]
    ) -> list[BundleEntryOutcome]:
        """A batch's writes: together if they all succeed, else each on its own."""
        if len(writes) > 1:
            try:
                relied_on = [c for w in writes for c in w.checks]
                await self._apply(caller, writes, relied_on, kind="batch")
                return [_written_outcome(w) for w in writes]
            except (VersionConflict, TransactionConflict):
                pass  # another writer collided with some entry: find which, one by one
        results = []
        for write in writes:
            try:
                await self._apply(caller, [write], list(write.checks), kind=None)
                results.append(_written_outcome(write))
            except PhivaultError as exc:
                results.append(BundleEntryOutcome(write.index, http_status(exc), error=exc))
        return results

    async def _existing(self, caller: Caller, key: ResourceKey, index: int) -> BundleEntryOutcome:
        """If-None-Exist matched ``key``: nothing written; its version, and its content only
        if the caller may read it."""
        try:
            record = await self.read(caller, key.resource_type, key.resource_id)
        except (RecordNotFound, RecordGone):
            stored = await _blocking(lambda: self._head(key))
            if stored is None:
                raise TransactionConflict(
                    f"{key.resource_type}/{key.resource_id} changed while the request ran"
                ) from None
            record = RecordVersion(
                key.resource_type, key.resource_id, stored.version, stored.last_updated
            )
        return BundleEntryOutcome(index, 200, record=record)

    def _head(self, key: ResourceKey) -> StoredVersion | None:
        with self._store.unit_of_work(read_only=True, reads=ReadClass.FRESH) as uow:
            return uow.read(key, groups=())

    async def _prepare(
        self,
        caller: Caller,
        entry: PlannedEntry,
        head: StoredVersion | None,
        now: datetime,
        related: set[str],
    ) -> _Write | None:
        """Decide, check the version, seal and index one write (no transaction is open).

        A write names an id, so its answer must not say whether a resource the caller may not
        see holds that id (``docs/decisions/records-write-visibility.md``): a head the caller
        may neither read nor make this write to is treated exactly like no head at all, and
        everything that depends on the head (``If-Match``, update-as-create, the deletion)
        is judged on what the caller may know. Only the ledger is told the truth.
        """
        tenant = caller.access.tenant
        the_id = entry.id or ""
        where = f"Bundle.entry[{entry.index}]"
        _check_auditable(entry.resource_type, the_id, path=f"{where}.request.url")
        key = ResourceKey(tenant, entry.resource_type, the_id)
        by_id = entry.outcome in (PlanOutcome.UPDATE, PlanOutcome.DELETE)
        named = Interaction.DELETE if entry.outcome is PlanOutcome.DELETE else Interaction.UPDATE
        if by_id:
            await self._check_may_write(caller, entry.resource_type, named)
        hidden = self._hidden(caller, entry.resource_type, head, related, named) if by_id else None
        seen = None if hidden is not None else head  # the head as far as the caller may know
        current = None if seen is None or seen.deleted else seen.version
        if entry.if_match is not None:
            wanted = _etag_version(entry.if_match)
            if wanted is None or wanted != current:
                await self._record_unseen(caller, named, head, hidden, "version-conflict")
                raise IfMatchFailed(
                    f"{entry.resource_type}/{the_id}: If-Match does not name the current version"
                )
        if entry.outcome is PlanOutcome.DELETE:
            if seen is None or seen.deleted:
                # Nothing (the caller may see) to delete: FHIR answers success, nothing is
                # written; the ledger records the attempt either way (one event, so that
                # even a failing ledger answers both cases alike).
                await self._record_unseen(caller, named, head, hidden, "not-found")
                return None
            facts_subject = seen.key_subject
            decision = self._decide(
                caller, entry.resource_type, facts_subject, related, Interaction.DELETE
            )
            if not decision.allowed:
                await self._refuse_write(caller, Interaction.DELETE, facts_subject, decision)
            return _Write(
                entry.index, Interaction.DELETE, key, seen.version, seen.version + 1, now,
                seen.key_subject, {}, [], None, decision, created=False, checks=entry.lookups,
            )  # fmt: skip
        if entry.resource is None:
            raise InvalidBundle("the entry has no resource", path=f"{where}.resource")
        # No current resource the caller may see: update-as-create only for callers who see
        # every resource of the type, for whom an id cannot be taken unseen (and never over
        # an unseen head, which such a caller cannot meet: fail closed if one does).
        if (
            entry.outcome is PlanOutcome.UPDATE
            and current is None
            and (hidden is not None or not self._update_creates(caller, entry.resource_type))
        ):
            await self._record_unseen(caller, named, head, hidden, "not-found")
            raise RecordNotFound(entry.resource_type, the_id)
        interaction = Interaction.CREATE if current is None else Interaction.UPDATE
        previous = None if head is None else head.version
        version = (previous or 0) + 1
        stamp = _instant(now)
        resource = dict(entry.resource)
        resource["id"] = the_id
        meta = resource.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise InvalidInput("must be an object", path="meta")
        resource["meta"] = {**(meta or {}), "versionId": str(version), "lastUpdated": stamp}
        if entry.patient_known:  # worked out at planning
            subject = entry.patient or DIRECTORY_SUBJECT
        else:
            subject = self._subject_of(resource)
        decision = self._decide(caller, entry.resource_type, subject, related, interaction)
        if not decision.allowed:
            await self._refuse_write(caller, interaction, subject, decision)
        if head is not None and not head.deleted and head.key_subject != subject:
            # Moving a record to another patient is a write to both compartments.
            before = self._decide(
                caller, entry.resource_type, head.key_subject, related, Interaction.UPDATE
            )
            if not before.allowed:
                await self._refuse_write(caller, Interaction.UPDATE, head.key_subject, before)
        classified = split(resource, self._table)
        refused = sorted(g.value for g in classified.groups if g not in decision.groups)
        if refused:
            await self._refuse_write(caller, interaction, subject, decision, "group-not-permitted")
        sealed = await self._seal(tenant, subject, classified.envelope, classified.groups)
        indexer = await self._keyring.blind_indexer(tenant)
        entries = index_entries(resource, indexer.tokens)
        return _Write(
            entry.index, interaction, key, previous, version, now, subject, sealed, entries,
            resource, decision, created=current is None, checks=entry.lookups,
            new_id=entry.method is Method.POST and entry.outcome is PlanOutcome.CREATE,
        )  # fmt: skip

    def _hidden(
        self,
        caller: Caller,
        resource_type: str,
        head: StoredVersion | None,
        related: Collection[str],
        interaction: Interaction,
    ) -> Decision | None:
        """The refusal, when ``head`` (current or a tombstone) is a resource the caller may
        neither read nor make ``interaction`` to: for this write it does not exist. None
        when there is no head or the caller may know of it (whoever may overwrite or delete
        a resource learns nothing new from being told that it exists)."""
        if head is None:
            return None
        subject = head.key_subject
        refusal = self._decide(caller, resource_type, subject, related, interaction)
        if refusal.allowed:
            return None
        if self._decide(caller, resource_type, subject, related, Interaction.READ).allowed:
            return None
        return refusal

    def _update_creates(self, caller: Caller, resource_type: str) -> bool:
        """Whether a PUT to an id with no current resource creates it (update-as-create):
        only for a caller who may read, or update, every resource of the type in the tenant.
        For anyone else an unused id and an id taken by a resource they may not see would
        answer differently (201 against a refusal), so both answer 404. Depends on the
        caller and the type only, never on what is stored."""
        if not self._controls.policy:
            return True
        now = self._clock()
        return any(
            _covers_tenant(search_scope(self._policy, caller.access, resource_type, i, now=now))
            for i in (Interaction.READ, Interaction.UPDATE)
        )

    async def _check_may_write(
        self, caller: Caller, resource_type: str, interaction: Interaction
    ) -> None:
        """Refuse (403) a PUT or DELETE by id that this caller could not make to any resource
        of the type, before looking at the id (so the refusal cannot depend on it). A PUT may
        update or, for some callers, create."""
        wanted = (interaction,) if interaction is Interaction.DELETE else (
            Interaction.UPDATE, Interaction.CREATE,
        )  # fmt: skip
        if any(self._scopes(caller, resource_type, i) is not None for i in wanted):
            return
        await self._record_miss(
            caller, interaction.value, _INTERACTION_ACTION[interaction], None, "not-permitted"
        )
        raise AccessDenied(f"{interaction.value} of {resource_type} is not allowed for this caller")

    async def _record_unseen(
        self,
        caller: Caller,
        interaction: Interaction,
        head: StoredVersion | None,
        hidden: Decision | None,
        reason: str,
    ) -> None:
        """The one ledger event of a write that finds nothing the caller may see: ``reason``
        when that is the truth, else (a resource they may not see is there) the refusal and
        the patient it belongs to -- auditors see what happened, the caller does not."""
        patient = None
        if hidden is not None and head is not None:
            patient = _patient_of_subject(head.key_subject)
            reason = str(hidden.reason or "denied")
        await self._record_miss(
            caller, interaction.value, _INTERACTION_ACTION[interaction], patient, reason
        )

    def _commit_unit(
        self,
        caller: Caller,
        writes: Sequence[_Write],
        checks: Sequence[_Check],
        indexer: BlindIndexer | None,
        *,
        claims: Collection[tuple[str, str]] = (),
        started: float | None = None,
    ) -> Callable[[RecordUnitOfWork], None]:
        """The write unit of one database transaction: claim the intents, re-check what the
        plan relied on, write (the store commits it). A write older than
        :data:`_WRITE_DEADLINE_S` when it holds its claims gives up (a claim the reconciler
        took is kept longer than that, so a write can never outlive the claim that refuses
        it). The store may commit it together with writes of
        other requests (group commit, ``docs/decisions/records-group-commit.md``): all or
        nothing for this write all the same, and its claims, checks and versions are its own.
        """

        def unit(uow: RecordUnitOfWork) -> None:
            by_tenant: dict[str, list[str]] = defaultdict(list)
            for tenant, claim in claims:
                by_tenant[tenant].append(claim)
            for tenant, ids in by_tenant.items():
                uow.claim_intents(tenant, ids, at=_micros(self._clock()))
            if started is not None and self._clock() - started > _WRITE_DEADLINE_S:
                raise IntentSettled(
                    "records store: this write waited past its deadline; nothing was written, "
                    "retry it"
                )
            if checks:  # (PostgreSQL: two writers must not both find "no match")
                uow.serialize_conditional(
                    caller.access.tenant, {lookup.resource_type for lookup, _ in checks}
                )
            for lookup, before in checks:
                assert indexer is not None
                if tuple(self._resolve(uow, caller, lookup, indexer.tokens)) != tuple(before):
                    raise TransactionConflict(
                        "a conditional reference, If-None-Exist or conditional update matched "
                        "differently while the request ran; retry it"
                    )
            fresh = [w for w in writes if w.previous is None]
            uow.create_many([_new_version(w) for w in fresh])
            for write in writes:
                if write.previous is None:
                    continue
                if write.interaction is Interaction.DELETE:
                    uow.delete(
                        write.key,
                        version=write.version,
                        last_updated=write.last_updated,
                        previous=write.previous or 0,
                    )
                else:
                    uow.write(_new_version(write), previous=write.previous)

        return unit

    # --- decisions -------------------------------------------------------------------------

    def _include_targets(self, include: Include) -> list[str]:
        """The stored types an ``_include`` may reach (its own target, or the parameter's)."""
        if include.target_type is not None:
            wanted = {include.target_type}
        else:
            wanted = set(search_param(include.source_type, include.param).targets) or {"Patient"}
        return sorted(wanted & self._table.resource_types)

    def _check_type(self, resource_type: str) -> None:
        self._table.for_type(resource_type)  # UnsupportedResourceType

    def _subject_of(self, resource: Mapping[str, Any]) -> str:
        """The key subject: the patient whose compartment holds it, or the directory."""
        if resource.get("resourceType") == "Patient":
            return str(resource["id"])
        return patient_of(resource) or DIRECTORY_SUBJECT

    def _scopes(
        self, caller: Caller, resource_type: str, interaction: Interaction
    ) -> list[PolicyScope] | None:
        """The SQL scope of a search or history (None: nothing can be admitted). Tenant
        isolation is the store's own, always."""
        if not self._controls.policy:
            return []
        scope = search_scope(
            self._policy, caller.access, resource_type, interaction, now=self._clock()
        )
        if scope.empty:
            return None
        return [PolicyScope(scope, practitioner_of(caller.access.fhir_user))]

    def _needs_care(self, caller: Caller) -> bool:
        return practitioner_of(caller.access.fhir_user) is not None and any(
            (role_policy := self._policy.policy.roles.get(role)) is not None
            and role_policy.relationship is Relationship.CARE
            for role in caller.access.roles
        )

    def _may_need_care(self, caller: Caller) -> bool:
        """Whether :meth:`_care_related` may find anything for this caller (else it finds
        nothing without looking)."""
        return practitioner_of(caller.access.fhir_user) is not None and self._needs_care(caller)

    def _care_related(
        self, uow: RecordUnitOfWork, caller: Caller, patients: Collection[str]
    ) -> set[str]:
        practitioner = practitioner_of(caller.access.fhir_user)
        wanted = {p for p in patients if p != DIRECTORY_SUBJECT}
        if practitioner is None or not wanted or not self._needs_care(caller):
            return set()
        return uow.care_related(caller.access.tenant, practitioner, wanted)

    def _care_proven(
        self,
        uow: RecordUnitOfWork,
        admitted_by: Mapping[str, Sequence[Sequence[PolicyScope]]],
        rows: Collection[tuple[str, str]],
    ) -> set[str]:
        """The patients of ``rows`` (type, key subject) whose care relationship the query that
        admitted them has already proved, so that asking the store again would only repeat it.

        A row's patient is proved related when, under every scope its type was admitted
        under, no clause but a care relationship could admit that patient: no tenant-wide
        role, no own compartment that is this patient, no break-glass grant naming them
        (``SearchScope.admits``, which the SQL predicate is property-tested to equal). The
        predicate's care test is :func:`linked_patients`, the very queries ``care_related``
        runs. And only when the rows were read on the primary: a unit served by a replica
        still asks the primary (``care_related``), so that a relationship ended a moment ago
        and not yet replicated no longer counts. The statement that admitted the row read its
        care relationship in its own snapshot, so a row shown is one its page and total
        counted under the same relationship."""
        if uow.nodes != (PRIMARY_NODE,):
            return set()
        proven: set[str] = set()
        for resource_type, subject in rows:
            scopes = admitted_by.get(resource_type)
            if scopes and all(_only_care_admits(s, subject) for s in scopes):
                proven.add(subject)
        return proven

    def _decide_rows(
        self,
        uow: RecordUnitOfWork,
        caller: Caller,
        rows: Sequence[StoredVersion],
        interaction: Interaction,
        proven: Collection[str] = (),
    ) -> list[Decision]:
        """One decision per row. ``proven``: patients whose care relationship the query that
        read these rows proved in the same unit (:meth:`_care_proven`); the store is asked
        about the others only."""
        asked = {r.key_subject for r in rows if r.key_subject not in proven}
        related = self._care_related(uow, caller, asked) | set(proven)
        return [
            self._decide(caller, r.key.resource_type, r.key_subject, related, interaction)
            for r in rows
        ]

    def _decide(
        self,
        caller: Caller,
        resource_type: str,
        subject: str,
        related: Collection[str],
        interaction: Interaction,
    ) -> Decision:
        if not self._controls.policy:
            return _ALL_ALLOWED
        patient = _patient_of_subject(subject)
        facts = RelationshipFacts(
            caller.access.tenant, patient, care_relationship=patient in related
        )
        return decide(
            self._policy, caller.access, resource_type, interaction, facts, now=self._clock()
        )

    async def _refuse_write(
        self,
        caller: Caller,
        interaction: Interaction,
        subject: str,
        decision: Decision,
        reason: str | None = None,
    ) -> None:
        why = reason or str(decision.reason or "denied")
        await self._record_miss(
            caller,
            interaction.value,
            _INTERACTION_ACTION[interaction],
            _patient_of_subject(subject),
            why,
        )
        if reason == "group-not-permitted":
            raise AccessDenied(
                f"this caller may not write some element groups of the resource ({why})"
            )
        raise AccessDenied(f"{interaction.value} is not allowed for this caller here ({why})")

    def _resolve(
        self,
        uow: RecordUnitOfWork,
        caller: Caller,
        lookup: ConditionalLookup,
        tokens: Callable[..., Any],
    ) -> list[str]:
        """A conditional lookup, scoped like a search by the caller: what the caller could
        not find by searching, a conditional reference cannot find either."""
        scopes = self._scopes(caller, lookup.resource_type, Interaction.SEARCH)
        if scopes is None:
            return []
        terms = blind_terms(lookup.query, tokens)
        return uow.find_ids(caller.access.tenant, lookup.query, blind=terms, scopes=scopes, limit=2)

    async def _resolve_now(self, caller: Caller, lookup: ConditionalLookup) -> list[str]:
        indexer = await self._keyring.blind_indexer(caller.access.tenant)

        def run() -> list[str]:
            with self._store.unit_of_work(read_only=True, reads=ReadClass.FRESH) as uow:
                return self._resolve(uow, caller, lookup, indexer.tokens)

        return await _blocking(run)

    # --- encryption --------------------------------------------------------------------------

    async def _seal(
        self,
        tenant: str,
        subject: str,
        envelope: Envelope,
        groups: Mapping[ElementGroup, bytes],
    ) -> dict[str, bytes]:
        if not self._controls.encryption:
            return {g.value: data for g, data in groups.items()}
        cipher = await self._keyring.patient_cipher(tenant, subject, create=True)
        refs = [(group_element_ref(tenant, envelope, g), data) for g, data in groups.items()]
        sealed = cipher.seal_many(refs)
        return {g.value: c for g, c in zip(groups, sealed, strict=True)}

    def _visible(self, stored: StoredVersion, decision: Decision) -> RecordVersion:
        """The version's clear facts (no plaintext yet)."""
        withheld = any(_group(g) not in decision.groups for g in stored.groups)
        return RecordVersion(
            stored.key.resource_type,
            stored.key.resource_id,
            stored.version,
            stored.last_updated,
            deleted=stored.deleted,
            redacted=withheld,
        )

    async def _opened(
        self, caller: Caller, stored: StoredVersion, decision: Decision, record: RecordVersion
    ) -> RecordVersion:
        """Open the groups the decision allows (only those), assemble, taint."""
        if stored.deleted:
            return record
        envelope = Envelope(
            stored.key.resource_type,
            stored.key.resource_id,
            str(stored.version),
            _instant(stored.last_updated),
        )
        groups = [_group(g) for g in stored.groups]
        allowed = [g for g in groups if g in decision.groups]
        withheld = [g for g in groups if g not in decision.groups]
        tenant = stored.key.tenant
        if self._controls.encryption:
            try:
                cipher = await self._keyring.patient_cipher(tenant, stored.key_subject)
                sealed = stored.groups
                plain = cipher.open_many(
                    (group_element_ref(tenant, envelope, g), sealed[str(g)]) for g in allowed
                )
            except DecryptionFailed:
                await self._record_miss(
                    caller, "read", Action.READ, _patient_of_subject(stored.key_subject),
                    "integrity-failure", outcome=Outcome.SERIOUS_FAILURE,
                )  # fmt: skip
                raise IntegrityFailure(
                    f"{stored.key.resource_type}/{stored.key.resource_id}: a stored element "
                    "failed its integrity check; nothing of it is disclosed"
                ) from None
        else:
            plain = [stored.groups[str(g)] for g in allowed]
        contents = {g: GroupContent.decode(p) for g, p in zip(allowed, plain, strict=True)}
        _taint_contents(contents.values())
        resource = assemble(envelope, contents, withheld=withheld, fresh=True)
        return RecordVersion(
            record.resource_type,
            record.id,
            record.version,
            record.last_updated,
            deleted=False,
            resource=resource,
            redacted=bool(withheld),
        )

    # --- audit -------------------------------------------------------------------------------

    async def _query_hash(self, caller: Caller, query: SearchQuery) -> str | None:
        if not self._controls.audit or not self._controls.encryption:
            return None
        tokenizer = await self._keyring.ledger_tokenizer(caller.access.tenant)
        return tokenizer.token("query", _normalized_query(query))

    async def _record_miss(
        self,
        caller: Caller,
        subtype: str,
        action: Action,
        patient: str | None,
        reason: str,
        *,
        outcome: Outcome = Outcome.MINOR_FAILURE,
    ) -> None:
        """A refused or failed interaction is evidence too (who tried what, and why not)."""
        if not self._controls.audit:
            return
        event = caller.audit.event(
            kind=EventKind.REST,
            subtype=subtype,
            action=action,
            outcome=outcome,
            outcome_reason=reason,
            patient=None if patient is None else f"Patient/{patient}",
        )
        await caller.audit.record(event)

    async def _record_disclosure(
        self,
        caller: Caller,
        subtype: str,
        action: Action,
        disclosed: Sequence[tuple[StoredVersion, Decision, RecordVersion]],
        *,
        query_hash: str | None = None,
        node: tuple[str, ...] = (PRIMARY_NODE,),
    ) -> None:
        """One event per patient whose records are disclosed (so that each patient's chain,
        and their accounting of disclosures, has it), recorded together (one group commit),
        all durable before anything is returned. When a replica served the rows, the
        event's ``source.site`` names the database node(s), in the order they served
        (joined by ``@``); the entities name the exact versions."""
        if not self._controls.audit:
            return
        by_patient: dict[str | None, list[tuple[StoredVersion, Decision, RecordVersion]]] = (
            defaultdict(list)
        )
        for item in disclosed:
            by_patient[_patient_of_subject(item[0].key_subject)].append(item)
        if not by_patient:
            by_patient[None] = []
        query_entity = (Entity(query_hash=query_hash, role=EntityRole.QUERY),) if query_hash else ()
        events = []
        for patient, items in by_patient.items():
            purposes = sorted({p for _, d, _ in items for p in d.purposes})
            grant = next((d.grant_id for _, d, _ in items if d.grant_id), None)
            entities = tuple(
                Entity(
                    what=r.versioned_reference, security_labels=("REDACTED",) if r.redacted else ()
                )
                for _, _, r in items
            )
            events.append(
                caller.audit.event(
                    kind=EventKind.REST,
                    subtype=subtype,
                    action=action,
                    patient=None if patient is None else f"Patient/{patient}",
                    entities=query_entity + entities,
                    purpose_of_use=tuple(purposes) if purposes else None,
                    break_glass_grant=grant,
                )
            )
        if node != (PRIMARY_NODE,):
            site = "@".join(node)
            events = [
                e.model_copy(update={"source": Source(observer=e.source.observer, site=site)})
                for e in events
            ]
        if len(events) == 1:  # a read, or a search of one patient: no task for gather
            await caller.audit.record(events[0])
        else:
            await asyncio.gather(*(caller.audit.record(e) for e in events))

    def _event_parts(self, writes: Sequence[_Write]) -> list[_EventPart]:
        """What the intent and outcome events of ``writes`` say besides the reason: one part
        per patient, its entities naming the exact versions (what reconciliation checks)."""
        if not self._controls.audit:
            return []
        by_patient: dict[str | None, list[_Write]] = defaultdict(list)
        for write in writes:
            by_patient[write.patient].append(write)
        parts = []
        for patient, items in by_patient.items():
            purposes = sorted({p for w in items for p in w.decision.purposes})
            parts.append(
                _EventPart(
                    patient=None if patient is None else f"Patient/{patient}",
                    entities=tuple(Entity(what=w.what) for w in items),
                    purposes=tuple(purposes) if purposes else None,
                    grant=next((w.decision.grant_id for w in items if w.decision.grant_id), None),
                )
            )
        return parts

    def _write_events(
        self,
        caller: Caller,
        subtype: str,
        action: Action,
        parts: Sequence[_EventPart],
        *,
        reason: str,
        outcome: Outcome = Outcome.SUCCESS,
    ) -> list[AuditEvent]:
        """The intent (before the commit) or the outcome (after it) of writes, one event per
        patient (:meth:`_event_parts`)."""
        return [
            caller.audit.event(
                kind=EventKind.REST,
                subtype=subtype,
                action=action,
                outcome=outcome,
                outcome_reason=reason,
                patient=part.patient,
                entities=part.entities,
                purpose_of_use=part.purposes,
                break_glass_grant=part.grant,
            )
            for part in parts
        ]

    async def _record_writes(
        self,
        caller: Caller,
        events: Sequence[AuditEvent | tuple[AuditEvent, str]],
        *,
        fail_quietly: bool = False,
    ) -> None:
        """Record write events (an event with a key: under that idempotency key)."""

        async def one(item: AuditEvent | tuple[AuditEvent, str]) -> None:
            if isinstance(item, AuditEvent):
                await caller.audit.record(item)
                return
            event, key = item
            with idempotency_key(key):
                await caller.audit.record(event)

        try:
            if len(events) == 1:  # a write of one patient's records: no task for gather
                await one(events[0])
            else:
                await asyncio.gather(*(one(item) for item in events))
        except Exception:
            if not fail_quietly:
                raise

    # --- explicit care assignments ------------------------------------------------------------

    async def assign_care(
        self, caller: Caller, practitioner: str, patient: str, *, assigned: bool = True
    ) -> bool:
        """Assign (or, with ``assigned=False``, unassign) a practitioner to a patient: a care
        relationship made by an administrator (a covering physician, a consult). Needs the
        ``users`` operation; recorded in the ledger before the change. Returns whether
        anything changed."""
        if not allows_operation(self._policy, caller.access, Operation.USERS):
            await self._record_miss(caller, "care-assignment", Action.UPDATE, None, "not-permitted")
            raise AccessDenied("assigning care is not allowed for this caller")
        who = practitioner_of(practitioner)
        if who is None:
            raise InvalidInput(
                "must be Practitioner/<id> or PractitionerRole/<id>", path="practitioner"
            )
        _check_auditable(who[0], who[1], path="practitioner")
        _check_auditable("Patient", patient, path="patient")
        tenant = caller.access.tenant
        event = caller.audit.event(
            kind=EventKind.ADMINISTRATION,
            subtype="care-assignment" if assigned else "care-unassignment",
            action=Action.CREATE if assigned else Action.DELETE,
            patient=f"Patient/{patient}",
            entities=(Entity(what=f"{who[0]}/{who[1]}"),),
        )
        await caller.audit.record(event)
        stamp = int(self._clock() * 1_000_000)

        def change() -> bool:
            with self._store.unit_of_work(session=_session(caller)) as uow:
                if assigned:
                    done = uow.assign_care(tenant, who, patient, by=caller.access.subject, at=stamp)
                else:
                    done = uow.unassign_care(tenant, who, patient)
                uow.commit()
                return done

        return await _blocking(change)

    # --- crash recovery ----------------------------------------------------------------------

    async def reconcile(
        self,
        ledger: LedgerReader,
        *,
        sink: AuditSink,
        cursor: Path | None = None,
        settle_after_s: float | None = None,
        keep_claims_s: float = 86_400.0,
        claim_wait_s: float = 10.0,
        memo: IntentScan | None = None,
    ) -> ReconcileReport:
        """Settle the write intents that a crash left without an outcome.

        Every write transaction claims its intents (a row per intent event, keyed by the
        intent's id) before it writes, so the claim commits or rolls back with the changes.
        For each open intent the reconciler claims it too, as absent, in its own transaction:
        the key decides (docs/decisions/records-intent-claims.md). If the writer's claim is
        there, the write committed; if the writer's transaction is still open, the claim
        waits for it to end; if the reconciler's claim goes in, the writer can no longer
        commit (its claim fails and it rolls back). Each open intent gets an outcome event,
        recorded through ``sink`` (the embedded ledger itself, or the audit stream):
        ``reconciled-committed`` or ``reconciled-absent``, and the verdict stays in the claim
        (a later pass, after a failure to record it, finds the same one). Intents recorded
        before claims existed (migration 0004), or so long ago that their claims may have been
        pruned (``keep_claims_s``), are judged by whether their versions are in the store.
        ``cursor`` (a small file) remembers how far the ledger was scanned, so a run reads
        only the entries written since the last one. Claims older than ``keep_claims_s`` are
        deleted at the end of a pass. A writing transaction still open after ``claim_wait_s``
        (PostgreSQL) leaves its intent open for a later pass, like a young one.

        The embedded shape runs it once at start, before serving. With several workers (the
        scaled shape) only intents older than ``settle_after_s`` are settled: a younger one
        is most likely still in flight (the claims keep a slower one correct, at the price of
        a failed request), and the cursor stops at the oldest one left open. A periodic
        reconciler passes the same ``memo`` (:class:`IntentScan`) to every pass: a pass then
        reads only the entries appended since the last one, not again from the cursor.

        The scan parses only the entries whose leaf bytes can be a REST intent or outcome
        (:func:`_may_settle`); docs/decisions/records-intent-claims.md says why that is safe.
        """
        await ledger.refresh()
        start = _read_cursor(cursor)
        end = ledger.size
        young_after = (
            None
            if settle_after_s is None
            else datetime.fromtimestamp(self._clock() - settle_after_s, UTC)
        )

        found = memo if memo is not None else IntentScan()

        def scan() -> tuple[list[tuple[int, AuditEvent]], int]:
            found.resume(ledger, start, end)  # what it holds from start on is kept
            try:
                for chunk in range(found.stop, end, _SCAN_CHUNK):
                    stop = min(chunk + _SCAN_CHUNK, end)
                    # Only the leaves that can be a REST intent or outcome are parsed (nearly
                    # every entry is a read, and every worker scans every entry).
                    for entry in ledger.read_range_matching(chunk, stop, _may_settle):
                        event = entry.event
                        if event.kind is not EventKind.REST or event.outcome_reason is None:
                            continue
                        key = (event.request_id, _written(event))
                        if event.outcome_reason == _INTENT:
                            found.add(entry.index, key, event)
                        elif event.outcome_reason in _OUTCOME_REASONS:
                            found.add(entry.index, key, None)
                    found.stop = stop
            except BaseException:
                found.forget()  # a chunk half taken in: scan it all again next time
                raise
            due: list[tuple[int, AuditEvent]] = []
            resume = end
            for index, event in found.open_intents():
                if young_after is not None and event.recorded > young_after:
                    resume = min(resume, index)  # maybe still in flight: look again next time
                    continue
                due.append((index, event))
            return due, resume

        open_intents, resume = await _blocking(scan)
        since = await _blocking(self._claims_since)
        # Claims of intents older than this may be pruned: judge those by their versions.
        claims_kept_from = self._clock() - keep_claims_s + _WRITE_DEADLINE_S
        committed = absent = 0
        for index, intent in open_intents:
            written = _written(intent)
            recorded = intent.recorded.timestamp()
            unclaimed = (since is not None and _micros(recorded) < since) or (
                recorded < claims_kept_from
            )

            def settle(
                event: AuditEvent = intent, whats: tuple[str, ...] = written, old: bool = unclaimed
            ) -> IntentClaim | None:
                with self._store.unit_of_work() as uow:
                    verdict = IntentClaim.ABSENT
                    if old and _present(uow, event.tenant, whats):
                        verdict = IntentClaim.WRITTEN
                    held = uow.settle_intent(
                        event.tenant, _intent_claim(event), at=_micros(self._clock()),
                        unclaimed=verdict, wait_s=claim_wait_s,
                    )  # fmt: skip
                    if held is not None:
                        uow.commit()
                return held

            held = await _blocking(settle)
            if held is None:  # its transaction is still open: look again next time
                resume = min(resume, index)
                continue
            done = held is IntentClaim.WRITTEN
            committed += done
            absent += not done
            await sink.record(
                AuditEvent(
                    kind=EventKind.REST,
                    subtype=intent.subtype,
                    action=intent.action,
                    recorded=datetime.fromtimestamp(self._clock(), UTC),
                    outcome=Outcome.SUCCESS if done else Outcome.SERIOUS_FAILURE,
                    outcome_reason="reconciled-committed" if done else "reconciled-absent",
                    tenant=intent.tenant,
                    patient=intent.patient,
                    agents=(Agent(who=_SYSTEM_AGENT, requestor=False),),
                    source=Source(observer=self._observer),
                    entities=tuple(Entity(what=w) for w in written),
                    purpose_of_use=intent.purpose_of_use,
                    request_id=intent.request_id,
                )
            )
        _write_cursor(cursor, resume)
        await _blocking(lambda: self._prune_claims(_micros(self._clock() - keep_claims_s)))
        return ReconcileReport(start, resume, committed, absent)

    def _claims_since(self) -> int | None:
        with self._store.unit_of_work(read_only=True, reads=ReadClass.FRESH) as uow:
            return uow.intent_claims_since()

    def _prune_claims(self, before: int) -> None:
        with self._store.unit_of_work() as uow:
            uow.prune_intent_claims(before=before)
            uow.commit()


# --- helpers ------------------------------------------------------------------------------

_T = TypeVar("_T")
_SCAN_CHUNK: Final = 1024  # ledger entries read at once by reconcile()
#: A write that holds its intent claims later than this after it began gives up (503): the
#: reconciler keeps the claims it takes far longer (``keep_claims_s``), so a write can never
#: commit after the claim that says it did not happen was pruned.
_WRITE_DEADLINE_S: Final = 3600.0
# PostgreSQL: batches of grouped creates (records-group-commit.md) of one event loop written
# side by side, each in its own transaction on its own storage thread and connection.
_PG_BATCHES_IN_FLIGHT: Final = 4
_READ_OUTCOMES: Final = frozenset({PlanOutcome.READ, PlanOutcome.SEARCH})
_OUTCOME_REASONS: Final = frozenset(
    {_COMMITTED, _ROLLED_BACK, "reconciled-committed", "reconciled-absent"}
)
_ALL_ALLOWED: Final = Decision(True, frozenset(ElementGroup))


def _session(caller: Caller) -> str:
    """The read-your-writes key of a caller (``records.store.routing``): after their write,
    their reads go to the primary until a replica has replayed it."""
    return f"{caller.access.tenant}/{caller.access.subject}"


def _written_outcome(write: _Write) -> BundleEntryOutcome:
    record = RecordVersion(
        write.key.resource_type,
        write.key.resource_id,
        write.version,
        write.last_updated,
        deleted=write.interaction is Interaction.DELETE,
        resource=write.resource,
    )
    status = 204 if record.deleted else (201 if write.created else 200)
    return BundleEntryOutcome(write.index, status, record=record)


def _new_version(write: _Write) -> NewVersion:
    return NewVersion(
        write.key, write.version, write.last_updated, write.subject, write.groups, write.entries
    )


#: A server-assigned id (``str(uuid.uuid4())``) and a FHIR type name: such a reference is
#: always one the ledger records. The id grammar admits it; the shapes it refuses cannot fit:
#: an SSN needs a 2-character group and a phone number a 3-character one between separators
#: (a uuid's groups have 8, 4, 4, 4 and 12), it has no ``@``, and it is no date as a whole.
_SERVER_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TYPE_NAME: Final = re.compile(r"[A-Z][A-Za-z]{1,63}")


def _check_auditable(resource_type: str, resource_id: str, *, path: str = "id") -> None:
    """What cannot be recorded in the ledger is not served: an id with the shape of personal
    data (an SSN, a phone number, a date) is refused before anything happens. A
    server-assigned id is known to pass without building the ledger's model (a test checks
    the two agree)."""
    if _SERVER_ID.fullmatch(resource_id) and _TYPE_NAME.fullmatch(resource_type):
        return
    try:
        Entity(what=f"{resource_type}/{resource_id}")
    except ValidationError:
        raise InvalidInput(
            "is not an id the audit ledger can record (it has the shape of personal data or "
            "is not a FHIR id)",
            path=path,
        ) from None


def _version_number(text: str) -> int | None:
    if not text.isdigit() or len(text) > 9:
        return None
    number = int(text)
    return number if number >= 1 else None


def _etag_version(text: str) -> int | None:
    """``W/"3"``, ``"3"`` or ``3`` -> 3."""
    value = text.strip()
    if value.startswith("W/"):
        value = value[2:]
    return _version_number(value.strip('"'))


def _patient_of_subject(subject: str) -> str | None:
    return None if subject == DIRECTORY_SUBJECT else subject


def _covers_tenant(scope: SearchScope) -> bool:
    """Whether ``scope`` admits every resource of its type in the tenant, whoever's it is
    (``SearchScope.admits`` for every facts): a directory type any clause opens, or a
    tenant-wide relationship not narrowed to one patient's compartment."""
    if scope.patient_only and not scope.directory:
        return False
    return any(
        c.by_relationship and (scope.directory or c.relationship is Relationship.TENANT)
        for c in scope.clauses
    )


def _instant(moment: datetime) -> str:
    """FHIR instant in UTC with microseconds (what the store keeps)."""
    if moment.tzinfo is UTC:  # what the store gives: every version opened takes this way
        return moment.isoformat(timespec="microseconds")[:-6] + "Z"
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_GROUPS: Final[Mapping[str, ElementGroup]] = {g.value: g for g in ElementGroup}


def _group(name: str) -> ElementGroup:
    """A stored group name as its group (the enum's own lookup costs more, once per group
    of every version opened); an unknown name raises ValueError, as the enum does."""
    group = _GROUPS.get(name)
    return ElementGroup(name) if group is None else group


def _resource_type_of(resource: object, *, path: str) -> str:
    if not isinstance(resource, Mapping):
        raise InvalidInput("must be a JSON object (a FHIR resource)", path="(body)")
    kind = resource.get("resourceType")
    if not isinstance(kind, str) or not kind:
        raise InvalidInput("is missing or not a string", path=path)
    return kind


def _single_result(outcome: BundleOutcome) -> WriteResult:
    entry = outcome.entries[0]
    if entry.record is None:
        raise TransactionConflict("the write did not take place; retry it")
    return WriteResult(entry.record, created=entry.status == 201)


def _patients_touched(entry: PlannedEntry, head: StoredVersion | None) -> set[str]:
    found: set[str] = set()
    if head is not None:
        found.add(head.key_subject)
    if entry.patient_known:  # worked out at planning
        if entry.patient:
            found.add(entry.patient)
    elif entry.resource is not None:
        if entry.resource_type == "Patient" and entry.id:
            found.add(entry.id)
        else:
            patient = patient_of(entry.resource)
            if patient:
                found.add(patient)
    return found


def _unique_versions(
    included: Iterable[StoredVersion], matches: Iterable[StoredVersion]
) -> list[StoredVersion]:
    """``_include`` results minus duplicates and minus what is already a match."""
    seen = {m.key for m in matches}
    out: list[StoredVersion] = []
    for version in included:
        if version.key not in seen:
            seen.add(version.key)
            out.append(version)
    return out


def _taint_contents(contents: Iterable[GroupContent]) -> None:
    """Every string and number opened from a group is PHI for the rest of the request."""
    roots: list[Any] = []
    for content in contents:
        roots.extend(content.elements.values())
        roots.extend([value for _, value in content.fragments])
    taint_tree(roots)


def _normalized_query(query: SearchQuery) -> str:
    """The query's meaning as text (only ever hashed with a keyed HMAC, never stored)."""
    return repr((query.resource_type, query.criteria, query.sort, query.includes))


def _written(event: AuditEvent) -> tuple[str, ...]:
    """The versioned references an intent or outcome event names."""
    return tuple(
        sorted(
            e.what
            for e in event.entities
            if e.what is not None
            and e.role is EntityRole.DOMAIN_RESOURCE
            and "/_history/" in e.what
        )
    )


def _intent_claim(event: AuditEvent) -> str:
    """The id of a write intent, the same for the writer (from the event it records) and the
    reconciler (from the event it reads back): what makes one intent event differ from
    another (tenant, request, instant, interaction, patient, agents and the versions)."""
    recorded = (event.recorded - _EPOCH) // _MICROSECOND
    text = "\n".join(
        (
            "phivault-intent/1",
            event.tenant,
            event.request_id or "",
            str(recorded),
            event.subtype,
            event.action.value,
            event.patient or "",
            *(str(agent.who) for agent in event.agents),
            "",
            *_written(event),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _present(uow: RecordUnitOfWork, tenant: str, whats: Iterable[str]) -> bool:
    """Whether every ``Type/id/_history/n`` is in the store."""
    for what in whats:
        kind, ident, _, version = what.split("/")
        if uow.vread(ResourceKey(tenant, kind, ident), int(version), groups=()) is None:
            return False
    return True


def _micros(seconds: float) -> int:
    return int(seconds * 1_000_000)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


_IntentKey = tuple[str | None, tuple[str, ...]]  # (request id, versions written)
#: The most intent and outcome events a scan keeps between passes (a few MB); beyond it, the
#: next pass reads its whole range again (only the intents and outcomes are parsed anyway).
_MEMO_MAX_EVENTS: Final = 10_000


class IntentScan:
    """The intent and outcome events reconcile passes found in ``[start, stop)`` of one
    ledger (parsed, with their keys), kept between the passes of a periodic reconciler.

    A cache, never the source of a verdict. A pass reads the ledger from its cursor, which
    stops at the oldest intent still young (for up to ``settle_after_s``) or still being
    written: without it, every pass would read and filter that whole range again. With it, a
    pass reads only what was appended since the last one, and drops what lies before its
    cursor. It holds exactly what scanning the range would give (entries never change), the
    open intents are computed from it as from a scan (:meth:`open_intents`), and it is
    dropped when another ledger is read, the cursor went back, a scan failed half way, or it
    holds more than ``_MEMO_MAX_EVENTS``. The verdict on each intent still comes from the
    intent claims.
    """

    __slots__ = ("_found", "_ledger", "start", "stop")

    def __init__(self) -> None:
        self._ledger: object | None = None
        self.start = self.stop = 0
        # (index, key, the intent event or None for an outcome), in ledger order
        self._found: list[tuple[int, _IntentKey, AuditEvent | None]] = []

    def resume(self, ledger: object, start: int, end: int) -> None:
        """Keep what was found at or after ``start`` if it is of this ledger, from ``start``
        on, and ``stop <= end``; otherwise start over, empty, at ``start``."""
        if self._ledger is ledger and self.start <= start <= self.stop <= end:
            if start > self.start:
                self._found = [found for found in self._found if found[0] >= start]
                self.start = start
            return
        self.forget()
        self._ledger = ledger
        self.start = self.stop = start

    def add(self, index: int, key: _IntentKey, intent: AuditEvent | None) -> None:
        """An intent event (``intent``) or an outcome (None) of ``key`` at ``index``."""
        self._found.append((index, key, intent))
        if len(self._found) > _MEMO_MAX_EVENTS:
            self._ledger = None  # still whole for this pass; not kept for the next

    def open_intents(self) -> list[tuple[int, AuditEvent]]:
        """The intents of ``[start, stop)`` without an outcome there, in ledger order.

        An outcome settles the oldest intent of its key recorded *before* it, and only one:
        the key (request id, versions written) is not unique, because a client may send the
        same ``X-Request-ID`` again. A retried update whose first try rolled back writes the
        same version under the same key; when the outcome of any earlier intent settled
        every intent of its key, the retry's intent looked settled by the first try's
        ``rolled-back`` outcome, and a crash between its commit and its outcome was never
        reconciled. An outcome with no earlier open intent in the range (its intent lies
        before the cursor, or it is a second outcome of one intent) settles nothing.
        """
        waiting: dict[_IntentKey, deque[tuple[int, AuditEvent]]] = defaultdict(deque)
        for index, key, intent in self._found:
            if intent is not None:
                waiting[key].append((index, intent))
            elif waiting.get(key):
                waiting[key].popleft()
        return sorted(
            (found for queue in waiting.values() for found in queue), key=lambda found: found[0]
        )

    def forget(self) -> None:
        self._ledger = None
        self.start = self.stop = 0
        self._found = []


#: The outcome reasons the reconciler acts on, as JSON strings: in a leaf that holds no ``\u``
#: escape, each can only be written this way (none has a character another escape gives).
_SETTLE_TOKENS: Final = tuple(
    f'"{reason}"'.encode() for reason in (_INTENT, *sorted(_OUTCOME_REASONS))
)


def _may_settle(leaf: bytes) -> bool:
    r"""Whether a leaf can hold a REST event with an intent or outcome reason, judged on its
    bytes alone: False only if ``json.loads`` of it cannot give one (a false positive costs a
    full parse, which decides; a false negative would lose an intent).

    A parsed string equals ``"intent"`` only if the JSON text spells it literally or with a
    ``\u`` escape; ``json.loads`` reads UTF-8 (a BOM allowed, still literal) or, from a NUL
    byte pattern, UTF-16/32, where every ASCII character has a NUL byte. So: a leaf with
    ``\u`` or a NUL byte may be anything; otherwise it needs ``"rest"`` and one of the tokens.
    Canonical leaves (RFC 8785) escape with ``\u`` only control characters, which event
    fields (ids and codes) do not hold, so in practice only REST intents and outcomes (and
    the odd event that names one of these words) are parsed.
    """
    if b"\\u" in leaf or b"\x00" in leaf:
        return True
    return any(token in leaf for token in _SETTLE_TOKENS) and b'"rest"' in leaf


def _read_cursor(cursor: Path | None) -> int:
    if cursor is None or not cursor.exists():
        return 0
    text = cursor.read_text(encoding="ascii").strip()
    if not text.isdigit():
        raise ConfigurationError(f"{cursor.name} is not a ledger index; remove it to rescan")
    return int(text)


def _write_cursor(cursor: Path | None, value: int) -> None:
    if cursor is None:
        return
    temporary = cursor.with_suffix(".tmp")
    temporary.write_text(f"{value}\n", encoding="ascii")
    temporary.replace(cursor)
