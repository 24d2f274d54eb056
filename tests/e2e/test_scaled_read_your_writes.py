"""Read-your-writes through two real workers (``phivault serve --workers 2``) in the scaled
shape with a real streaming replica whose replay is paused: a caller's update is read back
at once, whichever worker serves the read, while a caller who wrote nothing is served by the
replica (one version behind, within the lag bound). The routing rules are tested in
tests/integration/records/test_replica_shared_positions.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis import Redis
from scaled_support import Scaled, run_cli, scaled_deployment

from pg_replica_support import PgReplica, pg_replica, replica  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


@pytest.fixture
def scaled_with_replica(replica: PgReplica) -> Iterator[Scaled]:  # noqa: F811
    # A large lag bound: only read-your-writes keeps a caller off the paused replica.
    extra = f'replica_urls = ["{replica.url}"]\nreplica_max_lag_ms = 30000'
    with scaled_deployment(workers=2, records_extra=extra) as deployment:
        yield deployment


def token(scaled: Scaled, user: str, purpose: str) -> dict[str, str]:
    minted = run_cli(
        "token", "--role", "service", "--user", user, "--purpose", purpose,
        "--scope", "system/*.cruds", "--json", "--data-dir", str(scaled.data_dir),
        env=scaled.env,
    )  # fmt: skip
    assert minted.returncode == 0, minted.stderr
    value = json.loads(minted.stdout)["access_token"]
    return {"Authorization": f"Bearer {value}", "Content-Type": "application/fhir+json"}


def version(scaled: Scaled, cid: str, headers: dict[str, str]) -> str:
    """One read over a connection of its own (the kernel spreads them over the workers)."""
    with httpx.Client(timeout=30) as fresh:
        got = fresh.get(f"{scaled.url}/fhir/Claim/{cid}", headers=headers)
    assert got.status_code == 200, got.text[:500]
    body: dict[str, Any] = got.json()
    return str(body["meta"]["versionId"])


def test_an_update_is_read_back_through_either_worker_while_the_replica_lags(
    scaled_with_replica: Scaled,
    replica: PgReplica,  # noqa: F811
) -> None:
    scaled = scaled_with_replica
    # The first read of a deployment finds no epoch marker and, as after a Redis that lost
    # its data, keeps everyone on the primary for the lag bound (30 s here): mark it ahead.
    client = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        client.set(f"{scaled.redis_prefix}:rw:epoch", "1")
    finally:
        client.close()
    # A claims clearinghouse (HPAYMT) writes and reads claims; another reads them too.
    loader = token(scaled, "svc-loader", "HOPERAT")
    writer, other = token(scaled, "svc-writer", "HPAYMT"), token(scaled, "svc-reader", "HPAYMT")
    with httpx.Client(timeout=30) as client:
        patient = {"resourceType": "Patient", "name": [{"family": "Claimant"}]}
        made = client.post(f"{scaled.url}/fhir/Patient", json=patient, headers=loader)
        assert made.status_code == 201, made.text[:500]
        claim = {
            "resourceType": "Claim", "status": "active", "use": "claim",
            "patient": {"reference": f"Patient/{made.json()['id']}"}, "created": "2026-01-01",
            "type": {"coding": [{"code": "professional"}]},
            "total": {"value": 10, "currency": "USD"},
        }  # fmt: skip
        created = client.post(f"{scaled.url}/fhir/Claim", json=claim, headers=writer)
        assert created.status_code == 201, created.text[:500]
        cid = created.json()["id"]
        replica.wait_replayed()
        assert [version(scaled, cid, other) for _ in range(4)] == ["1"] * 4

        replica.pause_replay()
        try:
            updated = client.put(
                f"{scaled.url}/fhir/Claim/{cid}",
                json={**claim, "id": cid, "total": {"value": 20, "currency": "USD"}},
                headers={**writer, "If-Match": created.headers["ETag"]},
            )
            assert updated.status_code == 200, updated.text[:500]
            # the writer, over fresh connections (so both workers): the update, every time
            assert [version(scaled, cid, writer) for _ in range(16)] == ["2"] * 16
            # a caller who wrote nothing is served by the paused replica: the version before
            # (which shows that reads do go to the replica, through either worker)
            assert [version(scaled, cid, other) for _ in range(8)] == ["1"] * 8
        finally:
            replica.resume_replay()
        replica.wait_replayed()
