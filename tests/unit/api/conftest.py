"""The ``harness`` fixture: a fresh app, client, issuer, clock and audit sink per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from api_harness import Harness, build


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = build()
    async with h.client:
        yield h
