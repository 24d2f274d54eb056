"""How the records store's statements reach SQLite and PostgreSQL: the driver level.

Why a module of its own: a unit of work (:mod:`~phivault.records.store.unit_of_work`) says
*what* to run as SQLAlchemy Core statements; this module holds *how* they run where
SQLAlchemy's per-statement work was measured to cost more than the database's own
(docs/decisions/read-path-cpu.md, records-bundle-load-cpu.md): statements compiled once and
run on the driver's cursor (:func:`_compiled`, :func:`_on_driver`, :func:`_bulk_insert_tuples`),
read-only SQLite units begun on the driver (:class:`_DriverRead`), constant reads on the
PostgreSQL read pool's cursor (:func:`_direct`, :func:`_read_only_engine`), psycopg pipelines
(:func:`_pipelined`); the engines' connection hooks (SQLite's pragmas and ``BEGIN
IMMEDIATE``, the idle ping of pooled connections); and the one translation of driver errors
(:func:`_driver_error`: the driver's class name, never a statement or a parameter value).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, NamedTuple

import psycopg
from sqlalchemy import Connection, Engine, Table, bindparam, create_engine, event, insert
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.compiler import SQLCompiler

from phivault.errors import ConfigurationError
from phivault.records.store.ports import RecordStoreUnavailable


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
        raise _postgres_error(conn, exc, None, None, None) from exc


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


def _bulk_insert_tuples(
    conn: Connection, table: Table, columns: tuple[str, ...], rows: Sequence[tuple[Any, ...]]
) -> None:
    """INSERT many rows, given as tuples in ``columns`` order, through the driver's
    executemany, with the statement compiled once per dialect, table and columns:
    SQLAlchemy's per-row parameter processing would cost more than the database's own work
    for the thousands of index rows of a transaction Bundle. Only for plain columns
    (strings, integers, booleans, bytes), which every head, version, group and index column
    is."""
    if not rows:
        return
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


class _Ran(NamedTuple):
    """What a write statement run by :func:`_on_driver` did: rows changed, rows returned."""

    rowcount: int
    rows: list[Any]


def _on_driver(conn: Connection, sql: str, params: Any, *, many: bool = False) -> _Ran:
    """Run a write statement of this module (``sql`` as compiled for the connection's
    dialect) in the unit's transaction, on the driver's own connection under the unit's
    SQLAlchemy connection: SQLAlchemy's execution context, cursor result and events cost more
    per statement than the database's own work on a create's few rows (SQLite: 5 against
    1.7 us an insert in a loop; PostgreSQL: ``exec_driver_sql`` was about a tenth of a
    scaled create's CPU, records-postgres-round-trips.md).

    The driver's errors are turned into SQLAlchemy's exactly as SQLAlchemy does
    (``DBAPIError.instance``: IntegrityError and the rest, parameters hidden), so the
    callers' handling and translation stay the same. On PostgreSQL a lost connection is
    invalidated as SQLAlchemy would (this one, and the pool's older ones), so that the next
    unit gets a new one. ``many``: an executemany whose results nobody reads (on
    PostgreSQL its rowcount is not known, -1)."""
    if conn.dialect.name != "sqlite":
        return _on_postgres(conn, sql, params, many=many)
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


def _on_postgres(conn: Connection, sql: str, params: Any, *, many: bool) -> _Ran:
    """:func:`_on_driver` on psycopg's cursor."""
    pooled = conn.connection
    raw = pooled.dbapi_connection
    assert raw is not None
    cursor = raw.cursor()
    try:
        if many:
            cursor.executemany(sql, params)
            return _Ran(-1, [])
        cursor.execute(sql, params)
        rows = list(cursor.fetchall()) if cursor.description is not None else []
        return _Ran(cursor.rowcount, rows)
    except psycopg.Error as exc:
        raise _postgres_error(conn, exc, cursor, sql, params, many=many) from exc
    finally:
        cursor.close()


def _postgres_error(
    conn: Connection, exc: psycopg.Error, cursor: Any, sql: Any, params: Any, *, many: bool = False
) -> Exception:
    """psycopg's ``exc`` as SQLAlchemy raises it (``DBAPIError.instance``, parameters hidden);
    a lost connection is invalidated first, as SQLAlchemy's own error handling does (the
    pool then replaces it and every connection it handed out before)."""
    lost = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)  # type: ignore[arg-type]
    error: Exception = DBAPIError.instance(
        sql,
        params,  # shown as hidden (hide_parameters): no value ever reaches a message
        exc,
        psycopg.Error,
        hide_parameters=True,
        dialect=conn.dialect,
        connection_invalidated=lost,
        ismulti=many,
    )
    if lost and not conn.invalidated:
        pooled = conn.connection
        conn.engine.pool._invalidate(pooled, error)  # as Connection._handle_dbapi_exception
        conn.invalidate(error)
    return error


_WRITER_WAIT_S: Final = 30  # the SQLite busy timeout (_sqlite_connect)


#: Connections per PostgreSQL pool (the primary's, its read pool, each replica's) per process.
POSTGRES_POOL_SIZE: Final = 10


def _bounded_pool(size: int) -> dict[str, int]:
    """A PostgreSQL pool of ``size`` connections kept open and **no overflow**: a unit that
    finds all of them in use waits for one (``pool_timeout``, 30 s, then a 503).

    SQLAlchemy's default (5 kept, 10 more made on demand and closed when returned) made and
    closed a connection per request once more than 5 units ran at once, and 32 concurrent
    reads per worker always did: the scaled read benchmark opened ~25 connections a second,
    each a forked backend, which cost more CPU than the reads (463 -> 577 reads/s with a
    bounded pool, docs/decisions/records-storage.md). Waiting for a connection costs
    nothing while it waits; a pool as large as the thread count would cost the server a
    backend per thread per worker (100 connections by default in all)."""
    return {"pool_size": size, "max_overflow": 0}


def _read_only_engine(url: Any, connect_args: Mapping[str, Any], pool_size: int) -> Engine:
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
        **_bounded_pool(pool_size),
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
