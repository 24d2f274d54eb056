"""The scaled ledger store: leaves and checkpoints in PostgreSQL, append-only by construction.

Why PostgreSQL, and why this shape (docs/decisions/ledger-postgres-store.md): the scaled shape
already runs a replicated PostgreSQL, so the ledger sequencer stores its leaves there and
inherits its durability, replication and backups. The database itself, not only this code,
keeps the history append-only:

* a statement trigger refuses ``UPDATE``, ``DELETE`` and ``TRUNCATE`` on both tables, for
  every role including the owner and superusers (``ENABLE ALWAYS``, so that
  ``session_replication_role = replica`` does not skip it either); only an explicit
  ``ALTER TABLE ... DISABLE TRIGGER`` by the owner or a superuser gets past it, and then
  verification still catches the change against the signed checkpoints;
* a second statement trigger refuses inserted indexes that do not continue the table without
  a gap, and the primary key refuses duplicates, so two writers can never interleave;
* a ``CHECK`` makes every stored leaf hash the RFC 9162 hash of its leaf;
* the application role is granted ``SELECT`` and ``INSERT`` only (:func:`create_ledger_schema`).

One writer at a time: a writable store holds a session-level advisory lock for its whole life,
on the same connection that appends, so losing the connection loses the lock *and* the ability
to append together. Another store (a standby sequencer) that asks for the lock meanwhile gets
:class:`~phivault.ledger.errors.LedgerLocked`; once the holder's session ends, it can open.

Each append is one ``INSERT`` statement in its own transaction with ``synchronous_commit`` on:
when :meth:`PostgresLedgerStore.append` returns, the batch is durable. There are no torn tails
in a transactional store, so :attr:`PostgresLedgerStore.recovery` is always ``None``. A row
whose stored hash no longer matches its leaf, or an index missing from the table, is damage
(only a superuser can cause it): a writable open refuses it with :class:`LedgerRowDamaged`,
a read-only open records it in :attr:`PostgresLedgerStore.damage`, and
:meth:`PostgresLedgerStore.raw_frames` hands it to the verifier, which names it.

Readers beside the writer (the API workers' :class:`~phivault.ledger.view.LedgerView`,
``phivault ledger verify`` and ``export``): a read-only open loads one consistent snapshot,
and :meth:`PostgresLedgerStore.refresh` then loads only the rows committed since, again from
one snapshot (so a checkpoint never covers a leaf the reader cannot see), checking each new
row's hash as the open does. Reads run on a small set of connections, so several threads read
at once; a connection that fails is dropped and the next read opens a fresh one (a reader
holds no lock, so it simply recovers once PostgreSQL is back).

No psycopg exception crosses the port: they become
:class:`~phivault.ledger.errors.LedgerUnavailable` (``raise ... from exc``).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from phivault.errors import ConfigurationError
from phivault.ledger.errors import LedgerError, LedgerLocked, LedgerUnavailable
from phivault.ledger.file_store import MAX_LEAF_BYTES, TornTailRecovery
from phivault.ledger.merkle import leaf_hash
from phivault.ledger.ports import RefreshableLedgerStore, StoreGrowth
from phivault.pg_advisory import advisory_key

__all__ = [
    "DEFAULT_SCHEMA",
    "LedgerRowDamaged",
    "PostgresLedgerStore",
    "create_ledger_schema",
    "writer_lock_key",
]

DEFAULT_SCHEMA: Final = "phivault_ledger"
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_HASH_SIZE: Final = 32
_CHUNK: Final = 4096  # rows per read when scanning or refreshing
_READ_CONNECTIONS: Final = 4  # connections a read-only store reads on at once, at most
_HASH_CHUNK: Final = 1 << 20  # leaf hashes per query when loading (32 MiB of bytea)
# Durable enough as they are: "on" (and "remote_apply") wait for the local WAL flush.
_DURABLE_COMMIT: Final = frozenset({"on", "remote_apply"})


class LedgerRowDamaged(LedgerError):
    """A stored row is damaged or missing: refusing to write on top of evidence.

    Only someone who bypassed the database's triggers (the owner or a superuser) or a failing
    disk can cause this. ``phivault ledger verify`` names the entry and the kind of change.
    """

    def __init__(self, table: str, index: int, reason: str) -> None:
        super().__init__(
            f"the ledger's {table} table is damaged at {index} ({reason}); nothing was "
            "changed. Run `phivault ledger verify` for a diagnosis."
        )
        self.table = table
        self.index = index
        self.reason = reason


def writer_lock_key(schema: str) -> int:
    """The advisory lock key (a signed 64-bit integer) held by the writer of ``schema``.

    Operators find the holder with ``SELECT pid FROM pg_locks WHERE locktype = 'advisory'``
    and ``(classid::bigint << 32 | objid::bigint)`` equal to this key (as unsigned 64 bits).
    """
    return advisory_key(f"phivault.ledger.writer:{schema}")


def _check_schema_name(schema: str) -> None:
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            f"ledger schema name {schema!r} must be lower-case letters, digits and underscores "
            "(at most 63, not starting with a digit)"
        )


def _driver_message(exc: psycopg.Error) -> str:
    # The primary message only: a detail line can quote a failing row.
    primary = getattr(exc.diag, "message_primary", None) or str(exc).split("\n", 1)[0]
    state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
    return f"{type(exc).__name__}{state}: {primary}"


# -- schema -------------------------------------------------------------------------------

_REFUSE_CHANGE: Final = """
CREATE OR REPLACE FUNCTION {schema}.refuse_history_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RAISE EXCEPTION 'the phivault ledger is append-only: % on %.% is refused',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING HINT = 'Ledger entries and checkpoints are evidence; they are never changed.';
END
$fn$
"""

# Each INSERT statement must continue the table: its keys are contiguous and start right
# after an existing key (or at 0). With the primary key this keeps the keys exactly 0..n-1.
_CONTIGUOUS: Final = """
CREATE OR REPLACE FUNCTION {schema}.{function}() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    n bigint;
    lo bigint;
    hi bigint;
BEGIN
    SELECT count(*), min({column}), max({column}) INTO n, lo, hi FROM new_rows;
    IF n > 0 AND (hi - lo + 1 <> n OR (lo > 0 AND NOT EXISTS (
            SELECT 1 FROM {schema}.{table} WHERE {column} = lo - 1))) THEN
        RAISE EXCEPTION 'the phivault ledger refuses %.% % to %: they must continue the table '
            'without a gap', TG_TABLE_SCHEMA, TG_TABLE_NAME, lo, hi;
    END IF;
    RETURN NULL;
END
$fn$
"""

_TABLES: Final = r"""
CREATE TABLE IF NOT EXISTS {schema}.leaves (
    idx bigint PRIMARY KEY CHECK (idx >= 0),
    leaf bytea NOT NULL CHECK (octet_length(leaf) <= {max_leaf}),
    leaf_hash bytea NOT NULL,
    CONSTRAINT leaf_hash_is_rfc9162 CHECK (leaf_hash = sha256('\x00'::bytea || leaf))
);
CREATE TABLE IF NOT EXISTS {schema}.checkpoints (
    seq bigint PRIMARY KEY CHECK (seq >= 0),
    note text NOT NULL
)
"""

_TRIGGERS: Final = """
CREATE OR REPLACE TRIGGER {append_only}
    BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.{table}
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_history_change();
CREATE OR REPLACE TRIGGER {contiguous}
    AFTER INSERT ON {schema}.{table} REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.{function}();
ALTER TABLE {schema}.{table} ENABLE ALWAYS TRIGGER {append_only};
ALTER TABLE {schema}.{table} ENABLE ALWAYS TRIGGER {contiguous}
"""


def create_ledger_schema(
    conninfo: str, *, schema: str = DEFAULT_SCHEMA, app_role: str | None = None
) -> None:
    """Create (or bring up to date) the ledger's schema, tables, triggers and grants.

    Idempotent: run it at deploy time as the schema's owner (a migration role), never as the
    application role. ``app_role`` is the existing role the sequencer connects as; it gets
    ``USAGE`` on the schema and ``SELECT, INSERT`` on both tables, and nothing else (any
    earlier grant to it on these tables is revoked first). A superuser, or a member of the
    owner role, is refused as ``app_role``: it could disable the triggers.
    """
    _check_schema_name(schema)
    ident = sql.Identifier(schema)
    statements: list[sql.Composed] = [
        sql.SQL("SELECT pg_advisory_xact_lock({key})").format(
            key=sql.Literal(writer_lock_key(schema) ^ 1)
        ),
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {schema}").format(schema=ident),
        sql.SQL("REVOKE ALL ON SCHEMA {schema} FROM PUBLIC").format(schema=ident),
        sql.SQL(_TABLES).format(schema=ident, max_leaf=sql.Literal(MAX_LEAF_BYTES)),
        sql.SQL(_REFUSE_CHANGE).format(schema=ident),
    ]
    for table, column in (("leaves", "idx"), ("checkpoints", "seq")):
        names = {
            "schema": ident,
            "table": sql.Identifier(table),
            "column": sql.Identifier(column),
            "function": sql.Identifier(f"check_{table}_contiguous"),
            "append_only": sql.Identifier(f"{table}_append_only"),
            "contiguous": sql.Identifier(f"{table}_contiguous"),
        }
        statements.append(sql.SQL(_CONTIGUOUS).format(**names))
        statements.append(sql.SQL(_TRIGGERS).format(**names))
    statements.append(
        sql.SQL("REVOKE ALL ON {schema}.leaves, {schema}.checkpoints FROM PUBLIC").format(
            schema=ident
        )
    )
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn, conn.transaction():
            for statement in statements:
                conn.execute(statement)
            if app_role is not None:
                _grant_append_only(conn, ident, schema, app_role)
    except psycopg.Error as exc:
        raise LedgerUnavailable(
            f"cannot set up the ledger schema {schema}: {_driver_message(exc)}"
        ) from exc


def _grant_append_only(
    conn: psycopg.Connection[TupleRow], ident: sql.Identifier, schema: str, app_role: str
) -> None:
    row = conn.execute(
        "SELECT r.rolsuper, pg_has_role(r.oid, c.relowner, 'MEMBER') "
        "FROM pg_roles r, pg_class c WHERE r.rolname = %s AND c.oid = %s::regclass",
        (app_role, f'"{schema}".leaves'),
    ).fetchone()
    if row is None:
        raise ConfigurationError(
            f"the ledger's application role {app_role!r} does not exist; create it first "
            "(CREATE ROLE ... LOGIN) with its credentials kept outside phivault"
        )
    superuser, owner_member = row
    if superuser or owner_member:
        raise ConfigurationError(
            f"the ledger's application role {app_role!r} is a superuser or a member of the "
            "tables' owner, so it could disable the append-only triggers; use a plain role"
        )
    role = sql.Identifier(app_role)
    for template in (
        "REVOKE ALL ON {schema}.leaves, {schema}.checkpoints FROM {role}",
        "GRANT USAGE ON SCHEMA {schema} TO {role}",
        "GRANT SELECT, INSERT ON {schema}.leaves, {schema}.checkpoints TO {role}",
    ):
        conn.execute(sql.SQL(template).format(schema=ident, role=role))


# -- the store ----------------------------------------------------------------------------


class PostgresLedgerStore:
    """A :class:`~phivault.ledger.ports.LedgerStore` over two append-only PostgreSQL tables.

    Open it ``writable=True`` from the one active writer (an advisory lock enforces it; a
    second writer gets :class:`LedgerLocked`); read-only opens (verification, reports,
    exports) may run beside the writer and see the consistent prefix committed when they
    opened. ``strict_role=True`` (production) refuses to open as a role that could change
    history: a superuser, the tables' owner, or one granted UPDATE, DELETE or TRUNCATE.

    Methods may be called from several threads. A writable store uses its one connection (the
    one holding the writer lock) under a lock; a read-only store reads on up to
    ``read_connections`` connections at once and brings itself up to date with
    :meth:`refresh`.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        writable: bool,
        strict_role: bool = False,
        connect_timeout_s: int = 5,
        statement_timeout_s: float = 30.0,
        read_connections: int = _READ_CONNECTIONS,
    ) -> None:
        _check_schema_name(schema)
        if read_connections < 1:
            raise ConfigurationError("a ledger store reads on at least one connection")
        self.schema = schema
        self.writable = writable
        # Read-only opens keep the good prefix and say where damage starts, for verification.
        self.damage: tuple[int, str] | None = None
        self._lock = threading.Lock()  # the writer's connection, and the loaded state
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._broken: str | None = None
        self._closed = False
        self._hashes = bytearray()
        self._size = 0
        self._notes: list[str] = []
        self._last_note_seq = -1
        self._q = _Queries(schema)
        self._conninfo = conninfo
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_ms = int(statement_timeout_s * 1000)
        self._readers: _ReaderConnections | None = None
        self._conn = self._connect()
        try:
            self.synchronous_commit = self._configure_session()
            if writable:
                self._acquire_writer_lock()
            self._load()
            if strict_role:
                self._refuse_a_role_that_can_change_history()
            self._set_statement_timeout(self._conn)
        except psycopg.Error as exc:
            self._conn.close()
            if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
                raise LedgerUnavailable(
                    f"the ledger schema {schema} is not set up in this database "
                    "(run the schema setup as its owner first)"
                ) from exc
            raise LedgerUnavailable(
                f"cannot open the ledger in schema {schema}: {_driver_message(exc)}"
            ) from exc
        except BaseException:
            self._conn.close()
            raise
        if not writable:
            self._readers = _ReaderConnections(self._connect_reader, self._conn, read_connections)

    # -- opening ----------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[TupleRow]:
        try:
            return psycopg.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=self._connect_timeout_s,
                application_name="phivault-ledger" + ("-writer" if self.writable else "-reader"),
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        except psycopg.Error as exc:
            raise LedgerUnavailable(
                f"cannot connect to PostgreSQL for the ledger: {_driver_message(exc)}"
            ) from exc

    def _connect_reader(self) -> psycopg.Connection[TupleRow]:
        """Another connection for a read-only store (more threads, or after a failure)."""
        conn = self._connect()
        try:
            self._set_statement_timeout(conn)
        except psycopg.Error as exc:
            conn.close()
            raise LedgerUnavailable(
                f"cannot open the ledger in schema {self.schema}: {_driver_message(exc)}"
            ) from exc
        return conn

    def _set_statement_timeout(self, conn: psycopg.Connection[TupleRow]) -> None:
        conn.execute(
            sql.SQL("SET statement_timeout = {ms}").format(
                ms=sql.Literal(self._statement_timeout_ms)
            )
        )

    def _configure_session(self) -> str:
        """Durable commits, and a server that notices a vanished writer; return the commit mode.

        The server drops a session whose client stopped answering keepalives (about 25 s),
        which releases the writer lock so that a standby can take over; by then the old
        writer can no longer append, because its session is gone.
        """
        self._conn.execute(
            "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
            "SET tcp_keepalives_count = 3"
        )
        (current,) = self._one("SHOW synchronous_commit")
        if current not in _DURABLE_COMMIT:
            self._conn.execute("SET synchronous_commit = on")
            (current,) = self._one("SHOW synchronous_commit")
        return str(current)

    def _refuse_a_role_that_can_change_history(self) -> None:
        (can_change,) = self._one(self._q.role_powers)
        if can_change:
            raise ConfigurationError(
                "the ledger store refuses to run as a role that can change history (a "
                "superuser, the tables' owner, or one granted UPDATE, DELETE or TRUNCATE); "
                "connect as the application role that has SELECT and INSERT only"
            )

    def _acquire_writer_lock(self) -> None:
        key = writer_lock_key(self.schema)
        (acquired,) = self._one("SELECT pg_try_advisory_lock(%s)", (key,))
        if acquired:
            return
        unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
        holder = self._conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 1 AND classid::bigint = %s AND objid::bigint = %s",
            (unsigned >> 32, unsigned & 0xFFFF_FFFF),
        ).fetchone()
        who = f" (backend pid {holder[0]})" if holder else ""
        raise LedgerLocked(
            f"the ledger in schema {self.schema} is open for writing by another session{who} "
            "(is another sequencer active?)"
        )

    def _load(self) -> None:
        # One snapshot: checkpoints must never cover leaves this open cannot see.
        with self._conn.transaction():
            self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            first_bad = self._conn.execute(self._q.first_damage).fetchone()
            (rows,) = self._one(self._q.count_leaves)
            good = int(rows)
            if first_bad is not None:
                index, reason = int(first_bad[0]), str(first_bad[1])
                if self.writable:
                    raise LedgerRowDamaged("leaves", index, reason)
                self.damage = (index, reason)
                good = index
            for start in range(0, good, _HASH_CHUNK):
                (chunk,) = self._one(self._q.hashes, (start, min(start + _HASH_CHUNK, good)))
                self._hashes += chunk or b""
            self._size = good
            for position, (seq, note) in enumerate(self._conn.execute(self._q.checkpoints)):
                # A writer would reuse a deleted checkpoint's number; a reader keeps every note
                # (each one is evidence the verifier checks on its own signature).
                if seq != position and self.writable:
                    raise LedgerRowDamaged("checkpoints", position, "checkpoint missing")
                self._notes.append(str(note))
                self._last_note_seq = int(seq)

    def _one(
        self,
        query: str | sql.Composed,
        params: Sequence[Any] = (),
        conn: psycopg.Connection[TupleRow] | None = None,
    ) -> tuple[Any, ...]:
        row = (conn or self._conn).execute(query, params or None).fetchone()
        if row is None:  # aggregate and SHOW queries always return a row
            raise LedgerUnavailable("PostgreSQL returned no row where one was expected")
        return row

    # -- the LedgerStore port ---------------------------------------------------------------

    @property
    def recovery(self) -> TornTailRecovery | None:
        """Always ``None``: a transactional store has no torn tail to cut."""
        return None

    def size(self) -> int:
        return self._size

    def append(self, leaves: Sequence[bytes]) -> bytes:
        """Append in one transaction, durably; return the concatenated leaf hashes."""
        hashes = bytearray()
        for leaf in leaves:
            if len(leaf) > MAX_LEAF_BYTES:
                raise LedgerUnavailable(f"a leaf of {len(leaf)} bytes exceeds {MAX_LEAF_BYTES}")
            hashes += leaf_hash(leaf)
        with self._lock:
            self._check_usable(writing=True)
            if not leaves:
                return b""
            first = self._size
            params = (
                list(range(first, first + len(leaves))),
                list(leaves),
                [bytes(hashes[i : i + _HASH_SIZE]) for i in range(0, len(hashes), _HASH_SIZE)],
            )
            try:
                self._conn.execute(self._q.insert_leaves, params)
            except psycopg.Error as exc:
                raise self._failed("append to", exc) from exc
            self._size = first + len(leaves)
            self._hashes += hashes
        return bytes(hashes)

    def read(self, start: int, stop: int) -> list[bytes]:
        """Leaves ``start`` to ``stop``, each checked against the hash it had when it was
        appended (or loaded): a leaf changed since raises :class:`LedgerRowDamaged`, never
        served silently (the tree and its proofs were built from the original)."""
        size = self._size
        if not 0 <= start <= stop <= size:
            raise IndexError(f"entries {start}..{stop} are outside 0..{size}")
        if start == stop:
            return []
        leaves = []
        for expected, (idx, leaf, _hash) in enumerate(self._rows(start, stop), start):
            if idx != expected:
                raise LedgerRowDamaged("leaves", expected, "entry missing")
            known = self._hashes[expected * _HASH_SIZE : (expected + 1) * _HASH_SIZE]
            if leaf_hash(leaf) != known:
                raise LedgerRowDamaged("leaves", expected, "the leaf changed after it was stored")
            leaves.append(leaf)
        if len(leaves) != stop - start:
            raise LedgerRowDamaged("leaves", start + len(leaves), "entry missing")
        return leaves

    def read_back_links(self, head: int, limit: int) -> list[tuple[int, bytes]]:
        """Entry ``head`` and up to ``limit - 1`` entries down its ``patient_prev`` links,
        newest first, in one round trip; each leaf checked against its known hash as
        :meth:`read` does. The caller checks the links themselves (the database follows
        them as written, so it only saves round trips, it proves nothing)."""
        if not 0 <= head < self._size:
            raise IndexError(f"entry {head} is outside 0..{self._size}")
        with self._reading() as conn:
            try:
                rows = conn.execute(self._q.back_links, (head, max(1, limit))).fetchall()
            except psycopg.Error as exc:
                raise self._failed("read", exc, conn) from exc
        found = []
        for idx, leaf, _hash in rows:
            if idx >= self._size:  # appended after this store's view: not ours to serve
                break
            known = self._hashes[idx * _HASH_SIZE : (idx + 1) * _HASH_SIZE]
            if leaf_hash(leaf) != known:
                raise LedgerRowDamaged("leaves", idx, "the leaf changed after it was stored")
            found.append((idx, bytes(leaf)))
        if not found or found[0][0] != head:
            raise LedgerRowDamaged("leaves", head, "entry missing")
        return found

    def scan(self, start: int = 0) -> Iterator[bytes]:
        """Every leaf from ``start``, read from the table and checked against its hashes.

        A leaf that no longer matches its stored hash, or the hash it had when it was appended
        (or when this store opened), raises :class:`LedgerRowDamaged`: never yielded silently.
        """
        end = self._size
        for first in range(start, end, _CHUNK):
            yield from self.read(first, min(first + _CHUNK, end))

    def leaf_hashes(self) -> bytes:
        return bytes(self._hashes)

    def checkpoints(self) -> list[str]:
        return list(self._notes)

    def add_checkpoint(self, note: str) -> None:
        with self._lock:
            self._check_usable(writing=True)
            try:
                self._conn.execute(self._q.insert_checkpoint, (len(self._notes), note))
            except psycopg.Error as exc:
                raise self._failed("add a checkpoint to", exc) from exc
            self._notes.append(note)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._readers is not None:
                self._readers.close()  # closes self._conn too: it is one of them
            # Ending the session releases the writer lock; no explicit unlock is needed.
            self._conn.close()

    # -- reading beside the writer ----------------------------------------------------------

    def refresh(self) -> StoreGrowth:
        """Load the leaves and checkpoints committed since the open or the last refresh.

        Only the new rows are read, from one snapshot, and each is checked as the open checks
        every row: a row whose stored hash does not match its leaf, or a missing index, stops
        the growth there and is recorded in :attr:`damage` (the good prefix stays usable;
        ``phivault ledger verify`` names the damage). Once damage is found, later refreshes
        load checkpoints only. A writable store is the only writer, so it has nothing to load.
        """
        if self._readers is None:
            with self._lock:
                self._check_usable(writing=False)
                return StoreGrowth(self._size, [], b"", [])
        with self._refresh_lock, self._reading() as conn:
            first = self._size
            try:
                leaves, hashes, damage, notes = self._read_growth(conn, first)
            except psycopg.Error as exc:
                raise self._failed("refresh", exc, conn) from exc
            with self._lock:
                # Hashes before the size: a reader never sees a size its hashes do not cover.
                self._hashes += hashes
                self._size = first + len(leaves)
                if damage is not None:
                    self.damage = damage
                for seq, note in notes:
                    self._notes.append(note)
                    self._last_note_seq = seq
        return StoreGrowth(first, leaves, bytes(hashes), [note for _seq, note in notes])

    def _read_growth(
        self, conn: psycopg.Connection[TupleRow], first: int
    ) -> tuple[list[bytes], bytearray, tuple[int, str] | None, list[tuple[int, str]]]:
        leaves: list[bytes] = []
        hashes = bytearray()
        damage: tuple[int, str] | None = None
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            if self.damage is None:
                (rows,) = self._one(self._q.count_leaves, conn=conn)
                count = int(rows)
                if count < first:
                    damage = (count, "entries missing from the end")
                expected = first
                while damage is None and expected < count:
                    stop = min(expected + _CHUNK, count)
                    for idx, leaf, stored_hash in conn.execute(
                        self._q.read_rows, (expected, stop)
                    ).fetchall():
                        actual = leaf_hash(leaf)
                        if idx != expected:
                            damage = (expected, "entry missing")
                        elif actual != stored_hash:
                            damage = (expected, "stored leaf hash does not match the leaf")
                        if damage is not None:
                            break
                        leaves.append(leaf)
                        hashes += actual
                        expected += 1
                    if damage is None and expected < stop:
                        damage = (expected, "entry missing")
            notes = [
                (int(seq), str(note))
                for seq, note in conn.execute(self._q.checkpoints_after, (self._last_note_seq,))
            ]
        return leaves, hashes, damage, notes

    # -- raw access for verification of the table itself -----------------------------------

    def raw_frames(self) -> Iterator[tuple[int, bytes | None, str | None]]:
        """(position, leaf or None, damage reason or None) for every row, in index order.

        Named like :meth:`FileLedgerStore.raw_frames` so that verification code can take either
        store. Unlike :meth:`scan`, this reads every row regardless of what the store loaded:
        a row whose stored hash does not match its leaf is reported as damaged, and a missing
        index shows as the next row at that position (the verifier names it missing).
        """
        position = 0
        after = -1
        while True:
            with self._reading() as conn:
                try:
                    rows = conn.execute(self._q.raw_rows, (after, _CHUNK)).fetchall()
                except psycopg.Error as exc:
                    raise self._failed("read", exc, conn) from exc
            if not rows:
                return
            for idx, leaf, stored_hash in rows:
                if leaf_hash(leaf) != stored_hash:
                    yield position, None, "stored leaf hash does not match the leaf"
                else:
                    yield position, leaf, None
                position += 1
                after = idx

    # -- internals --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """A connection to read on: the writer's own (under the lock), or a reader's."""
        if self._readers is None:
            with self._lock:
                self._check_usable(writing=False)
                yield self._conn
            return
        self._check_usable(writing=False)
        conn = self._readers.take()
        try:
            yield conn
        finally:
            self._readers.give(conn)

    def _rows(self, start: int, stop: int) -> list[tuple[int, bytes, bytes]]:
        with self._reading() as conn:
            try:
                return conn.execute(self._q.read_rows, (start, stop)).fetchall()
            except psycopg.Error as exc:
                raise self._failed("read", exc, conn) from exc

    def _check_usable(self, *, writing: bool) -> None:
        if self._closed:
            raise LedgerUnavailable("the ledger store is closed")
        if writing and not self.writable:
            raise LedgerUnavailable("the ledger store is open read-only")
        if self._broken is not None:
            raise LedgerUnavailable(
                f"the ledger store stopped after a failure ({self._broken}); reopen it"
            )

    def _failed(
        self, action: str, exc: psycopg.Error, conn: psycopg.Connection[TupleRow] | None = None
    ) -> LedgerUnavailable:
        """Translate a driver error; stop writing unless the table is known to be unchanged."""
        message = f"cannot {action} the ledger: {_driver_message(exc)}"
        conn = conn or self._conn
        if conn.closed or conn.broken:
            if self._readers is not None:
                # A reader holds no lock: the connection is dropped, the next read reconnects.
                return LedgerUnavailable(message + "; the connection was lost")
            # The session is gone, and the writer lock with it; a commit may or may not have
            # happened. Only a fresh open can tell.
            self._broken = "the connection to PostgreSQL was lost"
            return LedgerUnavailable(message + "; the connection was lost")
        if self.writable:
            try:
                (size,) = self._one(self._q.count_leaves)
                (notes,) = self._one(self._q.count_checkpoints)
            except psycopg.Error:
                self._broken = "the connection to PostgreSQL failed"
                return LedgerUnavailable(message)
            if size != self._size or notes != len(self._notes):
                self._broken = "the tables changed behind the writer"
        return LedgerUnavailable(message)


class _Queries:
    """The store's statements, built once for its schema."""

    def __init__(self, schema: str) -> None:
        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(
                schema=sql.Identifier(schema), schema_name=sql.Literal(schema)
            )

        # Binary parameters (%b): the leaves travel as they are, not as hex text that the
        # client writes and the server decodes again (twice the bytes, both ways CPU).
        self.insert_leaves = q(
            "INSERT INTO {schema}.leaves (idx, leaf, leaf_hash) "
            "SELECT * FROM unnest(%b::bigint[], %b::bytea[], %b::bytea[])"
        )
        self.insert_checkpoint = q("INSERT INTO {schema}.checkpoints (seq, note) VALUES (%s, %s)")
        self.count_leaves = q("SELECT coalesce(max(idx) + 1, 0) FROM {schema}.leaves")
        self.count_checkpoints = q("SELECT coalesce(max(seq) + 1, 0) FROM {schema}.checkpoints")
        self.hashes = q(
            "SELECT string_agg(leaf_hash, ''::bytea ORDER BY idx) FROM {schema}.leaves "
            "WHERE idx >= %s AND idx < %s"
        )
        self.read_rows = q(
            "SELECT idx, leaf, leaf_hash FROM {schema}.leaves "
            "WHERE idx >= %s AND idx < %s ORDER BY idx"
        )
        # A patient's back-link chain from one entry down, in one round trip. Each step must
        # point strictly lower, so a tampered link cannot make the walk loop; the caller
        # re-checks every link in Python (report.walk_patient_chain), the database only
        # saves the round trips.
        self.back_links = q(
            "WITH RECURSIVE chain(idx, leaf, leaf_hash, depth) AS ("
            " SELECT idx, leaf, leaf_hash, 1 FROM {schema}.leaves WHERE idx = %s"
            " UNION ALL"
            " SELECT l.idx, l.leaf, l.leaf_hash, c.depth + 1 FROM chain c"
            " JOIN {schema}.leaves l ON l.idx = ("
            "  SELECT CASE WHEN d ->> 'patient_prev' ~ '^[0-9]{{1,18}}$'"
            "   THEN (d ->> 'patient_prev')::bigint END"
            "  FROM (SELECT convert_from(c.leaf, 'UTF8')::jsonb AS d) AS parsed)"
            " AND l.idx < c.idx"
            " WHERE c.depth < %s"
            ") SELECT idx, leaf, leaf_hash FROM chain ORDER BY idx DESC"
        )
        self.raw_rows = q(
            "SELECT idx, leaf, leaf_hash FROM {schema}.leaves WHERE idx > %s ORDER BY idx LIMIT %s"
        )
        self.checkpoints = q("SELECT seq, note FROM {schema}.checkpoints ORDER BY seq")
        self.checkpoints_after = q(
            "SELECT seq, note FROM {schema}.checkpoints WHERE seq > %s ORDER BY seq"
        )
        # The first position where the keys skip an index, or a stored hash is wrong.
        self.first_damage = q(
            "SELECT pos, CASE WHEN idx <> pos THEN 'entry missing' "
            "ELSE 'stored leaf hash does not match the leaf' END "
            "FROM (SELECT idx, leaf, leaf_hash, row_number() OVER (ORDER BY idx) - 1 AS pos "
            "      FROM {schema}.leaves) AS t "
            "WHERE idx <> pos OR leaf_hash <> sha256('\\x00'::bytea || leaf) "
            "ORDER BY pos LIMIT 1"
        )
        # Can the session's role change history? (a superuser, a member of the owner role, or
        # a grant of UPDATE, DELETE or TRUNCATE on either table)
        self.role_powers = q(
            "SELECT r.rolsuper OR bool_or(pg_has_role(current_user, c.relowner, 'MEMBER') "
            "OR has_table_privilege(c.oid, 'UPDATE, DELETE, TRUNCATE')) "
            "FROM pg_roles r, pg_class c WHERE r.rolname = current_user "
            "AND c.relnamespace = {schema_name}::regnamespace "
            "AND c.relname IN ('leaves', 'checkpoints') GROUP BY r.rolsuper"
        )


class _ReaderConnections:
    """The connections a read-only store reads on: at most ``limit``, opened as threads need
    them, and a failed one dropped (the next taker opens a fresh one)."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[TupleRow]],
        first: psycopg.Connection[TupleRow],
        limit: int,
    ) -> None:
        self._connect = connect
        self._idle = [first]
        self._open = 1
        self._limit = limit
        self._closed = False
        self._changed = threading.Condition()

    def take(self) -> psycopg.Connection[TupleRow]:
        with self._changed:
            while True:
                if self._closed:
                    raise LedgerUnavailable("the ledger store is closed")
                if self._idle:
                    conn = self._idle.pop()
                    if not (conn.closed or conn.broken):
                        return conn
                    self._open -= 1
                    continue
                if self._open < self._limit:
                    self._open += 1
                    break
                self._changed.wait()
        try:
            return self._connect()
        except BaseException:
            with self._changed:
                self._open -= 1
                self._changed.notify()
            raise

    def give(self, conn: psycopg.Connection[TupleRow]) -> None:
        with self._changed:
            if self._closed or conn.closed or conn.broken:
                conn.close()
                self._open -= 1
            else:
                self._idle.append(conn)
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            for conn in self._idle:
                conn.close()
            self._open -= len(self._idle)
            self._idle.clear()
            self._changed.notify_all()


def _conforms(store: PostgresLedgerStore) -> RefreshableLedgerStore:
    """Type-checks that the store implements the port (mypy fails here if it drifts)."""
    return store
