"""``open_service``: the composition ``phivault serve`` and the benchmark use, on a real data
directory (ledger, sealed keystore, SQLite records), with issuers passed in."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from fastapi import FastAPI

from phivault.api.serve import RECONCILE_CURSOR, open_service, records_store_url
from phivault.datadir import DataDir
from phivault.identity.testing import FakeIssuer
from phivault.initialize import initialize_data_dir
from phivault.ledger.service import open_ledger_readonly
from phivault.settings import RecordsSettings, Settings

NAME = "Quackenbush"


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def bearer(issuer: FakeIssuer, **claims: object) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {issuer.token(**claims)}",
        "Content-Type": "application/fhir+json",
    }


async def test_open_service_serves_fhir_and_keeps_records_across_restarts(tmp_path: Path) -> None:
    init = initialize_data_dir(tmp_path / "data", dev=False, threshold=2, shares=3)
    data_dir = DataDir.open(tmp_path / "data")
    settings = Settings()
    issuer = FakeIssuer()
    sources = {issuer.issuer: issuer.key_source()}
    loader = bearer(
        issuer, roles=["service"], scope="system/*.cruds", purpose_of_use=["HOPERAT"], fhirUser=None
    )
    resource = {"resourceType": "Patient", "name": [{"family": NAME}], "gender": "female"}
    async with (
        open_service(
            settings, data_dir, key_sources=sources, unseal_shares=init.keystore.shares[:2]
        ) as app,
        client(app) as http,
    ):
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/fhir/metadata")).status_code == 200
        created = await http.post("/fhir/Patient", content=json.dumps(resource), headers=loader)
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        # Key custody is mounted too (operators only: a loader is refused, not "not found").
        keys = await http.get("/admin/keys/status", headers=loader)
        assert keys.status_code in (401, 403)
    db = data_dir.records_dir / "records.db"
    assert records_store_url(settings, data_dir) == f"sqlite:///{db}"
    assert db.is_file()
    assert NAME.encode() not in db.read_bytes()
    # Reconciliation ran and remembers how far it scanned the ledger.
    assert (data_dir.records_dir / RECONCILE_CURSOR).read_text().strip().isdigit()

    # Restarted without shares: sealed, not ready; metadata answers, PHI does not.
    own = bearer(issuer, roles=["patient"], scope="patient/*.rs", fhirUser=f"Patient/{pid}")
    async with open_service(settings, data_dir, key_sources=sources) as app, client(app) as http:
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/fhir/metadata")).status_code == 200
        sealed = await http.get(f"/fhir/Patient/{pid}", headers=own)
        assert sealed.status_code == 503
        assert NAME not in sealed.text
    async with (
        open_service(
            settings, data_dir, key_sources=sources, unseal_shares=init.keystore.shares[1:]
        ) as app,
        client(app) as http,
    ):
        read = await http.get(f"/fhir/Patient/{pid}", headers=own)
        assert read.status_code == 200, read.text
        assert read.json()["name"] == [{"family": NAME}]


async def test_a_configured_store_url_is_used(tmp_path: Path) -> None:
    initialize_data_dir(tmp_path / "data", dev=False, threshold=2, shares=2)
    data_dir = DataDir.open(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere.db"
    settings = Settings(records=RecordsSettings(store_url=f"sqlite:///{elsewhere}"))
    issuer = FakeIssuer()
    async with open_service(settings, data_dir, key_sources={issuer.issuer: issuer.key_source()}):
        pass
    assert elsewhere.is_file()
    assert not (data_dir.records_dir / "records.db").exists()


async def _ledger_size_after_creates(folder: Path, records: RecordsSettings, count: int) -> int:
    init = initialize_data_dir(folder, dev=False, threshold=2, shares=2)
    data_dir = DataDir.open(folder)
    issuer = FakeIssuer()
    loader = bearer(
        issuer, roles=["service"], scope="system/*.cruds", purpose_of_use=["HOPERAT"], fhirUser=None
    )
    async with (
        open_service(
            Settings(records=records),
            data_dir,
            key_sources={issuer.issuer: issuer.key_source()},
            unseal_shares=init.keystore.shares,
        ) as app,
        client(app) as http,
    ):
        for n in range(count):
            body = json.dumps({"resourceType": "Organization", "name": f"Clinic {n}"})
            created = await http.post("/fhir/Organization", content=body, headers=loader)
            assert created.status_code == 201, created.text
    with open_ledger_readonly(data_dir) as store:
        return store.size()


async def test_the_benchmark_switches_reach_the_repository(tmp_path: Path) -> None:
    """``records.bench_audit_off`` (refused by production settings) is what the benchmark's
    ``controls_off`` run measures: writes record no intent or outcome events."""
    on = await _ledger_size_after_creates(tmp_path / "on", RecordsSettings(), 3)
    off = await _ledger_size_after_creates(
        tmp_path / "off", RecordsSettings(bench_audit_off=True), 3
    )
    assert on - off >= 2 * 3  # an intent and an outcome per create
