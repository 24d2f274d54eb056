"""The records storage port: what the records repository may ask of storage, and nothing more.

Why this shape (Cosmic Python's unit of work; docs/decisions/records-storage.md):

* The store holds **ciphertext and index entries only**. Sealing, opening and index tokens are
  made above it, by the repository that holds the key ring; no method here takes or returns
  plaintext PHI, so no adapter can leak it.
* Every read and write happens inside a :class:`RecordUnitOfWork` that owns one database
  transaction: a whole transaction Bundle commits or rolls back as one. Leaving the ``with``
  block without :meth:`RecordUnitOfWork.commit` rolls back.
* Versions are numbered by the caller and checked by the store (compare-and-swap on the
  resource's current version): the caller needs the version and ``lastUpdated`` before it
  seals the envelope (``meta``), and the store guarantees
  that two writers racing from the same version cannot both win (:class:`VersionConflict`).
* Read-only units of work name what they read (:class:`ReadClass`): PHI and display reads
  may be served by a streaming replica within a lag bound, authorization state and reads
  that must see the latest commit never are, and writes always run on the primary
  (docs/decisions/replica-routing.md). ``served_by`` says which node answered.
* Search takes a parsed :class:`~phivault.records.query.SearchQuery`, its blind values already
  tokenized (:func:`blind_terms`), and any number of :class:`Scope` predicates that the caller
  (the access policy) ANDs in: tenant scoping is always applied by the store itself.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Final, Protocol

from phivault.crypto.blind_index import BlindToken, IndexField
from phivault.errors import PhivaultError, StoreUnavailable
from phivault.records.query import Criterion, Include, SearchQuery
from phivault.records.search_params import IndexEntry

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy import ColumnElement, FromClause

__all__ = [
    "DIRECTORY_SUBJECT",
    "BlindTerms",
    "IntentClaim",
    "IntentSettled",
    "NewVersion",
    "ReadClass",
    "RecordStore",
    "RecordStoreUnavailable",
    "RecordUnitOfWork",
    "ResourceKey",
    "Scope",
    "SearchPage",
    "StaleBlindIndex",
    "StoredVersion",
    "VersionConflict",
    "blind_terms",
]

#: The key subject of resources that belong to no patient (Practitioner, Organization,
#: Location, PractitionerRole, Medication): a tenant-level "directory" data key. It is a valid
#: key-ring subject but can never be a server-assigned Patient id; the store refuses a Patient
#: with this id, so a patient can never share the directory's key.
DIRECTORY_SUBJECT: Final = "directory.tenant"

#: Blind tokens per blind criterion of a query (every live index-key version).
BlindTerms = Mapping[Criterion, Sequence[BlindToken]]


class ReadClass(Enum):
    """What a read-only unit of work reads, which decides the node that may serve it.

    ``PHI``: clinical records for a disclosure (read, vread, search, history, includes): a
    replica whose replication lag is under the store's bound, else the primary.
    ``AGGREGATE``: aggregate and display reads (counts, dashboards): a replica under the
    looser display bound, else the primary.
    ``AUTHORIZATION``: care relationships, assignments, grants: always the primary, so a
    revocation takes effect at once.
    ``FRESH``: reads that must see every committed write (the head before a write,
    reconciling write intents after a crash): always the primary.

    Care-relationship checks made inside a ``PHI`` unit (:meth:`RecordUnitOfWork.care_related`)
    run on the primary too.
    """

    PHI = "phi"
    AGGREGATE = "aggregate"
    AUTHORIZATION = "authorization"
    FRESH = "fresh"


class RecordStoreUnavailable(StoreUnavailable):
    """The records database cannot be reached or refused a statement (no PHI in the message)."""


class IntentClaim(Enum):
    """Who holds a write intent's claim (docs/decisions/records-intent-claims.md).

    ``WRITTEN``: the writer's transaction inserted it with its changes and committed, so the
    changes are in the store. ``ABSENT``: the reconciler took it first and recorded the intent
    as not made; the writer's transaction can then no longer commit.
    """

    WRITTEN = "written"
    ABSENT = "absent"


class IntentSettled(RecordStoreUnavailable):
    """A write's intent was settled as not made before its transaction could claim it (the
    write waited longer than the reconciler's settle age, or its deadline passed): nothing
    was written. A 503; retrying makes a new intent."""


class VersionConflict(PhivaultError):
    """The resource's current version is not the one the write was based on.

    ``expected`` is the version the caller based its write on (None: the resource must not
    exist yet); ``actual`` is the current version (None: it does not exist). The API answers
    412 (If-Match) or 409. Ids and versions are opaque: the message holds no PHI.
    """

    def __init__(
        self, resource_type: str, resource_id: str, expected: int | None, actual: int | None
    ) -> None:
        want = "no resource" if expected is None else f"version {expected}"
        have = "none" if actual is None else f"version {actual}"
        super().__init__(
            f"{resource_type}/{resource_id}: expected {want}, the current one is {have}"
        )
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.expected = expected
        self.actual = actual


class StaleBlindIndex(PhivaultError):
    """A blind-index key version cannot be retired yet: ``count`` tokens of current resources
    exist under it only (no other version covers their field). Re-index those resources
    (:meth:`RecordUnitOfWork.reindex` with tokens of the new version), then retry."""

    def __init__(self, tenant: str, version: int, count: int) -> None:
        super().__init__(
            f"tenant {tenant}: {count} blind-index tokens exist only under index-key version "
            f"{version}; re-index the records before retiring it"
        )
        self.tenant = tenant
        self.version = version
        self.count = count


@dataclass(frozen=True, slots=True)
class ResourceKey:
    """Which resource: tenant, type and id."""

    tenant: str
    resource_type: str
    resource_id: str


@dataclass(frozen=True, slots=True)
class NewVersion:
    """A version to write, already sealed and indexed by the repository.

    ``version`` must be ``previous + 1`` (1 for a create); ``groups`` maps element-group names
    (:class:`~phivault.records.classification.ElementGroup` values) to ciphertext sealed
    under ``key_subject``'s data key (the patient, or :data:`DIRECTORY_SUBJECT`);
    ``index`` is :func:`~phivault.records.search_params.index_entries` of the resource as
    stored (with this version's ``meta``). ``last_updated`` must carry a time zone.
    """

    key: ResourceKey
    version: int
    last_updated: datetime
    key_subject: str
    groups: Mapping[str, bytes] = field(repr=False)
    index: Sequence[IndexEntry] = field(repr=False)


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One stored version: the clear envelope and its sealed groups (those asked for)."""

    key: ResourceKey
    version: int
    last_updated: datetime
    deleted: bool
    key_subject: str
    groups: Mapping[str, bytes] = field(repr=False)


@dataclass(frozen=True, slots=True)
class SearchPage:
    """A page of current versions in the query's order.

    ``next_offset`` is the offset of the next page (None on the last page); ``total`` is set
    when the query asked for ``_total=accurate``.
    """

    matches: Sequence[StoredVersion]
    offset: int
    next_offset: int | None
    total: int | None


class Scope(Protocol):
    """An extra predicate the caller ANDs into a search (and its total): patient
    compartments, care relationships. ``resources`` is the current-version table being
    searched (columns ``tenant``, ``resource_type``, ``resource_id``, ``key_subject``,
    ``last_updated``)."""

    def predicate(self, resources: FromClause) -> ColumnElement[bool]: ...


def blind_terms(
    query: SearchQuery, tokens: Callable[[IndexField, str], Sequence[BlindToken]]
) -> dict[Criterion, tuple[BlindToken, ...]]:
    """Tokenize every blind criterion of ``query`` (``tokens`` is ``BlindIndexer.tokens``)."""
    return {
        criterion: tuple(t for f, value in pairs for t in tokens(f, value))
        for criterion, pairs in query.blind_lookups()
    }


class RecordUnitOfWork(Protocol):
    """One transaction over the records tables. Use as a context manager; call
    :meth:`commit` to keep the writes; leaving without it (or on an exception) rolls back.

    ``served_by`` names the database node whose data the unit's record reads returned:
    ``"primary"`` or ``"replica:<host>:<port>"``; if a replica failed in the middle of a unit
    and the primary served the rest, both, comma-separated in the order they served
    (``nodes`` has them as a tuple). The disclosure audit event records it."""

    @property
    def served_by(self) -> str: ...

    @property
    def nodes(self) -> tuple[str, ...]: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def write(self, new: NewVersion, *, previous: int | None) -> StoredVersion:
        """Add ``new`` as the current version if the current one is ``previous`` (None: the
        resource must not exist). Raises :class:`VersionConflict`."""
        ...

    def create_many(self, news: Sequence[NewVersion]) -> None:
        """Create many new resources (each at version 1) at once: what a transaction Bundle
        mostly is. Raises :class:`VersionConflict` if one exists already."""
        ...

    def delete(
        self, key: ResourceKey, *, version: int, last_updated: datetime, previous: int
    ) -> StoredVersion:
        """Add a tombstone as version ``version`` (= ``previous + 1``): it leaves search,
        stays in history. Raises :class:`VersionConflict`."""
        ...

    def read(
        self, key: ResourceKey, *, groups: Collection[str] | None = None
    ) -> StoredVersion | None:
        """The current version (a tombstone if deleted), with only ``groups`` (default all)."""
        ...

    def vread(
        self, key: ResourceKey, version: int, *, groups: Collection[str] | None = None
    ) -> StoredVersion | None: ...

    def read_many(
        self, wanted: Sequence[tuple[ResourceKey, int | None]]
    ) -> list[StoredVersion | None]:
        """For each (key, version) of ``wanted`` (version ``None``: the current one), what
        :meth:`read` or :meth:`vread` returns, with every group, in ``wanted`` order."""
        ...

    def history(
        self,
        tenant: str,
        resource_type: str,
        resource_id: str | None = None,
        *,
        count: int = 50,
        offset: int = 0,
        groups: Collection[str] | None = None,
        scopes: Sequence[Scope] = (),
    ) -> list[StoredVersion]:
        """Versions of one resource, or of every resource of a type, newest first; only
        versions every scope admits (a scope sees each version's own ``key_subject``)."""
        ...

    def assign_care(
        self, tenant: str, practitioner: tuple[str, str], patient: str, *, by: str, at: int
    ) -> bool:
        """Record an explicit care assignment (a care relationship an administrator made);
        False if it already existed."""
        ...

    def unassign_care(self, tenant: str, practitioner: tuple[str, str], patient: str) -> bool:
        """Remove an explicit care assignment; False if there was none."""
        ...

    def care_related(
        self, tenant: str, practitioner: tuple[str, str], patients: Collection[str]
    ) -> set[str]:
        """Which of ``patients`` the practitioner ``(type, id)`` has a care relationship with
        (CareTeam or Encounter participant, general practitioner), from current records."""
        ...

    def search(
        self,
        tenant: str,
        query: SearchQuery,
        *,
        blind: BlindTerms | None = None,
        scopes: Sequence[Scope] = (),
        offset: int = 0,
        groups: Collection[str] | None = None,
    ) -> SearchPage: ...

    def included(
        self,
        tenant: str,
        matches: Sequence[StoredVersion],
        include: Include,
        *,
        scopes: Sequence[Scope] = (),
        groups: Collection[str] | None = None,
    ) -> list[StoredVersion]:
        """``_include`` targets of ``matches``, current and under the same ``scopes``."""
        ...

    def reindex(self, key: ResourceKey, *, version: int, index: Sequence[IndexEntry]) -> None:
        """Replace the current version's index rows (index-key rotation); no new version."""
        ...

    def scan_current(
        self,
        tenant: str,
        *,
        after: tuple[str, str] | None = None,
        limit: int = 500,
        groups: Collection[str] | None = None,
    ) -> list[StoredVersion]:
        """Current versions in (type, id) order after ``after`` (a re-index walk)."""
        ...

    def find_ids(
        self,
        tenant: str,
        query: SearchQuery,
        *,
        blind: BlindTerms | None = None,
        scopes: Sequence[Scope] = (),
        limit: int = 2,
    ) -> list[str]:
        """Ids of current matches in id order (no ciphertext): conditional references,
        ``ifNoneExist``, conditional update and delete. ``limit=2`` tells one from many."""
        ...

    def serialize_conditional(self, tenant: str, resource_types: Collection[str]) -> None:
        """Before re-checking a conditional write's lookups (If-None-Exist, conditional
        update or reference): wait until no other open transaction holds the right to
        conditional writes of these types in this tenant, and hold it until this one ends.
        Without it, two transactions on PostgreSQL (READ COMMITTED) can both see no match
        and both create. SQLite has one writer at a time: nothing to do there.
        ``docs/decisions/records-transactions.md``."""
        ...

    def claim_intents(self, tenant: str, claims: Collection[str], *, at: int) -> None:
        """The writer's side: claim these intents (:attr:`IntentClaim.WRITTEN`), first thing in
        the writing transaction, so they commit or roll back with its changes. Raises
        :class:`IntentSettled` if the reconciler claimed one first; on PostgreSQL it waits
        for a reconciler's transaction that holds one. ``at``: microseconds (for pruning)."""
        ...

    def settle_intent(
        self,
        tenant: str,
        claim: str,
        *,
        at: int,
        unclaimed: IntentClaim = IntentClaim.ABSENT,
        wait_s: float = 10.0,
    ) -> IntentClaim | None:
        """The reconciler's side: claim the intent as ``unclaimed`` unless it is claimed
        already, and return who holds it. A writer's transaction that holds it and is still
        open is waited for (a row lock on PostgreSQL, the write lock on SQLite); None if it
        is still open after ``wait_s`` on PostgreSQL (still in flight: look again later; on
        SQLite the database's busy timeout applies and the wait ends in an error)."""
        ...

    def intent_claims_since(self) -> int | None:
        """When writers started claiming their intents (microseconds; the migration that
        made claims), so older intents are judged by the versions in the store."""
        ...

    def prune_intent_claims(self, *, before: int) -> int:
        """Delete the claims made before ``before`` (microseconds); how many went."""
        ...


class RecordStore(Protocol):
    """The records database. Build it in the composition root; close it on shutdown."""

    def unit_of_work(
        self,
        *,
        read_only: bool = False,
        reads: ReadClass = ReadClass.PHI,
        session: str | None = None,
    ) -> AbstractContextManager[RecordUnitOfWork]:
        """A new transaction (``read_only``: a deferred one on SQLite, READ ONLY on
        PostgreSQL, for reads and searches). ``reads`` says what a read-only unit reads (it
        chooses the node; writes ignore it). ``session`` keys read-your-writes: after a write
        under a key, that key's reads stay on the primary until a replica has replayed it
        (None: the key set by :func:`~phivault.records.store.routing.caller_session`, else
        one key shared by every unkeyed caller)."""
        ...

    def write_unit(
        self, work: Callable[[RecordUnitOfWork], None], *, session: str | None = None
    ) -> None:
        """Run ``work`` (which must not commit) in a writing transaction and commit it; its
        exception, if it raises, after rolling back what it wrote. The store may commit it
        together with units other threads submit meanwhile (group commit): each is still
        all or nothing on its own, and a unit that fails does not affect the others."""
        ...

    def write_units(
        self, works: Sequence[Callable[[RecordUnitOfWork], None]], *, session: str | None = None
    ) -> list[BaseException | None]:
        """:meth:`write_unit` of each of ``works``, submitted together by one thread (the
        store may commit them in one group); each one's exception, or None where it
        committed, in ``works`` order. Never raises for a unit."""
        ...

    def close(self) -> None: ...
