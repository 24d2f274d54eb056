from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception:  # pragma: no cover - the machine has Redis; fail loudly if not
        pytest.fail(f"Redis is not reachable at {REDIS_URL}")
    yield client
    await client.aclose()


@pytest.fixture
def redis_prefix() -> str:
    return f"test-identity-{uuid.uuid4().hex}"
