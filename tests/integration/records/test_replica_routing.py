"""Replica routing on a real streaming replica of the test PostgreSQL (pg_replica_support):
PHI reads on the replica while it keeps up, the lag guard and read-your-writes with replay
paused, kill and restart, writes and authorization state on the primary. The router's rules
are also checked alone, on a fake clock and probe."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from records_store_support import StoreFactory, fresh_schema, postgres_url
from repository_support import bundle, caller, loader, open_kit

from pg_replica_support import PgReplica, pg_replica, replica  # noqa: F401  (fixtures)
from phivault.errors import ConfigurationError
from phivault.identity.principal import Role
from phivault.records.query import parse_search
from phivault.records.search_params import ReferenceEntry, TokenEntry
from phivault.records.store import (
    PRIMARY,
    NewVersion,
    ReadClass,
    ResourceKey,
    SqlRecordStore,
    SqlUnitOfWork,
    StoredVersion,
    caller_session,
)
from phivault.records.store.routing import (
    BreakerHealth,
    CooldownHealth,
    Replica,
    ReplicaRouter,
    ReplicaStatus,
    ReplicaUnreachable,
    postgres_probe,
)
from phivault.resilience import Breakers

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
TENANT = "t1"
DOCTOR = ("Practitioner", "doc-1")


def obs(the_id: str, version: int = 1, *, patient: str = "p1") -> NewVersion:
    return NewVersion(
        key=ResourceKey(TENANT, "Observation", the_id),
        version=version,
        last_updated=T0,
        key_subject=patient,
        groups={"clinical": f"sealed-{the_id}-{version}".encode()},
        index=[TokenEntry("_id", None, the_id), ReferenceEntry("subject", "Patient", patient)],
    )


def key(the_id: str) -> ResourceKey:
    return ResourceKey(TENANT, "Observation", the_id)


def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)


@pytest.fixture
def schema(postgres: str) -> Iterator[str]:
    with fresh_schema(postgres, "pv_replica") as name:
        yield name


@pytest.fixture
def open_store(schema: str, replica: PgReplica) -> Iterator[Callable[..., SqlRecordStore]]:  # noqa: F811
    opened: list[SqlRecordStore] = []

    def make(**options: float) -> SqlRecordStore:
        store = SqlRecordStore(
            postgres_url(),
            schema=schema,
            replica_urls=[replica.url],
            replica_retry_s=0.2,
            **options,  # type: ignore[arg-type]
        )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def write(store: SqlRecordStore, new: NewVersion, *, session: str) -> None:
    with store.unit_of_work(session=session) as uow:
        uow.write(new, previous=new.version - 1 or None)
        assert uow.served_by == PRIMARY
        uow.commit()


def read(
    store: SqlRecordStore,
    the_id: str,
    *,
    session: str,
    reads: ReadClass = ReadClass.PHI,
) -> tuple[str, StoredVersion | None]:
    with store.unit_of_work(read_only=True, reads=reads, session=session) as uow:
        found = uow.read(key(the_id))
        return uow.served_by, found


def on_replica(store: SqlRecordStore, the_id: str, session: str, name: str) -> bool:
    return read(store, the_id, session=session)[0] == name


# --- routing on a real replica ---------------------------------------------------------------


def test_phi_reads_are_served_by_the_replica_while_it_keeps_up(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    store = open_store()
    write(store, obs("o1"), session="writer")
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="reader on replica")
    served, found = read(store, "o1", session="reader")
    assert served == replica.name
    assert found is not None and found.groups == {"clinical": b"sealed-o1-1"}
    # the writer's own reads return to the replica once it has replayed the write
    eventually(lambda: on_replica(store, "o1", "writer", replica.name), what="writer on replica")
    # search, history and vread go the same way
    with store.unit_of_work(read_only=True, session="reader") as uow:
        assert [v.version for v in uow.history(TENANT, "Observation", "o1")] == [1]
        assert uow.vread(key("o1"), 1) is not None
        assert uow.served_by == replica.name


def test_with_replay_paused_reads_go_to_the_primary_and_see_the_write(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    store = open_store()
    write(store, obs("o1"), session="writer")
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="reader on replica")

    replica.pause_replay()
    write(store, obs("o1", 2), session="writer")
    # read-your-writes: the writer's next read is on the primary at once, and sees version 2
    served, found = read(store, "o1", session="writer")
    assert (served, found and found.version) == (PRIMARY, 2)
    # the lag guard: once the replica is more than 100 ms behind, nobody reads from it
    time.sleep(0.2)
    served, found = read(store, "o1", session="reader")
    assert (served, found and found.version) == (PRIMARY, 2)
    # display reads tolerate more lag (5 s): they still get the replica, one version behind
    served, found = read(store, "o1", session="reader", reads=ReadClass.AGGREGATE)
    assert (served, found and found.version) == (replica.name, 1)

    replica.resume_replay()
    for who in ("reader", "writer"):

        def back(who: str = who) -> bool:
            return on_replica(store, "o1", who, replica.name)

        eventually(back, what=who)
        assert read(store, "o1", session=who)[1].version == 2  # type: ignore[union-attr]


def test_read_your_writes_follows_the_caller_session_context(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    store = open_store(replica_max_lag_s=30.0)  # the lag guard out of the way
    write(store, obs("o1"), session="someone")
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o1", "alice", replica.name), what="alice on replica")
    replica.pause_replay()
    with caller_session("alice"):
        with store.unit_of_work() as uow:
            uow.write(obs("o1", 2), previous=1)
            uow.commit()
        with store.unit_of_work(read_only=True) as uow:
            assert (uow.served_by, uow.read(key("o1")).version) == (PRIMARY, 2)  # type: ignore[union-attr]
    # bob never wrote: within the (large) bound he reads the replica, which lacks version 2
    served, found = read(store, "o1", session="bob")
    assert (served, found and found.version) == (replica.name, 1)


def test_resealed_elements_are_read_from_the_primary_until_every_replica_has_them(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    store = open_store(replica_max_lag_s=30.0)  # only the write floor keeps reads off it
    write(store, obs("o1"), session="writer")
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="reader on replica")
    replica.pause_replay()
    elements = store.sealed_elements()
    (element,) = elements.scan(TENANT, patient=None, after=0, limit=10)
    assert elements.replace(element, b"resealed")  # a DEK rotation's re-seal
    served, found = read(store, "o1", session="reader")  # a reader who wrote nothing
    assert served == PRIMARY and found is not None
    assert found.groups == {"clinical": b"resealed"}
    replica.resume_replay()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="back on replica")
    assert read(store, "o1", session="reader")[1].groups == {"clinical": b"resealed"}  # type: ignore[union-attr]


def test_killing_the_replica_moves_reads_to_the_primary_and_restarting_brings_them_back(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    store = open_store()
    write(store, obs("o1"), session="writer")
    write(store, obs("o2"), session="writer")
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="reader on replica")

    # a unit already reading from the replica when it dies finishes on the primary
    with store.unit_of_work(read_only=True, session="reader") as uow:
        assert uow.read(key("o1")) is not None
        replica.kill()
        assert uow.read(key("o2")) is not None
        assert uow.served_by == f"{replica.name},{PRIMARY}"
        assert uow.nodes == (replica.name, PRIMARY)
    # new units go to the primary, without an error
    for _ in range(5):
        served, found = read(store, "o1", session="reader")
        assert served == PRIMARY and found is not None

    replica.start()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="back on replica")

    # a unit that has read all it needed when the replica dies ends without an error too
    with store.unit_of_work(read_only=True, session="reader") as uow:
        assert uow.read(key("o1")) is not None
        replica.kill()
    assert uow.served_by == replica.name
    assert read(store, "o1", session="reader")[0] == PRIMARY
    replica.start()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="back again")


def test_reads_under_load_survive_a_replica_kill_and_return_after_restart(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    store = open_store()
    for n in range(4):
        write(store, obs(f"o{n}"), session="writer")
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o0", "reader", replica.name), what="reader on replica")
    served: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(n: int) -> None:
        while not stop.is_set():
            try:
                with store.unit_of_work(read_only=True, session=f"reader-{n}") as uow:
                    assert uow.read(key(f"o{n % 4}")) is not None
                    assert uow.search(TENANT, parse_search("Observation", "")).matches
                    served.append(uow.served_by)
            except BaseException as exc:  # any error at all fails the test
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        replica.kill()
        time.sleep(0.5)
        during = len(served)
        replica.start()
        eventually(lambda: served[-1] == replica.name, what="reads back on the replica")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert errors == []
    assert replica.name in served[:during] and PRIMARY in served[:during]
    # (that reads came back to the replica is what the wait above checked: a read still in
    # flight when the threads stop may rightly go to the primary, when the lag sample of a
    # busy replica is over its bound for a moment)


def test_a_circuit_breaker_guards_the_replica(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    breakers = Breakers()

    def health(name: str) -> BreakerHealth:
        return BreakerHealth(
            breakers.breaker(
                # reset after 3 s: the state is asserted "open" right after the trip, and a
                # loaded machine took more than 0.3 s between the two (it read "half-open")
                f"records-{name}",
                failure_threshold=1,
                reset_timeout_s=3.0,
                call_timeout_s=None,
            )
        )

    store = open_store(replica_health=health)
    breaker = breakers.get(f"records-{replica.name}")
    write(store, obs("o1"), session="writer")
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="reader on replica")
    assert breaker.state == "closed"
    replica.kill()
    assert read(store, "o1", session="reader")[0] == PRIMARY
    assert str(breaker.state) == "open" and breaker.trips == 1
    states = {m.name: m.samples for m in breakers.collect()}
    assert states["phivault_breaker_state"][0].value == 2  # exported: open
    replica.start()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="back on replica")
    assert breaker.state == "closed"


def test_a_stopped_replica_is_skipped_and_found_again(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    store = open_store()
    write(store, obs("o1"), session="writer")
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="reader on replica")
    replica.stop()
    started = time.monotonic()
    assert read(store, "o1", session="reader")[0] == PRIMARY
    assert time.monotonic() - started < 1.0  # a refused connection costs little
    replica.start()
    eventually(lambda: on_replica(store, "o1", "reader", replica.name), what="back on replica")


def test_writes_never_go_to_the_replica(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    store = open_store()
    write(store, obs("o1"), session="writer")
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o1", "writer", replica.name), what="writer on replica")
    for reads in ReadClass:  # what a write unit says it reads does not matter
        with store.unit_of_work(reads=reads, session="writer") as uow:
            assert uow.served_by == PRIMARY
            uow.write(obs(f"w-{reads.value}"), previous=None)
            uow.commit()
    with store.unit_of_work(session="writer") as uow:
        uow.assign_care(TENANT, DOCTOR, "p1", by="admin", at=1)
        assert uow.served_by == PRIMARY
        uow.commit()
    # the primary has them all; the replica only ever received them by streaming
    replica.wait_replayed()
    with psycopg.connect(replica.conninfo) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)


def test_authorization_state_is_read_on_the_primary(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
    schema: str,
) -> None:
    store = open_store(replica_max_lag_s=30.0)  # PHI may come from the paused replica
    write(store, obs("o1"), session="admin")
    with store.unit_of_work(session="admin") as uow:
        uow.assign_care(TENANT, DOCTOR, "p1", by="admin", at=1)
        uow.commit()
    replica.wait_replayed()
    eventually(lambda: on_replica(store, "o1", "doctor", replica.name), what="doctor on replica")

    replica.pause_replay()
    with store.unit_of_work(session="admin") as uow:  # the assignment ends
        assert uow.unassign_care(TENANT, DOCTOR, "p1")
        uow.commit()
    with psycopg.connect(replica.conninfo) as conn:  # the replica still has it
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
        assert conn.execute("SELECT count(*) FROM acc_care_assignments").fetchone() == (1,)

    with store.unit_of_work(read_only=True, session="doctor") as uow:
        assert uow.read(key("o1")) is not None  # PHI: from the replica
        assert uow.care_related(TENANT, DOCTOR, {"p1"}) == set()  # authorization: primary
        assert uow.served_by == replica.name
    for reads in (ReadClass.AUTHORIZATION, ReadClass.FRESH):
        with store.unit_of_work(read_only=True, reads=reads, session="doctor") as uow:
            assert uow.care_related(TENANT, DOCTOR, {"p1"}) == set()
            assert uow.served_by == PRIMARY


def test_the_probe_reads_zero_lag_on_a_caught_up_replica_and_real_lag_when_paused(
    open_store: Callable[..., SqlRecordStore],
    replica: PgReplica,  # noqa: F811
) -> None:
    store = open_store()
    probe = postgres_probe(store._replicas[replica.name])
    replica.wait_replayed()
    time.sleep(0.3)  # the primary may be idle now: the lag must not grow with idleness

    def lag() -> float:
        found = probe().lag_s
        assert found is not None  # it streams all along: the lag is known
        return found

    # Other work on the machine's PostgreSQL (the replica streams the whole cluster) can
    # put real lag on it for a moment: caught up means under the bound within a few tries.
    eventually(lambda: lag() < 0.1, 10, "the caught-up replica's lag to read under 0.1 s")
    status = probe()
    assert status.replay_lsn is not None and status.replay_lsn >= replica.replay_lsn() - 10**9

    replica.pause_replay()
    write(store, obs("o1"), session="writer")

    eventually(lambda: lag() > 0.3, 3, "the lag to show")
    replica.resume_replay()
    eventually(lambda: lag() < 0.1, 5, "the lag to fall")
    replica.kill()
    with pytest.raises(ReplicaUnreachable):
        probe()


class RecordingStore(SqlRecordStore):
    """A replica-routed store that remembers which node served each read-only unit."""

    served: list[str]

    @contextmanager
    def unit_of_work(self, **options: Any) -> Iterator[SqlUnitOfWork]:
        with super().unit_of_work(**options) as uow:
            yield uow
        if options.get("read_only"):
            self.served.append(uow.served_by)


class ReplicaStores(StoreFactory):
    def __init__(self, tmp_path: Path, schema: str, standby: PgReplica) -> None:
        super().__init__("postgresql", tmp_path, schema)
        self.replica = standby

    def open(self, *, migrate: bool = True) -> SqlRecordStore:
        store = RecordingStore(
            self.url, schema=self.schema, migrate=migrate, replica_urls=[self.replica.url]
        )
        store.served = []
        self._opened.append(store)
        return store


async def test_the_repository_as_it_is_reads_through_the_replica(
    schema: str,
    replica: PgReplica,  # noqa: F811
    tmp_path: Path,
    fixtures_dir: Path,
) -> None:
    stores = ReplicaStores(tmp_path, schema, replica)
    try:
        async with open_kit(stores, tmp_path) as kit:
            store = stores._opened[0]
            assert isinstance(store, RecordingStore)
            replica.pause_replay()  # the load stays off the replica until resumed
            outcome = await kit.repo.transaction(
                loader(kit.sink), bundle(fixtures_dir, "sof2019_Kathe_Zieme.json")
            )
            refs = [e.record.reference for e in outcome.entries if e.record is not None]
            practitioner = next(r for r in refs if r.startswith("Practitioner/"))
            patient_id = next(r for r in refs if r.startswith("Patient/")).split("/")[1]
            treating = caller(kit.sink, Role.CLINICIAN, "user/*.rs", fhir_user=practitioner)
            other = caller(kit.sink, Role.CLINICIAN, "user/*.rs", fhir_user="Practitioner/x")

            async def answers() -> tuple[int | None, int | None, str]:
                seen = await kit.repo.search(treating, parse_search("Condition", "_total=accurate"))
                unseen = await kit.repo.search(other, parse_search("Condition", "_total=accurate"))
                got = await kit.repo.read(treating, "Patient", patient_id)
                assert got.resource is not None
                return seen.total, unseen.total, got.resource["id"]

            # while the replica lacks the load (replay paused for longer than the bound), reads
            # are on the primary: the lag guard (the repository keys read-your-writes by
            # caller, and these callers wrote nothing)
            time.sleep(0.15)
            store.served.clear()
            on_primary = await answers()
            assert set(store.served) == {PRIMARY}
            # once the replica has the load, the same answers come from it
            replica.resume_replay()
            replica.wait_replayed()
            eventually(lambda: on_replica(store, "x", "", replica.name), what="on replica")
            # Other work on the machine's PostgreSQL (xdist workers beside this one) can put
            # the replica over the bound for a moment, and then a read rightly goes to the
            # primary: try again until one round is served by the replica alone.
            for _attempt in range(20):
                store.served.clear()
                kit.sink.events.clear()
                assert await answers() == on_primary == (14, 0, patient_id)
                if set(store.served) == {replica.name}:
                    break
                replica.wait_replayed()
                time.sleep(0.1)
            assert set(store.served) == {replica.name}
            # the disclosures name the node that served them, beside the exact versions
            disclosures = [e for e in kit.sink.events if e.entities and e.outcome_reason is None]
            assert disclosures
            assert {e.source.site for e in disclosures} == {replica.name}
    finally:
        stores.close_all()


# --- configuration ---------------------------------------------------------------------------


def test_replicas_need_postgresql(tmp_path: object) -> None:
    with pytest.raises(ConfigurationError):
        SqlRecordStore(f"sqlite:///{tmp_path}/r.db", replica_urls=["postgresql://h/db"])
    with pytest.raises(ConfigurationError) as refused:
        SqlRecordStore(postgres_url(), replica_urls=["not a url :secret@"], migrate=False)
    assert "secret" not in str(refused.value)
    with pytest.raises(ConfigurationError):
        SqlRecordStore(
            postgres_url(), replica_urls=["postgresql://h:1/a", "postgresql://h:1/b"], migrate=False
        )


def test_without_replicas_everything_is_served_by_the_primary(schema: str) -> None:
    store = SqlRecordStore(postgres_url(), schema=schema)
    try:
        with store.unit_of_work(read_only=True) as uow:
            assert uow.read(key("o1")) is None
            assert (uow.served_by, uow.nodes) == (PRIMARY, (PRIMARY,))
        assert store.router is None
    finally:
        store.close()


# --- the router's rules alone (fake clock and probe) -----------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeProbe:
    def __init__(self, lag_s: float | None = 0.0, replay_lsn: int | None = 1000) -> None:
        self.status: ReplicaStatus | None = ReplicaStatus(lag_s, replay_lsn)
        self.calls = 0

    def __call__(self) -> ReplicaStatus:
        self.calls += 1
        if self.status is None:
            raise ReplicaUnreachable("down")
        return self.status


def router_with(probe: FakeProbe, clock: FakeClock, **options: float) -> ReplicaRouter:
    health = CooldownHealth(retry_after_s=1.0, clock=clock)
    return ReplicaRouter([Replica("replica:r:1", probe, health)], clock=clock, **options)  # type: ignore[arg-type]


def test_router_keeps_a_lag_sample_briefly_and_counts_its_age() -> None:
    clock, probe = FakeClock(), FakeProbe(lag_s=0.04)
    router = router_with(probe, clock, sample_ttl_s=0.05)
    assert router.choose(ReadClass.PHI) is not None
    clock.now += 0.03
    assert router.choose(ReadClass.PHI) is not None  # kept: 0.04 + 0.03 <= 0.1
    assert probe.calls == 1
    probe.status = ReplicaStatus(0.09, 1000)
    clock.now += 0.03  # 60 ms old: probed again
    assert router.choose(ReadClass.PHI) is not None
    assert probe.calls == 2
    clock.now += 0.02  # kept, but 0.09 + 0.02 > 0.1
    assert router.choose(ReadClass.PHI) is None
    assert router.choose(ReadClass.AGGREGATE) is not None  # the display bound is 5 s


def test_router_keeps_a_sample_at_most_half_the_bound() -> None:
    clock, probe = FakeClock(), FakeProbe(lag_s=0.0)
    router = router_with(probe, clock, max_lag_s=0.01, sample_ttl_s=0.05)
    assert router.choose(ReadClass.PHI) is not None
    clock.now += 0.006  # past 5 ms: probed again, so the 10 ms bound can still hold
    assert router.choose(ReadClass.PHI) is not None
    assert probe.calls == 2


def test_router_does_not_wait_long_for_a_probe_that_hangs() -> None:
    release = threading.Event()

    def hanging() -> ReplicaStatus:
        release.wait(5)
        return ReplicaStatus(0.0, 1000)

    health = CooldownHealth(retry_after_s=1.0)
    router = ReplicaRouter([Replica("replica:r:1", hanging, health)], probe_wait_s=0.05)
    first = threading.Thread(target=router.choose, args=(ReadClass.PHI,))
    first.start()
    try:
        time.sleep(0.02)  # the first read is probing (and hangs)
        started = time.monotonic()
        assert router.choose(ReadClass.PHI) is None  # the second gives up on it
        assert time.monotonic() - started < 0.5
        assert not health.allow()  # skipped for its cool-down
    finally:
        release.set()
        first.join(5)


def test_router_sends_authorization_and_fresh_reads_to_the_primary() -> None:
    clock, probe = FakeClock(), FakeProbe()
    router = router_with(probe, clock)
    assert router.choose(ReadClass.AUTHORIZATION) is None
    assert router.choose(ReadClass.FRESH) is None
    assert probe.calls == 0


def test_router_unknown_lag_means_the_primary() -> None:
    clock, probe = FakeClock(), FakeProbe(lag_s=None)
    assert router_with(probe, clock).choose(ReadClass.AGGREGATE) is None


def test_router_skips_a_failed_replica_for_its_cooldown_then_returns() -> None:
    clock, probe = FakeClock(), FakeProbe()
    probe.status = None
    router = router_with(probe, clock)
    assert router.choose(ReadClass.PHI) is None
    clock.now += 0.5
    assert router.choose(ReadClass.PHI) is None
    assert probe.calls == 1  # not asked again during the cool-down
    probe.status = ReplicaStatus(0.0, 1000)
    clock.now += 0.6
    assert router.choose(ReadClass.PHI) is not None


def test_breaker_health_opens_on_a_failure_and_lets_a_trial_through_later() -> None:
    breaker = Breakers().breaker(
        "records-replica", failure_threshold=1, reset_timeout_s=0.2, call_timeout_s=None
    )
    health = BreakerHealth(breaker)
    assert health.allow()
    health.succeeded()
    health.failed()
    assert not health.allow() and breaker.state == "open"
    time.sleep(0.25)
    assert health.allow()  # half-open: the next read tries the replica
    health.succeeded()
    assert str(breaker.state) == "closed" and breaker.failures == 1


def test_router_read_your_writes_by_lsn_per_session() -> None:
    clock, probe = FakeClock(), FakeProbe(replay_lsn=1000)
    router = router_with(probe, clock)
    router.note_write("alice", 2000)
    assert router.choose(ReadClass.PHI, "alice") is None
    assert router.choose(ReadClass.PHI, "bob") is not None
    assert router.choose(ReadClass.PHI) is not None  # the anonymous session wrote nothing
    probe.status = ReplicaStatus(0.0, 2000)
    clock.now += 1
    assert router.choose(ReadClass.PHI, "alice") is not None
    assert router.tracked_sessions == 0  # every replica has it: forgotten
    router.note_write(None, 3000)  # an unkeyed write binds unkeyed reads
    assert router.choose(ReadClass.PHI) is None
    assert router.choose(ReadClass.PHI, "bob") is not None


def test_router_unknown_write_position_pins_the_session_for_a_while() -> None:
    clock, probe = FakeClock(), FakeProbe()
    router = router_with(probe, clock, unknown_pin_s=1.0)
    router.note_write("alice", None)
    assert router.choose(ReadClass.PHI, "alice") is None
    clock.now += 1.1
    assert router.choose(ReadClass.PHI, "alice") is not None


def test_router_folds_old_sessions_into_a_floor_everyone_must_see() -> None:
    clock, probe = FakeClock(), FakeProbe(replay_lsn=1000)
    router = router_with(probe, clock, max_sessions=4)
    for n in range(5):
        router.note_write(f"s{n}", 1500 + n)
    assert router.tracked_sessions <= 4
    assert router.choose(ReadClass.PHI, "never-wrote") is None  # the floor is past 1000
    probe.status = ReplicaStatus(0.0, 5000)
    clock.now += 1
    assert router.choose(ReadClass.PHI, "never-wrote") is not None
