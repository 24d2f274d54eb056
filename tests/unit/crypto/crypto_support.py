"""Shared helpers of the crypto tests (a uniquely named module: tests are not packages).

The key ring's behaviour is tested on both keystores: the embedded SQLite file and the scaled
shape's PostgreSQL schema (a fresh schema per test on the machine's PostgreSQL, dropped after).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql

from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.keystore_postgres import PostgresKeyStore
from phivault.crypto.ports import KeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.ledger.testing import InMemoryAuditSink
from postgres_support import require_postgres

STORE_KINDS = ("sqlite", "postgres")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@dataclass
class Env:
    ring: KeyRing
    sink: InMemoryAuditSink
    store: KeyStore
    provider: SealedLocalProvider
    shares: list[str]
    clock: Clock
    keys_dir: Path
    kind: str = "sqlite"


def fresh_schema_name() -> str:
    return f"test_keys_{secrets.token_hex(6)}"


def drop_schema(conninfo: str, schema: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def postgres_url(conninfo: str) -> str:
    """A SQLAlchemy URL (as ``records.store_url`` holds) for a libpq conninfo."""
    parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    auth = str(parts.get("user", "postgres"))
    if parts.get("password"):
        auth += f":{parts['password']}"
    host, port = parts.get("host", "127.0.0.1"), parts.get("port", 5432)
    return f"postgresql+psycopg://{auth}@{host}:{port}/{parts.get('dbname', 'test')}"


@contextmanager
def keystore(kind: str, keys_dir: Path) -> Iterator[KeyStore]:
    """A new, empty keystore of ``kind``: a SQLite file in ``keys_dir`` or a fresh schema."""
    if kind == "sqlite":
        keys_dir.mkdir(parents=True, exist_ok=True)
        lite = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
        try:
            yield lite
        finally:
            lite.close()
        return
    conninfo = require_postgres()
    schema = fresh_schema_name()
    try:
        store = PostgresKeyStore(conninfo, schema=schema)
        try:
            yield store
        finally:
            store.close()
    finally:
        drop_schema(conninfo, schema)


def stored_bytes(env: Env) -> bytes:
    """What the keystore holds: the SQLite file and its WAL, byte for byte; or everything a
    PostgreSQL session can read from the keys table (the heap file's old row versions depend on
    the server-wide VACUUM horizon; test_keystore_postgres.py checks them where it can)."""
    if isinstance(env.store, SqliteKeyStore):
        wal = env.store.path.with_name(env.store.path.name + "-wal")
        return env.store.path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert isinstance(env.store, PostgresKeyStore)
    dump = bytearray()
    with psycopg.connect(require_postgres()) as conn:
        for text, wrapped in conn.execute(
            sql.SQL("SELECT row_to_json(k)::text, wrapped FROM {}.keys k").format(
                sql.Identifier(env.store.schema)
            )
        ):
            dump += text.encode() + (bytes(wrapped) if wrapped is not None else b"")
    return bytes(dump)


def make_ring(
    keys_dir: Path, sink: InMemoryAuditSink, clock: Clock, store: KeyStore | None = None
) -> tuple[KeyRing, KeyStore, SealedLocalProvider]:
    store = store or SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    provider = SealedLocalProvider(keys_dir)
    ring = KeyRing(store=store, provider=provider, audit=sink, observer="node-test", clock=clock)
    return ring, store, provider
