"""Fixtures for the crypto unit tests: a sealed local keystore in a temp dir, unsealed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from crypto_support import Clock, Env, make_ring

from phivault.crypto.element_store import SqliteSealedElementStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.ledger.testing import InMemoryAuditSink


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=3, shares=5)
    sink = InMemoryAuditSink()
    clock = Clock()
    ring, store, provider = make_ring(keys_dir, sink, clock)
    await ring.unseal(shares[:3])
    yield Env(ring, sink, store, provider, shares, clock, keys_dir)
    store.close()


@pytest.fixture
def elements(tmp_path: Path) -> Iterator[SqliteSealedElementStore]:
    store = SqliteSealedElementStore(tmp_path / "elements.sqlite3")
    yield store
    store.close()
