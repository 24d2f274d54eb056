"""The scaled shape end to end: two workers behind one socket on PostgreSQL, the JetStream
audit stream and its sequencer, Redis; a Synthea patient in, the record out, and every
disclosure in the PostgreSQL ledger, which verifies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scaled_support import Scaled, run_cli, scaled_deployment, wait_until

from phivault.ledger.postgres_store import PostgresLedgerStore

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "synthea"
COMPANIONS = (
    "sof2019_hospitalInformation1559319163815.json",
    "sof2019_practitionerInformation1559319163815.json",
)
PATIENT_BUNDLE = "sof2019_Clemente_Kreiger.json"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not FIXTURES.is_dir(), reason="the Synthea fixtures are not here"),
]


@pytest.fixture(scope="module")
def scaled() -> Iterator[Scaled]:
    with scaled_deployment(workers=2) as deployment:
        yield deployment


def token(scaled: Scaled, *args: str) -> dict[str, str]:
    minted = run_cli("token", *args, "--json", "--data-dir", str(scaled.data_dir), env=scaled.env)
    assert minted.returncode == 0, minted.stderr
    value = json.loads(minted.stdout)["access_token"]
    return {"Authorization": f"Bearer {value}", "Content-Type": "application/fhir+json"}


def loader(scaled: Scaled) -> dict[str, str]:
    return token(scaled, "--role", "service", "--purpose", "HOPERAT", "--scope", "system/*.cruds")


def ledger_documents(scaled: Scaled) -> list[dict[str, Any]]:
    store = PostgresLedgerStore(scaled.admin, schema=scaled.ledger_schema, writable=False)
    try:
        return [json.loads(leaf) for leaf in store.scan()]
    finally:
        store.close()


def test_a_patient_in_and_out_through_two_workers(scaled: Scaled) -> None:
    with httpx.Client(timeout=60) as client:
        headers = loader(scaled)
        for name in (*COMPANIONS, PATIENT_BUNDLE):
            response = client.post(
                f"{scaled.url}/fhir", content=(FIXTURES / name).read_bytes(), headers=headers
            )
            assert response.status_code == 200, response.text[:500]
        body = response.json()
        sent = json.loads((FIXTURES / PATIENT_BUNDLE).read_bytes())
        kinds = [e["resource"]["resourceType"] for e in sent["entry"]]
        pid = body["entry"][kinds.index("Patient")]["fullUrl"].rsplit("/", 1)[-1]
        own = token(
            scaled, "--role", "patient", "--fhir-user", f"Patient/{pid}",
            "--scope", "patient/*.rs",
        )  # fmt: skip
        # Many reads over several connections: the kernel hands them to both workers, and
        # any of them reads what another wrote (one database, one key store).
        for _ in range(10):
            with httpx.Client(timeout=30) as fresh:
                me = fresh.get(f"{scaled.url}/fhir/Patient/{pid}", headers=own)
                assert me.status_code == 200, me.text
        original = sent["entry"][kinds.index("Patient")]["resource"]
        assert me.json()["name"] == original["name"]
        found = client.get(
            f"{scaled.url}/fhir/Observation?patient={pid}&_total=accurate&_count=5", headers=own
        )
        assert found.status_code == 200
        assert found.json()["total"] == kinds.count("Observation")

    # /metrics answers for both workers whichever one the scrape lands on: between them
    # they served the ten reads (each worker publishes its figures every second).
    def reads_counted() -> bool:
        with httpx.Client(timeout=10) as fresh:
            body = fresh.get(f"{scaled.url}/metrics").text
        workers = {
            s.labels["worker"]
            for f in text_string_to_metric_families(body)
            for s in f.samples
            if s.name == "phivault_worker_metrics_age_seconds"
        }
        served = sum(
            s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
            if s.name == "phivault_http_requests_total"
            and s.labels["method"] == "GET"
            and s.labels["route"].endswith("/{resource_id}")
            and s.labels["status"] == "200"
        )
        return workers == {"0", "1"} and served >= 10

    wait_until(reads_counted, 10, "both workers' reads at /metrics", logs=scaled.logs)

    # Every disclosure reaches the PostgreSQL ledger through the stream and the sequencer.
    def reads_recorded() -> bool:
        reads = [
            d for d in ledger_documents(scaled)
            if d.get("subtype") == "read" and d.get("patient") == f"Patient/{pid}"
        ]  # fmt: skip
        return len(reads) >= 10

    wait_until(reads_recorded, 20, "the reads' audit events in the ledger", logs=scaled.logs)
    verified = run_cli(
        "ledger", "verify", "--json", "--postgres", scaled.admin,
        "--schema", scaled.ledger_schema, "--data-dir", str(scaled.data_dir), env=scaled.env,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_shred_through_one_worker_stops_every_worker_before_it_answers(scaled: Scaled) -> None:
    patient = {"resourceType": "Patient", "name": [{"family": "Ashdown"}], "gender": "female"}
    with httpx.Client(timeout=60) as client:
        headers = loader(scaled)
        created = client.post(f"{scaled.url}/fhir/Patient", json=patient, headers=headers)
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        own = token(
            scaled, "--role", "patient", "--fhir-user", f"Patient/{pid}",
            "--scope", "patient/*.rs",
        )  # fmt: skip
        # reads over fresh connections reach both workers: each caches the patient's cipher
        for _ in range(10):
            with httpx.Client(timeout=30) as fresh:
                read = fresh.get(f"{scaled.url}/fhir/Patient/{pid}", headers=own)
                assert read.status_code == 200, read.text
        admin = token(scaled, "--role", "admin", "--mfa")
        admin["Content-Type"] = "application/json"
        shredded = client.post(
            f"{scaled.url}/admin/keys/shred",
            json={"patient": pid, "reason": "erasure-request"},
            headers=admin,
        )
        assert shredded.status_code == 200, shredded.text
        result = shredded.json()
        assert result["status"] == "complete" and result["confirmed_workers"] == 2, result
        # at once, whichever worker answers: no cached cipher survives the shred
        for _ in range(10):
            with httpx.Client(timeout=30) as fresh:
                gone = fresh.get(f"{scaled.url}/fhir/Patient/{pid}", headers=own)
                assert gone.status_code == 410, gone.text
                assert "Ashdown" not in gone.text


def test_a_worker_killed_is_replaced_and_service_goes_on(scaled: Scaled) -> None:
    """SIGKILL one worker: the supervisor starts another; requests keep being answered."""
    children = subprocess.run(
        ["pgrep", "-f", "multiprocessing.spawn"], capture_output=True, text=True, check=False
    ).stdout.split()
    mine = [pid for pid in children if _is_worker_of(int(pid), scaled)]
    assert len(mine) == 2, mine
    os.kill(int(mine[0]), signal.SIGKILL)
    headers = loader(scaled)

    def answered() -> bool:
        try:
            r = httpx.get(f"{scaled.url}/fhir/Organization?_count=1", headers=headers, timeout=5)
        except httpx.TransportError:
            return False
        return r.status_code == 200

    wait_until(answered, 30, "an answer after a worker died")

    def replaced() -> bool:
        alive = subprocess.run(
            ["pgrep", "-f", "multiprocessing.spawn"], capture_output=True, text=True, check=False
        ).stdout.split()
        return len([p for p in alive if _is_worker_of(int(p), scaled)]) == 2

    wait_until(replaced, 30, "a replacement worker")


def _is_worker_of(pid: int, scaled: Scaled) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"PHIVAULT_CONFIG={scaled.config}".encode() in environ
