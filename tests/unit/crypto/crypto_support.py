"""Shared helpers of the crypto unit tests (a uniquely named module: tests are not packages)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.ledger.testing import InMemoryAuditSink


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
    store: SqliteKeyStore
    provider: SealedLocalProvider
    shares: list[str]
    clock: Clock
    keys_dir: Path


def make_ring(
    keys_dir: Path, sink: InMemoryAuditSink, clock: Clock
) -> tuple[KeyRing, SqliteKeyStore, SealedLocalProvider]:
    store = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    provider = SealedLocalProvider(keys_dir)
    ring = KeyRing(store=store, provider=provider, audit=sink, observer="node-test", clock=clock)
    return ring, store, provider
