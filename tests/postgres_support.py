"""The PostgreSQL that tests of the scaled shape use (CI starts it; tests fail if it is down).

``PHIVAULT_TEST_POSTGRES`` is a libpq connection string for a superuser (default: the local
server, trust auth, database ``test``). Each test makes its own schema and drops it after.
"""

from __future__ import annotations

import os

import psycopg
import pytest

ADMIN_CONNINFO = os.environ.get(
    "PHIVAULT_TEST_POSTGRES", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)


def require_postgres() -> str:
    """The admin connection string, or a clear failure (never a silent skip)."""
    try:
        with psycopg.connect(ADMIN_CONNINFO, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(
            f"PostgreSQL is not reachable with PHIVAULT_TEST_POSTGRES={ADMIN_CONNINFO!r}.\n"
            "CI starts it; locally, start PostgreSQL (trust auth, database 'test') or point "
            f"PHIVAULT_TEST_POSTGRES at a superuser connection.\n{str(exc).strip()}",
            pytrace=False,
        )
    return ADMIN_CONNINFO
