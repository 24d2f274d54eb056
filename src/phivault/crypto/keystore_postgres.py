"""The scaled shape's :class:`~phivault.crypto.ports.KeyStore`: one schema in the records database.

Why PostgreSQL (``docs/decisions/keys-keystore-postgres.md``): every worker on every host must
see the same wrapped keys, holds, shred records and rotation jobs, atomically. The tables match
:class:`~phivault.crypto.keystore.SqliteKeyStore` and so do the semantics; what one SQLite
writer got for free, the database enforces here for many processes at once:

* one key per version (``UNIQUE (tenant, purpose, subject, version)``) and at most one *active*
  version (a partial unique index): two workers that create the first data key of a patient at
  the same moment end with one key; the loser's transaction writes nothing and raises
  :class:`KeyStoreConflict` (a :class:`~phivault.errors.StoreUnavailable`, like the SQLite
  store's constraint error), and reading again finds the winner's key;
* at most one unfinished rotation per tenant (a partial unique index on the jobs table);
* a shredded patient never gets a data key again, even from a worker that checked a moment
  before the shred: inserting data keys takes a per-tenant advisory lock in shared mode and
  refuses shredded patients (:class:`~phivault.crypto.errors.PatientShredded`); a shred takes
  the same lock exclusively, then destroys the keys and keeps its record in one transaction;
* rewraps are compare-and-swap (``UPDATE ... WHERE wrapped = old``), re-checked by PostgreSQL
  against the committed row when two rotations race;
* a key is stored only if the KEK that wraps it is its tenant's active KEK (row-locked while
  inserting): a worker that wrapped a new data key with a KEK another worker's rotation just
  retired gets :class:`KeyStoreConflict` instead of storing a key that the rotation would
  orphan when it destroys the old KEK.

Secure deletion: PostgreSQL has no ``secure_delete``. A destroyed key's wrapped bytes stay in
the old row version until VACUUM prunes it, and in WAL and backups until they expire. After
destroying keys the store runs ``VACUUM (SKIP_LOCKED)`` on the keys table (best effort: a role
that does not own it gets a warning in the log) and the table's autovacuum is tuned to follow
quickly. The remnants are wrapped: without the root key they are noise. The decision record says
what that does and does not promise.

Every method is one short transaction on a pooled connection (thread-safe; the key ring calls
it from worker threads, off its event loop). No psycopg exception crosses the port.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final, LiteralString

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from phivault.crypto.errors import KeyNotFound, KeyStoreConflict, PatientShredded
from phivault.crypto.ports import (
    Hold,
    JobKind,
    KeyPurpose,
    KeyRecord,
    KeyState,
    RotationJob,
    ShredRecord,
    WrappedKey,
)
from phivault.errors import ConfigurationError, StoreUnavailable
from phivault.pg_advisory import advisory_key

__all__ = [
    "DEFAULT_SCHEMA",
    "SCHEMA_VERSION",
    "KeyStoreConflict",
    "PostgresKeyStore",
    "postgres_conninfo",
]

DEFAULT_SCHEMA: Final = "phivault_keys"
SCHEMA_VERSION: Final = 1
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_PING_AFTER_IDLE_S: Final = 1.0  # a connection idle longer is checked before use
_log = logging.getLogger("phivault.crypto.keystore")


# -- connection strings ---------------------------------------------------------------------


def postgres_conninfo(url: str) -> str:
    """A libpq connection string from a SQLAlchemy URL (``postgresql+psycopg://...``), a libpq
    URI (``postgresql://...``) or a libpq conninfo (``host=... dbname=...``)."""
    if "://" in url:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise ConfigurationError("the keystore's PostgreSQL URL cannot be parsed") from exc
        if parsed.get_backend_name() != "postgresql":
            raise ConfigurationError("the keystore needs a postgresql:// URL")
        return parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ConfigurationError("the keystore's PostgreSQL conninfo cannot be parsed") from exc
    return url


def _driver_message(exc: psycopg.Error) -> str:
    # The primary message only: a DETAIL line can quote a row's values.
    primary = getattr(exc.diag, "message_primary", None) or str(exc).split("\n", 1)[0]
    state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
    return f"{type(exc).__name__}{state}: {primary}"


_CONFLICTS: Final = {
    "keys_key_id_key": "a key with this id already exists",
    "keys_one_version": "another worker created this key version first",
    "keys_one_active": "another worker made a different key version active first",
    "shreds_pkey": "another worker shredded this patient first",
    "jobs_pkey": "a rotation job with this id already exists",
    "jobs_one_open": "another worker started a rotation of this tenant first",
}


def _translate(exc: psycopg.Error, what: str) -> StoreUnavailable:
    if isinstance(exc, psycopg.errors.UniqueViolation):
        constraint = exc.diag.constraint_name or ""
        reason = _CONFLICTS.get(constraint, f"unique constraint {constraint} refused the write")
        return KeyStoreConflict(f"keystore {what}: {reason}; nothing was written")
    return StoreUnavailable(f"keystore {what}: {_driver_message(exc)}")


# -- schema -------------------------------------------------------------------------------

# Text columns that order or page (subjects, key ids) use the "C" collation: byte order, the same
# as Python's and SQLite's, whatever the database's default collation is.
_DDL: Final = """
CREATE SCHEMA IF NOT EXISTS {s};
REVOKE ALL ON SCHEMA {s} FROM PUBLIC;
CREATE TABLE IF NOT EXISTS {s}.meta (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    schema_version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.keys (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id text COLLATE "C" NOT NULL CONSTRAINT keys_key_id_key UNIQUE,
    tenant text COLLATE "C" NOT NULL,
    purpose text COLLATE "C" NOT NULL
        CHECK (purpose IN ('kek', 'dek', 'blind-index', 'ledger-token')),
    subject text COLLATE "C" NOT NULL,
    version integer NOT NULL CHECK (version > 0),
    state text NOT NULL CHECK (state IN ('active', 'decrypt-only', 'destroyed')),
    wrapped bytea,
    wrapped_by text COLLATE "C" NOT NULL,
    created timestamptz NOT NULL,
    rotated timestamptz,
    destroyed timestamptz,
    job text,
    CONSTRAINT keys_one_version UNIQUE (tenant, purpose, subject, version),
    -- a destroyed key holds no material, whatever code wrote the row
    CONSTRAINT keys_destroyed_is_empty CHECK (state <> 'destroyed' OR wrapped IS NULL)
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 50);
CREATE UNIQUE INDEX IF NOT EXISTS keys_one_active ON {s}.keys (tenant, purpose, subject)
    WHERE state = 'active';
CREATE INDEX IF NOT EXISTS keys_by_subject ON {s}.keys (tenant, purpose, subject, version);
CREATE INDEX IF NOT EXISTS keys_by_tenant_seq ON {s}.keys (tenant, seq);
CREATE TABLE IF NOT EXISTS {s}.holds (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant text COLLATE "C" NOT NULL,
    patient text COLLATE "C" NOT NULL,
    until timestamptz NOT NULL,
    reason text NOT NULL,
    placed_by text NOT NULL,
    placed timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_by_patient ON {s}.holds (tenant, patient);
CREATE TABLE IF NOT EXISTS {s}.shreds (
    tenant text COLLATE "C" NOT NULL,
    patient text COLLATE "C" NOT NULL,
    shredded timestamptz NOT NULL,
    by text NOT NULL,
    reason text NOT NULL,
    keys_destroyed text[] NOT NULL,
    ledger_index bigint NOT NULL,
    CONSTRAINT shreds_pkey PRIMARY KEY (tenant, patient)
);
CREATE TABLE IF NOT EXISTS {s}.jobs (
    job_id text CONSTRAINT jobs_pkey PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('kek', 'dek', 'index')),
    tenant text COLLATE "C" NOT NULL,
    patient text,
    phase text NOT NULL,
    cursor bigint NOT NULL,
    done bigint NOT NULL,
    started timestamptz NOT NULL,
    updated timestamptz NOT NULL,
    finished timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_open ON {s}.jobs (tenant) WHERE finished IS NULL;
INSERT INTO {s}.meta (schema_version) VALUES ({version}) ON CONFLICT (one) DO NOTHING;
"""

_COLUMNS: Final = (
    "key_id, tenant, purpose, subject, version, state, wrapped, wrapped_by, created, rotated, "
    "destroyed, job, seq"
)


def _lock_key(kind: str, schema: str, tenant: str = "") -> int:
    """Advisory lock keys: ``shred`` orders a tenant's data-key inserts against its shreds,
    ``ddl`` serializes creating the schema."""
    return advisory_key(f"phivault.keys.{kind}:{schema}:{tenant}")


def _record(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(
        key_id=row[0],
        tenant=row[1],
        purpose=KeyPurpose(row[2]),
        subject=row[3],
        version=row[4],
        state=KeyState(row[5]),
        wrapped=None if row[6] is None else bytes(row[6]),
        wrapped_by=row[7],
        created=row[8],
        rotated=row[9],
        destroyed=row[10],
        job=row[11],
        seq=row[12],
    )


# -- connections --------------------------------------------------------------------------


class _Pool:
    """A small thread-safe pool of autocommit connections, checked after idling.

    A connection that failed (server restart, network) is dropped, never handed out again; the
    next call opens a fresh one, so the store recovers by itself once the server is back.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        name: str,
        size: int,
        connect_timeout_s: int,
        statement_timeout_s: float,
    ) -> None:
        self._conninfo = conninfo
        self._name = name
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_ms = int(statement_timeout_s * 1000)
        self._slots = threading.BoundedSemaphore(size)
        self._wait_s = statement_timeout_s + connect_timeout_s
        self._idle: list[tuple[psycopg.Connection[Any], float]] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=self._connect_timeout_s,
            application_name=self._name,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            # a partition (packets unanswered, no reset) fails the call instead of waiting
            # for the kernel's retransmission limit
            tcp_user_timeout=self._statement_timeout_ms,
        )
        try:
            # UTC: timestamps come back aware and comparable; timeouts: a stuck server fails
            # the call (StoreUnavailable) instead of hanging a worker.
            conn.execute(
                sql.SQL(
                    "SET TimeZone = 'UTC'; SET statement_timeout = {ms}; SET lock_timeout = {ms}"
                ).format(ms=sql.Literal(self._statement_timeout_ms))
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def _checkout(self) -> psycopg.Connection[Any]:
        while True:
            with self._lock:
                if self._closed:
                    raise StoreUnavailable("the keystore is closed")
                if not self._idle:
                    break
                conn, since = self._idle.pop()
            if conn.closed or conn.broken:
                continue
            if time.monotonic() - since < _PING_AFTER_IDLE_S:
                return conn
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                conn.close()
                continue
            return conn
        return self._connect()

    def _checkin(self, conn: psycopg.Connection[Any]) -> None:
        healthy = not (conn.closed or conn.broken)
        if healthy and conn.info.transaction_status is not TransactionStatus.IDLE:
            healthy = False  # never hand out a connection inside someone's transaction
        with self._lock:
            if healthy and not self._closed:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._slots.acquire(timeout=self._wait_s):
            raise StoreUnavailable(f"keystore: no free connection within {self._wait_s:.0f} s")
        try:
            conn = self._checkout()
            try:
                yield conn
            finally:
                self._checkin(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


# -- the store ----------------------------------------------------------------------------


class PostgresKeyStore:
    """Key metadata and wrapped keys in schema ``schema`` of the PostgreSQL at ``url``.

    ``url``: a SQLAlchemy URL (``postgresql+psycopg://...``, as ``records.store_url``), a libpq
    URI or conninfo. ``create=True`` creates the schema and tables if missing (idempotent and
    serialized between workers); ``create=False`` refuses a database where they are missing.
    ``pool_size`` connections at most, opened on demand. ``vacuum_after_destroy`` prunes
    destroyed wrapped keys from the table right after a shred or retirement.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        create: bool = True,
        pool_size: int = 8,
        connect_timeout_s: int = 5,
        statement_timeout_s: float = 15.0,
        vacuum_after_destroy: bool = True,
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(
                f"keystore schema name {schema!r} must be lower-case letters, digits and "
                "underscores (at most 63, not starting with a digit)"
            )
        if pool_size < 1:
            raise ConfigurationError("the keystore's pool_size must be at least 1")
        self.schema = schema
        self._ident = sql.Identifier(schema)
        self._columns = sql.SQL(_COLUMNS)
        self._vacuum = vacuum_after_destroy
        self._statements: dict[str, sql.Composed] = {}
        self._pool = _Pool(
            postgres_conninfo(url),
            # operators see which keystore a session serves (pg_stat_activity)
            name=f"phivault-keys:{schema}"[:63],
            size=pool_size,
            connect_timeout_s=connect_timeout_s,
            statement_timeout_s=statement_timeout_s,
        )
        try:
            self._open(create)
        except BaseException:
            self._pool.close()
            raise

    def __repr__(self) -> str:  # never the connection string (it may carry a password)
        return f"PostgresKeyStore(schema={self.schema!r})"

    def _sql(self, text: LiteralString) -> sql.Composed:
        statement = self._statements.get(text)
        if statement is None:
            statement = sql.SQL(text).format(s=self._ident, cols=self._columns)
            self._statements[text] = statement
        return statement

    def _open(self, create: bool) -> None:
        try:
            with self._pool.connection() as conn:
                found = conn.execute(
                    "SELECT to_regclass(%s) IS NOT NULL", (f'"{self.schema}".meta',)
                ).fetchone()
                if not (found and found[0]):
                    if not create:
                        raise StoreUnavailable(
                            f"the keystore schema {self.schema} is not set up in this database "
                            "(run `phivault init` for the scaled shape first)"
                        )
                    with conn.transaction():
                        # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalogs.
                        conn.execute(
                            "SELECT pg_advisory_xact_lock(%s)", (_lock_key("ddl", self.schema),)
                        )
                        conn.execute(
                            sql.SQL(_DDL).format(s=self._ident, version=sql.Literal(SCHEMA_VERSION))
                        )
                row = conn.execute(self._sql("SELECT schema_version FROM {s}.meta")).fetchone()
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"cannot open the keystore in schema {self.schema}: {_driver_message(exc)}"
            ) from exc
        if row is None or row[0] != SCHEMA_VERSION:
            raise ConfigurationError(
                f"the keystore schema {self.schema} has version {None if row is None else row[0]}"
                f"; this phivault knows version {SCHEMA_VERSION}"
            )

    @contextmanager
    def _tx(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise _translate(exc, what) from exc

    def _read(
        self, what: str, text: LiteralString | sql.Composed, params: Sequence[Any] = ()
    ) -> list[Any]:
        statement = text if isinstance(text, sql.Composed) else self._sql(text)
        # Reads are idempotent: a session lost under them (server restart, cut connection) is
        # retried once on a fresh one. A timeout or a refused connection is not: retrying would
        # only double the wait.
        retried = False
        while True:
            try:
                with self._pool.connection() as conn:
                    try:
                        return conn.execute(statement, params).fetchall()
                    except psycopg.OperationalError:
                        if retried or not conn.broken:
                            raise
                retried = True
            except psycopg.Error as exc:
                raise _translate(exc, what) from exc

    # keys -------------------------------------------------------------------------------

    def add(self, records: Sequence[KeyRecord], *, demote: Sequence[str] = ()) -> None:
        rows = [
            (
                r.key_id, r.tenant, r.purpose.value, r.subject, r.version, r.state.value,
                r.wrapped, r.wrapped_by, r.created, r.rotated, r.destroyed, r.job,
            )
            for r in records
        ]  # fmt: skip
        patients = sorted({(r.tenant, r.subject) for r in records if r.purpose is KeyPurpose.DEK})
        with self._tx("add") as conn:
            for tenant in sorted({tenant for tenant, _ in patients}):
                # Shared: creators do not wait for each other, only for a shred in progress.
                conn.execute(
                    "SELECT pg_advisory_xact_lock_shared(%s)",
                    (_lock_key("shred", self.schema, tenant),),
                )
            if patients:
                shredded = conn.execute(
                    self._sql(
                        "SELECT s.tenant, s.patient FROM {s}.shreds s "
                        "JOIN unnest(%s::text[], %s::text[]) AS p(tenant, patient) "
                        "ON s.tenant = p.tenant AND s.patient = p.patient LIMIT 1"
                    ),
                    ([t for t, _ in patients], [p for _, p in patients]),
                ).fetchone()
                if shredded is not None:
                    raise PatientShredded(shredded[0], shredded[1])
            self._refuse_stale_keks(conn, records)
            if demote:
                # Demote first: the new version may take the "one active version" slot.
                now = records[0].created if records else None
                conn.execute(
                    self._sql(
                        "UPDATE {s}.keys SET state = 'decrypt-only', rotated = %s "
                        "WHERE key_id = ANY(%s) AND state = 'active'"
                    ),
                    (now, list(demote)),
                )
            if rows:
                with conn.cursor() as cur:
                    cur.executemany(
                        self._sql(
                            "INSERT INTO {s}.keys (key_id, tenant, purpose, subject, version, "
                            "state, wrapped, wrapped_by, created, rotated, destroyed, job) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                        ),
                        rows,
                    )

    def _refuse_stale_keks(
        self, conn: psycopg.Connection[Any], records: Sequence[KeyRecord]
    ) -> None:
        """Keys wrapped by a KEK must name an active KEK of their tenant.

        Another worker may have read the active KEK just before a KEK rotation demoted it; a
        key it wrapped with that KEK and inserted after the rotation's scan would be lost when
        the rotation destroys the old KEK. ``FOR SHARE`` makes the rotation's demotion wait for
        this transaction, and this one see a demotion that committed first.
        """
        in_batch = {
            (r.key_id, r.tenant)
            for r in records
            if r.purpose is KeyPurpose.KEK and r.state is KeyState.ACTIVE
        }
        wanted = {
            (r.wrapped_by, r.tenant) for r in records if r.purpose is not KeyPurpose.KEK
        } - in_batch
        if not wanted:
            return
        found = conn.execute(
            self._sql(
                "SELECT key_id, tenant FROM {s}.keys WHERE key_id = ANY(%s) "
                "AND purpose = 'kek' AND state = 'active' FOR SHARE"
            ),
            ([key_id for key_id, _ in wanted],),
        ).fetchall()
        stale = wanted - {(row[0], row[1]) for row in found}
        if stale:
            key_id, tenant = min(stale)
            raise KeyStoreConflict(
                f"keystore add: key-encryption key {key_id} is not the active one of tenant "
                f"{tenant} (another worker rotated it); nothing was written"
            )

    def get(self, key_id: str) -> KeyRecord:
        rows = self._read("get", "SELECT {cols} FROM {s}.keys WHERE key_id = %s", (key_id,))
        if not rows:
            raise KeyNotFound(f"no key {key_id}")
        return _record(rows[0])

    def live(self, tenant: str, purpose: KeyPurpose, subject: str = "") -> list[KeyRecord]:
        rows = self._read(
            "live",
            "SELECT {cols} FROM {s}.keys WHERE tenant = %s AND purpose = %s "
            "AND subject = %s AND state <> 'destroyed' ORDER BY version",
            (tenant, purpose.value, subject),
        )
        return [_record(row) for row in rows]

    def live_many(self, tenant: str, subjects: Sequence[str]) -> dict[str, list[KeyRecord]]:
        result: dict[str, list[KeyRecord]] = {subject: [] for subject in subjects}
        for start in range(0, len(subjects), 5000):
            rows = self._read(
                "live_many",
                "SELECT {cols} FROM {s}.keys WHERE tenant = %s AND purpose = 'dek' "
                "AND subject = ANY(%s) AND state <> 'destroyed' ORDER BY subject, version",
                (tenant, list(subjects[start : start + 5000])),
            )
            for row in rows:
                result[row[3]].append(_record(row))
        return result

    def records(
        self,
        tenant: str | None = None,
        purpose: KeyPurpose | None = None,
        subject: str | None = None,
        *,
        include_destroyed: bool = True,
    ) -> list[KeyRecord]:
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        for column, value in (
            ("tenant", tenant),
            ("purpose", None if purpose is None else purpose.value),
            ("subject", subject),
        ):
            if value is not None:
                clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
        if not include_destroyed:
            clauses.append(sql.SQL("state <> 'destroyed'"))
        where = sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("true")
        statement = sql.SQL(
            "SELECT {cols} FROM {s}.keys WHERE {where} ORDER BY tenant, purpose, subject, version"
        ).format(s=self._ident, cols=self._columns, where=where)
        rows = self._read("records", statement, params)
        return [_record(row) for row in rows]

    def dek_summary(self) -> dict[tuple[str, str, str], int]:
        rows = self._read(
            "dek_summary",
            "SELECT tenant, state, wrapped_by, count(*) FROM {s}.keys WHERE purpose = 'dek' "
            "GROUP BY tenant, state, wrapped_by",
        )
        return {(row[0], row[1], row[2]): row[3] for row in rows}

    def tenants(self) -> list[str]:
        rows = self._read("tenants", "SELECT DISTINCT tenant FROM {s}.keys ORDER BY tenant")
        return [row[0] for row in rows]

    def scan_wrapped_by(
        self, tenant: str, not_wrapped_by: str, after: int, limit: int
    ) -> list[WrappedKey]:
        rows = self._read(
            "scan_wrapped_by",
            "SELECT seq, key_id, purpose, subject, version, wrapped, wrapped_by FROM {s}.keys "
            "WHERE tenant = %s AND seq > %s AND purpose <> 'kek' AND state <> 'destroyed' "
            "AND wrapped_by <> %s ORDER BY seq LIMIT %s",
            (tenant, after, not_wrapped_by, limit),
        )
        return [
            WrappedKey(row[0], row[1], row[2], row[3], row[4], bytes(row[5]), row[6])
            for row in rows
        ]

    def rewrap(self, updates: Sequence[tuple[int, bytes, bytes, str]], now: datetime) -> int:
        if not updates:
            return 0
        with self._tx("rewrap") as conn:
            # One statement for the batch. Under a concurrent rewrap of the same row PostgreSQL
            # waits, then re-checks "wrapped = old" against the committed row: a lost race
            # changes nothing and is not counted.
            cur = conn.execute(
                self._sql(
                    "UPDATE {s}.keys AS k SET wrapped = u.new, wrapped_by = u.by "
                    "FROM unnest(%s::bigint[], %s::bytea[], %s::bytea[], %s::text[]) "
                    "AS u(seq, old, new, by) "
                    "WHERE k.seq = u.seq AND k.wrapped = u.old"
                ),
                (
                    [u[0] for u in updates],
                    [u[1] for u in updates],
                    [u[2] for u in updates],
                    [u[3] for u in updates],
                ),
            )
            return cur.rowcount

    def destroy(self, key_ids: Sequence[str], now: datetime) -> None:
        if not key_ids:
            return
        with self._tx("destroy") as conn:
            conn.execute(
                self._sql(
                    "UPDATE {s}.keys SET wrapped = NULL, state = 'destroyed', "
                    "destroyed = coalesce(destroyed, %s) WHERE key_id = ANY(%s)"
                ),
                (now, list(key_ids)),
            )
        self._prune()

    def subjects(self, tenant: str, after: str, limit: int) -> list[str]:
        rows = self._read(
            "subjects",
            "SELECT DISTINCT subject FROM {s}.keys WHERE tenant = %s AND purpose = 'dek' "
            "AND state <> 'destroyed' AND subject > %s ORDER BY subject LIMIT %s",
            (tenant, after, limit),
        )
        return [row[0] for row in rows]

    # holds and shreds ---------------------------------------------------------------------

    def place_hold(self, hold: Hold) -> None:
        with self._tx("place_hold") as conn:
            conn.execute(
                self._sql(
                    "INSERT INTO {s}.holds (tenant, patient, until, reason, placed_by, placed) "
                    "VALUES (%s, %s, %s, %s, %s, %s)"
                ),
                (hold.tenant, hold.patient, hold.until, hold.reason, hold.placed_by, hold.placed),
            )

    def holds(self, tenant: str, patient: str) -> list[Hold]:
        rows = self._read(
            "holds",
            "SELECT tenant, patient, until, reason, placed_by, placed FROM {s}.holds "
            "WHERE tenant = %s AND patient = %s ORDER BY until, id",
            (tenant, patient),
        )
        return [
            Hold(tenant=r[0], patient=r[1], until=r[2], reason=r[3], placed_by=r[4], placed=r[5])
            for r in rows
        ]

    def shred(self, record: ShredRecord) -> None:
        with self._tx("shred") as conn:
            # Exclusive: waits for data-key inserts of this tenant in flight, and makes later
            # ones see the shred record (they refuse the patient).
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s)",
                (_lock_key("shred", self.schema, record.tenant),),
            )
            conn.execute(
                self._sql(
                    "UPDATE {s}.keys SET wrapped = NULL, state = 'destroyed', "
                    "destroyed = coalesce(destroyed, %s) "
                    "WHERE tenant = %s AND purpose = 'dek' AND subject = %s"
                ),
                (record.shredded, record.tenant, record.patient),
            )
            conn.execute(
                self._sql(
                    "INSERT INTO {s}.shreds (tenant, patient, shredded, by, reason, "
                    "keys_destroyed, ledger_index) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                ),
                (
                    record.tenant, record.patient, record.shredded, record.by, record.reason,
                    list(record.keys_destroyed), record.ledger_index,
                ),
            )  # fmt: skip
        self._prune()

    def shred_record(self, tenant: str, patient: str) -> ShredRecord | None:
        rows = self._read(
            "shred_record",
            "SELECT tenant, patient, shredded, by, reason, keys_destroyed, ledger_index "
            "FROM {s}.shreds WHERE tenant = %s AND patient = %s",
            (tenant, patient),
        )
        if not rows:
            return None
        r = rows[0]
        return ShredRecord(
            tenant=r[0],
            patient=r[1],
            shredded=r[2],
            by=r[3],
            reason=r[4],
            keys_destroyed=tuple(r[5]),
            ledger_index=r[6],
        )

    def _prune(self) -> None:
        """Remove the old row versions that still hold destroyed wrapped keys (best effort).

        The destruction itself is committed: a VACUUM that cannot run now (another one is
        running, or this role does not own the table) leaves the work to autovacuum, and says
        so in the log rather than failing the shred.
        """
        if not self._vacuum:
            return
        skipped: list[str] = []

        def notice(diag: psycopg.errors.Diagnostic) -> None:
            # Skipping (not the owner, table locked) is a WARNING notice, not an error.
            if diag.severity_nonlocalized == "WARNING" and diag.message_primary:
                skipped.append(diag.message_primary)

        try:
            with self._pool.connection() as conn:
                conn.add_notice_handler(notice)
                try:
                    conn.execute(self._sql("VACUUM (SKIP_LOCKED) {s}.keys"))
                finally:
                    conn.remove_notice_handler(notice)
        except (psycopg.Error, StoreUnavailable) as exc:
            skipped.append(_driver_message(exc) if isinstance(exc, psycopg.Error) else str(exc))
        if skipped:
            _log.warning(
                "keystore: VACUUM after destroying keys did not run (%s); autovacuum will "
                "prune the destroyed wrapped keys later",
                "; ".join(skipped),
            )

    # rotation jobs -----------------------------------------------------------------------

    def start_job(self, job: RotationJob) -> None:
        with self._tx("start_job") as conn:
            conn.execute(
                self._sql(
                    "INSERT INTO {s}.jobs (job_id, kind, tenant, patient, phase, cursor, done, "
                    "started, updated) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ),
                (
                    job.job_id, job.kind.value, job.tenant, job.patient, job.phase, job.cursor,
                    job.done, job.started, job.updated,
                ),
            )  # fmt: skip

    def open_jobs(self, tenant: str) -> list[RotationJob]:
        rows = self._read(
            "open_jobs",
            "SELECT job_id, kind, tenant, patient, phase, cursor, done, started, updated "
            "FROM {s}.jobs WHERE tenant = %s AND finished IS NULL ORDER BY started, job_id",
            (tenant,),
        )
        return [
            RotationJob(
                job_id=r[0],
                kind=JobKind(r[1]),
                tenant=r[2],
                patient=r[3],
                phase=r[4],
                cursor=r[5],
                done=r[6],
                started=r[7],
                updated=r[8],
            )
            for r in rows
        ]

    def update_job(self, job_id: str, *, phase: str, cursor: int, done: int, now: datetime) -> None:
        with self._tx("update_job") as conn:
            conn.execute(
                self._sql(
                    "UPDATE {s}.jobs SET phase = %s, cursor = %s, done = %s, updated = %s "
                    "WHERE job_id = %s"
                ),
                (phase, cursor, done, now, job_id),
            )

    def finish_job(self, job_id: str, now: datetime) -> None:
        with self._tx("finish_job") as conn:
            conn.execute(
                self._sql(
                    "UPDATE {s}.jobs SET phase = 'done', finished = %s, updated = %s "
                    "WHERE job_id = %s"
                ),
                (now, now, job_id),
            )

    def close(self) -> None:
        self._pool.close()
