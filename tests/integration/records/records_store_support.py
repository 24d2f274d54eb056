"""Helpers for the records storage tests (a uniquely named module: tests are not packages)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL

from phivault.records.store import SqlRecordStore
from postgres_support import ADMIN_CONNINFO


def postgres_url() -> str:
    parts: dict[str, Any] = conninfo_to_dict(ADMIN_CONNINFO)
    return URL.create(
        "postgresql+psycopg",
        username=parts.get("user"),
        password=parts.get("password"),
        host=parts.get("host"),
        port=int(parts["port"]) if parts.get("port") else None,
        database=parts.get("dbname"),
    ).render_as_string(hide_password=False)


@contextmanager
def fresh_schema(admin: str, prefix: str) -> Iterator[str]:
    """A new PostgreSQL schema named ``<prefix>_<random>`` for one test, dropped after it."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


class StoreFactory:
    """Opens stores on the test's database (several, to act as several workers)."""

    def __init__(self, engine: str, tmp_path: Path, schema: str | None) -> None:
        self.engine = engine
        self.schema = schema
        self.path = tmp_path / "records.db" if engine == "sqlite" else None
        self._opened: list[SqlRecordStore] = []

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}" if self.path is not None else postgres_url()

    def open(self, *, migrate: bool = True) -> SqlRecordStore:
        store = SqlRecordStore(self.url, schema=self.schema, migrate=migrate)
        self._opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self._opened:
            store.close()
