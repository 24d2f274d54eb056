"""SIGKILL an API worker in the middle of a FHIR transaction: all or nothing, and its audit
intent is reconciled.

``phivault serve --workers 2`` (its supervisor replaces a worker that dies) on a private
PostgreSQL and a private 3-node NATS cluster, with ``phivault sequencer``. A transaction
Bundle of many entries is posted; the moment its intent event reaches the audit stream (a
plain subscriber watches the stream's subject), the worker serving it (the one holding the
connection, found in /proc) is SIGKILLed; the other one serves on. The supervisor starts a
replacement; an intent reconciler settles the intent left without an outcome. Afterwards:
the Bundle's resources are either all in the database or none is, every version the intent
named has exactly the outcome that matches (committed or reconciled-committed if present;
rolled-back or reconciled-absent if not), and the ledger verifies.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
import uuid
from typing import Any

import httpx
import nats
import psycopg
import psycopg.sql
import pytest
from fault_scaled_support import deploy_scaled
from fault_support import Harness, await_until

from phivault.ledger.stream import audit_subject
from phivault.records.store import ResourceKey, SqlRecordStore
from phivault.records.store.schema import resources

pytestmark = pytest.mark.faults
FAULT_TIMEOUT_S = 120
ENTRIES = 300  # enough work that the kill lands between the intent and the commit


def transaction_bundle(entries: int) -> dict[str, Any]:
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    items: list[dict[str, Any]] = [
        {
            "fullUrl": patient_url,
            "resource": {"resourceType": "Patient", "name": [{"family": "Midflight"}]},
            "request": {"method": "POST", "url": "Patient"},
        }
    ]
    for n in range(entries - 1):
        items.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": patient_url},
                    "valueQuantity": {"value": 60 + n % 40, "unit": "/min"},
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": items}


def versions(event: dict[str, Any]) -> list[str]:
    return sorted(str(e["what"]) for e in event.get("entities", ()) if "/_history/" in e["what"])


async def test_a_worker_killed_mid_transaction_leaves_all_or_nothing_reconciled(
    harness: Harness,
) -> None:
    scaled = await asyncio.to_thread(deploy_scaled, harness, workers=2, settle_after_s=1.0)
    before = scaled.worker_pids()
    killed: list[int] = []
    rid = f"mid-{secrets.token_hex(8)}"
    intent: dict[str, Any] = {}
    seen = asyncio.Event()

    async def on_message(msg: Any) -> None:
        # One event per line: a worker groups the events of a loop turn into one message.
        for line in msg.data.split(b"\n"):
            doc = json.loads(line)
            if doc.get("request_id") == rid and doc.get("outcome_reason") == "intent":
                # At once: the commit is under way in that worker (held by the lock below).
                for pid in scaled.workers_serving(os.getpid()):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                intent.update(doc)
                seen.set()

    # The worker's transaction waits for this lock at its first insert of a resource, so the
    # kill lands between the intent and the commit every time (without it, a fast commit
    # once answered before the kill arrived). Reads are not blocked.
    holder = await psycopg.AsyncConnection.connect(scaled.pg.conninfo)
    await holder.execute(
        psycopg.sql.SQL("LOCK TABLE {}.{} IN SHARE ROW EXCLUSIVE MODE").format(
            psycopg.sql.Identifier(scaled.records_schema), psycopg.sql.Identifier(resources.name)
        )
    )

    watcher = await nats.connect(servers=scaled.nats.urls, connect_timeout=2)
    try:
        await watcher.subscribe(audit_subject(scaled.stream), cb=on_message)
        await watcher.flush()
        headers = {**scaled.loader(), "X-Request-ID": rid}
        async with httpx.AsyncClient(base_url=scaled.url, timeout=60) as client:
            posting = asyncio.ensure_future(
                client.post("/fhir", json=transaction_bundle(ENTRIES), headers=headers)
            )
            await asyncio.wait_for(seen.wait(), 30)
            with pytest.raises(httpx.TransportError):
                await posting  # the worker died under it: no answer at all
    finally:
        await watcher.close()
        await holder.rollback()
        await holder.close()
    written = versions(intent)
    assert len(written) == ENTRIES
    assert len(killed) == 1 and killed[0] in before, (killed, before)

    # The supervisor replaces the worker; the service answers again.
    await await_until(
        lambda: len(scaled.worker_pids()) == 2 and killed[0] not in scaled.worker_pids(),
        30,
        what="a replacement worker",
    )
    await await_until(lambda: scaled.healthz() == 200, 30, what="/healthz after the kill")

    # All or nothing in the database.
    store = SqlRecordStore(scaled.pg.url, schema=scaled.records_schema, migrate=False)
    try:
        with store.unit_of_work(read_only=True) as uow:
            present = [
                w for w in written
                if uow.read(ResourceKey("default", w.split("/")[0], w.split("/")[1])) is not None
            ]  # fmt: skip
    finally:
        store.close()
    assert present in ([], written), f"{len(present)} of {len(written)} entries were committed"
    committed = bool(present)
    # (The lock above makes the kill land before the commit: the reconciled-absent path.)

    # Its intent gets the matching outcome, for every version it named.
    expected = {"committed", "reconciled-committed"} if committed else {
        "rolled-back", "reconciled-absent"}  # fmt: skip

    def settled() -> bool:
        scaled.wait_ledger_caught_up()
        outcomes: dict[str, set[str]] = {w: set() for w in written}
        for doc in scaled.ledger_documents():
            reason = str(doc.get("outcome_reason"))
            if reason in ("intent", "None"):
                continue
            for what in versions(doc):
                if what in outcomes:
                    outcomes[what].add(reason)
        missing = [w for w, got in outcomes.items() if not got]
        wrong = [(w, got) for w, got in outcomes.items() if got and not got <= expected]
        assert wrong == [], f"outcomes that contradict the database: {wrong[:3]}"
        return not missing

    started = time.monotonic()
    await await_until(lambda: asyncio.to_thread(settled), 45, what="the intent to be reconciled")
    assert time.monotonic() - started < 45
    await asyncio.to_thread(scaled.verify_ledger)
