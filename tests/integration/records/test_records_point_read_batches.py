"""Point reads served together (docs/decisions/records-storage.md, "Point reads of one
turn"): on PostgreSQL the reads and vreads of one turn of the event loop share a unit of work
and one statement (``read_many``), and each caller still gets exactly the answer, or the
error, it would have got alone. On the real store of each engine; the replica cases on the
real streaming replica (pg_replica_support)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from records_store_support import StoreFactory, fresh_schema, postgres_url
from repository_support import Kit, caller, loader, open_kit, patient_caller

from pg_replica_support import PgReplica, pg_replica, replica  # noqa: F401  (fixtures)
from phivault.identity.principal import Role
from phivault.records.errors import RecordGone, RecordNotFound
from phivault.records.results import Caller
from phivault.records.search_params import TokenEntry
from phivault.records.store import PRIMARY, NewVersion, ResourceKey, SqlRecordStore
from phivault.records.store.unit_of_work import SqlUnitOfWork

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _version(tenant: str, the_id: str, version: int) -> NewVersion:
    return NewVersion(
        key=ResourceKey(tenant, "Observation", the_id),
        version=version,
        last_updated=T0,
        key_subject=f"p-{tenant}",
        groups={
            "clinical": f"{tenant}/{the_id}/{version}".encode(),
            "direct-identifiers": b"x" * version,
        },
        index=[TokenEntry("_id", None, the_id)],
    )


def _write(store: SqlRecordStore, *news: NewVersion) -> None:
    with store.unit_of_work() as uow:
        for new in news:
            uow.write(new, previous=new.version - 1 or None)
        uow.commit()


def _fill(store: SqlRecordStore) -> None:
    """Two tenants with the same ids: o1 has three versions, o2 is deleted (version 2, a
    tombstone without groups); only t1 has o4; nobody has o3."""
    for tenant in ("t1", "t2"):
        _write(store, _version(tenant, "o1", 1), _version(tenant, "o2", 1))
        _write(store, _version(tenant, "o1", 2))
        _write(store, _version(tenant, "o1", 3))
        with store.unit_of_work() as uow:
            uow.delete(
                ResourceKey(tenant, "Observation", "o2"), version=2, last_updated=T0, previous=1
            )
            uow.commit()
    _write(store, _version("t1", "o4", 1))


_KEYS = st.tuples(
    st.sampled_from(["t1", "t2", "t3"]),
    st.sampled_from(["o1", "o2", "o3", "o4"]),
    st.one_of(st.none(), st.integers(min_value=0, max_value=4)),
)


@given(wanted=st.lists(_KEYS, max_size=12))
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_read_many_answers_as_read_and_vread_one_by_one(
    store: SqlRecordStore, wanted: list[tuple[str, str, int | None]]
) -> None:
    with store.unit_of_work(read_only=True) as uow:
        if uow.read(ResourceKey("t1", "Observation", "o1")) is None:
            _fill(store)
    asked = [(ResourceKey(t, "Observation", i), v) for t, i, v in wanted]
    with store.unit_of_work(read_only=True) as uow:
        together = uow.read_many(asked)
        alone = [uow.read(k) if v is None else uow.vread(k, v) for k, v in asked]
    assert together == alone
    for (key, _), found in zip(asked, together, strict=True):
        assert found is None or found.key == key  # never a version of another tenant


def test_read_many_never_returns_a_key_of_another_tenant(store: SqlRecordStore) -> None:
    _fill(store)
    with store.unit_of_work(read_only=True) as uow:
        found = uow.read_many(
            [
                (ResourceKey("t1", "Observation", "o1"), None),
                (ResourceKey("t2", "Observation", "o1"), 2),
                (ResourceKey("t2", "Observation", "o4"), None),  # only t1 has o4
                (ResourceKey("t2", "Observation", "o4"), 1),
            ]
        )
    assert [None if f is None else (f.key.tenant, f.version) for f in found] == [
        ("t1", 3),
        ("t2", 2),
        None,
        None,
    ]
    assert found[0] is not None and found[0].groups["clinical"] == b"t1/o1/3"
    assert found[1] is not None and found[1].groups["clinical"] == b"t2/o1/2"


# --- the repository: one batch, each caller its own answer -----------------------------------


@pytest.fixture
async def kit(stores: StoreFactory, tmp_path: Path) -> AsyncIterator[Kit]:
    async with open_kit(stores, tmp_path) as opened:
        yield opened


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each ``read_many`` the store runs (observed, not replaced)."""
    sizes: list[int] = []
    real = SqlUnitOfWork.read_many

    def observed(self: SqlUnitOfWork, wanted: Any) -> Any:
        sizes.append(len(wanted))
        return real(self, wanted)

    monkeypatch.setattr(SqlUnitOfWork, "read_many", observed)
    return sizes


async def _answer(work: Any) -> tuple[str, Any]:
    """What a read gave: its resource's (type, id, version), or the error's class."""
    try:
        got = await work
    except (RecordNotFound, RecordGone) as exc:
        return type(exc).__name__, getattr(exc, "version", None)
    return "ok", (got.resource_type, got.id, got.version, got.redacted, got.resource)


async def test_reads_batched_on_one_turn_each_get_their_own_answer(
    kit: Kit, stores: StoreFactory, batches: list[int]
) -> None:
    writer = loader(kit.sink)
    admin = caller(kit.sink, Role.ADMIN, "user/*.cruds")
    patient = {"resourceType": "Patient", "name": [{"family": "Zieme"}]}
    me_id = (await kit.repo.create(writer, patient)).record.id
    other_id = (await kit.repo.create(writer, patient)).record.id
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/{me_id}"},
    }
    obs_id = (await kit.repo.create(writer, obs)).record.id
    await kit.repo.update(
        writer, "Observation", obs_id, {**obs, "id": obs_id, "status": "amended"}, if_match=1
    )
    org = {"resourceType": "Organization", "name": "Clinic"}
    org_id = (await kit.repo.create(writer, org)).record.id
    gone_id = (await kit.repo.create(writer, org)).record.id
    await kit.repo.delete(admin, "Organization", gone_id)
    me = patient_caller(kit.sink, me_id)
    stranger = patient_caller(kit.sink, other_id)
    elsewhere: Caller = caller(
        kit.sink, Role.PATIENT, "patient/*.rs", fhir_user=f"Patient/{me_id}", tenant="t2"
    )
    asks = [
        lambda: kit.repo.read(me, "Patient", me_id),  # found
        lambda: kit.repo.read(me, "Observation", obs_id),  # found, version 2
        lambda: kit.repo.vread(me, "Observation", obs_id, "1"),  # an old version
        lambda: kit.repo.vread(me, "Observation", obs_id, "7"),  # no such version
        lambda: kit.repo.read(me, "Patient", "no-such-id"),  # missing
        lambda: kit.repo.read(stranger, "Patient", me_id),  # refused
        lambda: kit.repo.read(elsewhere, "Patient", me_id),  # another tenant's key
        lambda: kit.repo.read(me, "Organization", org_id),  # the directory
        lambda: kit.repo.read(me, "Organization", gone_id),  # deleted
        lambda: kit.repo.read(admin, "Patient", me_id),  # refused (no PHI for admin)
        lambda: kit.repo.read(stranger, "Patient", other_id),  # found, another caller
    ]
    batches.clear()
    kit.sink.events.clear()
    alone = [await _answer(ask()) for ask in asks]
    alone_events = len(kit.sink.events)
    kit.sink.events.clear()
    together = await asyncio.gather(*(_answer(ask()) for ask in asks))
    assert together == alone
    assert [a[0] for a in alone] == [
        "ok", "ok", "ok", "RecordNotFound", "RecordNotFound", "RecordNotFound",
        "RecordNotFound", "ok", "RecordGone", "RecordNotFound", "ok",
    ]  # fmt: skip
    assert alone[1][1][2] == 2 and alone[2][1][2] == 1
    assert len(kit.sink.events) == alone_events  # one event per read, as alone
    if stores.engine == "postgresql":
        # one at a time, then all of the gathered reads in one statement (the vread of an
        # id that cannot be a version never reaches the store)
        assert batches == [1] * len(asks) + [len(asks)]
    else:
        assert batches == []  # SQLite keeps its own batches (_ReadBatches)


async def test_a_caller_that_left_before_its_batch_began_is_skipped(
    kit: Kit, stores: StoreFactory, batches: list[int]
) -> None:
    writer = loader(kit.sink)
    org_id = (
        await kit.repo.create(writer, {"resourceType": "Organization", "name": "C"})
    ).record.id
    me = patient_caller(kit.sink, "p1")
    batches.clear()
    kit.sink.events.clear()
    staying = asyncio.ensure_future(kit.repo.read(me, "Organization", org_id))
    leaving = asyncio.ensure_future(kit.repo.read(me, "Organization", org_id))
    await asyncio.sleep(0)  # both are now waiting for their batch
    leaving.cancel()
    assert (await staying).id == org_id
    with pytest.raises(asyncio.CancelledError):
        await leaving
    if stores.engine == "postgresql":
        assert batches == [1]
    assert len(kit.sink.events) == 1  # the one that left read nothing and recorded nothing


# --- replicas ---------------------------------------------------------------------------------


@pytest.fixture
def replica_store(postgres: str, replica: PgReplica) -> Iterator[SqlRecordStore]:  # noqa: F811
    with fresh_schema(postgres, "pv_batch") as schema:
        store = SqlRecordStore(
            postgres_url(), schema=schema, replica_urls=[replica.url], replica_retry_s=0.2
        )
        try:
            yield store
        finally:
            store.close()


def test_read_many_on_a_failing_replica_is_finished_by_the_primary(
    replica_store: SqlRecordStore,
    replica: PgReplica,  # noqa: F811
) -> None:
    _fill(replica_store)
    replica.wait_replayed()
    asked = [
        (ResourceKey("t1", "Observation", "o1"), None),
        (ResourceKey("t2", "Observation", "o1"), 1),
        (ResourceKey("t1", "Observation", "o9"), None),
    ]
    with replica_store.unit_of_work(read_only=True, session="reader") as uow:
        expected = uow.read_many(asked)  # wherever it was served
    try:
        # Until a unit is routed to the replica (its lag is sampled, and other work on the
        # machine's PostgreSQL can put it over the bound for a moment); that unit's replica
        # is then killed before its read_many.
        for _attempt in range(50):
            replica.wait_replayed()
            with replica_store.unit_of_work(read_only=True, session="reader") as uow:
                if uow.served_by != replica.name:
                    time.sleep(0.05)
                    continue
                replica.kill()
                assert uow.read_many(asked) == expected
                assert uow.nodes == (replica.name, PRIMARY)
                break
        else:
            pytest.fail("no unit was routed to the replica")
    finally:
        replica.start()
