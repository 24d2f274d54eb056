"""Read-your-writes across workers: two stores (two routers: two API workers) on one real
streaming replica (pg_replica_support), sharing write positions in Redis under one key
prefix. The replica's replay is paused to make "it has not replayed the write yet" hold as
long as a test needs. Also: Redis down (a closed port, and a redis-server of the test's own
that is killed), namespacing, and the shared store's rules on the machine's Redis."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from records_store_support import fresh_schema, postgres_url
from redis import Redis

from pg_replica_support import PgReplica, pg_replica, replica  # noqa: F401  (fixtures)
from phivault.errors import ConfigurationError
from phivault.records.search_params import ReferenceEntry, TokenEntry
from phivault.records.store import (
    PRIMARY,
    NewVersion,
    ReadClass,
    RecordStoreUnavailable,
    ResourceKey,
    SqlRecordStore,
    StoredVersion,
)
from phivault.records.store.routing import (
    CooldownHealth,
    Replica,
    ReplicaRouter,
    ReplicaStatus,
)
from phivault.records.store.write_positions import (
    EVERYONE,
    PositionNeed,
    RedisWritePositions,
    WritePositionsUnavailable,
)
from ports_support import free_port
from redis_support import RedisServer

pytestmark = pytest.mark.integration
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
TENANT = "t1"


def obs(the_id: str, version: int = 1) -> NewVersion:
    return NewVersion(
        key=ResourceKey(TENANT, "Observation", the_id),
        version=version,
        last_updated=T0,
        key_subject="p1",
        groups={"clinical": f"sealed-{the_id}-{version}".encode()},
        index=[TokenEntry("_id", None, the_id), ReferenceEntry("subject", "Patient", "p1")],
    )


def key(the_id: str) -> ResourceKey:
    return ResourceKey(TENANT, "Observation", the_id)


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def write(store: SqlRecordStore, new: NewVersion, *, session: str) -> None:
    with store.unit_of_work(session=session) as uow:
        uow.write(new, previous=new.version - 1 or None)
        uow.commit()


def read(
    store: SqlRecordStore, the_id: str, *, session: str, reads: ReadClass = ReadClass.PHI
) -> tuple[str, StoredVersion | None]:
    with store.unit_of_work(read_only=True, reads=reads, session=session) as uow:
        found = uow.read(key(the_id))
        return uow.served_by, found


def version_seen(store: SqlRecordStore, the_id: str, session: str) -> tuple[str, int | None]:
    served, found = read(store, the_id, session=session)
    return served, None if found is None else found.version


# --- fixtures --------------------------------------------------------------------------------


def mark_epoch(url: str, prefix: str) -> None:
    """What the first read of a deployment does (then pins everyone for a while): done ahead,
    so that a test starts on a Redis that has not lost anything."""
    client = Redis.from_url(url)
    try:
        client.set(f"{prefix}:rw:epoch", "1")
    finally:
        client.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own (one "deployment"), its keys deleted afterwards."""
    name = f"pvtest-rw-{secrets.token_hex(6)}"
    mark_epoch(LOCAL_REDIS, name)
    yield name
    client = Redis.from_url(LOCAL_REDIS)
    try:
        found = list(client.scan_iter(match=f"{name}*"))  # and "<name>-other:..."
        if found:
            client.delete(*found)
    finally:
        client.close()


@pytest.fixture
def redis_client() -> Iterator[Redis]:
    client = Redis.from_url(LOCAL_REDIS)
    try:
        client.ping()
    except Exception:  # pragma: no cover - the machine has Redis
        pytest.fail(f"Redis is not reachable at {LOCAL_REDIS}")
    yield client
    client.close()


@pytest.fixture
def schema(postgres: str) -> Iterator[str]:
    with fresh_schema(postgres, "pv_rwshared") as name:
        yield name


@pytest.fixture
def open_worker(
    schema: str,
    replica: PgReplica,  # noqa: F811
) -> Iterator[Callable[..., SqlRecordStore]]:
    """``open_worker(redis_url, prefix)``: one worker's store (its own router), routing to
    the test replica and sharing write positions at ``redis_url`` under ``prefix`` (None:
    none shared, the behaviour before)."""
    opened: list[SqlRecordStore] = []

    def make(
        redis_url: str | None = LOCAL_REDIS,
        prefix: str | None = None,
        *,
        max_lag_s: float = 30.0,  # the lag guard out of the way: only positions matter
        cooldown_s: float = 1.0,
    ) -> SqlRecordStore:
        positions = None
        if redis_url is not None and prefix is not None:
            positions = RedisWritePositions.from_url(
                redis_url, prefix=prefix, cooldown_s=cooldown_s
            )
        store = SqlRecordStore(
            postgres_url(),
            schema=schema,
            replica_urls=[replica.url],
            replica_retry_s=0.2,
            replica_max_lag_s=max_lag_s,
            replica_display_max_lag_s=max(max_lag_s, 5.0),
            replica_positions=positions,
        )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def settle_on_replica(
    stores: list[SqlRecordStore],
    replica: PgReplica,  # noqa: F811
    the_id: str,
) -> None:
    """Wait until every store reads ``the_id`` for a session that never wrote from the
    replica (it has replayed the setup, migrations included)."""
    replica.wait_replayed()
    for store in stores:
        eventually(
            lambda s=store: read(s, the_id, session="nobody")[0] == replica.name,  # type: ignore[misc]
            what="reads on the replica",
        )


# --- two workers on a real replica -----------------------------------------------------------


def test_a_write_on_one_worker_is_read_back_on_another_from_the_primary(
    open_worker: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
    prefix: str,
) -> None:
    a, b = open_worker(prefix=prefix), open_worker(prefix=prefix)
    write(a, obs("o1"), session="t1/alice")
    settle_on_replica([a, b], replica, "o1")
    eventually(lambda: read(b, "o1", session="t1/alice")[0] == replica.name, what="alice back")

    replica.pause_replay()
    write(a, obs("o1", 2), session="t1/alice")  # on worker A
    # worker B never saw the write, and its replica has not replayed it: the primary serves
    assert version_seen(b, "o1", "t1/alice") == (PRIMARY, 2)
    assert version_seen(b, "o1", "t1/alice") == (PRIMARY, 2)  # and again: nothing forgotten
    # the display reads are bound by read-your-writes too
    served, found = read(b, "o1", session="t1/alice", reads=ReadClass.AGGREGATE)
    assert (served, found and found.version) == (PRIMARY, 2)
    # bob never wrote: within the (large) bound he still reads the replica, one version behind
    assert version_seen(b, "o1", "t1/bob") == (replica.name, 1)
    # the same subject in another tenant is another session
    assert version_seen(b, "o1", "t2/alice") == (replica.name, 1)

    replica.resume_replay()
    replica.wait_replayed()
    eventually(
        lambda: version_seen(b, "o1", "t1/alice") == (replica.name, 2),
        what="alice back on the replica once it has the write",
    )


def test_without_shared_positions_the_other_worker_reads_stale(
    open_worker: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    """The attack the shared positions stop: the behaviour of one router per worker alone."""
    a, b = open_worker(None), open_worker(None)
    write(a, obs("o1"), session="t1/alice")
    settle_on_replica([a, b], replica, "o1")
    eventually(lambda: read(b, "o1", session="t1/alice")[0] == replica.name, what="alice back")
    replica.pause_replay()
    write(a, obs("o1", 2), session="t1/alice")
    assert version_seen(a, "o1", "t1/alice") == (PRIMARY, 2)  # the worker that wrote knows
    assert version_seen(b, "o1", "t1/alice") == (replica.name, 1)  # the other does not
    replica.resume_replay()


def test_other_deployments_writes_are_not_seen(
    open_worker: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
    prefix: str,
) -> None:
    mark_epoch(LOCAL_REDIS, f"{prefix}-other")
    a = open_worker(prefix=prefix)
    elsewhere = open_worker(prefix=f"{prefix}-other")
    write(a, obs("o1"), session="t1/alice")
    settle_on_replica([a, elsewhere], replica, "o1")
    eventually(
        lambda: read(elsewhere, "o1", session="t1/alice")[0] == replica.name, what="alice back"
    )
    replica.pause_replay()
    write(a, obs("o1", 2), session="t1/alice")
    assert version_seen(elsewhere, "o1", "t1/alice") == (replica.name, 1)
    replica.resume_replay()


def test_a_floor_written_on_one_worker_binds_every_session_on_another(
    open_worker: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
    prefix: str,
) -> None:
    a, b = open_worker(prefix=prefix), open_worker(prefix=prefix)
    write(a, obs("o1"), session="t1/writer")
    settle_on_replica([a, b], replica, "o1")
    replica.pause_replay()
    elements = a.sealed_elements()
    (element,) = elements.scan(TENANT, patient=None, after=0, limit=10)
    assert elements.replace(element, b"resealed")  # a DEK rotation's re-seal, on worker A
    served, found = read(b, "o1", session="t1/reader")  # a reader who wrote nothing, on B
    assert served == PRIMARY and found is not None
    assert found.groups == {"clinical": b"resealed"}
    replica.resume_replay()
    replica.wait_replayed()
    eventually(lambda: read(b, "o1", session="t1/reader")[0] == replica.name, what="back")
    assert read(b, "o1", session="t1/reader")[1].groups == {"clinical": b"resealed"}  # type: ignore[union-attr]


def test_with_redis_down_reads_use_the_primary_and_writes_are_refused_before_commit(
    open_worker: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
    prefix: str,
    redis_server: RedisServer,
) -> None:
    mark_epoch(redis_server.url, prefix)
    a = open_worker(redis_server.url, prefix, cooldown_s=0.2, max_lag_s=0.5)
    b = open_worker(redis_server.url, prefix, cooldown_s=0.2, max_lag_s=0.5)
    write(a, obs("o1"), session="t1/alice")
    settle_on_replica([a, b], replica, "o1")

    redis_server.kill()
    # nobody's shared position can be read: every read a replica would serve goes to the
    # primary, even a session that never wrote (its write may be on another worker)
    for session in ("t1/alice", "t1/bob", "t1/bob"):
        assert read(b, "o1", session=session)[0] == PRIMARY
    # reads the router sends to the primary anyway never needed Redis: they still work
    assert read(b, "o1", session="t1/bob", reads=ReadClass.FRESH)[0] == PRIMARY
    # a write whose position cannot be shared does not happen at all
    with pytest.raises(RecordStoreUnavailable):
        write(a, obs("o1", 2), session="t1/alice")
    assert read(a, "o1", session="t1/alice", reads=ReadClass.FRESH)[1].version == 1  # type: ignore[union-attr]

    redis_server.start()  # empty: the positions it held are lost
    time.sleep(0.25)  # past the cool-down
    write(a, obs("o1", 2), session="t1/alice")
    # the first read finds the data lost: everyone reads the primary for the bound (+ margin)
    assert version_seen(b, "o1", "t1/bob") == (PRIMARY, 2)
    settle_on_replica([a, b], replica, "o1")
    assert version_seen(b, "o1", "t1/bob") == (replica.name, 2)


def test_a_redis_that_hangs_sends_reads_to_the_primary_and_refuses_writes(
    open_worker: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
    prefix: str,
    redis_server: RedisServer,
) -> None:
    mark_epoch(redis_server.url, prefix)
    a = open_worker(redis_server.url, prefix)
    write(a, obs("o1"), session="t1/alice")
    settle_on_replica([a], replica, "o1")
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    try:
        # the reply timeout (0.25 s) ends the wait: the primary serves
        assert read(a, "o1", session="t1/bob")[0] == PRIMARY
        with pytest.raises(RecordStoreUnavailable):
            write(a, obs("o1", 2), session="t1/alice")
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert read(a, "o1", session="t1/alice", reads=ReadClass.FRESH)[1].version == 1  # type: ignore[union-attr]


def test_a_write_unit_that_does_not_commit_leaves_nothing_shared(
    open_worker: Callable[..., SqlRecordStore],
    prefix: str,
    redis_client: Redis,
) -> None:
    a = open_worker(prefix=prefix)
    with a.unit_of_work(session="t1/carol") as uow:
        uow.write(obs("c1"), previous=None)  # and no commit: rolled back
    assert list(redis_client.scan_iter(match=f"{prefix}:rw:s:*")) == []
    write(a, obs("c1"), session="t1/carol")
    (name,) = redis_client.scan_iter(match=f"{prefix}:rw:s:*")
    assert redis_client.hget(name, "pins") is None  # settled
    assert int(redis_client.hget(name, "lsn") or 0) > 0


def test_with_redis_on_a_closed_port_reads_use_the_primary(
    open_worker: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
    prefix: str,
) -> None:
    plain = open_worker(None)
    write(plain, obs("o1"), session="t1/alice")
    settle_on_replica([plain], replica, "o1")
    dead = open_worker(f"redis://127.0.0.1:{free_port()}/0", prefix)  # it opens all the same
    router = dead.router
    assert router is not None and isinstance(router.shared, RedisWritePositions)
    before = router.shared.failures  # its migration's floor could not be shared
    for _ in range(3):
        assert read(dead, "o1", session="t1/bob")[0] == PRIMARY
    assert router.shared.failures - before <= 1  # cooling down: not a connection per read


# --- the router and the shared store on the machine's Redis (fake replica) -------------------


class FakeProbe:
    def __init__(self, lag_s: float | None = 0.0, replay_lsn: int | None = 1000) -> None:
        self.status = ReplicaStatus(lag_s, replay_lsn)

    def __call__(self) -> ReplicaStatus:
        return self.status


class Counting:
    """The real Redis store, counting the reads that ask it."""

    def __init__(self, inner: RedisWritePositions) -> None:
        self.inner = inner
        self.retain_s = inner.retain_s
        self.needs = 0

    def begin(self, session: str) -> None:
        self.inner.begin(session)

    def settle(
        self, session: str, *, pinned: bool, committed: bool | None, lsn: int | None
    ) -> None:
        self.inner.settle(session, pinned=pinned, committed=committed, lsn=lsn)

    def need(self, session: str) -> PositionNeed:
        self.needs += 1
        return self.inner.need(session)

    def close(self) -> None:
        self.inner.close()


def worker(
    positions: RedisWritePositions | Counting, probe: FakeProbe, **options: float
) -> ReplicaRouter:
    replica_ = Replica("replica:r:1", probe, CooldownHealth(retry_after_s=1.0))
    return ReplicaRouter([replica_], sample_ttl_s=0.0, shared=positions, **options)  # type: ignore[arg-type]


def test_router_asks_redis_only_when_a_replica_would_serve(
    redis_client: Redis, prefix: str
) -> None:
    positions = Counting(RedisWritePositions(redis_client, prefix=prefix))
    probe = FakeProbe(lag_s=0.0)
    router = worker(positions, probe)
    assert router.choose(ReadClass.AUTHORIZATION, "s") is None
    assert router.choose(ReadClass.FRESH, "s") is None
    probe.status = ReplicaStatus(1.0, 1000)  # over the PHI bound
    assert router.choose(ReadClass.PHI, "s") is None
    assert positions.needs == 0
    router.note_write("s", 5000)  # this worker's own write: it knows without asking
    probe.status = ReplicaStatus(0.0, 1000)
    assert router.choose(ReadClass.PHI, "s") is None
    assert positions.needs == 0
    assert router.choose(ReadClass.PHI, "other") is not None
    assert positions.needs == 1


def test_a_write_pins_its_session_on_every_worker_until_it_settles(
    redis_client: Redis, prefix: str
) -> None:
    probe = FakeProbe(replay_lsn=1000)
    a = worker(RedisWritePositions(redis_client, prefix=prefix), probe)
    b = worker(RedisWritePositions(redis_client, prefix=prefix), probe)
    a.begin_write("t1/alice")
    assert b.choose(ReadClass.PHI, "t1/alice") is None  # in flight: its commit may be next
    assert b.choose(ReadClass.PHI, "t1/bob") is not None
    a.begin_write("t1/alice")  # a second write of the same session, at once
    a.end_write("t1/alice", committed=True, lsn=900)
    assert b.choose(ReadClass.PHI, "t1/alice") is None  # the second is still in flight
    a.end_write("t1/alice", committed=False)  # it wrote nothing
    assert b.choose(ReadClass.PHI, "t1/alice") is not None  # 900 is replayed
    a.begin_write("t1/alice")
    a.end_write("t1/alice", committed=True, lsn=2000)
    assert b.choose(ReadClass.PHI, "t1/alice") is None  # the replica is at 1000
    probe.status = ReplicaStatus(0.0, 2000)
    assert b.choose(ReadClass.PHI, "t1/alice") is not None
    # a settlement that never comes (the worker died, Redis went away after the commit)
    a.begin_write("t1/alice")
    assert b.choose(ReadClass.PHI, "t1/alice") is None  # until the key expires


def test_an_unknown_position_pins_the_session_everywhere_for_the_bound(
    redis_client: Redis, prefix: str
) -> None:
    probe = FakeProbe()
    options = {"max_lag_s": 0.05, "display_max_lag_s": 0.3, "unknown_pin_s": 0.1}
    a = worker(RedisWritePositions(redis_client, prefix=prefix), probe, **options)
    b = worker(RedisWritePositions(redis_client, prefix=prefix), probe, **options)
    assert b.pin_for(0.05) == pytest.approx(0.55)  # the PHI bound plus the clock margin
    assert b.pin_for(0.3) == pytest.approx(0.8)
    a.begin_write("t1/alice")
    a.end_write("t1/alice", committed=None)  # its commit failed midway: it may have happened
    assert b.choose(ReadClass.PHI, "t1/alice") is None
    assert b.choose(ReadClass.AGGREGATE, "t1/alice") is None
    time.sleep(0.6)
    assert b.choose(ReadClass.PHI, "t1/alice") is not None
    assert b.choose(ReadClass.AGGREGATE, "t1/alice") is None  # a looser bound pins longer
    time.sleep(0.3)
    assert b.choose(ReadClass.AGGREGATE, "t1/alice") is not None


def test_a_redis_that_lost_its_data_pins_everyone_for_the_bound(
    redis_client: Redis, prefix: str
) -> None:
    probe = FakeProbe(replay_lsn=1000)
    options = {"max_lag_s": 0.05, "display_max_lag_s": 0.3, "unknown_pin_s": 0.1}
    a = worker(RedisWritePositions(redis_client, prefix=prefix), probe, **options)
    b = worker(RedisWritePositions(redis_client, prefix=prefix), probe, **options)
    a.begin_write("t1/alice")
    a.end_write("t1/alice", committed=True, lsn=5000)
    assert b.choose(ReadClass.PHI, "t1/alice") is None
    redis_client.delete(*redis_client.scan_iter(match=f"{prefix}:*"))  # a restart, no AOF
    assert b.choose(ReadClass.PHI, "t1/alice") is None  # the write is forgotten, but...
    assert b.choose(ReadClass.PHI, "t1/bob") is None  # ...everyone is on the primary
    time.sleep(0.6)
    assert b.choose(ReadClass.PHI, "t1/alice") is not None  # any replica in the bound has it
    assert b.choose(ReadClass.AGGREGATE, "t1/alice") is None  # not yet for the looser bound


def test_the_floor_binds_every_session(redis_client: Redis, prefix: str) -> None:
    probe = FakeProbe(replay_lsn=1000)
    a = worker(RedisWritePositions(redis_client, prefix=prefix), probe)
    b = worker(RedisWritePositions(redis_client, prefix=prefix), probe)
    a.begin_write_everyone()
    assert b.choose(ReadClass.PHI, "anyone") is None
    a.end_write_everyone(committed=True, lsn=1500)
    assert b.choose(ReadClass.PHI, "anyone") is None
    probe.status = ReplicaStatus(0.0, 1500)
    assert b.choose(ReadClass.PHI, "anyone") is not None


def test_positions_keep_the_largest_lsn_exactly_and_expire(
    redis_client: Redis, prefix: str
) -> None:
    positions = RedisWritePositions(redis_client, prefix=prefix, retain_s=30)
    big = 2**60 + 1  # beyond a double's exact integers: compared as strings, not numbers
    positions.settle("s", pinned=False, committed=True, lsn=big)
    positions.settle("s", pinned=False, committed=True, lsn=big - 1)
    positions.settle("s", pinned=False, committed=True, lsn=9)
    assert positions.need("s") == PositionNeed(lsn=big)
    positions.settle("t", pinned=False, committed=True, lsn=9)
    positions.settle("t", pinned=False, committed=True, lsn=10)
    assert positions.need("t").lsn == 10
    ttl = redis_client.pttl(positions.key("s"))
    assert 25_000 < ttl <= 30_000
    # a settlement of a pin that expired never leaves a negative count behind
    positions.settle("u", pinned=True, committed=False, lsn=None)
    assert positions.need("u") == PositionNeed()
    assert redis_client.exists(positions.key("u")) == 0


def test_keys_are_opaque_and_namespaced(redis_client: Redis, prefix: str) -> None:
    positions = RedisWritePositions(redis_client, prefix=prefix)
    positions.settle("tenant-a/subject-123", pinned=False, committed=True, lsn=1)
    (name,) = [k.decode() for k in redis_client.scan_iter(match=f"{prefix}:rw:s:*")]
    assert name.startswith(f"{prefix}:rw:s:")
    assert "subject-123" not in name and "tenant-a" not in name
    assert positions.key("tenant-b/subject-123") != name
    assert positions.key(EVERYONE) == f"{prefix}:rw:floor"
    elsewhere = RedisWritePositions(redis_client, prefix=f"{prefix}x").need("tenant-a/subject-123")
    assert (elsewhere.lsn, elsewhere.in_flight) == (0, False)


def test_reads_skip_redis_while_it_cools_down(prefix: str) -> None:
    now = [100.0]
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    positions = RedisWritePositions(client, prefix=prefix, cooldown_s=1.0, clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(WritePositionsUnavailable):
            positions.need("s")
    assert positions.failures == 1
    now[0] += 1.1
    with pytest.raises(WritePositionsUnavailable):
        positions.need("s")
    assert positions.failures == 2
    with pytest.raises(WritePositionsUnavailable):  # a write always tries
        positions.begin("s")
    assert positions.failures == 3
    client.close()


def test_shared_positions_must_outlive_the_display_bound(redis_client: Redis) -> None:
    short = RedisWritePositions(redis_client, prefix="pvtest-unused", retain_s=2.0)
    with pytest.raises(ConfigurationError):
        worker(short, FakeProbe(), display_max_lag_s=5.0)
