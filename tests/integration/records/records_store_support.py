"""Helpers for the records storage tests (a uniquely named module: tests are not packages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
