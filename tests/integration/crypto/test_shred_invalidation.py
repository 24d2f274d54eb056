"""A shred takes effect on every worker before it is reported done (scaled shape).

Workers are key rings on one PostgreSQL key store (the machine's server, a schema per test),
each announcing and hearing shreds through NATS (the test server at 127.0.0.1:4222, or a
nats-server of the test's own to stop). Every worker caches ciphers for 300 s here, so nothing
in these tests is closed by a cache expiring: no test sleeps for a cache lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from phivault.crypto.elements import ElementRef
from phivault.crypto.errors import PatientShredded
from phivault.crypto.invalidation import InProcessInvalidation, PropagationStatus
from phivault.crypto.invalidation_nats import NatsInvalidation, invalidation_bucket
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore_postgres import PostgresKeyStore
from phivault.crypto.ports import KeyPurpose, KeyRecord
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.ledger.testing import InMemoryAuditSink
from ports_support import free_port

pytestmark = pytest.mark.integration

NATS_URL = os.environ.get("PHIVAULT_TEST_NATS", "nats://127.0.0.1:4222")
CACHE_TTL_S = 300.0  # far longer than any test: only the invalidation can close the window
LEASE_S = 2.0
CONFIRM_S = 1.0
REF = ElementRef("acme", "Patient", "p1", "birthDate")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def schema(postgres: str) -> Iterator[str]:
    name = f"test_shred_{secrets.token_hex(6)}"
    yield name
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def sealed_keys(tmp_path: Path) -> tuple[Path, list[str]]:
    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=3)
    return keys_dir, shares[:2]


@dataclass
class Worker:
    ring: KeyRing
    invalidation: NatsInvalidation | InProcessInvalidation
    store: PostgresKeyStore

    @property
    def worker_id(self) -> str:
        assert isinstance(self.invalidation, NatsInvalidation)
        return self.invalidation.worker_id


WorkerFactory = Callable[..., Awaitable[Worker]]


async def _delete_bucket(url: str, namespace: str) -> None:
    with contextlib.suppress(Exception):
        client = await asyncio.wait_for(nats.connect(servers=[url], connect_timeout=2), 5)
        try:
            with contextlib.suppress(Exception):
                await client.jetstream().delete_key_value(invalidation_bucket(namespace))
        finally:
            await client.close()


@pytest_asyncio.fixture
async def workers(
    postgres: str, schema: str, sealed_keys: tuple[Path, list[str]]
) -> AsyncIterator[WorkerFactory]:
    """Builds unsealed workers on the test's key store; closes them and the bucket after."""
    keys_dir, shares = sealed_keys
    built: list[Worker] = []
    urls: set[str] = set()

    async def make(
        name: str, *, url: str = NATS_URL, nats_on: bool = True, lease_s: float = LEASE_S
    ) -> Worker:
        store = PostgresKeyStore(postgres, schema=schema)
        invalidation: NatsInvalidation | InProcessInvalidation
        if nats_on:
            urls.add(url)
            invalidation = await NatsInvalidation.connect(
                [url],
                namespace=schema,
                name=name,
                serving=True,
                lease_s=lease_s,
                confirm_timeout_s=CONFIRM_S,
                cache_ttl_s=CACHE_TTL_S,
            )
        else:
            invalidation = InProcessInvalidation()
        ring = KeyRing(
            store=store,
            provider=SealedLocalProvider(keys_dir),
            audit=InMemoryAuditSink(),
            observer=name,
            cache_ttl_s=CACHE_TTL_S,
            invalidation=invalidation,
        )
        await invalidation.start()
        await ring.unseal(shares)
        worker = Worker(ring, invalidation, store)
        built.append(worker)
        return worker

    try:
        yield make
    finally:
        for worker in built:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker.invalidation.aclose(), 5)
            worker.store.close()
        for url in urls:
            await _delete_bucket(url, schema)


async def eventually(condition: Callable[[], bool], *, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def _cached_on_both(first: Worker, second: Worker) -> bytes:
    """p1's birth date sealed by the first worker, opened (and its cipher cached) by both."""
    sealed = (await first.ring.patient_cipher("acme", "p1", create=True)).seal(REF, b"1970-01-01")
    assert (await second.ring.patient_cipher("acme", "p1")).open(REF, sealed) == b"1970-01-01"
    assert second.ring.cached_ciphers == 1 and first.ring.cached_ciphers == 1
    return sealed


# -- the attack, without the broadcast -----------------------------------------------------------


async def test_without_the_broadcast_another_worker_still_decrypts_after_a_shred(
    workers: WorkerFactory,
) -> None:
    # What the broadcast closes: two workers that share a key store but hear nothing of each
    # other's shreds (the behaviour before it, with a 300 s cache).
    first = await workers("w1", nats_on=False)
    second = await workers("w2", nats_on=False)
    sealed = await _cached_on_both(first, second)
    await first.ring.shred_patient("acme", "p1", reason="erasure-request")
    with pytest.raises(PatientShredded):
        await first.ring.patient_cipher("acme", "p1")
    # the other worker's cached cipher still opens the shredded patient's data
    assert (await second.ring.patient_cipher("acme", "p1")).open(REF, sealed) == b"1970-01-01"


# -- with it ------------------------------------------------------------------------------------


async def test_a_shred_on_one_worker_stops_every_other_worker_before_it_returns(
    workers: WorkerFactory,
) -> None:
    first = await workers("w1")
    second = await workers("w2")
    third = await workers("w3")
    await _cached_on_both(first, second)
    await third.ring.patient_cipher("acme", "p1")
    assert second.ring.cached_ciphers == third.ring.cached_ciphers == 1

    outcome = await first.ring.shred_patient("acme", "p1", reason="erasure-request")

    assert outcome.propagation.status is PropagationStatus.COMPLETE and not outcome.pending
    assert set(outcome.propagation.confirmed) == {w.worker_id for w in (first, second, third)}
    # immediately: no sleeping, no cache expiry
    assert second.ring.cached_ciphers == 0 and third.ring.cached_ciphers == 0
    for worker in (first, second, third):
        with pytest.raises(PatientShredded):
            await worker.ring.patient_cipher("acme", "p1")


async def test_shredding_one_patient_leaves_the_others_cached(workers: WorkerFactory) -> None:
    first = await workers("w1")
    second = await workers("w2")
    await _cached_on_both(first, second)
    other = await first.ring.patient_cipher("acme", "p2", create=True)
    sealed = other.seal(ElementRef("acme", "Patient", "p2", "birthDate"), b"1980")
    await second.ring.patient_cipher("acme", "p2")
    await first.ring.shred_patient("acme", "p1", reason="erasure-request")
    assert second.ring.cached_ciphers == 1  # p2's
    opened = (await second.ring.patient_cipher("acme", "p2")).open(
        ElementRef("acme", "Patient", "p2", "birthDate"), sealed
    )
    assert opened == b"1980"


async def test_a_worker_that_stopped_gives_its_lease_back(workers: WorkerFactory) -> None:
    first = await workers("w1")
    second = await workers("w2")
    await _cached_on_both(first, second)
    await second.invalidation.aclose()  # a worker shut down cleanly
    outcome = await first.ring.shred_patient("acme", "p1", reason="erasure-request")
    assert outcome.propagation.complete, outcome.propagation  # nobody left to wait for


async def test_a_worker_that_does_not_confirm_makes_the_shred_pending_and_loses_its_lease(
    workers: WorkerFactory,
) -> None:
    # A worker that misses the invalidation (a dropped message, a stalled event loop) yet
    # holds a lease: the shredder cannot call the shred done; it revokes the lease, and the
    # deaf worker stops using its cache within one lease.
    first = await workers("w1")
    deaf = await workers("w2")
    sealed = await _cached_on_both(first, deaf)
    assert isinstance(deaf.invalidation, NatsInvalidation)
    sub = deaf.invalidation._sub
    assert sub is not None
    await sub.unsubscribe()  # it will hear nothing, and confirm nothing

    started = time.monotonic()
    outcome = await first.ring.shred_patient("acme", "p1", reason="erasure-request")
    took = time.monotonic() - started

    assert outcome.pending and outcome.propagation.status is PropagationStatus.PENDING
    assert outcome.propagation.unconfirmed == (deaf.worker_id,)
    assert first.worker_id in outcome.propagation.confirmed
    assert outcome.propagation.bound_s == LEASE_S  # its lease was revoked
    # bounded: the listing, the wait for confirmations and the revocation, each at most
    # CONFIRM_S (plus a loaded machine's scheduling)
    assert took < 3 * CONFIRM_S + 2.0, took
    # The deaf worker may still decrypt from its cache right now (the danger "pending"
    # reports), but only until its current lease ends: it cannot renew a revoked lease.
    returned = time.monotonic()
    while True:
        try:
            cipher = await deaf.ring.patient_cipher("acme", "p1")
        except PatientShredded:
            break
        assert cipher.open(REF, sealed) == b"1970-01-01"
        assert time.monotonic() - returned <= LEASE_S + 0.5, "served past its lease"
        await asyncio.sleep(0.05)
    assert deaf.ring.cached_ciphers == 0
    # Announcing again (the CLI's "run the shred again") now finds it re-registered, hearing
    # nothing still: pending again, never falsely complete.
    again = await first.ring.shred_patient("acme", "p1", reason="erasure-request")
    assert again.record == outcome.record and first.worker_id in again.propagation.confirmed
    assert again.pending and again.propagation.unconfirmed == (deaf.worker_id,)


async def test_a_revoked_worker_is_still_waited_for_while_its_lease_may_run(
    workers: WorkerFactory,
) -> None:
    # Revoking a lease must not hide the worker from the next shred: until its current lease
    # ends it may still trust it (and hold other patients' ciphers).
    first = await workers("w1")
    deaf = await workers("w2")
    await _cached_on_both(first, deaf)
    await first.ring.patient_cipher("acme", "p2", create=True)
    await deaf.ring.patient_cipher("acme", "p2")
    assert isinstance(deaf.invalidation, NatsInvalidation)
    sub = deaf.invalidation._sub
    assert sub is not None
    await sub.unsubscribe()
    assert (await first.ring.shred_patient("acme", "p1", reason="erasure-request")).pending
    second = await first.ring.shred_patient("acme", "p2", reason="erasure-request")
    assert second.pending and second.propagation.unconfirmed == (deaf.worker_id,)


async def test_an_invalidation_that_is_not_ours_drops_everything_and_confirms_nothing(
    workers: WorkerFactory,
) -> None:
    first = await workers("w1")
    second = await workers("w2")
    await _cached_on_both(first, second)
    client = await nats.connect(servers=[NATS_URL])
    try:
        assert isinstance(second.invalidation, NatsInvalidation)
        inbox = client.new_inbox()
        sub = await client.subscribe(inbox)
        await client.publish(second.invalidation.subject, b'{"tenant": 1}', reply=inbox)
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)
    finally:
        await client.close()
    assert second.ring.cached_ciphers == 0 and first.ring.cached_ciphers == 0


# -- a worker that cannot hear invalidations ---------------------------------------------------


class _OwnNats:
    """A nats-server of the test's own (loopback, free port), to stop and start again."""

    def __init__(self, store_dir: Path) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.store_dir = store_dir
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("nats-server") or "nats-server"
        self._proc = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        pytest.fail("the test's own nats-server did not start")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[_OwnNats]:
    if shutil.which("nats-server") is None:
        pytest.fail("nats-server is not installed (CI installs it)", pytrace=False)
    server = _OwnNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_worker_whose_nats_is_down_does_not_serve_from_its_cache(
    own_nats: _OwnNats,  # first: started before the workers, stopped after them
    workers: WorkerFactory,
) -> None:
    first = await workers("w1", url=own_nats.url)
    second = await workers("w2", url=own_nats.url)
    sealed = await _cached_on_both(first, second)
    assert second.invalidation.cache_usable()

    own_nats.stop()
    await eventually(
        lambda: not second.invalidation.cache_usable(), timeout_s=5, what="the disconnect"
    )
    assert second.ring.cached_ciphers == 0  # wiped: it may miss invalidations from now on
    # still serving, from the key store each time
    assert (await second.ring.patient_cipher("acme", "p1")).open(REF, sealed) == b"1970-01-01"
    assert second.ring.cached_ciphers == 0  # and not caching

    # A shred now cannot be announced: done in the store, reported pending ...
    outcome = await first.ring.shred_patient("acme", "p1", reason="erasure-request")
    assert outcome.pending and outcome.propagation.bound_s == CACHE_TTL_S
    assert outcome.propagation.detail
    # ... and the worker that heard nothing cannot decrypt, at once.
    with pytest.raises(PatientShredded):
        await second.ring.patient_cipher("acme", "p1")

    # NATS back: the worker takes a lease again and caches again (from an empty cache).
    own_nats.start()
    await eventually(second.invalidation.cache_usable, timeout_s=10, what="a new lease")
    await second.ring.patient_cipher("acme", "p2", create=True)
    assert second.ring.cached_ciphers == 1


async def test_a_worker_whose_event_loop_stalled_past_its_lease_does_not_trust_its_cache(
    workers: WorkerFactory,
) -> None:
    # A stalled worker renews nothing; a shredder may already have given up on it. When its
    # loop runs again, the first thing that asks for a cipher finds the lease lapsed.
    first = await workers("w1")
    second = await workers("w2")
    sealed = await _cached_on_both(first, second)
    time.sleep(LEASE_S * 0.85)
    assert not second.invalidation.cache_usable()
    assert second.ring.cached_ciphers == 0
    assert (await second.ring.patient_cipher("acme", "p1")).open(REF, sealed) == b"1970-01-01"
    assert second.ring.cached_ciphers == 0  # read from the store, not cached
    await eventually(second.invalidation.cache_usable, timeout_s=LEASE_S, what="a renewal")


async def test_a_cipher_read_while_its_shred_lands_is_not_cached(
    workers: WorkerFactory, postgres: str, schema: str
) -> None:
    # A cache miss reads the store (off the event loop) just before the shred commits; the
    # invalidation arrives while the read is in flight: what it read must not be cached.
    first = await workers("w1")
    second = await workers("w2")
    await first.ring.patient_cipher("acme", "p1", create=True)
    reading = asyncio.Event()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    real_live = second.store.live

    def slow_live(tenant: str, purpose: KeyPurpose, subject: str = "") -> list[KeyRecord]:
        records = real_live(tenant, purpose, subject)
        if purpose is KeyPurpose.DEK:
            loop.call_soon_threadsafe(reading.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        return records

    second.store.live = slow_live  # type: ignore[method-assign]
    pending = asyncio.create_task(second.ring.patient_cipher("acme", "p1"))
    await reading.wait()  # the read happened before the shred
    outcome = await first.ring.shred_patient("acme", "p1", reason="erasure-request")
    assert outcome.propagation.complete
    release.set()
    await pending  # a request that read before the shred finishes with what it read ...
    second.store.live = real_live  # type: ignore[method-assign]
    assert second.ring.cached_ciphers == 0  # ... but nothing of it stays cached
    with pytest.raises(PatientShredded):
        await second.ring.patient_cipher("acme", "p1")


# -- key store calls off the event loop --------------------------------------------------------


class _SlowStore(PostgresKeyStore):
    """The real store, each call held 0.2 s in the calling thread (a slow database)."""

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr) or name == "close":
            return attr

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.2)
            return attr(*args, **kwargs)

        return slow


async def test_key_creation_holds_and_shreds_leave_the_event_loop_free(
    postgres: str, schema: str, sealed_keys: tuple[Path, list[str]]
) -> None:
    from datetime import UTC, datetime, timedelta

    keys_dir, shares = sealed_keys
    store = _SlowStore(postgres, schema=schema)
    ring = KeyRing(
        store=store,
        provider=SealedLocalProvider(keys_dir),
        audit=InMemoryAuditSink(),
        observer="slow",
    )
    try:
        await ring.unseal(shares)
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        running = asyncio.create_task(ticker())
        started = time.monotonic()
        await ring.create_patient_key("acme", "p1")
        await ring.place_hold(
            "acme", "p1", until=datetime.now(UTC) + timedelta(seconds=1), reason="litigation"
        )
        await ring.create_patient_key("acme", "p2")
        await ring.shred_patient("acme", "p2", reason="erasure-request")
        elapsed = time.monotonic() - started
        stop.set()
        await running
        # the loop ticked through the store's waits (each 0.2 s, many per operation)
        assert elapsed > 1.0 and ticks > elapsed / 0.01 * 0.5, (elapsed, ticks)
    finally:
        await ring.seal()
        store.close()


# -- composition: open_keyring in the scaled shape -----------------------------------------------


def _scaled_settings(postgres: str, schema: str, nats_url: str) -> Any:
    from phivault.settings import (
        KeySettings,
        LedgerKind,
        LedgerSettings,
        RecordsSettings,
        Settings,
        ShapeSettings,
        StoreKind,
    )

    return Settings(
        shape=ShapeSettings(store=StoreKind.POSTGRES, ledger=LedgerKind.JETSTREAM),
        records=RecordsSettings(store_url=_sqlalchemy_url(postgres)),
        ledger=LedgerSettings(postgres_url=postgres, nats_urls=[nats_url]),
        keys=KeySettings(postgres_schema=schema, invalidation_lease_s=LEASE_S),
    )


def _sqlalchemy_url(conninfo: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(conninfo)
    user = parts.get("user", "postgres")
    host = parts.get("host", "127.0.0.1")
    port = parts.get("port", 5432)
    return f"postgresql+psycopg://{user}@{host}:{port}/{parts.get('dbname', 'test')}"


async def test_open_keyring_wires_the_broadcast_in_the_scaled_shape(
    postgres: str, schema: str, tmp_path: Path
) -> None:
    import shutil as _shutil

    from phivault.crypto.custody import initialize_keystore, open_keyring
    from phivault.crypto.errors import KeyUnavailable
    from phivault.datadir import DataDir

    settings = _scaled_settings(postgres, schema, NATS_URL)
    hosts = [DataDir.create(tmp_path / f"host-{n}", dev=False) for n in range(3)]
    init = initialize_keystore(hosts[0], settings, threshold=2, shares=3)
    for host in hosts[1:]:
        for item in hosts[0].keys_dir.iterdir():
            _shutil.copy(item, host.keys_dir / item.name)
    shares = list(init.shares[:2])
    sink = InMemoryAuditSink()
    try:
        async with (
            open_keyring(hosts[0], settings, sink, credentials=shares, serving=True) as one,
            open_keyring(hosts[1], settings, sink, credentials=shares, serving=True) as two,
        ):
            sealed = (await one.patient_cipher("acme", "p1", create=True)).seal(REF, b"1970")
            assert (await two.patient_cipher("acme", "p1")).open(REF, sealed) == b"1970"
            # an operator's tool (not serving) shreds: both workers confirm before it returns
            async with open_keyring(hosts[2], settings, sink, unseal=False) as tool:
                outcome = await tool.shred_patient("acme", "p1", reason="erasure-request")
            assert outcome.propagation.complete and len(outcome.propagation.confirmed) == 2
            for ring in (one, two):
                with pytest.raises(PatientShredded):
                    await ring.patient_cipher("acme", "p1")
        # NATS unreachable: a worker does not start; a tool still shreds, reported pending
        dead = f"nats://127.0.0.1:{free_port()}"  # nobody listens there
        unreachable = _scaled_settings(postgres, schema, dead)
        with pytest.raises(KeyUnavailable):
            async with open_keyring(hosts[0], unreachable, sink, credentials=shares, serving=True):
                pass
        async with open_keyring(hosts[0], unreachable, sink, credentials=shares) as ring:
            await ring.patient_cipher("acme", "p2", create=True)
        async with open_keyring(hosts[2], unreachable, sink, unseal=False) as tool:
            pending = await tool.shred_patient("acme", "p2", reason="erasure-request")
        assert pending.pending and pending.propagation.bound_s == settings.keys.dek_cache_ttl_s
    finally:
        await _delete_bucket(NATS_URL, schema)


async def test_a_short_lease_listing_never_makes_a_shred_complete(
    workers: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py's KeyValue.keys() can answer before its entries arrive (seen once in the full
    suite: a shred called complete with nobody listed while another worker held the cipher).
    A short listing is taken again; one that keeps missing the shredder's own lease is
    refused, and the shred is pending, never falsely complete."""
    first = await workers("w1")
    other = await workers("w2")
    await _cached_on_both(first, other)
    assert isinstance(first.invalidation, NatsInvalidation)
    kv = first.invalidation._kv
    real_keys = kv.keys
    answers: list[str] = []

    async def short_once() -> list[str]:
        answers.append("short" if not answers else "whole")
        if len(answers) == 1:
            raise nats.js.errors.NoKeysError
        return await real_keys()

    monkeypatch.setattr(kv, "keys", short_once)
    outcome = await first.ring.shred_patient("acme", "p1", reason="erasure-request")
    assert answers == ["short", "whole"]
    assert outcome.propagation.status is PropagationStatus.COMPLETE
    assert set(outcome.propagation.confirmed) == {first.worker_id, other.worker_id}

    async def never_self() -> list[str]:
        return [other.worker_id]

    monkeypatch.setattr(kv, "keys", never_self)
    again = await first.ring.shred_patient("acme", "p1", reason="erasure-request")
    assert again.pending and again.propagation.status is PropagationStatus.PENDING
    assert "could not be listed" in again.propagation.detail
