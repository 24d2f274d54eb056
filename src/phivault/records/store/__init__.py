"""Records storage: sealed element groups, versions and the search index in SQL.

Why a subpackage of its own: the records core (``phivault.records``) decides what a record
is made of; this package only keeps ciphertext and index entries, transactionally, on SQLite
(embedded) or PostgreSQL (scaled), and answers searches in SQL. It never sees plaintext PHI:
the repository above it seals and opens. Public names:

* the port: :class:`RecordStore`, :class:`RecordUnitOfWork`, :class:`NewVersion`,
  :class:`StoredVersion`, :class:`SearchPage`, :class:`ResourceKey`, :class:`Scope`,
  :func:`blind_terms`, :data:`DIRECTORY_SUBJECT`;
* errors: :class:`VersionConflict`, :class:`StaleBlindIndex`, :class:`RecordStoreUnavailable`,
  :class:`IntentSettled`;
* write-intent claims: :class:`IntentClaim` (docs/decisions/records-intent-claims.md);
* the adapter: :class:`SqlRecordStore` (:mod:`~phivault.records.store.sql_store`, which lists
  the modules of the adapter), its units of work :class:`SqlUnitOfWork` and its key-ring view
  :class:`SqlSealedElements`;
* replica routing: :class:`ReadClass` (what a read-only unit reads), :func:`caller_session`
  (the read-your-writes key of the units opened in a block), :data:`PRIMARY`, the router
  itself in :mod:`phivault.records.store.routing`, and the write positions it shares with
  the other workers in :mod:`phivault.records.store.write_positions`;
* ready-made scopes: :class:`SubjectScope` (patient compartments) and
  :class:`CareRelationshipScope` (patients a practitioner cares for).
"""

from __future__ import annotations

from phivault.records.store.ports import (
    DIRECTORY_SUBJECT,
    BlindTerms,
    IntentClaim,
    IntentSettled,
    NewVersion,
    ReadClass,
    RecordStore,
    RecordStoreUnavailable,
    RecordUnitOfWork,
    ResourceKey,
    Scope,
    SearchPage,
    StaleBlindIndex,
    StoredVersion,
    VersionConflict,
    blind_terms,
)
from phivault.records.store.routing import PRIMARY, caller_session
from phivault.records.store.sealed_elements import SqlSealedElements
from phivault.records.store.search import CareRelationshipScope, SubjectScope
from phivault.records.store.sql_store import SqlRecordStore
from phivault.records.store.unit_of_work import SqlUnitOfWork

__all__ = [
    "DIRECTORY_SUBJECT",
    "PRIMARY",
    "BlindTerms",
    "CareRelationshipScope",
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
    "SqlRecordStore",
    "SqlSealedElements",
    "SqlUnitOfWork",
    "StaleBlindIndex",
    "StoredVersion",
    "SubjectScope",
    "VersionConflict",
    "blind_terms",
    "caller_session",
]
