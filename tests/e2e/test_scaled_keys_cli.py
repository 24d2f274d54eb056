"""`phivault keys shred` run by an operator against the scaled shape: the shred's event goes
through the audit stream and the sequencer into the PostgreSQL ledger auditors verify, and
every running worker stops serving the patient before the command reports success."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from scaled_support import Scaled, run_cli, scaled_deployment, wait_until

from phivault.ledger.postgres_store import PostgresLedgerStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scaled() -> Iterator[Scaled]:
    with scaled_deployment(workers=2) as deployment:
        yield deployment


def _token(scaled: Scaled, *args: str) -> dict[str, str]:
    minted = run_cli("token", *args, "--json", "--data-dir", str(scaled.data_dir), env=scaled.env)
    assert minted.returncode == 0, minted.stderr
    value = json.loads(minted.stdout)["access_token"]
    return {"Authorization": f"Bearer {value}", "Content-Type": "application/fhir+json"}


def _ledger(scaled: Scaled) -> list[dict[str, Any]]:
    store = PostgresLedgerStore(scaled.admin, schema=scaled.ledger_schema, writable=False)
    try:
        return [json.loads(leaf) for leaf in store.scan()]
    finally:
        store.close()


def test_a_cli_shred_is_in_the_sequenced_ledger_and_stops_every_worker(scaled: Scaled) -> None:
    patient = {"resourceType": "Patient", "name": [{"family": "Okonedo"}], "gender": "male"}
    loader = _token(
        scaled, "--role", "service", "--purpose", "HOPERAT", "--scope", "system/*.cruds"
    )
    with httpx.Client(timeout=60) as client:
        created = client.post(f"{scaled.url}/fhir/Patient", json=patient, headers=loader)
        assert created.status_code == 201, created.text
    pid = created.json()["id"]
    own = _token(
        scaled, "--role", "patient", "--fhir-user", f"Patient/{pid}", "--scope", "patient/*.rs"
    )
    for _ in range(6):  # fresh connections reach both workers: each caches the cipher
        with httpx.Client(timeout=30) as fresh:
            assert fresh.get(f"{scaled.url}/fhir/Patient/{pid}", headers=own).status_code == 200

    shredded = run_cli("keys", "shred", "--patient", pid, "--yes", "--json",
                       "--data-dir", str(scaled.data_dir), env=scaled.env)  # fmt: skip
    assert shredded.returncode == 0, shredded.stdout + shredded.stderr
    result = json.loads(shredded.stdout)
    assert result["audit_position"]["kind"] == "stream-sequence"
    assert result["propagation"]["status"] == "complete", result
    for _ in range(6):
        with httpx.Client(timeout=30) as fresh:
            assert fresh.get(f"{scaled.url}/fhir/Patient/{pid}", headers=own).status_code == 410

    def shred_sequenced() -> bool:
        return any(
            d.get("subtype") == "shred" and d.get("patient") == f"Patient/{pid}"
            for d in _ledger(scaled)
        )

    wait_until(shred_sequenced, 20, "the CLI shred's event in the ledger", logs=scaled.logs)
    verified = run_cli(
        "ledger", "verify", "--json", "--postgres", scaled.admin,
        "--schema", scaled.ledger_schema, "--data-dir", str(scaled.data_dir), env=scaled.env,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
