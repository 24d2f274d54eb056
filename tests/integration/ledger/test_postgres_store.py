"""The PostgreSQL ledger store: append-only in the database, one writer, damage reported.

Each test runs in its own schema with its own application role (see test_postgres_support).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from test_postgres_support import PgLedger, pg_fixture  # noqa: F401

from phivault.errors import ConfigurationError
from phivault.ledger.errors import LedgerLocked, LedgerUnavailable
from phivault.ledger.merkle import leaf_hash
from phivault.ledger.postgres_store import (
    LedgerRowDamaged,
    PostgresLedgerStore,
    create_ledger_schema,
)

pytestmark = pytest.mark.integration

TABLES = ("leaves", "checkpoints")


def _leaves(n: int, start: int = 0) -> list[bytes]:
    return [f'{{"n":{i}}}'.encode() for i in range(start, start + n)]


def test_append_read_scan_and_reopen(pg: PgLedger) -> None:
    store = pg.store()
    assert store.recovery is None
    hashes = store.append(_leaves(10))
    assert hashes == b"".join(leaf_hash(leaf) for leaf in _leaves(10))
    store.append(_leaves(5, start=10))
    store.add_checkpoint("first\n")
    assert store.size() == 15
    assert store.read(3, 6) == _leaves(3, start=3)
    assert store.read(7, 7) == []
    with pytest.raises(IndexError):
        store.read(14, 16)
    assert list(store.scan(12)) == _leaves(3, start=12)
    store.close()
    store.close()  # closing twice is harmless

    reopened = pg.store()
    assert reopened.size() == 15
    assert reopened.recovery is None  # a transactional store has no torn tail
    assert reopened.leaf_hashes() == b"".join(leaf_hash(leaf) for leaf in _leaves(15))
    assert reopened.checkpoints() == ["first\n"]
    assert list(reopened.scan()) == _leaves(15)
    reopened.add_checkpoint("second\n")
    assert reopened.checkpoints() == ["first\n", "second\n"]
    reopened.close()
    with pytest.raises(LedgerUnavailable, match="closed"):
        reopened.append(_leaves(1))


def test_one_writer_at_a_time_but_readers_alongside(pg: PgLedger) -> None:
    writer = pg.store()
    writer.append(_leaves(3))
    with pytest.raises(LedgerLocked, match="open for writing by another session"):
        pg.store()
    reader = pg.store(writable=False)
    assert reader.size() == 3
    with pytest.raises(LedgerUnavailable, match="read-only"):
        reader.append(_leaves(1))
    with pytest.raises(LedgerUnavailable, match="read-only"):
        reader.add_checkpoint("note\n")
    # A reader sees the prefix committed when it opened.
    writer.append(_leaves(2, start=3))
    assert reader.size() == 3
    assert reader.read(0, 3) == _leaves(3)
    reader.close()
    writer.close()
    # The lock goes with the writer: the next one opens and continues without a gap.
    successor = pg.store()
    successor.append(_leaves(1, start=5))
    assert successor.read(0, 6) == _leaves(6)
    successor.close()


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from phivault.ledger.postgres_store import PostgresLedgerStore
    store = PostgresLedgerStore(sys.argv[1], schema=sys.argv[2], writable=True)
    store.append([b'{"n":%d}' % i for i in range(4)])
    print("holding", flush=True)
    time.sleep(60)
    """
)


def test_a_standby_takes_over_when_the_writer_process_dies(pg: PgLedger) -> None:
    # The sequencer failover of the scaled shape: the lock dies with the writer's session.
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, pg.app, pg.schema],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"holding\n", child.stderr.read() if child.stderr else line
        with pytest.raises(LedgerLocked, match=r"another session \(backend pid \d+\)"):
            pg.store()
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            standby = pg.store()
            break
        except LedgerLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert standby.size() == 4
    standby.append(_leaves(2, start=4))
    assert list(standby.scan()) == _leaves(6)
    standby.close()


def test_losing_the_connection_stops_the_writer_and_frees_the_lock(pg: PgLedger) -> None:
    writer = pg.store()
    writer.append(_leaves(2))
    pg.admin_sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE usename = '{pg.role}' AND application_name = 'phivault-ledger-writer'"
    )
    with pytest.raises(LedgerUnavailable, match="connection was lost") as caught:
        writer.append(_leaves(1, start=2))
    assert isinstance(caught.value.__cause__, psycopg.Error)  # translated, with its cause
    with pytest.raises(LedgerUnavailable, match="reopen it"):
        writer.append(_leaves(1, start=2))
    writer.close()
    successor = pg.store()
    assert successor.size() == 2
    successor.close()


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize(
    "statement",
    ["UPDATE {s}.{t} SET {c} = {c}", "DELETE FROM {s}.{t}", "TRUNCATE {s}.{t}"],
)
def test_the_application_role_has_no_update_delete_or_truncate(
    pg: PgLedger, table: str, statement: str
) -> None:
    store = pg.store()
    store.append(_leaves(2))
    store.add_checkpoint("note\n")
    store.close()
    column = "idx" if table == "leaves" else "seq"
    query = sql.SQL(statement).format(
        s=sql.Identifier(pg.schema), t=sql.Identifier(table), c=sql.Identifier(column)
    )
    with (
        psycopg.connect(pg.app, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(query)


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize(
    ("statement", "operation"),
    [
        ("UPDATE {s}.{t} SET {c} = {c}", "UPDATE"),
        ("DELETE FROM {s}.{t} WHERE {c} = 0", "DELETE"),
        ("TRUNCATE {s}.{t}", "TRUNCATE"),
        ("INSERT INTO {s}.{t} ({c}) VALUES (0) ON CONFLICT ({c}) DO UPDATE SET {c} = 0", "UPDATE"),
        (
            "MERGE INTO {s}.{t} USING (SELECT 0 AS k) AS src ON {c} = k WHEN MATCHED THEN DELETE",
            "DELETE",
        ),
    ],
)
@pytest.mark.parametrize("replica_role", [False, True])
def test_the_triggers_refuse_changes_even_by_the_owner(
    pg: PgLedger, table: str, statement: str, operation: str, replica_role: bool
) -> None:
    store = pg.store()
    store.append(_leaves(2))
    store.add_checkpoint("note\n")
    store.close()
    column = "idx" if table == "leaves" else "seq"
    query = sql.SQL(statement).format(
        s=sql.Identifier(pg.schema), t=sql.Identifier(table), c=sql.Identifier(column)
    )
    # The superuser owns the tables here; `replica` mode skips ordinary triggers, not these.
    with psycopg.connect(pg.admin, autocommit=True) as conn:
        if replica_role:
            conn.execute("SET session_replication_role = replica")
        with pytest.raises(psycopg.errors.RaiseException) as caught:
            conn.execute(query)
    assert (
        caught.value.diag.message_primary
        == f"the phivault ledger is append-only: {operation} on {pg.schema}.{table} is refused"
    )
    reopened = pg.store()
    assert reopened.read(0, 2) == _leaves(2)
    assert reopened.checkpoints() == ["note\n"]
    reopened.close()


def test_the_database_refuses_gaps_repeats_and_wrong_hashes(pg: PgLedger) -> None:
    store = pg.store()
    store.append(_leaves(3))
    store.close()
    leaves = sql.Identifier(pg.schema, "leaves")
    checkpoints = sql.Identifier(pg.schema, "checkpoints")
    insert = sql.SQL("INSERT INTO {} VALUES (%s, %s, sha256('\\x00'::bytea || %s))").format(leaves)
    with psycopg.connect(pg.app, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="without a gap"):
            conn.execute(insert, (4, b"x", b"x"))  # index 3 skipped
        with pytest.raises(psycopg.errors.RaiseException, match="without a gap"):
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s), (%s, %s, %s)").format(leaves),
                (3, b"a", leaf_hash(b"a"), 5, b"b", leaf_hash(b"b")),
            )
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, (2, b"x", b"x"))
        with pytest.raises(psycopg.errors.CheckViolation, match="leaf_hash_is_rfc9162"):
            conn.execute(sql.SQL("INSERT INTO {} VALUES (3, 'x', %s)").format(leaves), (bytes(32),))
        with pytest.raises(psycopg.errors.RaiseException, match="without a gap"):
            conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'n')").format(checkpoints))
    reopened = pg.store()
    assert reopened.size() == 3
    reopened.close()


def test_schema_setup_is_idempotent_and_grants_only_select_and_insert(pg: PgLedger) -> None:
    store = pg.store()
    store.append(_leaves(3))
    store.close()
    # Someone granted too much by hand; running the setup again takes it back.
    pg.admin_sql(f"GRANT UPDATE, DELETE ON {{s}}.leaves TO {pg.role}")
    create_ledger_schema(pg.admin, schema=pg.schema, app_role=pg.role)
    create_ledger_schema(pg.admin, schema=pg.schema, app_role=pg.role)
    grants = pg.admin_sql(
        "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
        f"WHERE grantee = '{pg.role}' AND table_schema = '{pg.schema}' ORDER BY 1, 2"
    )
    assert grants == [
        ("checkpoints", "INSERT"),
        ("checkpoints", "SELECT"),
        ("leaves", "INSERT"),
        ("leaves", "SELECT"),
    ]
    reopened = pg.store()
    assert reopened.read(0, 3) == _leaves(3)
    reopened.close()


def test_setup_refuses_an_app_role_that_could_disable_the_triggers(pg: PgLedger) -> None:
    with pytest.raises(ConfigurationError, match="superuser or a member"):
        create_ledger_schema(pg.admin, schema=pg.schema, app_role="postgres")
    with pytest.raises(ConfigurationError, match="does not exist"):
        create_ledger_schema(pg.admin, schema=pg.schema, app_role="pv_no_such_role")
    with pytest.raises(ConfigurationError, match="schema name"):
        create_ledger_schema(pg.admin, schema="Robert'); DROP TABLE x;--")


def test_a_strict_store_refuses_a_role_that_can_change_history(pg: PgLedger) -> None:
    with pytest.raises(ConfigurationError, match="can change history"):
        PostgresLedgerStore(pg.admin, schema=pg.schema, writable=True, strict_role=True)
    pg.admin_sql(f"GRANT DELETE ON {{s}}.checkpoints TO {pg.role}")
    with pytest.raises(ConfigurationError, match="can change history"):
        pg.store(writable=False)
    # The refused writer released its lock on the way out.
    pg.admin_sql(f"REVOKE DELETE ON {{s}}.checkpoints FROM {pg.role}")
    pg.store().close()


def test_commits_are_synchronous_even_if_the_role_defaults_to_asynchronous(
    pg: PgLedger,
) -> None:
    pg.admin_sql(f"ALTER ROLE {pg.role} SET synchronous_commit = off")
    with psycopg.connect(pg.app) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
    store = pg.store()
    assert store.synchronous_commit == "on"
    store.close()


def test_driver_errors_never_cross_the_port(pg: PgLedger) -> None:
    nowhere = make_conninfo(pg.app, port="1")
    with pytest.raises(LedgerUnavailable, match="cannot connect") as caught:
        PostgresLedgerStore(nowhere, schema=pg.schema, writable=True, connect_timeout_s=2)
    assert isinstance(caught.value.__cause__, psycopg.Error)
    with pytest.raises(LedgerUnavailable, match="not set up") as missing:
        PostgresLedgerStore(pg.app, schema="pv_no_such_schema", writable=False)
    assert isinstance(missing.value.__cause__, psycopg.Error)
    # A statement refused on a live connection changes nothing: the store stays usable.
    store = pg.store()
    with pytest.raises(LedgerUnavailable, match="cannot add a checkpoint") as bad_note:
        store.add_checkpoint("not\x00a note")
    assert isinstance(bad_note.value.__cause__, psycopg.Error)
    store.add_checkpoint("a note\n")
    assert store.checkpoints() == ["a note\n"]
    store.close()
    # A refused insert (here: the tables were changed behind the writer's back) is translated,
    # and the writer stops: it cannot know what else changed.
    store = pg.store()
    store.append(_leaves(2))
    pg.admin_sql(
        "ALTER TABLE {s}.leaves DISABLE TRIGGER leaves_contiguous",
        "INSERT INTO {s}.leaves VALUES (2, 'x', sha256('\\x00'::bytea || 'x'))",
        "ALTER TABLE {s}.leaves ENABLE ALWAYS TRIGGER leaves_contiguous",
    )
    with pytest.raises(LedgerUnavailable, match="UniqueViolation") as refused:
        store.append(_leaves(1, start=2))
    assert isinstance(refused.value.__cause__, psycopg.errors.UniqueViolation)
    with pytest.raises(LedgerUnavailable, match="changed behind the writer"):
        store.append(_leaves(1, start=3))
    store.close()


def _tamper(pg: PgLedger, *statements: str) -> None:
    """As a superuser, bypass the append-only trigger for ``statements``."""
    pg.admin_sql(
        "ALTER TABLE {s}.leaves DISABLE TRIGGER leaves_append_only",
        *statements,
        "ALTER TABLE {s}.leaves ENABLE ALWAYS TRIGGER leaves_append_only",
    )


def test_a_row_whose_hash_no_longer_matches_is_refused_and_reported(pg: PgLedger) -> None:
    store = pg.store()
    store.append(_leaves(6))
    store.close()
    _tamper(
        pg,
        "ALTER TABLE {s}.leaves DROP CONSTRAINT leaf_hash_is_rfc9162",
        "UPDATE {s}.leaves SET leaf = '{{\"n\":99}}' WHERE idx = 2",
    )
    with pytest.raises(LedgerRowDamaged, match="damaged at 2") as caught:
        pg.store()
    assert caught.value.reason == "stored leaf hash does not match the leaf"
    reader = pg.store(writable=False)
    assert reader.damage == (2, "stored leaf hash does not match the leaf")
    assert reader.size() == 2  # the good prefix
    frames = list(reader.raw_frames())
    assert [reason for _i, _leaf, reason in frames] == [
        None,
        None,
        "stored leaf hash does not match the leaf",
        None,
        None,
        None,
    ]
    reader.close()


def test_a_missing_row_is_refused_and_reported(pg: PgLedger) -> None:
    store = pg.store()
    store.append(_leaves(6))
    store.close()
    _tamper(pg, "DELETE FROM {s}.leaves WHERE idx = 3")
    with pytest.raises(LedgerRowDamaged, match="damaged at 3") as caught:
        pg.store()
    assert caught.value.reason == "entry missing"
    reader = pg.store(writable=False)
    assert reader.damage == (3, "entry missing")
    # Position 3 now holds entry 4: the verifier names that (see test_postgres_ledger).
    assert [leaf for _i, leaf, _r in reader.raw_frames()] == [*_leaves(3), *_leaves(2, start=4)]
    reader.close()


def test_a_leaf_changed_while_the_store_is_open_is_caught_by_scan(pg: PgLedger) -> None:
    store = pg.store()
    store.append(_leaves(5))
    # A consistent rewrite (leaf and stored hash together) behind the open writer's back.
    _tamper(
        pg,
        "UPDATE {s}.leaves SET leaf = '{{\"n\":77}}', "
        "leaf_hash = sha256('\\x00'::bytea || '{{\"n\":77}}'::bytea) WHERE idx = 1",
    )
    with pytest.raises(LedgerRowDamaged, match="damaged at 1"):
        list(store.scan())
    store.close()


def test_racing_inserters_without_the_lock_still_leave_no_gap_or_duplicate(pg: PgLedger) -> None:
    # The advisory lock is the first line; the primary key and the contiguity trigger hold even
    # for clients that skip it (here: raw sessions of the application role, racing).
    leaves = sql.Identifier(pg.schema, "leaves")
    insert = sql.SQL(
        "INSERT INTO {} SELECT i, convert_to(i::text, 'UTF8'), "
        "sha256('\\x00'::bytea || convert_to(i::text, 'UTF8')) "
        "FROM generate_series(%s::bigint, %s::bigint) AS i"
    ).format(leaves)
    top = sql.SQL("SELECT coalesce(max(idx) + 1, 0) FROM {}").format(leaves)
    refused = []

    def racer(offset: int) -> None:
        with psycopg.connect(pg.app, autocommit=True) as conn:
            for round_ in range(40):
                row = conn.execute(top).fetchone()
                assert row is not None
                start = int(row[0]) + (offset if round_ % 3 == 0 else 0)  # sometimes skip ahead
                try:
                    conn.execute(insert, (start, start + 2))
                except psycopg.Error as exc:
                    refused.append(type(exc).__name__)

    threads = [threading.Thread(target=racer, args=(offset,)) for offset in (0, 1, 0, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert refused  # some inserts raced or skipped ahead, and were refused
    assert set(refused) <= {"UniqueViolation", "RaiseException"}
    rows = pg.admin_sql("SELECT count(*), coalesce(max(idx) + 1, 0) FROM {s}.leaves")
    assert rows[0][0] == rows[0][1]  # keys are exactly 0..n-1
    store = pg.store()
    assert store.size() == rows[0][0]
    store.close()


def test_a_deleted_checkpoint_stops_the_writer_but_readers_keep_the_rest(pg: PgLedger) -> None:
    store = pg.store()
    store.append(_leaves(3))
    for note in ("one\n", "two\n", "three\n"):
        store.add_checkpoint(note)
    store.close()
    pg.admin_sql(
        "ALTER TABLE {s}.checkpoints DISABLE TRIGGER checkpoints_append_only",
        "DELETE FROM {s}.checkpoints WHERE seq = 1",
        "ALTER TABLE {s}.checkpoints ENABLE ALWAYS TRIGGER checkpoints_append_only",
    )
    with pytest.raises(LedgerRowDamaged, match="checkpoints table is damaged at 1"):
        pg.store()
    reader = pg.store(writable=False)
    assert reader.checkpoints() == ["one\n", "three\n"]
    reader.close()
