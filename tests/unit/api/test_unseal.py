"""Operators unseal the server's key ring with M shares over HTTP; nothing else unseals it.

The app is built the way `phivault serve` builds it (the keys router at /admin/keys, the
readiness check), on a real sealed keystore in a production-style data directory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from api_harness import Harness, build

from phivault.api import MountedRouter
from phivault.api.keys import UnsealState, keys_router, require_unsealed
from phivault.crypto import open_keyring
from phivault.crypto.custody import initialize_keystore
from phivault.datadir import DataDir
from phivault.ledger.events import EventKind, Outcome
from phivault.ledger.testing import InMemoryAuditSink


@pytest.fixture
async def sealed(tmp_path: Path) -> AsyncIterator[tuple[Harness, list[str]]]:
    data_dir = DataDir.create(tmp_path / "data", dev=False)
    probe = build()  # for its settings: the same ones the app below uses
    init = initialize_keystore(data_dir, probe.settings.keys, threshold=3, shares=5)
    sink = InMemoryAuditSink()
    async with open_keyring(data_dir, probe.settings, sink) as ring:
        assert ring.sealed  # production data directory, no dev unseal file: starts sealed
        state = UnsealState(ring)

        async def unsealed() -> None:
            await require_unsealed(state)

        harness = build(
            routers=[MountedRouter(keys_router(), prefix="/admin/keys")],
            state={"unseal": state},
            readiness_checks=[unsealed],
            sink=sink,  # one audit trail for the key ring and the front door
        )
        async with harness.client:
            yield harness, list(init.shares)


def _operator(harness: Harness, **claims: Any) -> dict[str, str]:
    defaults: dict[str, Any] = {
        "roles": ["admin"],
        "amr": ["pwd", "otp"],
        "auth_time": harness.clock.t - 10,
    }
    return harness.auth(**(defaults | claims))


async def test_shares_from_separate_custodians_unseal_the_server(
    sealed: tuple[Harness, list[str]],
) -> None:
    harness, shares = sealed
    client = harness.client
    assert (await client.get("/readyz")).status_code == 503  # sealed: not ready for traffic
    status = await client.get("/admin/keys/status", headers=_operator(harness))
    assert status.json() == {"sealed": True, "provider": "sealed", "needed": 3, "presented": 0}

    for presented, share in enumerate(shares[1:4], start=1):
        answer = await client.post(
            "/admin/keys/unseal", json={"credentials": [share]}, headers=_operator(harness)
        )
        assert answer.status_code == 200
        assert answer.json()["presented"] == (presented if presented < 3 else 0)
    assert answer.json()["sealed"] is False
    assert (await client.get("/readyz")).status_code == 200
    unseals = [e for e in harness.sink.events if e.subtype == "unseal"]
    assert [(e.kind, e.outcome) for e in unseals] == [(EventKind.KEY_OPERATION, Outcome.SUCCESS)]

    sealed_again = await client.post("/admin/keys/seal", headers=_operator(harness))
    assert sealed_again.json()["sealed"] is True
    assert (await client.get("/readyz")).status_code == 503


async def test_wrong_shares_are_refused_audited_and_never_echoed(
    sealed: tuple[Harness, list[str]],
) -> None:
    harness, shares = sealed
    forged = shares[0][:-12] + "0" * 12
    answer = await harness.client.post(
        "/admin/keys/unseal",
        json={"credentials": [shares[1], shares[2], forged]},
        headers=_operator(harness),
    )
    assert answer.status_code == 400
    assert answer.json()["resourceType"] == "OperationOutcome"
    body = answer.text + harness.logs.getvalue()
    for share in (*shares, forged):
        assert share not in body
        assert share.split("-")[4] not in body  # not even the secret part
    failed = [e for e in harness.sink.events if e.subtype == "unseal"]
    assert [e.outcome for e in failed] == [Outcome.MINOR_FAILURE]
    # Nothing presented is kept after a failed attempt: the next custodian starts afresh.
    status = await harness.client.get("/admin/keys/status", headers=_operator(harness))
    assert status.json()["presented"] == 0 and status.json()["sealed"] is True


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"roles": ["clinician"]}, 403),  # not an operator
        ({"roles": ["privacy-officer"]}, 403),
        ({"amr": ["pwd"]}, 401),  # no MFA: the RFC 9470 step-up challenge
        ({"auth_time": 1_800_000_000.0 - 3600}, 401),  # MFA too long ago
    ],
)
async def test_only_a_stepped_up_admin_may_unseal(
    sealed: tuple[Harness, list[str]], claims: dict[str, Any], status: int
) -> None:
    harness, shares = sealed
    answer = await harness.client.post(
        "/admin/keys/unseal", json={"credentials": shares[:3]}, headers=_operator(harness, **claims)
    )
    assert answer.status_code == status
    if status == 401:
        assert "insufficient_user_authentication" in answer.headers["www-authenticate"]
    check = await harness.client.get("/admin/keys/status", headers=_operator(harness))
    assert check.json()["sealed"] is True
    anonymous = await harness.client.post("/admin/keys/unseal", json={"credentials": shares[:3]})
    assert anonymous.status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"credentials": []},
        {"credentials": ["x" * 600]},
        {"credentials": "pvs1-not-a-list"},
        {"credentials": ["a"] * 17},
    ],
)
async def test_malformed_unseal_requests_are_clear_errors(
    sealed: tuple[Harness, list[str]], body: dict[str, Any]
) -> None:
    harness, _shares = sealed
    answer = await harness.client.post("/admin/keys/unseal", json=body, headers=_operator(harness))
    assert answer.status_code in (400, 422)
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert "x" * 50 not in answer.text
