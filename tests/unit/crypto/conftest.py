"""Fixtures for the crypto unit tests: a sealed local keystore in a temp dir, unsealed, with its
keys in SQLite and again in PostgreSQL (every ``env`` test runs on both keystores)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from crypto_support import STORE_KINDS, Clock, Env, keystore, make_ring

from phivault.crypto.element_store import SqliteSealedElementStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.ledger.testing import InMemoryAuditSink


@pytest.fixture(params=STORE_KINDS)
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=3, shares=5)
    sink = InMemoryAuditSink()
    clock = Clock()
    with keystore(request.param, keys_dir) as store:
        ring, _, provider = make_ring(keys_dir, sink, clock, store)
        await ring.unseal(shares[:3])
        yield Env(ring, sink, store, provider, shares, clock, keys_dir, request.param)


@pytest.fixture
def elements(tmp_path: Path) -> Iterator[SqliteSealedElementStore]:
    store = SqliteSealedElementStore(tmp_path / "elements.sqlite3")
    yield store
    store.close()
