"""The records store's unit of work: one transaction on SQLite or PostgreSQL.

Why a module of its own: :class:`SqlUnitOfWork` is the adapter of the
:class:`~phivault.records.store.ports.RecordUnitOfWork` port, everything a transaction does:
writes (compare-and-swap of the current version, bulk creates), reads of versions with their
sealed groups, searches and ``_include``, care assignments, the conditional writes' locks and
the write-intent claims. The store (:mod:`~phivault.records.store.sql_store`) only opens units
(and routes them); the SQL they run is built in :mod:`~phivault.records.store._statements`
and reaches the driver through :mod:`~phivault.records.store._driver`. Here too: the input
checks made before any SQL, the index rows of a version's entries (:class:`_IndexRows`), and
the hand-over of a failing replica read to the primary (:func:`_failover`,
:class:`_ReplicaLink`). Driver exceptions never leave a unit
(:class:`~phivault.records.store.ports.RecordStoreUnavailable`, ``raise ... from exc``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, cast

import orjson
from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Connection,
    Table,
    and_,
    bindparam,
    delete,
    false,
    func,
    insert,
    select,
    text,
    tuple_,
    union,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.sql.elements import BindParameter, TextClause

from phivault.errors import InvalidInput
from phivault.pg_advisory import advisory_key
from phivault.records.classification import ElementGroup
from phivault.records.query import Include, SearchQuery
from phivault.records.search_params import (
    BlindEntry,
    DateEntry,
    IndexEntry,
    ReferenceEntry,
    StringEntry,
    TokenEntry,
)
from phivault.records.store._driver import (
    _bulk_insert_tuples,
    _direct,
    _driver_error,
    _DriverRead,
    _in_transaction,
    _on_driver,
    _pipelined,
)
from phivault.records.store._statements import (
    _ADVISORY_XACT_LOCK,
    _CLAIM_COLUMNS,
    _CLAIM_STATE,
    _CURRENT,
    _CURRENT_VERSION,
    _CURRENT_WITH,
    _DELETE_INDEX,
    _GROUP_COLUMNS,
    _GROUPS_OF,
    _GROUPS_OF_ANY,
    _HEAD_COLUMNS,
    _INDEX_TABLES,
    _INSERT_HEADS,
    _INSERT_VERSIONS,
    _LOCK_NOT_AVAILABLE,
    _READ_MANY,
    _SCHEMA_INFO,
    _SETTLE_CLAIM,
    _SOME_GROUPS_OF,
    _SOME_GROUPS_OF_ANY,
    _SWAP_COLUMNS,
    _TAKEN,
    _VREAD,
    _VREAD_WITH,
    _head_is,
    _key_params,
    _pg_create_one,
    _run_row,
)
from phivault.records.store.group_commit import _SavepointLost
from phivault.records.store.ports import (
    DIRECTORY_SUBJECT,
    BlindTerms,
    IntentClaim,
    IntentSettled,
    NewVersion,
    RecordStoreUnavailable,
    ResourceKey,
    Scope,
    SearchPage,
    StoredVersion,
    VersionConflict,
)
from phivault.records.store.routing import PRIMARY, Replica, ReplicaRouter
from phivault.records.store.schema import (
    CLAIMS_SINCE,
    DATE_MAX,
    DATE_MIN,
    care_assignments,
    groups,
    idx_blind,
    idx_date,
    idx_reference,
    idx_string,
    idx_token,
    intent_claims,
    resources,
    versions,
)
from phivault.records.store.search import (
    compile_search,
    from_micros,
    linked_patients,
    order_by,
    page_select,
    to_micros,
)

_TENANT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,127}$")
_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_RE: Final = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_GROUPS: Final = frozenset(g.value for g in ElementGroup)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _failover(
    method: Callable[Concatenate[SqlUnitOfWork, _P], _R],
) -> Callable[Concatenate[SqlUnitOfWork, _P], _R]:
    """A record read that a failing replica hands to the primary (once, then it stays there)."""

    @functools.wraps(method)
    def read(uow: SqlUnitOfWork, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(uow, *args, **kwargs)
        except RecordStoreUnavailable as exc:
            if not uow._fail_over(exc):
                raise
        return method(uow, *args, **kwargs)

    return read


def _check_key(key: ResourceKey) -> None:
    _check_tenant(key.tenant)
    _check_type(key.resource_type)
    if not _ID_RE.match(key.resource_id):
        raise InvalidInput("not a resource id", path="id")


def _check_tenant(tenant: str) -> None:
    if not _TENANT_RE.match(tenant):
        raise InvalidInput("not a tenant id", path="tenant")


def _check_type(resource_type: str) -> None:
    if not _TYPE_RE.match(resource_type):
        raise InvalidInput("not a resource type", path="resourceType")


def _check_groups(wanted: Collection[str] | None) -> None:
    if wanted is not None and not set(wanted) <= _GROUPS:
        raise InvalidInput("unknown element group", path="groups")


class _ReplicaLink:
    """What a unit of work reading from a replica needs besides its connection: the router
    (to report a failure) and a way to open a read-only transaction on the primary (for
    authorization state, and to take over when the replica fails)."""

    __slots__ = ("open_primary", "replica", "router")

    def __init__(
        self, router: ReplicaRouter, replica: Replica, open_primary: Callable[[], Connection]
    ) -> None:
        self.router = router
        self.replica = replica
        self.open_primary = open_primary


class SqlUnitOfWork:
    """One transaction: see :class:`~.ports.RecordUnitOfWork`.

    Usually one connection. A unit routed to a replica (``link``) reads records there and
    opens a second, read-only transaction on the primary when it first needs authorization
    state (:meth:`care_related`); if a record read fails on the replica, the unit moves to
    the primary for that read and the rest (``served_by`` then names both). A read-only
    unit on SQLite starts on the driver (``driver``, :class:`_DriverRead`) and has a
    SQLAlchemy connection only once it runs more than point reads.
    """

    def __init__(
        self,
        connection: Connection | _DriverRead,
        *,
        read_only: bool = False,
        link: _ReplicaLink | None = None,
        before_commit: Callable[[], None] | None = None,
        after_commit: Callable[[Connection], None] | None = None,
    ) -> None:
        self._driver: _DriverRead | None = None
        self._adopted: Connection | None = None
        if isinstance(connection, _DriverRead):
            self._driver = connection
            self._postgres = False
        else:
            self._conn = connection
            self._postgres = connection.dialect.name == "postgresql"
        self._done = False
        self._read_only = read_only
        self._link = link
        self._primary: Connection | None = None  # the authority beside a replica
        self._nodes = [PRIMARY if link is None else link.replica.name]
        self._before_commit = before_commit
        self._after_commit = after_commit
        self._commit_tried = False  # a failed commit may still have committed

    @property
    def _conn(self) -> Connection:
        """The unit's SQLAlchemy connection (a driver-begun unit adopts its own on first use)."""
        conn = self._adopted
        if conn is None:
            driver, self._driver = self._driver, None
            if driver is None:  # its adoption failed (and gave the connection back)
                raise InvalidInput("this unit of work has no connection")
            conn = self._adopted = driver.adopt()
        return conn

    @_conn.setter
    def _conn(self, connection: Connection) -> None:
        self._adopted = connection

    @property
    def served_by(self) -> str:
        """``primary``, ``replica:<host>:<port>``, or both (comma-separated) after a failover."""
        return ",".join(self._nodes)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    # transaction ------------------------------------------------------------------------

    def commit(self) -> None:
        if self._before_commit is not None:
            self._before_commit()
        self._commit_tried = True
        with self._translate("commit"):
            self._conn.commit()
            if self._primary is not None:
                self._primary.commit()
        self._done = True
        if self._after_commit is not None:
            self._after_commit(self._conn)

    def rollback(self) -> None:
        with self._translate("rollback"):
            self._conn.rollback()
            if self._primary is not None:
                self._primary.rollback()
        self._done = True

    def _close(self) -> None:
        """End the unit (rolling back what was not committed) and release its connections."""
        extra, self._primary = self._primary, None
        link, done, self._done = self._link, self._done, True
        driver, self._driver = self._driver, None
        if driver is not None:  # never adopted: nothing but the driver's transaction to end
            driver.end()
            return
        if self._adopted is None:
            return  # a driver-begun unit whose adoption failed: nothing is left open
        try:
            if link is not None:
                # What was read is already returned: a replica lost since then must not fail
                # the request as it ends (ending a read-only transaction loses nothing).
                try:
                    if not done:
                        self._conn.rollback()
                    self._conn.close()
                except SQLAlchemyError:
                    link.router.replica_failed(link.replica)
                    with suppress(SQLAlchemyError):
                        self._conn.invalidate()
            else:
                if not done:
                    self._conn.rollback()
                self._conn.close()
            if extra is not None:
                if not done:
                    extra.rollback()
                extra.close()
        except SQLAlchemyError as exc:
            raise _driver_error(exc, "rollback") from exc

    def _authority(self) -> Connection:
        """The connection for authorization state: the primary's, always."""
        conn = self._live()
        link = self._link
        if link is None:
            return conn
        if self._primary is None:
            self._primary = link.open_primary()
        return self._primary

    def _fail_over(self, exc: RecordStoreUnavailable) -> bool:
        """Move this unit from its replica to the primary after a driver error there (the
        replica is reported down if the error was a lost connection). False: nothing to do."""
        link = self._link
        if link is None or self._done or not isinstance(exc.__cause__, SQLAlchemyError):
            return False
        cause = exc.__cause__
        if not isinstance(cause, DBAPIError) or cause.connection_invalidated:
            link.router.replica_failed(link.replica)  # else (a recovery conflict): still up
        failed, self._link = self._conn, None
        with suppress(SQLAlchemyError):  # the replica is gone; its connection with it
            failed.close()
        self._conn = self._primary if self._primary is not None else link.open_primary()
        self._primary = None
        self._nodes.append(PRIMARY)
        return True

    @contextmanager
    def _translate(self, doing: str) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise _driver_error(exc, doing) from exc

    def _live(self) -> Connection:
        if self._done:
            raise InvalidInput("this unit of work is finished; open a new one")
        return self._conn

    def _writable(self) -> Connection:
        """Refuse writes in a read-only unit on both engines (SQLite would not)."""
        if self._read_only:
            raise InvalidInput("this unit of work is read-only")
        return self._live()

    def mark_unit(self) -> None:
        """Begin a group's chain of unit savepoints (:meth:`next_unit`, :meth:`undo_unit`):
        ``SAVEPOINT`` before its first unit (:class:`_SavepointLost` if that fails)."""
        conn = self._writable()
        try:
            _on_driver(conn, "SAVEPOINT phivault_unit", ())
        except SQLAlchemyError as exc:
            raise _SavepointLost("savepoint") from exc

    def next_unit(self, *, last: bool = False) -> None:
        """The unit since the savepoint succeeded: keep it (``RELEASE``) and mark the next
        one (``SAVEPOINT``; not after the ``last``). On PostgreSQL both go as one query (one
        round trip, not two, for each unit of a group), and the last unit needs no release:
        the group's ``COMMIT`` keeps it, and PostgreSQL never ends a transaction on its own.
        SQLite may (after a full disk): its release also proves the savepoint is still
        there, so nothing is committed over a transaction it ended (:class:`_SavepointLost`)."""
        conn = self._writable()
        try:
            if self._postgres:
                if last:
                    return
                # No parameters: psycopg sends it with the simple protocol, two statements in
                # one message (SQLAlchemy's own transaction is untouched either way).
                _on_driver(conn, "RELEASE SAVEPOINT phivault_unit; SAVEPOINT phivault_unit", None)
            else:
                _on_driver(conn, "RELEASE SAVEPOINT phivault_unit", ())
                if not last:
                    _on_driver(conn, "SAVEPOINT phivault_unit", ())
        except SQLAlchemyError as exc:
            raise _SavepointLost("release savepoint") from exc
        if not _in_transaction(conn):
            raise _SavepointLost("the transaction ended")

    def undo_unit(self) -> None:
        """The unit since the savepoint failed: undo what it wrote (``ROLLBACK TO``, which
        keeps the savepoint for the next unit). :class:`_SavepointLost` if that cannot be
        done or the database ended the transaction."""
        conn = self._writable()
        try:
            _on_driver(conn, "ROLLBACK TO SAVEPOINT phivault_unit", ())
        except SQLAlchemyError as exc:
            raise _SavepointLost("rollback to savepoint") from exc
        if not _in_transaction(conn):
            raise _SavepointLost("the transaction ended")

    # writes -----------------------------------------------------------------------------

    def write(self, new: NewVersion, *, previous: int | None) -> StoredVersion:
        key = new.key
        _check_new(new, previous)
        stamp = to_micros(new.last_updated)
        conn = self._writable()
        with self._translate("write"):
            self._swap_head(key, previous, new.version, stamp, new.key_subject, deleted=False)
            seq = self._insert_version(key, new.version, stamp, new.key_subject, deleted=False)
            sealed = [
                (seq, key.tenant, new.key_subject, name, data)
                for name, data in sorted(new.groups.items())
            ]
            _bulk_insert_tuples(conn, groups, _GROUP_COLUMNS, sealed)
            self._replace_index(key, new.key_subject, new.index, fresh=previous is None)
        return StoredVersion(
            key, new.version, new.last_updated, False, new.key_subject, dict(new.groups)
        )

    def create_many(self, news: Sequence[NewVersion]) -> None:
        """Create many new resources (version 1 each) in a few statements: a transaction
        Bundle of a thousand entries costs a handful of round trips, not six thousand.
        :class:`VersionConflict` if one of them exists already."""
        if not news:
            return
        for new in news:
            _check_new(new, None)
        keys = [(n.key.tenant, n.key.resource_type, n.key.resource_id) for n in news]
        if len(set(keys)) != len(keys):
            raise InvalidInput("the same resource is created twice", path="id")
        conn = self._writable()
        if len(news) == 1:
            self._create_one(conn, news[0])
            return
        with self._translate("write"):
            rows = [
                (*key, 1, False, to_micros(n.last_updated), n.key_subject)
                for key, n in zip(keys, news, strict=True)
            ]  # in _HEAD_COLUMNS order
            seqs = self._create_heads(conn, keys, rows) if self._postgres else (
                self._create_heads_sqlite(conn, keys, rows)
            )  # fmt: skip
            sealed = [
                (seq, n.key.tenant, n.key_subject, name, data)  # in _GROUP_COLUMNS order
                for n, seq in zip(news, seqs, strict=True)
                for name, data in sorted(n.groups.items())
            ]
            index = _IndexRows()
            for n in news:
                index.add(n.key, n.key_subject, n.index)
            with _pipelined(conn):
                _bulk_insert_tuples(conn, groups, _GROUP_COLUMNS, sealed)
                index.insert(conn)

    def _create_heads(
        self, conn: Connection, keys: list[tuple[str, str, str]], rows: list[tuple[Any, ...]]
    ) -> Sequence[int]:
        """:meth:`create_many`'s heads and versions (PostgreSQL): refuse a taken key, insert
        the heads, then the versions; their seqs, in ``rows`` order."""
        for chunk in _chunks(keys, 500):
            taken = conn.execute(_TAKEN, {"keys": list(chunk)}).first()
            if taken is not None:
                raise VersionConflict(taken[0], taken[1], None, int(taken[2]))
        heads = [dict(zip(_HEAD_COLUMNS, row, strict=True)) for row in rows]
        try:
            conn.execute(_INSERT_HEADS, heads)
        except IntegrityError:  # a concurrent writer created one meanwhile
            raise VersionConflict(keys[0][1], "(one of the bundle)", None, 1) from None
        return conn.execute(_INSERT_VERSIONS, heads).scalars().all()

    def _create_heads_sqlite(
        self, conn: Connection, keys: list[tuple[str, str, str]], rows: list[tuple[Any, ...]]
    ) -> Sequence[int]:
        """:meth:`_create_heads` on SQLite, on the driver. SQLite has one writer at a time, so
        no key is taken between a look and the insert: the heads go in without a look first
        (an existence check of a Synthea bundle's keys cost 7 us a resource), in a savepoint,
        and only if one is taken (the primary key refuses it) is it rolled back and looked
        for, to name it. The versions: SQLAlchemy keeps a bulk insert's RETURNING rows in
        order on SQLite only by running each row as a statement of its own through its
        execution machinery (16 us a resource); here one executemany and two single-row
        statements on the driver (see below)."""
        _on_driver(conn, "SAVEPOINT phivault_heads", ())
        try:
            _bulk_insert_tuples(conn, resources, _HEAD_COLUMNS, rows)
        except IntegrityError:
            _on_driver(conn, "ROLLBACK TO SAVEPOINT phivault_heads", ())
            _on_driver(conn, "RELEASE SAVEPOINT phivault_heads", ())
            for chunk in _chunks(keys, 500):
                taken = conn.execute(_TAKEN, {"keys": list(chunk)}).first()
                if taken is not None:
                    raise VersionConflict(taken[0], taken[1], None, int(taken[2])) from None
            raise VersionConflict(keys[0][1], "(one of the bundle)", None, 1) from None
        _on_driver(conn, "RELEASE SAVEPOINT phivault_heads", ())
        # The versions: the first returns its seq, the rest go in by the driver's executemany,
        # and the last one's seq is asked for. AUTOINCREMENT gives every new row a seq larger
        # than any before it, so the seqs rise with each row; with one writer at a time and
        # ``last - first == len(rows) - 1`` they are exactly first, first + 1, ..., last in
        # row order (otherwise nothing is written: fail closed).
        first = int(_run_row(conn, "insert_version", _HEAD_COLUMNS, rows[0]).rows[0][0])
        _bulk_insert_tuples(conn, versions, _HEAD_COLUMNS, rows[1:])
        last = int(_on_driver(conn, "SELECT last_insert_rowid()", ()).rows[0][0])
        if last - first != len(rows) - 1:
            raise RecordStoreUnavailable(
                "records store: version rows were not numbered in order; nothing was written"
            )
        return range(first, last + 1)

    def _create_one(self, conn: Connection, new: NewVersion) -> None:
        """:meth:`create_many` of one resource, on the driver's cursor with statements
        compiled once (SQLAlchemy's per-statement work cost more than the database's): the
        head is inserted unless it exists (no SELECT before: a taken id is found by the
        insert). On PostgreSQL all of it is one statement (:func:`_pg_create_one`): one
        execution and one round trip instead of one per table."""
        key, subject = new.key, new.key_subject
        stamp = to_micros(new.last_updated)
        head = (key.tenant, key.resource_type, key.resource_id, 1, False, stamp, subject)
        with self._translate("write"):
            if self._postgres:
                params = _create_one_params(head, new)
                if not _on_driver(conn, _PG_CREATE_ONE, params).rows:
                    actual = conn.execute(_CURRENT_VERSION, _key_params(key)).scalar_one_or_none()
                    raise VersionConflict(key.resource_type, key.resource_id, None, actual)
                return
            if _run_row(conn, "create_head", _HEAD_COLUMNS, head).rowcount != 1:
                actual = conn.execute(_CURRENT_VERSION, _key_params(key)).scalar_one_or_none()
                raise VersionConflict(key.resource_type, key.resource_id, None, actual)
            seq = _run_row(conn, "insert_version", _HEAD_COLUMNS, head).rows[0][0]
            sealed = [
                (seq, key.tenant, subject, name, data) for name, data in sorted(new.groups.items())
            ]
            _bulk_insert_tuples(conn, groups, _GROUP_COLUMNS, sealed)
            rows = _IndexRows()
            rows.add(key, subject, new.index)
            rows.insert(conn)

    def delete(
        self, key: ResourceKey, *, version: int, last_updated: datetime, previous: int
    ) -> StoredVersion:
        _check_key(key)
        if version != previous + 1:
            raise InvalidInput("a new version must follow the previous one", path="version")
        stamp = to_micros(last_updated)
        conn = self._writable()
        with self._translate("delete"):
            subject = conn.execute(
                select(resources.c.key_subject).where(*_head_is(key))
            ).scalar_one_or_none()
            if subject is None:
                raise VersionConflict(key.resource_type, key.resource_id, previous, None)
            self._swap_head(key, previous, version, stamp, subject, deleted=True)
            self._insert_version(key, version, stamp, subject, deleted=True)
            self._replace_index(key, subject, ())
        return StoredVersion(key, version, last_updated, True, subject, {})

    def _swap_head(
        self,
        key: ResourceKey,
        previous: int | None,
        version: int,
        stamp: int,
        subject: str,
        *,
        deleted: bool,
    ) -> None:
        """Compare-and-swap the current version; :class:`VersionConflict` if it moved."""
        conn = self._conn
        if previous is None:
            head = (
                key.tenant,
                key.resource_type,
                key.resource_id,
                version,
                deleted,
                stamp,
                subject,
            )
            changed = _run_row(conn, "create_head", _HEAD_COLUMNS, head).rowcount
        else:
            swap = (key.tenant, key.resource_type, key.resource_id, previous)
            changed = _run_row(
                conn, "update_head", _SWAP_COLUMNS, (*swap, version, deleted, stamp, subject)
            ).rowcount
        if changed != 1:
            actual = conn.execute(_CURRENT_VERSION, _key_params(key)).scalar_one_or_none()
            raise VersionConflict(key.resource_type, key.resource_id, previous, actual)

    def _insert_version(
        self, key: ResourceKey, version: int, stamp: int, subject: str, *, deleted: bool
    ) -> int:
        row = (key.tenant, key.resource_type, key.resource_id, version, deleted, stamp, subject)
        return int(_run_row(self._conn, "insert_version", _HEAD_COLUMNS, row).rows[0][0])

    def _replace_index(
        self,
        key: ResourceKey,
        subject: str,
        entries: Sequence[IndexEntry],
        *,
        fresh: bool = False,
    ) -> None:
        """Index rows hold the current version only: replace them all, in this transaction.
        ``fresh``: the resource was just created (no head before), so it has no rows yet."""
        conn = self._conn
        if not fresh:
            params = _key_params(key)
            for table in _INDEX_TABLES:
                conn.execute(_DELETE_INDEX[table.name], params)
        rows = _IndexRows()
        rows.add(key, subject, entries)
        rows.insert(conn)

    def reindex(self, key: ResourceKey, *, version: int, index: Sequence[IndexEntry]) -> None:
        """Replace the index rows of the current version without writing a new one (index-key
        rotation, a changed normalization). :class:`VersionConflict` if ``version`` is not
        current (or is a tombstone): the writer that moved it indexed its own version."""
        _check_key(key)
        conn = self._writable()
        with self._translate("reindex"):
            h = resources.c
            subject = conn.execute(
                update(resources)  # locks the head row until commit, like a write
                .where(*_head_is(key), h.version == version, h.deleted == false())
                .values(version=h.version)
                .returning(h.key_subject)
            ).scalar_one_or_none()
            if subject is None:
                actual = conn.execute(select(h.version).where(*_head_is(key))).scalar_one_or_none()
                raise VersionConflict(key.resource_type, key.resource_id, version, actual)
            self._replace_index(key, subject, index)

    # reads ------------------------------------------------------------------------------

    @_failover
    def read(
        self, key: ResourceKey, *, groups: Collection[str] | None = None
    ) -> StoredVersion | None:
        _check_key(key)
        _check_groups(groups)
        if self._postgres or not groups:
            return self._one_version(_CURRENT_WITH, _CURRENT, groups, _key_params(key))
        found = self._versions(_CURRENT, groups, _key_params(key))
        return found[0] if found else None

    @_failover
    def vread(
        self, key: ResourceKey, version: int, *, groups: Collection[str] | None = None
    ) -> StoredVersion | None:
        _check_key(key)
        _check_groups(groups)
        params = {**_key_params(key), "version": version}
        if self._postgres or not groups:
            return self._one_version(_VREAD_WITH, _VREAD, groups, params)
        found = self._versions(_VREAD, groups, params)
        return found[0] if found else None

    @_failover
    def read_many(
        self, wanted: Sequence[tuple[ResourceKey, int | None]]
    ) -> list[StoredVersion | None]:
        """Several point reads at once: for each (key, version) of ``wanted``, that version
        (``None``: the current one, a tombstone if deleted) with all its sealed groups, or
        ``None``; in ``wanted`` order. What :meth:`read` and :meth:`vread` of each would
        return, in one statement on PostgreSQL (:data:`_READ_MANY`: one round trip and one
        execution for them all; a single read runs as :meth:`read` runs it); SQLite reads them
        one after another. Every key is checked
        first: one that is not valid refuses them all (``InvalidInput``)."""
        for key, version in wanted:
            _check_key(key)
            if version is not None and not isinstance(version, int):
                raise InvalidInput("not a version number", path="version")
        if not self._postgres or len(wanted) == 1:
            # SQLite reads each in tens of microseconds; a PostgreSQL read alone is cheaper as
            # the single statement (0.17 against 0.22 ms of backend CPU, measured side by side)
            return [self.read(k) if v is None else self.vread(k, v) for k, v in wanted]
        if not wanted:
            return []
        params = {
            "m_tenants": [k.tenant for k, _ in wanted],
            "m_types": [k.resource_type for k, _ in wanted],
            "m_ids": [k.resource_id for k, _ in wanted],
            "m_versions": [v for _, v in wanted],
        }
        conn = self._live()
        rows: Sequence[Sequence[Any]] | None = _direct(conn, _READ_MANY, params)
        if rows is None:
            with self._translate("read"):
                rows = conn.execute(_READ_MANY, params).all()
        return _versions_by_position(rows, len(wanted))

    @_failover
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
        _check_tenant(tenant)
        _check_type(resource_type)
        _check_groups(groups)
        if count < 0 or offset < 0:
            raise InvalidInput("count and offset must not be negative", path="_count")
        v = versions.c
        # A scope sees the version rows as it sees current ones: the same columns, so a
        # version is admitted by what it was sealed under (its patient), not by the head.
        statement = select(versions).where(
            v.tenant == tenant,
            v.resource_type == resource_type,
            *(scope.predicate(versions) for scope in scopes),
        )
        if resource_id is not None:
            statement = statement.where(v.resource_id == resource_id).order_by(v.version.desc())
        else:
            statement = statement.order_by(v.seq.desc())
        return self._versions(statement.offset(offset).limit(count), groups)

    def _versions(
        self,
        statement: Any,
        wanted: Collection[str] | None,
        params: Mapping[str, Any] | None = None,
    ) -> list[StoredVersion]:
        """Version rows of ``statement`` with their sealed groups (only ``wanted`` ones)."""
        conn = self._live()
        with self._translate("read"):
            rows = conn.execute(statement, params or {}).mappings().all()
            sealed: dict[int, dict[str, bytes]] = {int(r["seq"]): {} for r in rows}
            if sealed and (wanted is None or wanted):
                # PostgreSQL takes the lists as arrays: one statement text whatever their
                # length, where an expanding IN is rendered again for each call.
                pg = conn.dialect.name == "postgresql"
                if wanted is None:
                    found = conn.execute(
                        _GROUPS_OF_ANY if pg else _GROUPS_OF, {"seqs": list(sealed)}
                    )
                else:
                    found = conn.execute(
                        _SOME_GROUPS_OF_ANY if pg else _SOME_GROUPS_OF,
                        {"seqs": list(sealed), "groups": sorted(wanted)},
                    )
                for seq, grp, data in found:
                    sealed[int(seq)][grp] = bytes(data)
        return [
            StoredVersion(
                ResourceKey(r["tenant"], r["resource_type"], r["resource_id"]),
                int(r["version"]),
                from_micros(int(r["last_updated"])),
                bool(r["deleted"]),
                r["key_subject"],
                sealed[int(r["seq"])],
            )
            for r in rows
        ]

    def _one_version(
        self,
        joined: Mapping[bool, Any],
        bare: Any,
        wanted: Collection[str] | None,
        params: Mapping[str, Any],
    ) -> StoredVersion | None:
        """At most one version and its sealed groups (only ``wanted`` ones) in **one**
        statement: the version row outer-joined with its groups, one row per group (or one
        row with no group). ``joined[True]``: every group; ``[False]``: those named by the
        ``groups`` array (PostgreSQL only). A read is one round trip, not two. On the
        driver's cursor where the unit allows (a driver-begun SQLite unit, PostgreSQL's
        read pool), else through SQLAlchemy."""
        grouped = wanted is None or bool(wanted)
        statement = joined[wanted is None] if grouped else bare
        if wanted:
            params = {**params, "groups": sorted(wanted)}
        driver = self._driver
        rows: Sequence[Sequence[Any]] | None = None
        if driver is not None and not self._done:
            rows = driver.rows(statement, params)
        if rows is None:
            conn = self._live()
            rows = _direct(conn, statement, params)
            if rows is None:
                with self._translate("read"):
                    rows = conn.execute(statement, params).all()
        if not rows:
            return None
        # The columns of rec_versions in table order, then (grouped) grp and ciphertext.
        _, tenant, resource_type, resource_id, version, deleted, stamp, subject = rows[0][:8]
        sealed = (
            {str(row[8]): bytes(row[9]) for row in rows if row[8] is not None} if grouped else {}
        )
        return StoredVersion(
            ResourceKey(tenant, resource_type, resource_id),
            int(version),
            from_micros(int(stamp)),
            bool(deleted),
            subject,
            sealed,
        )

    @_failover
    def scan_current(
        self,
        tenant: str,
        *,
        after: tuple[str, str] | None = None,
        limit: int = 500,
        groups: Collection[str] | None = None,
    ) -> list[StoredVersion]:
        """Current, not deleted versions of ``tenant`` in (type, id) order after ``after``: the
        walk a re-index makes, batch by batch."""
        _check_tenant(tenant)
        _check_groups(groups)
        h = resources.c
        where = and_(h.tenant == tenant, h.deleted == false())
        if after is not None:
            where = and_(where, tuple_(h.resource_type, h.resource_id) > tuple_(*after))
        statement = page_select(where).order_by(h.resource_type, h.resource_id).limit(limit)
        return self._versions(statement, groups)

    # search -----------------------------------------------------------------------------

    @_failover
    def search(
        self,
        tenant: str,
        query: SearchQuery,
        *,
        blind: BlindTerms | None = None,
        scopes: Sequence[Scope] = (),
        offset: int = 0,
        groups: Collection[str] | None = None,
    ) -> SearchPage:
        _check_tenant(tenant)
        _check_groups(groups)
        if offset < 0:
            raise InvalidInput("must not be negative", path="_offset")
        where = compile_search(tenant, query, blind=blind, scopes=scopes)
        conn = self._live()
        with self._translate("search"):
            total = None
            if query.total == "accurate":
                total = int(
                    conn.execute(
                        select(func.count()).select_from(resources).where(where)
                    ).scalar_one()
                )
            if query.count == 0:
                return SearchPage((), offset, None, total)
        window = page_select(where).order_by(*order_by(query)).offset(offset)
        found = self._versions(window.limit(query.count + 1), groups)
        more = len(found) > query.count
        return SearchPage(
            tuple(found[: query.count]), offset, offset + query.count if more else None, total
        )

    @_failover
    def included(
        self,
        tenant: str,
        matches: Sequence[StoredVersion],
        include: Include,
        *,
        scopes: Sequence[Scope] = (),
        groups: Collection[str] | None = None,
    ) -> list[StoredVersion]:
        """``_include``: current, not deleted resources that ``include.param`` of ``matches``
        refers to, under the same ``scopes`` as the search (an include never shows what the
        caller could not search for), in (type, id) order."""
        _check_tenant(tenant)
        _check_groups(groups)
        ids = sorted(
            {m.key.resource_id for m in matches if m.key.resource_type == include.source_type}
        )
        if not ids:
            return []
        r, h = idx_reference.c, resources.c
        targets = select(r.target_type, r.target_id).where(
            r.tenant == tenant,
            r.resource_type == include.source_type,
            r.param == include.param,
            r.resource_id.in_(ids),
        )
        if include.target_type is not None:
            targets = targets.where(r.target_type == include.target_type)
        where = and_(
            h.tenant == tenant,
            h.deleted == false(),
            tuple_(h.resource_type, h.resource_id).in_(targets),
            *(scope.predicate(resources) for scope in scopes),
        )
        statement = page_select(where).order_by(h.resource_type, h.resource_id)
        return self._versions(statement, groups)

    def assign_care(
        self, tenant: str, practitioner: tuple[str, str], patient: str, *, by: str, at: int
    ) -> bool:
        """Record an explicit care assignment; False if it already existed."""
        _check_tenant(tenant)
        _check_type(practitioner[0])
        for value, where in ((practitioner[1], "practitioner"), (patient, "patient")):
            if not _ID_RE.match(value):
                raise InvalidInput("not a resource id", path=where)
        conn = self._writable()
        a = care_assignments.c
        key = (
            a.tenant == tenant,
            a.practitioner_type == practitioner[0],
            a.practitioner_id == practitioner[1],
            a.patient_id == patient,
        )
        with self._translate("assign care"):
            if conn.execute(select(a.patient_id).where(*key)).first() is not None:
                return False
            conn.execute(
                insert(care_assignments).values(
                    tenant=tenant, practitioner_type=practitioner[0],
                    practitioner_id=practitioner[1], patient_id=patient,
                    assigned_by=by, assigned_at=at,
                )
            )  # fmt: skip
        return True

    def unassign_care(self, tenant: str, practitioner: tuple[str, str], patient: str) -> bool:
        """Remove an explicit care assignment; False if there was none."""
        _check_tenant(tenant)
        conn = self._writable()
        a = care_assignments.c
        with self._translate("unassign care"):
            removed = conn.execute(
                delete(care_assignments).where(
                    a.tenant == tenant,
                    a.practitioner_type == practitioner[0],
                    a.practitioner_id == practitioner[1],
                    a.patient_id == patient,
                )
            ).rowcount
        return bool(removed)

    def care_related(
        self, tenant: str, practitioner: tuple[str, str], patients: Collection[str]
    ) -> set[str]:
        """Which of ``patients`` the practitioner (type, id) has a care relationship with.
        Authorization state: read on the primary even in a unit served by a replica, so that
        a relationship ended a moment ago no longer counts. One statement for every way a
        relationship is established and every patient asked about (:data:`_CARE_RELATED`):
        one round trip, and one snapshot of them all."""
        _check_tenant(tenant)
        wanted = sorted(set(patients))
        if not wanted:
            return set()
        asked = {"care_tenant": tenant, "care_type": practitioner[0], "care_id": practitioner[1]}
        if len(wanted) > 1:
            conn = self._authority()
            with self._translate("care relationship"):
                found = conn.execute(_CARE_RELATED, {**asked, "care_patients": wanted})
                return {str(row[0]) for row in found}
        # One patient (a read): a constant text, on the driver's cursor where the unit allows
        # (a driver-begun SQLite unit, PostgreSQL's read pool), as the read itself ran.
        asked["care_patient"] = wanted[0]
        rows: Sequence[Sequence[Any]] | None = None
        driver = self._driver
        if driver is not None and not self._done:
            statement, constants = _care_of_one()
            rows = driver.rows(statement, {**constants, **asked})
        if rows is None:
            conn = self._authority()
            statement, constants = _care_of_one()
            params = {**constants, **asked}
            rows = _direct(conn, statement, params)
            if rows is None:
                with self._translate("care relationship"):
                    rows = conn.execute(statement, params).all()
        return {str(row[0]) for row in rows}

    @_failover
    def find_ids(
        self,
        tenant: str,
        query: SearchQuery,
        *,
        blind: BlindTerms | None = None,
        scopes: Sequence[Scope] = (),
        limit: int = 2,
    ) -> list[str]:
        _check_tenant(tenant)
        where = compile_search(tenant, query, blind=blind, scopes=scopes)
        conn = self._live()
        with self._translate("search"):
            rows = conn.execute(
                select(resources.c.resource_id)
                .where(where)
                .order_by(resources.c.resource_id)
                .limit(limit)
            ).all()
        return [str(r[0]) for r in rows]

    # conditional writes (docs/decisions/records-transactions.md) -------------------------

    def serialize_conditional(self, tenant: str, resource_types: Collection[str]) -> None:
        """PostgreSQL: transaction-scoped advisory locks, one per (schema, tenant, type),
        taken in name order (so two writers never wait for each other in a cycle). Per
        type, not per criteria: the criteria hold identifiers (PHI) that must not reach
        ``pg_locks``, and a coarse lock also orders lookups by different criteria that
        match one resource. Unconditional writes take no lock."""
        _check_tenant(tenant)
        for resource_type in resource_types:
            _check_type(resource_type)
        conn = self._writable()
        if not self._postgres or not resource_types:
            return  # SQLite: one writer at a time
        with self._translate("serialize conditional writes"):
            schema = conn.info.get(_SCHEMA_INFO)
            if schema is None:  # once per pooled connection
                schema = conn.info[_SCHEMA_INFO] = conn.execute(
                    text("SELECT current_schema()")
                ).scalar()
            for name in sorted(
                f"phivault.records.conditional:{schema}:{tenant}:{t}" for t in set(resource_types)
            ):
                _on_driver(conn, _ADVISORY_XACT_LOCK, {"k": advisory_key(name)})

    # write-intent claims (docs/decisions/records-intent-claims.md) ---------------------------

    def claim_intents(self, tenant: str, claims: Collection[str], *, at: int) -> None:
        """Claim the intents for this transaction's changes; :class:`IntentSettled` if the
        reconciler holds one (PostgreSQL first waits for a reconciler still deciding)."""
        _check_tenant(tenant)
        if not claims:
            return
        conn = self._writable()
        rows = [(tenant, c, IntentClaim.WRITTEN.value, at) for c in sorted(set(claims))]
        try:
            if len(rows) == 1:  # one execute, not an executemany (a pipeline on PostgreSQL)
                _run_row(conn, "claim", _CLAIM_COLUMNS, rows[0])
            else:
                _bulk_insert_tuples(conn, intent_claims, _CLAIM_COLUMNS, rows)
        except IntegrityError:
            raise IntentSettled(
                "records store: this write's intent was already settled as not made (the "
                "write waited too long); nothing was written, retry it"
            ) from None
        except SQLAlchemyError as exc:
            raise _driver_error(exc, "claim intent") from exc

    def settle_intent(
        self,
        tenant: str,
        claim: str,
        *,
        at: int,
        unclaimed: IntentClaim = IntentClaim.ABSENT,
        wait_s: float = 10.0,
    ) -> IntentClaim | None:
        """Insert the claim as ``unclaimed`` unless someone holds it; who holds it. On
        PostgreSQL the insert waits for an open writing transaction that inserted the same
        key, up to ``wait_s`` (then None, and this unit can only roll back); on SQLite this
        unit's write lock already waited for every writer."""
        _check_tenant(tenant)
        conn = self._writable()
        postgres = conn.dialect.name == "postgresql"
        row = {"tenant": tenant, "claim": claim, "state": unclaimed.value, "claimed_at": at}
        try:
            if postgres:
                # A writer stuck with its transaction open must not hold every later intent
                # (and, through the reconcile lock, every worker's reconciling) hostage.
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(wait_s * 1000))}")
            conn.execute(_SETTLE_CLAIM[postgres], row)
            state = conn.execute(_CLAIM_STATE, {"c_tenant": tenant, "claim": claim}).scalar_one()
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
                return None
            raise _driver_error(exc, "settle intent") from exc
        except SQLAlchemyError as exc:
            raise _driver_error(exc, "settle intent") from exc
        return IntentClaim(state)

    def intent_claims_since(self) -> int | None:
        conn = self._live()
        tenant, claim, _ = CLAIMS_SINCE
        with self._translate("read claims"):
            since = conn.execute(
                select(intent_claims.c.claimed_at).where(
                    intent_claims.c.tenant == tenant, intent_claims.c.claim == claim
                )
            ).scalar_one_or_none()
        return None if since is None else int(since)

    def prune_intent_claims(self, *, before: int) -> int:
        conn = self._writable()
        c = intent_claims.c
        with self._translate("prune claims"):
            removed = conn.execute(
                delete(intent_claims).where(c.claimed_at < before, c.tenant != CLAIMS_SINCE[0])
            ).rowcount
        return int(removed)


#: The columns of each index table's rows as :class:`_IndexRows` builds them (tuples).
_INDEX_COLUMNS: Final = {
    idx_token.name: ("tenant", "resource_type", "resource_id", "param", "code", "system"),
    idx_string.name: ("tenant", "resource_type", "resource_id", "param", "value"),
    idx_date.name: ("tenant", "resource_type", "resource_id", "param", "low", "high"),
    idx_reference.name: (
        "tenant", "resource_type", "resource_id", "param", "target_type", "target_id",
    ),
    idx_blind.name: (
        "tenant", "resource_type", "resource_id", "param", "field", "key_version", "token",
        "key_subject",
    ),
}  # fmt: skip


def _versions_by_position(rows: Sequence[Sequence[Any]], count: int) -> list[StoredVersion | None]:
    """The rows of :data:`_READ_MANY` as one version (or None) per read position: each row is
    the position (from 1), the version's columns in table order, a group and its ciphertext
    (both NULL for a version without groups)."""
    heads: dict[int, Sequence[Any]] = {}
    sealed: dict[int, dict[str, bytes]] = {}
    for row in rows:
        at = int(row[0]) - 1
        if at not in heads:
            heads[at] = row
            sealed[at] = {}
        if row[9] is not None:
            sealed[at][str(row[9])] = bytes(row[10])
    found: list[StoredVersion | None] = [None] * count
    for at, row in heads.items():
        _, tenant, resource_type, resource_id, number, deleted, stamp, subject = row[1:9]
        found[at] = StoredVersion(
            ResourceKey(tenant, resource_type, resource_id),
            int(number),
            from_micros(int(stamp)),
            bool(deleted),
            subject,
            sealed[at],
        )
    return found


def _check_index_keys() -> None:
    """What :class:`_IndexRows` relies on: the whole row is the primary key of every index
    table but the blind one, whose key it builds itself. Checked at import."""
    for table in (idx_token, idx_string, idx_date, idx_reference, idx_blind):
        key = {c.name for c in table.primary_key.columns}
        columns = _INDEX_COLUMNS[table.name]
        if set(columns) != {c.name for c in table.columns}:
            raise RuntimeError(f"{table.name}: _INDEX_COLUMNS does not match the table")
        wanted = (
            {"tenant", "resource_type", "field", "token", "resource_id"}
            if table is idx_blind
            else set(columns)
        )
        if key != wanted:
            raise RuntimeError(f"{table.name}: its primary key is not what _IndexRows assumes")


class _IndexRows:
    """The index table rows of resources' entries, as tuples in :data:`_INDEX_COLUMNS` order
    (no dict per row), each table's rows without repeats of its primary key (two entries
    that differ only outside the key, such as two tokens of one normalized value: the first
    is kept)."""

    __slots__ = ("blind", "date", "reference", "string", "token")

    def __init__(self) -> None:
        self.token: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.string: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.date: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.reference: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.blind: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def add(self, key: ResourceKey, subject: str, entries: Sequence[IndexEntry]) -> None:
        tenant, kind, ident = key.tenant, key.resource_type, key.resource_id
        row: tuple[Any, ...]
        for entry in entries:
            if isinstance(entry, TokenEntry):
                row = (tenant, kind, ident, entry.param, entry.code, entry.system or "")
                self.token.setdefault(row, row)  # the whole row is the key
            elif isinstance(entry, ReferenceEntry):
                row = (tenant, kind, ident, entry.param, entry.target_type, entry.target_id)
                self.reference.setdefault(row, row)
            elif isinstance(entry, DateEntry):
                low = to_micros(entry.range.low, default=DATE_MIN)
                high = to_micros(entry.range.high, default=DATE_MAX)
                row = (tenant, kind, ident, entry.param, low, high)
                self.date.setdefault(row, row)
            elif isinstance(entry, StringEntry):
                row = (tenant, kind, ident, entry.param, entry.value)
                self.string.setdefault(row, row)
            elif isinstance(entry, BlindEntry):
                token = entry.token
                row = (
                    tenant, kind, ident, entry.param, token.field, token.version, token.token,
                    subject,
                )  # fmt: skip
                # primary key: tenant, resource_type, field, token, resource_id
                self.blind.setdefault((tenant, kind, token.field, token.token, ident), row)

    def by_table(self) -> tuple[tuple[Table, list[tuple[Any, ...]]], ...]:
        """Each index table with its rows (in :data:`_INDEX_COLUMNS` order), empty ones too."""
        return (
            (idx_token, list(self.token.values())),
            (idx_string, list(self.string.values())),
            (idx_date, list(self.date.values())),
            (idx_reference, list(self.reference.values())),
            (idx_blind, list(self.blind.values())),
        )

    def insert(self, conn: Connection) -> None:
        for table, rows in self.by_table():
            if rows:
                _bulk_insert_tuples(conn, table, _INDEX_COLUMNS[table.name], rows)


_check_index_keys()
#: PostgreSQL: a single create as one statement (:func:`_pg_create_one`).
_PG_CREATE_ONE: Final = _pg_create_one(_INDEX_COLUMNS)


def _create_one_params(head: tuple[Any, ...], new: NewVersion) -> dict[str, Any]:
    """The parameters of :data:`_PG_CREATE_ONE`: the head's columns, each group's name and
    ciphertext (in name order) and each index table's rows (one JSON array of them)."""
    params: dict[str, Any] = dict(zip(_HEAD_COLUMNS, head, strict=True))
    named = sorted(new.groups.items())
    params["g_grp"] = [name for name, _ in named]
    params["g_ciphertext"] = [data for _, data in named]
    index = _IndexRows()
    index.add(new.key, new.key_subject, new.index)
    for table, rows in index.by_table():
        params[table.name] = orjson.dumps(rows).decode() if rows else "[]"
    return params


def _check_new(new: NewVersion, previous: int | None) -> None:
    key = new.key
    _check_key(key)
    _check_groups(new.groups)
    if not _ID_RE.match(new.key_subject):
        raise InvalidInput("not a key subject (a patient id)", path="key_subject")
    if key.resource_type == "Patient":
        if key.resource_id == DIRECTORY_SUBJECT:
            raise InvalidInput("this Patient id is reserved", path="id")
        if new.key_subject != key.resource_id:
            raise InvalidInput("a Patient is sealed under its own key", path="key_subject")
    if new.version != (previous or 0) + 1:
        raise InvalidInput("a new version must follow the previous one", path="version")
    if not new.groups:
        raise InvalidInput("a version needs at least one sealed group", path="groups")


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _care_union(limit: Callable[[ColumnElement[str]], ColumnElement[bool]]) -> CompoundSelect[str]:
    """The patients ``:care_type/:care_id`` has a care relationship with in ``:care_tenant``,
    among those ``limit`` admits: the union of :func:`linked_patients`' queries (the one
    definition the search predicate uses too). Bound, not fixed: built once, keyed and
    compiled once, where building the queries per call cost more than running them."""
    tenant: BindParameter[str] = bindparam("care_tenant", "")
    kind: BindParameter[str] = bindparam("care_type", "")
    ident: BindParameter[str] = bindparam("care_id", "")
    # linked_patients compares the practitioner's type and id with what it is given
    linked = linked_patients(tenant, cast(str, kind), cast(str, ident))
    return union(*(query.where(limit(query.selected_columns[0])) for query in linked))


#: The patients among ``:care_patients`` (expanding) the practitioner cares for.
_CARE_RELATED: Final = _care_union(
    lambda patient: patient.in_(bindparam("care_patients", expanding=True))
)


@functools.cache
def _care_of_one() -> tuple[TextClause, dict[str, Any]]:
    """The same for one patient (``:care_patient``), as a constant text and the values of its
    constant parameters (resource types, parameters, void statuses): rendered once, it runs
    on a driver's cursor as it is. Plain SQL (joins, ``NOT EXISTS``, ``IN``, ``UNION``) that
    SQLite and PostgreSQL both run; rendered without PostgreSQL's ``::VARCHAR`` casts, which
    a text's ``:name`` parameters cannot be followed by."""
    statement = _care_union(lambda patient: patient == bindparam("care_patient", ""))
    compiled = statement.compile(
        dialect=sqlite.dialect(paramstyle="named"), compile_kwargs={"render_postcompile": True}
    )
    constants = {k: v for k, v in compiled.params.items() if not k.startswith("care_")}
    return text(str(compiled)), constants
