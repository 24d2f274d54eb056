"""The harness itself: a private PostgreSQL keeps every committed row across a SIGKILL of the
whole server, and a private 3-node NATS cluster keeps its replicated stream across a node's
kill and restart. If these fail, every other fault test's verdict is suspect."""

from __future__ import annotations

import os

import nats
import psycopg
import pytest
from fault_support import Harness, await_until

pytestmark = pytest.mark.faults


def test_private_postgres_keeps_committed_rows_across_kill_and_restart(harness: Harness) -> None:
    pg = harness.postgres()
    assert pg.port != 5432
    with psycopg.connect(pg.conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int PRIMARY KEY)")
        for n in range(50):
            conn.execute("INSERT INTO t VALUES (%s)", (n,))
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    old_postmaster = pg.postmaster_pid()
    pg.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(old_postmaster, 0)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.conninfo, connect_timeout=1)
    pg.start()  # crash recovery
    with psycopg.connect(pg.conninfo) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (50,)
    pg.restart()
    with psycopg.connect(pg.conninfo) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (50,)


async def test_private_nats_cluster_keeps_its_stream_across_a_node_kill_and_restart(
    harness: Harness,
) -> None:
    cluster = harness.nats(3)
    assert all(not url.endswith(":4222") for url in cluster.urls)
    leader = cluster.wait_for_leader()
    nc = await nats.connect(
        servers=cluster.urls, connect_timeout=2, reconnect_time_wait=0.25, max_reconnect_attempts=-1
    )
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name="HARNESS", subjects=["harness.>"], num_replicas=3)
        for n in range(10):
            await js.publish("harness.x", str(n).encode(), headers={"Nats-Msg-Id": f"m{n}"})
        # Neither the meta leader nor the stream's: nobody has to elect anything.
        stream_leader = (await js.stream_info("HARNESS")).cluster.leader
        follower = next(i for i in range(3) if f"n{i}" not in (leader, stream_leader))
        cluster.kill(follower)
        assert not cluster.running(follower)
        assert cluster.wait_for_leader() == leader  # the others never noticed a thing

        async def published() -> bool:
            # Our client may have been on the dead node: it reconnects, and the same message
            # id makes a retry harmless.
            await js.publish("harness.x", b"while down", headers={"Nats-Msg-Id": "down"})
            return True

        await await_until(published, 20, what="a publish with one node down")
        cluster.restart(follower)  # back, and caught up (healthy)
        info = await js.stream_info("HARNESS")
        assert info.state.messages == 11
    finally:
        await nc.close()
