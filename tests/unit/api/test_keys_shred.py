"""Operators shred a patient over HTTP: 200 when every worker dropped the keys, 202 when the
keys are destroyed but the shred is still pending propagation, 409 under a retention hold.

The app is built with the keys router at /admin/keys, as `phivault serve` builds it, on a real
embedded keystore and element store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from api_harness import Harness, build

from phivault.api import MountedRouter
from phivault.api.keys import UnsealState, keys_router
from phivault.crypto.element_store import SqliteSealedElementStore
from phivault.crypto.errors import PatientShredded
from phivault.crypto.invalidation import (
    CacheInvalidation,
    InProcessInvalidation,
    UnreachableInvalidation,
)
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.ledger.events import Outcome
from phivault.ledger.testing import InMemoryAuditSink


@dataclass
class Shredding:
    harness: Harness
    ring: KeyRing
    elements: SqliteSealedElementStore


Build = Callable[[CacheInvalidation], Any]


@pytest.fixture
async def shredding(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    opened: list[Any] = []

    async def make(invalidation: CacheInvalidation | None = None) -> Shredding:
        keys_dir = tmp_path / f"keys{len(opened)}"
        _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=3)
        store = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
        elements = SqliteSealedElementStore(tmp_path / f"elements{len(opened)}.sqlite3")
        sink = InMemoryAuditSink()
        ring = KeyRing(
            store=store,
            provider=SealedLocalProvider(keys_dir),
            audit=sink,
            observer="node-http",
            invalidation=invalidation or InProcessInvalidation(),
        )
        await ring.unseal(shares[:2])
        harness = build(
            routers=[MountedRouter(keys_router(), prefix="/admin/keys")],
            state={"unseal": UnsealState(ring), "sealed_elements": elements},
            sink=sink,
        )
        opened.append((store, elements, harness))
        await harness.client.__aenter__()
        return Shredding(harness, ring, elements)

    yield make
    for store, elements, harness in opened:
        await harness.client.__aexit__(None, None, None)
        elements.close()
        store.close()


def _admin(harness: Harness, **claims: Any) -> dict[str, str]:
    defaults: dict[str, Any] = {
        "roles": ["admin"],
        "amr": ["pwd", "otp"],
        "auth_time": harness.clock.t - 10,
    }
    return harness.auth(**(defaults | claims))


async def test_an_admin_shreds_a_patient_and_every_worker_dropped_the_keys(
    shredding: Callable[..., Any],
) -> None:
    s: Shredding = await shredding()
    await s.ring.patient_cipher("default", "p1", create=True)
    answer = await s.harness.client.post(
        "/admin/keys/shred",
        json={"patient": "p1", "reason": "erasure-request"},
        headers=_admin(s.harness),
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "complete" and body["patient"] == "Patient/p1"
    assert body["keys_destroyed"] == 1 and body["unconfirmed_workers"] == []
    with pytest.raises(PatientShredded):
        await s.ring.patient_cipher("default", "p1")
    shred = s.harness.sink.events[body["ledger_index"]]
    assert shred.subtype == "shred" and shred.agents[0].who != "service:phivault-keys"
    assert s.ring.shred_record("default", "p1") is not None


async def test_a_shred_that_did_not_reach_every_worker_answers_202_pending(
    shredding: Callable[..., Any],
) -> None:
    s: Shredding = await shredding(
        UnreachableInvalidation("the other workers could not be reached", bound_s=30.0)
    )
    await s.ring.patient_cipher("default", "p1", create=True)
    answer = await s.harness.client.post(
        "/admin/keys/shred", json={"patient": "p1"}, headers=_admin(s.harness)
    )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["status"] == "pending-propagation"
    assert "pending propagation" in body["message"] and "30 s" in body["message"]
    assert body["bound_s"] == 30.0
    # done in the store all the same, and at once on this worker
    with pytest.raises(PatientShredded):
        await s.ring.patient_cipher("default", "p1")
    again = await s.harness.client.post(
        "/admin/keys/shred", json={"patient": "p1"}, headers=_admin(s.harness)
    )
    assert again.status_code == 202 and again.json()["ledger_index"] == body["ledger_index"]


async def test_a_hold_refuses_the_shred_over_http(shredding: Callable[..., Any]) -> None:
    s: Shredding = await shredding()
    await s.ring.patient_cipher("default", "p1", create=True)
    await s.ring.place_hold(
        "default", "p1", until=datetime.now(UTC) + timedelta(days=30), reason="litigation"
    )
    answer = await s.harness.client.post(
        "/admin/keys/shred", json={"patient": "p1"}, headers=_admin(s.harness)
    )
    assert answer.status_code == 409
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert s.ring.shred_record("default", "p1") is None
    assert s.harness.sink.events[-1].outcome is Outcome.MINOR_FAILURE


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"roles": ["clinician"]}, 403),
        ({"roles": ["privacy-officer"]}, 403),
        ({"amr": ["pwd"]}, 401),  # no MFA: step up first
    ],
)
async def test_only_a_stepped_up_admin_may_shred(
    shredding: Callable[..., Any], claims: dict[str, Any], status: int
) -> None:
    s: Shredding = await shredding()
    await s.ring.patient_cipher("default", "p1", create=True)
    answer = await s.harness.client.post(
        "/admin/keys/shred", json={"patient": "p1"}, headers=_admin(s.harness, **claims)
    )
    assert answer.status_code == status
    assert s.ring.shred_record("default", "p1") is None


@pytest.mark.parametrize(
    "body",
    [{}, {"patient": ""}, {"patient": "p1", "reason": "because she asked"}, {"patient": "a/b"}],
)
async def test_malformed_shred_requests_are_clear_errors_and_shred_nothing(
    shredding: Callable[..., Any], body: dict[str, Any]
) -> None:
    s: Shredding = await shredding()
    await s.ring.patient_cipher("default", "p1", create=True)
    answer = await s.harness.client.post("/admin/keys/shred", json=body, headers=_admin(s.harness))
    assert answer.status_code in (400, 422), answer.text
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert "because she asked" not in answer.text
    assert s.ring.shred_record("default", "p1") is None
