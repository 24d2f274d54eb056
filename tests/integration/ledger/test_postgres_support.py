"""Shared fixtures for the PostgreSQL ledger store tests (this module holds no tests).

Test modules import ``pg_fixture`` (registered as ``pg``); the ``postgres`` fixture it needs
comes from tests/conftest.py (tests/postgres_support.py).

Each test gets its own schema and its own application role, both with random names, and both
are dropped afterwards, so tests never depend on each other or on leftovers. If PostgreSQL is
not reachable the tests fail with a clear message (CI starts it): they never skip silently.

``PHIVAULT_TEST_POSTGRES`` is a libpq connection string for a superuser (default: the local
server, database ``test``, user ``postgres``, trust authentication).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from phivault.ledger.postgres_store import PostgresLedgerStore, create_ledger_schema


@dataclass(frozen=True)
class PgLedger:
    """One test's ledger schema: the superuser (owner) and the application role."""

    admin: str  # conninfo of the superuser that owns the schema
    app: str  # conninfo of the append-only application role
    schema: str
    role: str

    def store(self, *, writable: bool = True, strict: bool = True) -> PostgresLedgerStore:
        return PostgresLedgerStore(
            self.app, schema=self.schema, writable=writable, strict_role=strict
        )

    def admin_sql(self, *statements: str) -> list[tuple[object, ...]]:
        """Run statements as the superuser in one transaction; ``{s}`` is the schema."""
        rows: list[tuple[object, ...]] = []
        with psycopg.connect(self.admin, autocommit=True) as conn, conn.transaction():
            for statement in statements:
                cur = conn.execute(sql.SQL(statement).format(s=sql.Identifier(self.schema)))
                if cur.description is not None:
                    rows.extend(cur.fetchall())
        return rows


@pytest.fixture(name="pg")
def pg_fixture(postgres: str) -> Iterator[PgLedger]:
    suffix = secrets.token_hex(6)
    schema, role = f"pv_ledger_{suffix}", f"pv_app_{suffix}"
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        create_ledger_schema(postgres, schema=schema, app_role=role)
        yield PgLedger(postgres, make_conninfo(postgres, user=role), schema, role)
    finally:
        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
