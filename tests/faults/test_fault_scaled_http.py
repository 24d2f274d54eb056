"""The scaled shape through HTTP while its audit stream or its database dies: ``phivault
serve --workers 2`` and ``phivault sequencer`` on a private PostgreSQL and a private 3-node
NATS cluster.

The NATS node that leads the audit stream is SIGKILLed under a load of PHI reads and writes:
no request fails (they wait for JetStream to elect a new leader), and the checks below hold.

Every NATS node is SIGKILLed -- or PostgreSQL (records, keys and ledger) is shut down -- under
a load of PHI reads and writes: PHI interactions answer 503 with an OperationOutcome (nothing
else), ``/healthz`` stays up; the servers are started again and the same workers serve PHI
again by themselves. Afterwards, with the sequencer
caught up: every 200 read has its read event in the ledger (same request id) -- so nothing
was disclosed without a record, and nothing was disclosed while the stream was down; every
acknowledged write is there and has its committed outcome; every write answered 503 is
either absent or has a committed outcome; every intent has an outcome; the ledger verifies.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fault_scaled_support import OUTCOMES, ScaledDeployment, deploy_scaled
from fault_stream_support import admin_client
from fault_support import Harness, await_until

from phivault.records.store import ResourceKey, SqlRecordStore

pytestmark = pytest.mark.faults
FAULT_TIMEOUT_S = 100


@dataclass
class Exchange:
    kind: str  # "read" or "write"
    request_id: str
    patient: str
    started: float
    finished: float
    status: int
    resource_type: str | None


@dataclass
class HttpTally:
    done: list[Exchange] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)

    def since(self, t: float, kind: str | None = None) -> list[Exchange]:
        return [e for e in self.done if e.started >= t and (kind is None or e.kind == kind)]


def patient(patient_id: str) -> dict[str, object]:
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "active": True,
        "name": [{"family": "Faultline", "given": ["Http"]}],
    }


async def http_load(
    scaled: ScaledDeployment,
    tally: HttpTally,
    stop: asyncio.Event,
    readable: dict[str, dict[str, str]],
    writer: dict[str, str],
) -> None:
    async with httpx.AsyncClient(base_url=scaled.url, timeout=30) as client:

        async def exchange(kind: str, pid: str, request: httpx.Request) -> None:
            rid = request.headers["X-Request-ID"]
            started = time.monotonic()
            try:
                response = await client.send(request)
            except httpx.TransportError as exc:
                tally.transport_errors.append(f"{type(exc).__name__}: {exc}")
                return
            kind_of = None
            if response.headers.get("content-type", "").startswith("application/fhir+json"):
                kind_of = response.json().get("resourceType")
            tally.done.append(
                Exchange(kind, rid, pid, started, time.monotonic(), response.status_code, kind_of)
            )

        async def reader(lane: int) -> None:
            ids = list(readable)
            turn = lane
            while not stop.is_set():
                pid = ids[turn % len(ids)]
                turn += 1
                rid = f"fr{lane}-{secrets.token_hex(6)}"
                headers = {**readable[pid], "X-Request-ID": rid}
                await exchange("read", pid, client.build_request(
                    "GET", f"/fhir/Patient/{pid}", headers=headers))  # fmt: skip
                await asyncio.sleep(0.01)

        async def write_loop() -> None:
            while not stop.is_set():
                pid = f"fw-{secrets.token_hex(6)}"
                rid = f"fw-{secrets.token_hex(6)}"
                await exchange("write", pid, client.build_request(
                    "PUT", f"/fhir/Patient/{pid}", json=patient(pid),
                    headers={**writer, "X-Request-ID": rid}))  # fmt: skip
                await asyncio.sleep(0.02)

        await asyncio.gather(*(reader(n) for n in range(3)), write_loop())


async def seed_patients(scaled: ScaledDeployment, writer: dict[str, str]) -> dict[str, Any]:
    readable: dict[str, dict[str, str]] = {}
    async with httpx.AsyncClient(base_url=scaled.url, timeout=30) as client:
        for n in range(3):
            pid = f"seed-{n}-{secrets.token_hex(4)}"
            put = await client.put(f"/fhir/Patient/{pid}", json=patient(pid), headers=writer)
            assert put.status_code == 201, put.text
            readable[pid] = scaled.patient(pid)
    return readable


async def through_a_fault(
    scaled: ScaledDeployment, fault: Callable[[], None], repair: Callable[[], None]
) -> tuple[HttpTally, list[int], float, float]:
    """Reads and writes over HTTP; ``fault()`` once they run, until PHI answers 503; then
    ``/healthz`` five times; then ``repair()`` and wait until reads and writes succeed again.
    Returns the tally, the /healthz answers, and when the fault and the repair began."""
    writer = scaled.loader()
    readable = await seed_patients(scaled, writer)
    tally = HttpTally()
    stop = asyncio.Event()
    load = asyncio.ensure_future(http_load(scaled, tally, stop, readable, writer))
    try:
        await await_until(
            lambda: len([e for e in tally.done if e.status == 200]) >= 20, 30,
            what="reads before the fault",
        )  # fmt: skip
        await asyncio.to_thread(fault)
        down_at = time.monotonic()
        await await_until(
            lambda: len([e for e in tally.since(down_at) if e.status == 503]) >= 20,
            30,
            what="PHI interactions to answer 503",
        )
        health = [await asyncio.to_thread(scaled.healthz) for _ in range(5)]
        up_at = time.monotonic()
        await asyncio.to_thread(repair)
        await await_until(
            lambda: (
                len([e for e in tally.since(up_at, "read") if e.status == 200]) >= 20
                and len([e for e in tally.since(up_at, "write") if e.status == 201]) >= 3
            ),
            45,
            what="PHI reads and writes to succeed again",
        )
    finally:
        stop.set()
        await asyncio.wait_for(load, 60)
    return tally, health, down_at, up_at


async def check_http_afterwards(
    scaled: ScaledDeployment, tally: HttpTally, outage: tuple[float, float] | None
) -> None:
    """The answers were 200, 201 or a 503 OperationOutcome; nothing succeeded in the
    ``outage`` (from the fault to the repair; None: there was none); every disclosure has its
    event, every acknowledged write is there with its outcome, a write answered 503 is absent
    or recorded as committed; the ledger verifies."""
    assert tally.transport_errors == []
    statuses = Counter(e.status for e in tally.done)
    assert set(statuses) <= {200, 201, 503}, statuses
    for e in tally.done:
        if e.status == 503:
            assert e.resource_type == "OperationOutcome", e
    if outage is not None:
        # Started once the fault was complete and finished before the repair: nothing
        # succeeded.
        down_at, up_at = outage
        during = [e for e in tally.since(down_at) if e.finished < up_at]
        assert during and all(e.status == 503 for e in during), Counter(e.status for e in during)

    def ledger_by_request() -> dict[str, list[dict[str, object]]]:
        scaled.wait_ledger_caught_up()
        grouped: dict[str, list[dict[str, object]]] = {}
        for doc in scaled.ledger_documents():
            grouped.setdefault(str(doc.get("request_id")), []).append(doc)
        return grouped

    def open_intents(grouped: dict[str, list[dict[str, object]]]) -> list[str]:
        open_ = []
        for e in tally.done:
            reasons = Counter(str(d.get("outcome_reason")) for d in grouped.get(e.request_id, []))
            if e.kind == "write" and reasons["intent"] and not any(reasons[r] for r in OUTCOMES):
                open_.append(e.request_id)
        return open_

    # A write that answered 503 may leave its intent open for a while: its outcome is
    # recorded once the stream is back, or the intent reconciler settles it (after
    # settle_intents_after_s). Wait for that, bounded.
    by_request = await asyncio.to_thread(ledger_by_request)
    deadline = time.monotonic() + 30
    while open_intents(by_request) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        by_request = await asyncio.to_thread(ledger_by_request)
    assert open_intents(by_request) == [], "intents left without an outcome"
    for e in tally.done:
        events = by_request.get(e.request_id, [])
        if e.kind == "read" and e.status == 200:
            assert any(d.get("subtype") == "read" for d in events), f"no event for {e}"
        if e.kind == "write":
            reasons = Counter(str(d.get("outcome_reason")) for d in events)
            if e.status == 201:
                assert reasons["intent"] == 1 and reasons["committed"] == 1, (e, reasons)
            elif reasons["intent"]:
                assert sum(reasons[r] for r in OUTCOMES) >= 1, (e, reasons)
    # Every acknowledged write is in the database; a write answered 503 is either absent or
    # recorded as committed. (Read from the store itself: an HTTP read would be one more
    # disclosure, and one more thing that could answer 503.)
    store = SqlRecordStore(scaled.pg.url, schema=scaled.records_schema, migrate=False)
    try:
        with store.unit_of_work(read_only=True) as uow:
            for e in tally.done:
                if e.kind != "write":
                    continue
                stored = uow.read(ResourceKey("default", "Patient", e.patient))
                reasons = {str(d.get("outcome_reason")) for d in by_request.get(e.request_id, [])}
                if e.status == 201:
                    assert stored is not None, f"acknowledged write {e} is missing"
                elif stored is not None:
                    assert reasons & {"committed", "reconciled-committed"}, (e, reasons)
                else:
                    assert not reasons & {"committed", "reconciled-committed"}, (e, reasons)
    finally:
        store.close()
    await asyncio.to_thread(scaled.verify_ledger)


async def test_phi_fails_closed_while_every_nats_node_is_down_and_resumes(
    harness: Harness,
) -> None:
    scaled = await asyncio.to_thread(deploy_scaled, harness, workers=2)
    tally, health, down_at, up_at = await through_a_fault(
        scaled, scaled.nats.kill_all, scaled.nats.start
    )
    assert health == [200] * 5, f"/healthz answered {health} with the stream down"
    await check_http_afterwards(scaled, tally, (down_at, up_at))


async def test_losing_the_node_that_leads_the_audit_stream_fails_no_request(
    harness: Harness,
) -> None:
    scaled = await asyncio.to_thread(deploy_scaled, harness, workers=2)
    writer = scaled.loader()
    readable = await seed_patients(scaled, writer)
    tally = HttpTally()
    stop = asyncio.Event()
    load = asyncio.ensure_future(http_load(scaled, tally, stop, readable, writer))
    admin = await admin_client(scaled.nats.urls)
    try:
        await await_until(
            lambda: len([e for e in tally.done if e.status == 200]) >= 20, 30,
            what="reads before the fault",
        )  # fmt: skip
        info = await admin.jetstream(timeout=5).stream_info(scaled.stream)
        leader = int(str(info.cluster.leader if info.cluster else "").removeprefix("n"))
        await asyncio.to_thread(scaled.nats.kill, leader)
        killed_at = time.monotonic()
        # JetStream elects a new leader 4 to 9 s later; requests wait for it meanwhile.
        await await_until(
            lambda: (
                len([e for e in tally.since(killed_at + 1, "read") if e.status == 200]) >= 20
                and len([e for e in tally.since(killed_at + 1, "write") if e.status == 201]) >= 3
            ),
            45,
            what="reads and writes after the stream leader's node died",
        )
    finally:
        stop.set()
        await asyncio.wait_for(load, 60)
        await admin.close()
    failed = Counter(e.status for e in tally.done if e.status not in (200, 201))
    assert not failed, f"requests failed while the stream elected a leader: {failed}"
    await check_http_afterwards(scaled, tally, None)


async def test_a_postgresql_restart_answers_503_then_service_resumes(harness: Harness) -> None:
    scaled = await asyncio.to_thread(deploy_scaled, harness, workers=2)
    tally, health, down_at, up_at = await through_a_fault(
        scaled, lambda: scaled.pg.stop("fast"), scaled.pg.start
    )
    assert health == [200] * 5, f"/healthz answered {health} with PostgreSQL down"
    await check_http_afterwards(scaled, tally, (down_at, up_at))
