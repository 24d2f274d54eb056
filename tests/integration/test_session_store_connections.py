"""The Redis session store's own connections (``_PipelinedConnections``), taken from the client's
pool settings. A call cancelled between its request and its reply never hands that reply to
the next caller; a script the server forgot is loaded again; a restarted server is reached
again, failing closed meanwhile. (Pipelining itself: ``test_session_store_pipeline.py``.)"""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.asyncio import Redis

from phivault.identity.errors import IdentityUnavailable
from phivault.identity.sessions import RedisSessionStore, SessionState
from redis_support import RedisServer

pytestmark = pytest.mark.integration


async def test_a_cancelled_call_never_hands_its_reply_to_the_next(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url)
    store = RedisSessionStore(client, prefix=f"t{secrets.token_hex(4)}")
    direct = store._direct
    try:
        waiting = asyncio.ensure_future(direct.call("BLPOP", "nothing-here", 1))
        await asyncio.sleep(0.1)  # sent, its reply not read
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await client.rpush("nothing-here", "x")  # would have been BLPOP's reply
        for _ in range(3):
            assert await direct.call("PING") in (b"PONG", "PONG", True)
        assert await store.touch("s", now=1.0, idle_s=900, keep_s=60) is SessionState.NEW
    finally:
        await client.aclose()


async def test_a_forgotten_script_is_loaded_again(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    store = RedisSessionStore(client, prefix=f"t{secrets.token_hex(4)}")
    try:
        assert await store.touch("s", now=1.0, idle_s=900, keep_s=60) is SessionState.NEW
        await client.script_flush()
        assert await store.touch("s", now=2.0, idle_s=900, keep_s=60) is SessionState.ACTIVE
        assert await store.touch("s", now=2000.0, idle_s=900, keep_s=60) is SessionState.ENDED
    finally:
        await client.aclose()


async def test_a_restarted_server_is_reached_again_failing_closed_meanwhile(
    redis_server: RedisServer,
) -> None:
    client = Redis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    store = RedisSessionStore(client, prefix=f"t{secrets.token_hex(4)}")
    try:
        touches = [store.touch(f"s{i}", now=1.0, idle_s=900, keep_s=60) for i in range(8)]
        assert set(await asyncio.gather(*touches)) == {SessionState.NEW}  # a connection idle
        redis_server.kill()
        with pytest.raises(IdentityUnavailable):
            await store.touch("s0", now=2.0, idle_s=900, keep_s=60)
        redis_server.start()
        await asyncio.sleep(0.1)
        # Every idle connection was dead: none of them answers a later touch.
        for i in range(8):
            assert await store.touch(f"s{i}", now=3.0, idle_s=900, keep_s=60) in (
                SessionState.NEW,
                SessionState.ACTIVE,
            )
    finally:
        await client.aclose()
