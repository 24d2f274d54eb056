"""The records store on SQLAlchemy Core: SQLite (WAL) embedded, PostgreSQL scaled.

Why one adapter for both: the statements are the same Core expressions; only the engine set-up
differs (SQLite: WAL, ``BEGIN IMMEDIATE`` for writers so that two writers never deadlock on
a lock upgrade, foreign keys on; PostgreSQL: psycopg 3, the tables in one schema through
``search_path``). The URL chooses.

Every method of a unit of work runs in the one transaction the unit of work owns; driver
exceptions never leave it (:class:`RecordStoreUnavailable`, ``raise ... from exc``, with the
driver's class name and never its statement or parameters). The same tables also serve the
key ring's :class:`~phivault.crypto.ports.SealedElementStore` port
(:meth:`SqlRecordStore.sealed_elements`), so DEK rotation re-seals and shredding drops the
blind tokens of real records.

With ``replica_urls`` (PostgreSQL streaming replicas), read-only units of work are routed
(:mod:`~phivault.records.store.routing`): PHI and display reads may run on a replica whose
lag is under the bound, care-relationship checks and writes run on the primary, and a
replica that fails in the middle of a unit hands the rest of the unit to the primary.
"""

from __future__ import annotations

import contextvars
import functools
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any, Concatenate, Final, NamedTuple, ParamSpec, TypeVar

import psycopg
from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    String,
    Table,
    and_,
    any_,
    bindparam,
    create_engine,
    delete,
    event,
    false,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    SQLAlchemyError,
)
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.compiler import SQLCompiler

from phivault.crypto.blind_index import BlindToken
from phivault.crypto.ports import SealedElement, SealedElementStore
from phivault.errors import ConfigurationError, InvalidInput
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
from phivault.records.split import Envelope, group_element_ref
from phivault.records.store.ports import (
    DIRECTORY_SUBJECT,
    BlindTerms,
    IntentClaim,
    IntentSettled,
    NewVersion,
    ReadClass,
    RecordStore,
    RecordStoreUnavailable,
    ResourceKey,
    Scope,
    SearchPage,
    StaleBlindIndex,
    StoredVersion,
    VersionConflict,
)
from phivault.records.store.routing import (
    PRIMARY,
    CooldownHealth,
    Replica,
    ReplicaHealth,
    ReplicaRouter,
    current_session,
    postgres_probe,
    replica_name,
)
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
    upgrade,
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
from phivault.records.store.write_positions import WritePositions, WritePositionsUnavailable

__all__ = ["SqlRecordStore", "SqlSealedElements", "SqlUnitOfWork"]

_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_TENANT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,127}$")
_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_RE: Final = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_GROUPS: Final = frozenset(g.value for g in ElementGroup)
_INDEX_TABLES: Final = (idx_token, idx_string, idx_date, idx_reference, idx_blind)
_MIGRATION_LOCK: Final = advisory_key("phivault.records.migrate")


def _driver_error(exc: Exception, doing: str) -> RecordStoreUnavailable:
    """A message with the driver's error class only: statements and parameters stay out
    (``exc``: SQLAlchemy's error, or the driver's own from a driver-begun read unit)."""
    orig = getattr(exc, "orig", None)
    kind = type(orig).__name__ if orig is not None else type(exc).__name__
    state = getattr(orig, "sqlstate", None)
    return RecordStoreUnavailable(
        f"records store: {doing} failed ({kind}{f' [{state}]' if state else ''})"
    )


@contextmanager
def _pipelined(conn: Connection) -> Iterator[None]:
    """PostgreSQL: the block's statements go to the server without waiting for each one's
    answer (psycopg's pipeline mode), and the block ends with one round trip for them all.
    Only for several statements whose results nobody reads (inserts): for one statement, the
    pipeline's own cost is more than the round trip it saves (measured: a claim insert sent
    with its transaction's BEGIN cost about 0.1 ms more CPU, not less). A statement's error
    surfaces at the latest when the block ends, as the driver's own exception: it is raised
    as SQLAlchemy would have raised it, so that the callers' translation applies; the
    transaction is then failed, and the unit rolls back. SQLite: nothing changes."""
    driver = conn.connection.driver_connection if conn.dialect.name == "postgresql" else None
    if not isinstance(driver, psycopg.Connection):
        yield
        return
    try:
        with driver.pipeline():
            yield
    except psycopg.Error as exc:  # raised by the pipeline's end, past SQLAlchemy
        raise DBAPIError.instance(
            None, None, exc, psycopg.Error, hide_parameters=True, dialect=conn.dialect
        ) from exc


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


class _DriverRead:
    """A read-only SQLite transaction begun on a pooled driver connection, with no
    SQLAlchemy ``Connection`` (yet): a point read is ``BEGIN``, one ``SELECT`` on the
    driver's cursor and ``ROLLBACK``, where SQLAlchemy's connection, begin event, statement
    execution and result rows cost about ten times as much (docs/decisions/read-path-cpu.md).
    Anything else the unit runs first adopts the connection (:meth:`adopt`) and goes on in
    the same transaction, so the unit still reads one snapshot."""

    __slots__ = ("engine", "pooled")

    def __init__(self, engine: Engine, pooled: PoolProxiedConnection) -> None:
        self.engine = engine
        self.pooled = pooled

    def rows(self, statement: Any, params: Mapping[str, Any]) -> list[Any] | None:
        """The rows of a constant SELECT of this module; ``None`` on a driver error (the
        caller then runs it through SQLAlchemy, which says why)."""
        try:
            cursor = self.pooled.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(_statement_text(statement, _SQLITE_NAMED), params)
                rows: list[Any] = cursor.fetchall()
                return rows
            finally:
                cursor.close()
        except Exception:  # any driver error: the ordinary path runs it again and says why
            return None

    def adopt(self) -> Connection:
        """A SQLAlchemy connection on the pooled connection, in its open transaction (the
        begin event sees it open and adds no ``BEGIN``); closing it returns the connection.
        If this fails, the pooled connection is back in the pool all the same."""
        try:
            conn = Connection(self.engine, self.pooled)
        except BaseException:
            self.pooled.close()
            raise
        try:
            conn.execution_options(phivault_read_only=True).begin()
        except BaseException as exc:
            conn.close()
            if isinstance(exc, SQLAlchemyError):
                raise _driver_error(exc, "begin") from exc
            raise
        return conn

    def end(self) -> None:
        """Roll back and return the connection to the pool (never adopted); one that cannot
        roll back is discarded, not reused."""
        try:
            self.pooled.driver_connection.rollback()  # type: ignore[union-attr]
        except Exception as exc:
            self.pooled.invalidate()
            raise _driver_error(exc, "rollback") from exc
        self.pooled.close()


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

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A savepoint around the block: if it raises, what it wrote is rolled back and the
        transaction goes on (:class:`_SavepointLost` if that cannot be done)."""
        conn = self._writable()
        # The statements themselves, not SQLAlchemy's nested transactions: begin_nested()
        # and its commit cost 71 us a pair in Python, the two statements 1-11 us. Group units
        # do not nest, so one name serves; SQLAlchemy's own transaction is untouched.
        try:
            _on_driver(conn, "SAVEPOINT phivault_unit", ())
        except SQLAlchemyError as exc:
            raise _SavepointLost("savepoint") from exc
        try:
            yield
        except BaseException:
            try:
                _on_driver(conn, "ROLLBACK TO SAVEPOINT phivault_unit", ())
                _on_driver(conn, "RELEASE SAVEPOINT phivault_unit", ())
            except SQLAlchemyError as exc:
                raise _SavepointLost("rollback to savepoint") from exc
            if not _in_transaction(conn):
                raise _SavepointLost("the transaction ended") from None
            raise
        try:
            _on_driver(conn, "RELEASE SAVEPOINT phivault_unit", ())
        except SQLAlchemyError as exc:
            raise _SavepointLost("release savepoint") from exc
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
        compiled once (SQLAlchemy's per-statement work cost more than SQLite's): the head is
        inserted unless it exists (no SELECT before: a taken id is found by the insert)."""
        key, subject = new.key, new.key_subject
        stamp = to_micros(new.last_updated)
        head = (key.tenant, key.resource_type, key.resource_id, 1, False, stamp, subject)
        with self._translate("write"):
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
        a relationship ended a moment ago no longer counts."""
        _check_tenant(tenant)
        wanted = sorted(set(patients))
        if not wanted:
            return set()
        conn = self._authority()
        found: set[str] = set()
        with self._translate("care relationship"):
            for query in linked_patients(tenant, *practitioner):
                column = query.selected_columns[0]
                found.update(
                    str(row[0]) for row in conn.execute(query.where(column.in_(wanted)).distinct())
                )
        return found

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
                conn.execute(_ADVISORY_XACT_LOCK, {"k": advisory_key(name)})

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

    def insert(self, conn: Connection) -> None:
        for table, rows in (
            (idx_token, self.token),
            (idx_string, self.string),
            (idx_date, self.date),
            (idx_reference, self.reference),
            (idx_blind, self.blind),
        ):
            if rows:
                _bulk_insert_tuples(conn, table, _INDEX_COLUMNS[table.name], list(rows.values()))


_check_index_keys()


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


def _key_params(key: ResourceKey) -> dict[str, str]:
    return {"k_tenant": key.tenant, "rtype": key.resource_type, "rid": key.resource_id}


# Statements built once (SQLAlchemy caches their compiled form; building an expression per
# call costs more than running it on SQLite).
_H, _V, _G = resources.c, versions.c, groups.c
_CURRENT: Final = (
    select(versions)
    .join(
        resources,
        and_(
            _H.tenant == _V.tenant,
            _H.resource_type == _V.resource_type,
            _H.resource_id == _V.resource_id,
            _H.version == _V.version,
        ),
    )
    .where(
        _H.tenant == bindparam("k_tenant"),
        _H.resource_type == bindparam("rtype"),
        _H.resource_id == bindparam("rid"),
    )
)
_VREAD: Final = select(versions).where(
    _V.tenant == bindparam("k_tenant"),
    _V.resource_type == bindparam("rtype"),
    _V.resource_id == bindparam("rid"),
    _V.version == bindparam("version"),
)
_GROUPS_OF: Final = select(_G.version_seq, _G.grp, _G.ciphertext).where(
    _G.version_seq.in_(bindparam("seqs", expanding=True))
)
_SOME_GROUPS_OF: Final = _GROUPS_OF.where(_G.grp.in_(bindparam("groups", expanding=True)))
# PostgreSQL: the same with arrays (``= ANY``), and a single version read with its groups in
# one statement (keyed by "every group"; else the groups named by the ``groups`` array).
_SEQS: Final = bindparam("seqs", type_=ARRAY(BigInteger))
_GROUP_NAMES: Final = bindparam("groups", type_=ARRAY(String))
_GROUPS_OF_ANY: Final = select(_G.version_seq, _G.grp, _G.ciphertext).where(
    _G.version_seq == any_(_SEQS)
)
_SOME_GROUPS_OF_ANY: Final = _GROUPS_OF_ANY.where(_G.grp == any_(_GROUP_NAMES))


def _with_groups(statement: Any) -> dict[bool, Any]:
    on = _G.version_seq == _V.seq
    return {
        every: statement.add_columns(_G.grp, _G.ciphertext).outerjoin(
            groups, on if every else and_(on, _G.grp == any_(_GROUP_NAMES))
        )
        for every in (True, False)
    }


_CURRENT_WITH: Final = _with_groups(_CURRENT)
_VREAD_WITH: Final = _with_groups(_VREAD)
_HEAD_IS: Final = (
    _H.tenant == bindparam("k_tenant"),
    _H.resource_type == bindparam("rtype"),
    _H.resource_id == bindparam("rid"),
)
_CURRENT_VERSION: Final = select(_H.version).where(*_HEAD_IS)
_INSERT_HEADS: Final = insert(resources)
_INSERT_VERSIONS: Final = insert(versions).returning(_V.seq, sort_by_parameter_order=True)
#: Which of the keys (tenant, type, id) of a bulk create are taken already.
_TAKEN: Final = select(_H.resource_type, _H.resource_id, _H.version).where(
    tuple_(_H.tenant, _H.resource_type, _H.resource_id).in_(bindparam("keys", expanding=True))
)
#: Keyed by "is PostgreSQL": the reconciler's claim, unless a writer (or an earlier pass) has
#: one; PostgreSQL waits for the transaction of a conflicting row not yet committed.
_SETTLE_CLAIM: Final = {
    flag: dialect.insert(intent_claims).on_conflict_do_nothing()
    for flag, dialect in ((True, postgresql), (False, sqlite))
}
_ADVISORY_XACT_LOCK: Final = text("SELECT pg_advisory_xact_lock(:k)")
_SCHEMA_INFO: Final = "phivault.records.current_schema"  # key in a connection's info dict
_LOCK_NOT_AVAILABLE: Final = "55P03"  # PostgreSQL: lock_timeout expired
_CLAIM_STATE: Final = select(intent_claims.c.state).where(
    intent_claims.c.tenant == bindparam("c_tenant"), intent_claims.c.claim == bindparam("claim")
)
_DELETE_INDEX: Final = {
    table.name: delete(table).where(
        table.c.tenant == bindparam("k_tenant"),
        table.c.resource_type == bindparam("rtype"),
        table.c.resource_id == bindparam("rid"),
    )
    for table in _INDEX_TABLES
}


def _head_is(key: ResourceKey) -> tuple[ColumnElement[bool], ...]:
    h = resources.c
    return (
        h.tenant == key.tenant,
        h.resource_type == key.resource_type,
        h.resource_id == key.resource_id,
    )


def _bulk_insert_tuples(
    conn: Connection, table: Table, columns: tuple[str, ...], rows: Sequence[tuple[Any, ...]]
) -> None:
    """INSERT many rows, given as tuples in ``columns`` order, through the driver's
    executemany, with the statement compiled once per dialect, table and columns:
    SQLAlchemy's per-row parameter processing would cost more than the database's own work
    for the thousands of index rows of a transaction Bundle. Only for plain columns
    (strings, integers, booleans, bytes), which every head, version, group and index column
    is."""
    compiled = _bulk_sql(conn, table, columns)
    if compiled.positional:
        order = compiled.positiontup or ()
        if tuple(order) != columns:
            at = [columns.index(c) for c in order]
            rows = [tuple(row[i] for i in at) for row in rows]
        _on_driver(conn, compiled.string, rows, many=True)
    else:
        named = [dict(zip(columns, row, strict=True)) for row in rows]
        _on_driver(conn, compiled.string, named, many=True)


def _bulk_sql(conn: Connection, table: Table, columns: tuple[str, ...]) -> SQLCompiler:
    return _compiled(
        conn,
        (table.name, columns),
        lambda: insert(table).values({c: bindparam(c) for c in columns}),
    )


def _compiled(conn: Connection, name: Any, build: Callable[[], Any]) -> SQLCompiler:
    """The statement ``build`` makes, compiled once per dialect and ``name``."""
    cache_key = (conn.dialect.name, name)
    compiled = _DRIVER_SQL.get(cache_key)
    if compiled is None:
        made = build().compile(dialect=conn.dialect)
        assert isinstance(made, SQLCompiler)
        compiled = _DRIVER_SQL[cache_key] = made
    return compiled


_DRIVER_SQL: dict[tuple[str, Any], SQLCompiler] = {}


def _run_row(conn: Connection, name: str, columns: tuple[str, ...], row: tuple[Any, ...]) -> _Ran:
    """One execution of the write statement ``name`` of :data:`_ROW_STATEMENTS` (a row given
    as a tuple in ``columns`` order) on the driver; only plain columns
    (:func:`_bulk_insert_tuples`)."""
    compiled = _compiled(
        conn, name, lambda: _ROW_STATEMENTS[name][conn.dialect.name == "postgresql"]
    )
    if compiled.positional:
        order = compiled.positiontup or ()
        if tuple(order) != columns:
            row = tuple(row[columns.index(c)] for c in order)
        return _on_driver(conn, compiled.string, row)
    return _on_driver(conn, compiled.string, dict(zip(columns, row, strict=True)))


class _Ran(NamedTuple):
    """What a write statement run by :func:`_on_driver` did: rows changed, rows returned."""

    rowcount: int
    rows: list[Any]


def _on_driver(conn: Connection, sql: str, params: Any, *, many: bool = False) -> _Ran:
    """Run a write statement of this module (``sql`` as compiled for the connection's
    dialect) in the unit's transaction.

    On SQLite, on the ``sqlite3`` connection itself: SQLAlchemy's execution context, cursor
    result and events cost more per statement than SQLite's own work on a create's few rows
    (5 against 1.7 us an insert in a loop, and a create runs nine). Its errors are turned
    into SQLAlchemy's, exactly as SQLAlchemy does (``DBAPIError.instance``: IntegrityError
    and the rest), so the callers' handling and translation stay the same. On PostgreSQL,
    ``exec_driver_sql`` (psycopg's errors need SQLAlchemy's connection invalidation)."""
    if conn.dialect.name != "sqlite":
        result = conn.exec_driver_sql(sql, params)
        return _Ran(result.rowcount, list(result.all()) if result.returns_rows else [])
    raw = conn.connection.dbapi_connection
    assert raw is not None
    try:
        cursor = raw.executemany(sql, params) if many else raw.execute(sql, params)
        rows = cursor.fetchall() if cursor.description is not None else []
        return _Ran(cursor.rowcount, rows)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(
            sql,
            params,  # shown as hidden (hide_parameters): no value ever reaches a message
            exc,
            conn.dialect.loaded_dbapi.Error,
            hide_parameters=True,
            dialect=conn.dialect,
            ismulti=many,
        ) from exc


_HEAD_COLUMNS: Final = (
    "tenant", "resource_type", "resource_id", "version", "deleted", "last_updated", "key_subject",
)  # fmt: skip
_SWAP_COLUMNS: Final = (
    "k_tenant", "rtype", "rid", "previous",
    "set_version", "set_deleted", "set_last_updated", "set_key_subject",
)  # fmt: skip
_GROUP_COLUMNS: Final = ("version_seq", "tenant", "key_subject", "grp", "ciphertext")
_CLAIM_COLUMNS: Final = ("tenant", "claim", "state", "claimed_at")
_HEAD_VALUES: Final[dict[str, Any]] = {c: bindparam(c) for c in _HEAD_COLUMNS}
#: Single-row write statements for :func:`_run_row`, keyed by "is PostgreSQL".
_ROW_STATEMENTS: Final = {
    # a create's head, unless the resource exists (rowcount 0)
    "create_head": {
        flag: dialect.insert(resources).values(_HEAD_VALUES).on_conflict_do_nothing()
        for flag, dialect in ((True, postgresql), (False, sqlite))
    },
    # compare-and-swap of the current version (rowcount 0: it moved)
    "update_head": {
        flag: update(resources)
        .where(
            resources.c.tenant == bindparam("k_tenant"),
            resources.c.resource_type == bindparam("rtype"),
            resources.c.resource_id == bindparam("rid"),
            resources.c.version == bindparam("previous"),
        )
        .values(  # SET parameters may not reuse column names
            version=bindparam("set_version"),
            deleted=bindparam("set_deleted"),
            last_updated=bindparam("set_last_updated"),
            key_subject=bindparam("set_key_subject"),
        )
        for flag in (True, False)
    },
    "insert_version": {
        flag: insert(versions).values(_HEAD_VALUES).returning(versions.c.seq)
        for flag in (True, False)
    },
}


class SqlRecordStore:
    """The records database behind a SQLAlchemy URL (``sqlite:///path`` or
    ``postgresql+psycopg://...``; a bare ``postgresql://`` means psycopg 3).

    ``schema`` (PostgreSQL only) puts the tables in that schema (it must exist).
    ``migrate=True`` runs the Alembic migrations to head on open (serialized by an advisory
    lock on PostgreSQL, so several workers may start at once).

    ``replica_urls`` (PostgreSQL only): streaming replicas of the primary, same database and
    schema. Read-only units of work reading PHI go to one whose lag is under
    ``replica_max_lag_s``, display reads (:attr:`ReadClass.AGGREGATE`) under
    ``replica_display_max_lag_s``; the lag is probed at most every ``replica_sample_s``.
    ``replica_health`` builds each replica's health state from its name (default: skip it
    for ``replica_retry_s`` after a failure); it is the seam for a circuit breaker.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        migrate: bool = True,
        replica_urls: Sequence[str] = (),
        replica_max_lag_s: float = 0.1,
        replica_display_max_lag_s: float = 5.0,
        replica_sample_s: float = 0.05,
        replica_retry_s: float = 1.0,
        replica_health: Callable[[str], ReplicaHealth] | None = None,
        replica_positions: WritePositions | None = None,
    ) -> None:
        parsed = _parse_url(url)
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ConfigurationError("the records store needs a sqlite or postgresql URL")
        if replica_urls and backend != "postgresql":
            raise ConfigurationError("records replicas need a PostgreSQL records store")
        if backend == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        connect_args: dict[str, Any] = {}
        if schema is not None:
            if backend != "postgresql" or not _SCHEMA_NAME.fullmatch(schema):
                raise ConfigurationError(
                    "a records schema is a PostgreSQL name: lower-case letters, digits, _"
                )
            connect_args["options"] = f"-c search_path={schema}"
        self.dialect = backend
        # SQLite has one writer at a time: a second BEGIN IMMEDIATE waits in SQLite's busy
        # handler, which sleeps up to 100 ms between tries, so a create's p99 was many times
        # its p50. This process's writers queue on a lock instead and go in the moment the
        # writer before them is done (another process, such as the CLI, still meets the busy
        # handler). Reentrant: a thread's second write unit would deadlock in SQLite anyway.
        self._writer = threading.RLock() if backend == "sqlite" else None
        # Group commit (SQLite): write units submitted while a group is being written wait
        # here and go in together as the next group (write_unit).
        self._group_turn = threading.Condition(threading.Lock())
        self._group_writing = False  # a group is being written (by one of the submitters)
        self._group_pending: list[_GroupUnit] = []
        # PostgreSQL: read-only units on the primary use their own pool (_read_only_engine).
        self._reader: Engine | None = None
        try:
            if backend == "sqlite":
                if parsed.database in (None, "", ":memory:"):
                    raise ConfigurationError("the embedded records store needs a file path")
                connect_args["timeout"] = 30
                # hide_parameters: a driver exception kept as __cause__ holds no values
                # As many pooled connections as worker threads may run units of work at
                # once (anyio's default limiter is 40): a thread waiting for a connection
                # was most of a create's tail latency under load.
                self._engine: Engine = create_engine(
                    parsed,
                    connect_args=connect_args,
                    hide_parameters=True,
                    pool_size=20,
                    max_overflow=20,
                )
                event.listen(self._engine, "connect", _sqlite_connect)
                event.listen(self._engine, "begin", _sqlite_begin)
            else:
                self._engine = create_engine(
                    parsed, connect_args=connect_args, hide_parameters=True
                )
                # As the read pool: a connection is pinged only after a second idle, not on
                # every checkout (pool_pre_ping: one more round trip per write unit).
                event.listen(self._engine, "checkin", _note_idle)
                event.listen(self._engine, "checkout", _ping_if_idle)
                self._reader = _read_only_engine(parsed, connect_args)
            self._replicas: dict[str, Engine] = {}
            self._router: ReplicaRouter | None = None
            if replica_urls:
                self._router = self._open_replicas(
                    replica_urls,
                    connect_args,
                    health=replica_health
                    or (lambda _name: CooldownHealth(retry_after_s=replica_retry_s)),
                    max_lag_s=replica_max_lag_s,
                    display_max_lag_s=replica_display_max_lag_s,
                    sample_ttl_s=replica_sample_s,
                    positions=replica_positions,
                )
            if migrate:
                self.migrate()
        except SQLAlchemyError as exc:
            raise _driver_error(exc, "open") from exc

    def _open_replicas(
        self,
        urls: Sequence[str],
        connect_args: Mapping[str, Any],
        *,
        health: Callable[[str], ReplicaHealth],
        max_lag_s: float,
        display_max_lag_s: float,
        sample_ttl_s: float,
        positions: WritePositions | None,
    ) -> ReplicaRouter:
        replicas = []
        for url in urls:
            parsed = _parse_url(url)
            if parsed.get_backend_name() != "postgresql":
                raise ConfigurationError("a records replica needs a postgresql URL")
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            name = replica_name(parsed.host or "localhost", parsed.port or 5432)
            if name in self._replicas:
                raise ConfigurationError(f"the records replica {name} is listed twice")
            # A short connect timeout: a replica that is down must cost a request little.
            engine = create_engine(
                parsed,
                connect_args={**connect_args, "connect_timeout": _REPLICA_CONNECT_TIMEOUT_S},
                pool_pre_ping=True,
                hide_parameters=True,
            )
            self._replicas[name] = engine
            replicas.append(Replica(name, postgres_probe(engine), health(name)))
        return ReplicaRouter(
            replicas,
            max_lag_s=max_lag_s,
            display_max_lag_s=display_max_lag_s,
            sample_ttl_s=sample_ttl_s,
            shared=positions,
        )

    @property
    def router(self) -> ReplicaRouter | None:
        """The replica router (None without replicas): health and lag samples, for operators."""
        return self._router

    def migrate(self) -> None:
        """Run the migrations to head, in one transaction (replicas are read from only once
        they have replayed it)."""
        # Not required: a worker starts while Redis is down (a replica without a new schema
        # fails the read, which the primary then serves; it never returns stale PHI).
        with _writing_everyone(self._router, required=False) as committed:
            try:
                with self._engine.begin() as conn:
                    if self.dialect == "postgresql":
                        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
                    upgrade(conn)
                if self._router is not None:
                    with self._engine.connect() as conn:
                        committed(conn)
            except SQLAlchemyError as exc:
                raise _driver_error(exc, "migrate") from exc

    @property
    def engine(self) -> Engine:
        """For tests and operators' tools; application code goes through units of work."""
        return self._engine

    @contextmanager
    def unit_of_work(
        self,
        *,
        read_only: bool = False,
        reads: ReadClass = ReadClass.PHI,
        session: str | None = None,
    ) -> Iterator[SqlUnitOfWork]:
        """A transaction; commit explicitly, anything else rolls back. With replicas, a
        read-only unit goes where the router sends ``reads`` for ``session`` (a replica that
        cannot be reached is skipped: the primary serves), and a write unit's commit is noted
        for the session's read-your-writes."""
        router = self._router
        writer = None if read_only else self._writer
        if writer is not None:
            if not writer.acquire(timeout=_WRITER_WAIT_S):  # as long as the busy handler waits
                raise RecordStoreUnavailable("records store: begin failed (another writer)")
            try:
                uow = SqlUnitOfWork(self._begin(self._engine, read_only=False), read_only=False)
            except BaseException:
                writer.release()
                raise
            try:
                yield uow
            finally:
                try:
                    uow._close()
                finally:
                    writer.release()
            return
        if router is None and read_only and self.dialect == "sqlite":
            uow = self._read_on_driver()
        elif router is None:
            uow = SqlUnitOfWork(self._begin(self._engine, read_only=read_only), read_only=read_only)
        elif read_only:
            uow = self._routed(router, reads, session)
        else:
            with self._noted_write(router, current_session(session)) as uow:
                yield uow
            return
        try:
            yield uow
        finally:
            uow._close()

    @contextmanager
    def _noted_write(self, router: ReplicaRouter, key: str) -> Iterator[SqlUnitOfWork]:
        """A write unit whose commit every worker's router learns of (read-your-writes): just
        before it commits, the session is pinned to the primary in the shared positions (the
        commit is refused if that fails: nothing is written), and it is settled with the
        commit's LSN after."""
        pinned = False
        settled = False

        def before_commit() -> None:
            nonlocal pinned
            try:
                router.begin_write(key)
            except WritePositionsUnavailable as exc:
                raise RecordStoreUnavailable(
                    "records store: commit refused (write positions)"
                ) from exc
            pinned = router.shared is not None

        def after_commit(conn: Connection) -> None:
            nonlocal settled
            settled = True
            router.end_write(key, committed=True, lsn=_written_lsn(conn), pinned=pinned)

        uow = SqlUnitOfWork(
            self._begin(self._engine, read_only=False),
            before_commit=before_commit,
            after_commit=after_commit,
        )
        try:
            yield uow
        finally:
            try:
                uow._close()
            finally:
                committed = None if uow._commit_tried else False
                if not settled and (pinned or committed is not False):
                    router.end_write(key, committed=committed, pinned=pinned)

    def write_unit(
        self, work: Callable[[SqlUnitOfWork], None], *, session: str | None = None
    ) -> None:
        """Run ``work`` in a writing transaction and commit it (``work`` must not commit).

        SQLite has one writer at a time, so units submitted by other threads while a
        transaction is being written wait and are then committed together, as one group:
        one transaction, one commit (and one fsync) for all of them, each unit in its own
        savepoint. A unit that raises is rolled back to its savepoint and gets its own
        error; the others are not affected. If the group's transaction itself breaks
        (a savepoint cannot be rolled back, SQLite rolled the whole transaction back), the
        group is rolled back and every unit of it runs again alone. If the commit fails,
        nothing of the group is written and every unit gets that error. PostgreSQL runs
        each unit in its own transaction (its writers do not wait for one another).
        ``docs/decisions/records-group-commit.md``."""
        if self._writer is None:
            with self.unit_of_work(session=session) as uow:
                work(uow)
                uow.commit()
            return
        error = self._write_grouped([_GroupUnit(work, contextvars.copy_context())])[0]
        if error is not None:
            raise error

    def write_units(
        self, works: Sequence[Callable[[SqlUnitOfWork], None]], *, session: str | None = None
    ) -> list[BaseException | None]:
        """:meth:`write_unit` of each of ``works``, submitted at once by one thread: on
        SQLite they go into the next group together (with whatever other threads submit),
        and this thread waits once for all of them instead of one thread waiting for each.
        Each one's exception, or None where it committed (in ``works`` order). PostgreSQL
        writes them one after another, each in its own transaction."""
        if self._writer is None:
            errors: list[BaseException | None] = []
            for work in works:
                try:
                    self.write_unit(work, session=session)
                except BaseException as exc:  # handed to that unit's submitter
                    errors.append(exc)
                else:
                    errors.append(None)
            return errors
        context = contextvars.copy_context()
        return self._write_grouped([_GroupUnit(work, context.copy()) for work in works])

    def _write_grouped(self, units: list[_GroupUnit]) -> list[BaseException | None]:
        """Queue ``units`` for the next group and wait until each one is written or has
        failed, writing groups on this thread when it is its turn (see :meth:`write_unit`)."""
        deadline = time.monotonic() + _WRITER_WAIT_S
        with self._group_turn:
            self._group_pending.extend(units)
        while True:
            with self._group_turn:
                while self._group_writing and not all(u.finished for u in units):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._withdraw(units)
                        if all(u.finished for u in units):
                            break
                    # (once a group has taken a unit, it is being written: wait for that to end)
                    self._group_turn.wait(left if left > 0 else None)
                if all(u.finished for u in units):
                    break
                # This thread writes the next group: the longest waiting units (its own
                # among them, or in a later group it writes too: it leaves only when its
                # own units are finished).
                self._group_writing = True
                batch = self._group_pending[:_GROUP_MAX]
                del self._group_pending[:_GROUP_MAX]
            try:
                self._write_group(batch)
            finally:
                with self._group_turn:
                    for done in batch:
                        done.finished = True
                    self._group_writing = False
                    self._group_turn.notify_all()
        return [u.error for u in units]

    def _withdraw(self, units: list[_GroupUnit]) -> None:
        """The units no group has taken yet fail closed (their wait is over): no later group
        may write one after its submitter was told it failed. Under ``_group_turn``."""
        for unit in units:
            if unit in self._group_pending:
                self._group_pending.remove(unit)
                unit.error = RecordStoreUnavailable("records store: begin failed (another writer)")
                unit.finished = True

    def _write_group(self, batch: list[_GroupUnit]) -> None:
        """Write and commit ``batch`` (see :meth:`write_unit`): each unit's ``error`` says
        how it ended (None: committed)."""
        if len(batch) == 1:
            self._write_alone(batch[0])
            return
        try:
            with self.unit_of_work() as uow:
                for unit in batch:
                    try:
                        with uow.savepoint():
                            unit.context.run(unit.work, uow)
                    except _SavepointLost:
                        raise
                    except BaseException as exc:  # this unit alone is rolled back
                        unit.error = exc
                uow.commit()
        except _SavepointLost:
            for unit in batch:  # nothing of the group was written: one by one
                unit.error = None
                self._write_alone(unit)
        except BaseException as exc:
            for unit in batch:
                if unit.error is None:
                    unit.error = exc

    def _write_alone(self, unit: _GroupUnit) -> None:
        try:
            with self.unit_of_work() as uow:
                unit.context.run(unit.work, uow)
                uow.commit()
        except BaseException as exc:
            unit.error = exc

    def _routed(
        self, router: ReplicaRouter, reads: ReadClass, session: str | None
    ) -> SqlUnitOfWork:
        replica = router.choose(reads, session)
        if replica is not None:
            try:
                # A standby refuses "BEGIN READ WRITE", which psycopg sends once a pooled
                # connection's read-only flag has been set and reset: never set it there
                # (every transaction on a standby is read-only anyway).
                conn = self._begin(self._replicas[replica.name], read_only=True, standby=True)
            except RecordStoreUnavailable:
                router.replica_failed(replica)  # it went down since its last probe
            else:
                link = _ReplicaLink(
                    router, replica, lambda: self._begin(self._engine, read_only=True)
                )
                return SqlUnitOfWork(conn, read_only=True, link=link)
        return SqlUnitOfWork(self._begin(self._engine, read_only=True), read_only=True)

    def _read_on_driver(self) -> SqlUnitOfWork:
        """A read-only SQLite unit begun on the driver (:class:`_DriverRead`). If that fails,
        the ordinary begin runs, and says why if it fails too."""
        try:
            pooled = self._engine.raw_connection()
        except Exception:  # any error: the ordinary begin tries again and translates it
            return SqlUnitOfWork(self._begin(self._engine, read_only=True), read_only=True)
        try:
            pooled.driver_connection.execute("BEGIN")  # type: ignore[union-attr]
        except Exception:
            pooled.close()
            return SqlUnitOfWork(self._begin(self._engine, read_only=True), read_only=True)
        return SqlUnitOfWork(_DriverRead(self._engine, pooled), read_only=True)

    def _begin(self, engine: Engine, *, read_only: bool, standby: bool = False) -> Connection:
        reader = self._reader
        if read_only and reader is not None and engine is self._engine:
            try:
                conn = reader.connect()
                conn.begin()  # no statement: each one runs as its own read-only transaction
            except SQLAlchemyError as exc:
                raise _driver_error(exc, "begin") from exc
            return conn
        try:
            conn = engine.connect()
            if read_only:
                flag = self.dialect == "postgresql" and not standby
                conn = conn.execution_options(
                    phivault_read_only=True, **({"postgresql_readonly": True} if flag else {})
                )
            conn.begin()
        except SQLAlchemyError as exc:
            raise _driver_error(exc, "begin") from exc
        return conn

    def sealed_elements(self) -> SqlSealedElements:
        """The key ring's view of these tables (DEK rotation, index upkeep, shredding)."""
        return SqlSealedElements(self._engine, router=self._router)

    def close(self) -> None:
        self._engine.dispose()
        if self._reader is not None:
            self._reader.dispose()
        for engine in self._replicas.values():
            engine.dispose()
        if self._router is not None and self._router.shared is not None:
            self._router.shared.close()


_REPLICA_CONNECT_TIMEOUT_S: Final = 2
_WRITER_WAIT_S: Final = 30  # the SQLite busy timeout (_sqlite_connect)
_GROUP_MAX: Final = 64  # write units committed together at most


class _GroupUnit:
    """A write unit waiting to be committed in a group (:meth:`SqlRecordStore.write_unit`);
    it runs in its submitter's context (context variables), on the group's thread."""

    __slots__ = ("context", "error", "finished", "work")

    def __init__(self, work: Callable[[SqlUnitOfWork], None], context: contextvars.Context):
        self.work = work
        self.context = context
        self.error: BaseException | None = None
        self.finished = False  # under the store's _group_turn


class _SavepointLost(Exception):
    """A group's transaction can no longer be trusted: a savepoint could not be rolled back
    or released, or the database ended the transaction on its own."""


def _read_only_engine(url: Any, connect_args: Mapping[str, Any]) -> Engine:
    """The pool for read-only units on the PostgreSQL primary (``docs/decisions/
    records-storage.md``, "Read-only units on PostgreSQL").

    Its connections run in autocommit with ``default_transaction_read_only`` on: every
    statement is its own read-only transaction, so the server still refuses any write (as
    ``BEGIN READ ONLY`` did), and a unit costs no ``BEGIN`` and ``ROLLBACK`` round trips. Under
    READ COMMITTED, PostgreSQL's default and the only level used here, each statement of a
    transaction took its own snapshot anyway, so a unit of several statements sees what it
    saw before.
    """
    given = connect_args.get("options")
    options = (f"{given} " if given else "") + "-c default_transaction_read_only=on"
    engine = create_engine(
        url,
        connect_args={**connect_args, "options": options},
        isolation_level="AUTOCOMMIT",
        hide_parameters=True,
        execution_options={_DIRECT: True},
    )
    # A connection back from the pool is checked only if it sat there a while (see
    # _ping_if_idle), not on every checkout as pool_pre_ping would (a round trip per read).
    event.listen(engine, "checkin", _note_idle)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


#: The read pool's execution option that lets :func:`_direct` use the driver's cursor.
_DIRECT: Final = "phivault_direct_reads"
#: Statement texts for the driver, by statement and dialect (constant statements only;
#: compiled once).
_DRIVER_TEXT: dict[tuple[int, str], tuple[Any, str]] = {}
#: SQLite with named parameters (the driver takes a mapping; the engine's dialect is qmark).
_SQLITE_NAMED: Final = sqlite.dialect(paramstyle="named")


def _statement_text(statement: Any, dialect: Any) -> str:
    """``statement`` compiled for ``dialect``, as its driver runs it."""
    key = (id(statement), dialect.name)
    known = _DRIVER_TEXT.get(key)
    if known is None or known[0] is not statement:
        known = (statement, str(statement.compile(dialect=dialect)))
        _DRIVER_TEXT[key] = known
    return known[1]


def _direct(conn: Connection, statement: Any, params: Mapping[str, Any]) -> list[Any] | None:
    """Run a constant SELECT of this module on the driver's own cursor, on the read pool's
    autocommit connections only: SQLAlchemy's per-call work (cache key, bind and result
    processing) was about half of a read's CPU in the unit (0.33 -> 0.18 ms in a loop).

    ``None`` on any other connection, and on any driver error: the caller then runs the
    statement the ordinary way, which translates the error (no driver exception leaves this
    module) and lets the pool replace a lost connection. Re-running is safe: a read-only
    statement in autocommit, with nothing of the failed try left on the connection."""
    if not conn.get_execution_options().get(_DIRECT, False):
        return None
    text = _statement_text(statement, conn.dialect)
    try:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(text, params)
            return list(cursor.fetchall())
        finally:
            cursor.close()
    except Exception:  # any driver error: the ordinary path runs it again and says why
        return None


#: A pooled read connection idle longer than this is pinged before use (seconds).
_PING_IDLE_S: Final = 1.0
_IDLE_SINCE: Final = "phivault_idle_since"


def _note_idle(_dbapi_connection: Any, record: Any) -> None:
    record.info[_IDLE_SINCE] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Ping a connection that was idle over ``_PING_IDLE_S`` (or is new) before a unit uses
    it; a failed ping makes the pool replace it (``DisconnectionError``), as pre-ping does.

    A connection used within the last second is not pinged: if the server went away in that
    second, the unit that meets it fails with ``RecordStoreUnavailable`` (a 503, as a unit in
    flight then does anyway), and SQLAlchemy then replaces every connection of the pool."""
    since = record.info.get(_IDLE_SINCE)
    if since is not None and time.monotonic() - since <= _PING_IDLE_S:
        return
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
    except Exception as exc:  # whatever the driver raised: the connection is not usable
        raise DisconnectionError("a pooled connection did not answer") from exc


def _parse_url(url: str) -> Any:
    try:
        return make_url(url)
    except ArgumentError:
        # The URL may hold a password: it stays out of the message.
        raise ConfigurationError("not a database URL (records store)") from None


@contextmanager
def _writing_everyone(
    router: ReplicaRouter | None, *, required: bool = True
) -> Iterator[Callable[[Connection], None]]:
    """Around a write every session must see (a migration, a re-seal): with shared write
    positions, every session is pinned to the primary first; if that cannot be shared, the
    write is refused (nothing is written) unless not ``required``. Call the yielded function
    with the connection once the write committed; if the block ends without that, it may
    have committed at an unknown position, and is settled so."""
    settled = router is None
    pinned = False

    def committed(conn: Connection) -> None:
        nonlocal settled
        if router is not None and not settled:
            settled = True
            router.end_write_everyone(committed=True, lsn=_written_lsn(conn), pinned=pinned)

    if router is not None:
        try:
            router.begin_write_everyone()
            pinned = router.shared is not None
        except WritePositionsUnavailable as exc:
            if required:
                raise RecordStoreUnavailable(
                    "records store: begin failed (write positions)"
                ) from exc
    try:
        yield committed
    finally:
        if router is not None and not settled:
            router.end_write_everyone(committed=None, pinned=pinned)


def _written_lsn(conn: Connection) -> int | None:
    """The primary's WAL insert position after a commit: at or past the commit's record, so
    a replica that has replayed it has the write (None if it cannot be read: the session
    then stays on the primary for a while)."""
    try:
        lsn = conn.exec_driver_sql("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").scalar()
        conn.rollback()
    except SQLAlchemyError:
        return None
    return None if lsn is None else int(lsn)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event decide how transactions start (BEGIN IMMEDIATE).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
    finally:
        cursor.close()


def _in_transaction(conn: Connection) -> bool:
    """Whether the database still has the transaction open (SQLite ends one on its own after
    some errors, such as a full disk; statements after that would each commit alone)."""
    if conn.dialect.name != "sqlite":
        return True  # PostgreSQL keeps it (aborted until rolled back to a savepoint)
    dbapi = conn.connection.dbapi_connection
    return bool(getattr(dbapi, "in_transaction", True))


def _sqlite_begin(conn: Connection) -> None:
    read_only = conn.get_execution_options().get("phivault_read_only", False)
    if read_only and _in_transaction(conn):
        return  # a driver-begun read unit adopting its connection: its BEGIN ran already
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


class SqlSealedElements:
    """:class:`~phivault.crypto.ports.SealedElementStore` over the records tables.

    An element is one sealed group of one version (history included: every version must be
    re-sealed before an old data key is destroyed). ``position`` is ``rec_groups.position``.
    Each call is its own short transaction. ``index`` is None: a group is not one indexed
    value; blind tokens belong to the current version and are written by the records
    repository (see docs/decisions/records-storage.md on index-key rotation).
    """

    def __init__(self, engine: Engine, *, router: ReplicaRouter | None = None) -> None:
        self._engine = engine
        self._router = router

    @contextmanager
    def _tx(self, doing: str, *, writes: bool = True) -> Iterator[Connection]:
        """One transaction. With replicas, a write's position becomes a floor every reader
        must find replayed: an element re-sealed under a new data key must not be read back
        in its old form from a replica once the old key may be destroyed."""
        with _writing_everyone(self._router if writes else None) as committed:
            try:
                with self._engine.connect() as conn:
                    with conn.begin():
                        yield conn
                    committed(conn)
            except SQLAlchemyError as exc:
                raise _driver_error(exc, doing) from exc

    def scan(
        self, tenant: str, *, patient: str | None, after: int, limit: int
    ) -> Sequence[SealedElement]:
        g, v = groups.c, versions.c
        statement = (
            select(
                g.position, g.key_subject, g.grp, g.ciphertext,
                v.resource_type, v.resource_id, v.version,
            )
            .join(versions, v.seq == g.version_seq)
            .where(g.tenant == tenant, g.position > after)
            .order_by(g.position)
            .limit(limit)
        )  # fmt: skip
        if patient is not None:
            statement = statement.where(g.key_subject == patient)
        with self._tx("scan", writes=False) as conn:
            rows = conn.execute(statement).all()
        return [
            SealedElement(
                position=int(r.position),
                ref=group_element_ref(
                    tenant,
                    Envelope(r.resource_type, r.resource_id, str(r.version)),
                    ElementGroup(r.grp),
                ),
                patient=r.key_subject,
                ciphertext=bytes(r.ciphertext),
            )
            for r in rows
        ]

    def replace(self, element: SealedElement, ciphertext: bytes) -> bool:
        g = groups.c
        with self._tx("replace") as conn:
            changed = conn.execute(
                update(groups)
                .where(g.position == element.position, g.ciphertext == element.ciphertext)
                .values(ciphertext=ciphertext)
            ).rowcount
        return changed == 1

    def add_tokens(self, element: SealedElement, tokens: Sequence[BlindToken]) -> None:
        """Tokens of the element's resource, if the element belongs to its current version."""
        if not tokens:
            return
        g, v, h = groups.c, versions.c, resources.c
        with self._tx("add tokens") as conn:
            current = conn.execute(
                select(v.resource_type, v.resource_id)
                .join(groups, g.version_seq == v.seq)
                .join(
                    resources,
                    (h.tenant == v.tenant)
                    & (h.resource_type == v.resource_type)
                    & (h.resource_id == v.resource_id)
                    & (h.version == v.version),
                )
                .where(g.position == element.position, h.deleted == false())
            ).first()
            if current is None:
                return
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            rows = [
                {
                    "tenant": element.ref.tenant,
                    "resource_type": current.resource_type,
                    "resource_id": current.resource_id,
                    "param": t.field.split(".")[1] if "." in t.field else t.field,
                    "field": t.field,
                    "key_version": t.version,
                    "token": t.token,
                    "key_subject": element.patient,
                }
                for t in tokens
            ]
            conn.execute(dialect.insert(idx_blind).on_conflict_do_nothing(), rows)

    def drop_token_version(self, tenant: str, version: int) -> int:
        """Delete the tokens of a retired index-key version, but refuse (:class:`StaleBlindIndex`)
        while some current resource has tokens of a field under that version only: the key
        ring's index rotation cannot re-index sealed groups, so deleting them would make those
        resources unsearchable without a word. Re-index first (``reindex``), then retry."""
        b = idx_blind.c
        other = idx_blind.alias("other")
        o = other.c
        stale = (
            select(func.count())
            .select_from(idx_blind)
            .where(
                b.tenant == tenant,
                b.key_version == version,
                ~select(o.token)
                .where(
                    o.tenant == b.tenant,
                    o.resource_type == b.resource_type,
                    o.resource_id == b.resource_id,
                    o.field == b.field,
                    o.key_version != version,
                )
                .exists(),
            )
        )
        with self._tx("drop tokens") as conn:
            left = int(conn.execute(stale).scalar_one())
            if left:
                raise StaleBlindIndex(tenant, version, left)
            return int(
                conn.execute(
                    delete(idx_blind).where(b.tenant == tenant, b.key_version == version)
                ).rowcount
            )

    def drop_patient_tokens(self, tenant: str, patient: str) -> int:
        b = idx_blind.c
        with self._tx("drop tokens") as conn:
            return int(
                conn.execute(
                    delete(idx_blind).where(b.tenant == tenant, b.key_subject == patient)
                ).rowcount
            )


if TYPE_CHECKING:  # mypy holds the adapters to their ports

    def _ports(store: SqlRecordStore) -> tuple[RecordStore, SealedElementStore]:
        return store, store.sealed_elements()
