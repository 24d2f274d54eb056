"""Fixtures for the records storage tests: one store per test, on SQLite and on PostgreSQL.

Every test that takes ``store`` runs twice: on a fresh SQLite file (WAL) in a temp dir, and
on a fresh PostgreSQL schema with a random name, dropped afterwards. If PostgreSQL is not
reachable the PostgreSQL runs fail with a clear message (CI starts it): never a silent skip.

``PHIVAULT_TEST_POSTGRES`` is a libpq connection string for a superuser (default: the local
server, database ``test``, user ``postgres``, trust authentication).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from records_store_support import StoreFactory, fresh_schema

from phivault.records.store import SqlRecordStore


@contextmanager
def _factory(request: pytest.FixtureRequest, directory: Path) -> Iterator[StoreFactory]:
    """A store factory on a fresh SQLite file or a fresh PostgreSQL schema (dropped after)."""
    if request.param == "sqlite":
        factory = StoreFactory("sqlite", directory, None)
        try:
            yield factory
        finally:
            factory.close_all()
        return
    admin = request.getfixturevalue("postgres")
    with fresh_schema(admin, "pv_records") as schema:
        factory = StoreFactory("postgresql", directory, schema)
        try:
            yield factory
        finally:
            factory.close_all()


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    with _factory(request, tmp_path) as factory:
        yield factory


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_stores(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StoreFactory]:
    """Shared by a module's read-only tests (loading once keeps the suite fast)."""
    with _factory(request, tmp_path_factory.mktemp("records")) as factory:
        yield factory


@pytest.fixture
def store(stores: StoreFactory) -> SqlRecordStore:
    return stores.open()
