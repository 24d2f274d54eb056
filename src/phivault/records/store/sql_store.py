"""The records store on SQLAlchemy Core: SQLite (WAL) embedded, PostgreSQL scaled.

Why one adapter for both: the statements are the same Core expressions; only the engine set-up
differs (SQLite: WAL, ``BEGIN IMMEDIATE`` for writers so that two writers never deadlock on
a lock upgrade, foreign keys on; PostgreSQL: psycopg 3, the tables in one schema through
``search_path``). The URL chooses.

This module holds :class:`SqlRecordStore`: the engines and pools, migrations, the replicas
and the routing of read-only units, the SQLite writer lock, and the units of work it opens.
The rest of the adapter, one concern a module:

* :mod:`~phivault.records.store.unit_of_work`: :class:`SqlUnitOfWork`, what a transaction does;
* :mod:`~phivault.records.store._statements`: the SQL it runs, built once;
* :mod:`~phivault.records.store._driver`: how statements reach the drivers, the engines'
  connection hooks, and the translation of driver errors;
* :mod:`~phivault.records.store.group_commit`: SQLite's group commit of write units;
* :mod:`~phivault.records.store._commit_positions`: commits' WAL positions for the replicas;
* :mod:`~phivault.records.store.sealed_elements`: :class:`SqlSealedElements`, the key ring's
  view of the same tables.

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
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError

from phivault.crypto.ports import SealedElementStore
from phivault.errors import ConfigurationError
from phivault.pg_advisory import advisory_key
from phivault.records.store._commit_positions import _writing_everyone, _written_lsn
from phivault.records.store._driver import (
    _WRITER_WAIT_S,
    POSTGRES_POOL_SIZE,
    _bounded_pool,
    _driver_error,
    _DriverRead,
    _note_idle,
    _parse_url,
    _ping_if_idle,
    _read_only_engine,
    _sqlite_begin,
    _sqlite_connect,
)
from phivault.records.store.group_commit import GroupCommit, GroupUnit
from phivault.records.store.ports import ReadClass, RecordStore, RecordStoreUnavailable
from phivault.records.store.routing import (
    CooldownHealth,
    Replica,
    ReplicaHealth,
    ReplicaRouter,
    current_session,
    postgres_probe,
    replica_name,
)
from phivault.records.store.schema import upgrade
from phivault.records.store.sealed_elements import SqlSealedElements
from phivault.records.store.unit_of_work import SqlUnitOfWork, _ReplicaLink
from phivault.records.store.write_positions import WritePositions, WritePositionsUnavailable

__all__ = ["SqlRecordStore"]

_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_MIGRATION_LOCK: Final = advisory_key("phivault.records.migrate")


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
        pool_size: int = POSTGRES_POOL_SIZE,
    ) -> None:
        if pool_size < 1:
            raise ConfigurationError("the records store's pool_size must be at least 1")
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
        # there and go in together as the next group (write_unit).
        self._group_commit = GroupCommit(self.unit_of_work)
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
                    parsed,
                    connect_args=connect_args,
                    hide_parameters=True,
                    **_bounded_pool(pool_size),
                )
                # As the read pool: a connection is pinged only after a second idle, not on
                # every checkout (pool_pre_ping: one more round trip per write unit).
                event.listen(self._engine, "checkin", _note_idle)
                event.listen(self._engine, "checkout", _ping_if_idle)
                self._reader = _read_only_engine(parsed, connect_args, pool_size)
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
                    pool_size=pool_size,
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
        pool_size: int,
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
                **_bounded_pool(pool_size),
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
        error = self._group_commit.write([GroupUnit(work, contextvars.copy_context())])[0]
        if error is not None:
            raise error

    def write_units(
        self, works: Sequence[Callable[[SqlUnitOfWork], None]], *, session: str | None = None
    ) -> list[BaseException | None]:
        """:meth:`write_unit` of each of ``works``, submitted at once by one thread: on
        SQLite they go into the next group together (with whatever other threads submit),
        and this thread waits once for all of them instead of one thread waiting for each.
        Each one's exception, or None where it committed (in ``works`` order). PostgreSQL
        without replicas writes them at once in one transaction, each in its own savepoint
        (:meth:`GroupCommit.write_now`); with replicas, one after another, each in its own
        transaction (a commit is noted for one session's read-your-writes)."""
        if self._writer is None and self._router is None:
            context = contextvars.copy_context()
            return self._group_commit.write_now([GroupUnit(w, context.copy()) for w in works])
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
        return self._group_commit.write([GroupUnit(work, context.copy()) for work in works])

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


if TYPE_CHECKING:  # mypy holds the adapters to their ports

    def _ports(store: SqlRecordStore) -> tuple[RecordStore, SealedElementStore]:
        return store, store.sealed_elements()
