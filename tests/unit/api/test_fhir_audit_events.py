"""AuditEvent over HTTP, served read-only from the ledger by ``open_service``'s reader: a
privacy officer searches and reads, a patient sees their own, others are refused, and the
CapabilityStatement says what is supported."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from fastapi import FastAPI

from phivault.api.serve import open_service
from phivault.datadir import DataDir
from phivault.identity.testing import FakeIssuer
from phivault.initialize import initialize_data_dir
from phivault.settings import Settings


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def bearer(issuer: FakeIssuer, **claims: object) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {issuer.token(**claims)}",
        "Content-Type": "application/fhir+json",
    }


async def test_audit_events_are_served_from_the_ledger(tmp_path: Path) -> None:
    init = initialize_data_dir(tmp_path / "data", dev=False, threshold=2, shares=3)
    issuer = FakeIssuer()
    loader = bearer(
        issuer, roles=["service"], scope="system/*.cruds", purpose_of_use=["HOPERAT"], fhirUser=None
    )
    officer = bearer(
        issuer, sub="po-1", roles=["privacy-officer"], scope="user/AuditEvent.rs", fhirUser=None,
        amr=["pwd", "otp"], acr="http://schemas.openid.net/pape/policies/2007/06/multi-factor",
    )  # fmt: skip
    clinician = bearer(
        issuer, roles=["clinician"], scope="user/*.rs", fhirUser="Practitioner/nobody"
    )
    async with (
        open_service(
            Settings(),
            DataDir.open(tmp_path / "data"),
            key_sources={issuer.issuer: issuer.key_source()},
            unseal_shares=init.keystore.shares[:2],
        ) as app,
        client(app) as http,
    ):
        patient = {"resourceType": "Patient", "gender": "female"}
        created = await http.post("/fhir/Patient", content=json.dumps(patient), headers=loader)
        pid = created.json()["id"]
        own = bearer(issuer, roles=["patient"], scope="patient/*.rs", fhirUser=f"Patient/{pid}")
        assert (await http.get(f"/fhir/Patient/{pid}", headers=own)).status_code == 200

        found = await http.get(f"/fhir/AuditEvent?patient={pid}", headers=officer)
        assert found.status_code == 200, found.text
        bundle = found.json()
        assert bundle["type"] == "searchset" and bundle["entry"]
        newest = bundle["entry"][0]["resource"]
        assert newest["resourceType"] == "AuditEvent" and newest["id"].startswith("ledger-")
        one = await http.get(f"/fhir/AuditEvent/{newest['id']}", headers=officer)
        assert one.status_code == 200 and one.json()["id"] == newest["id"]

        mine = await http.get("/fhir/AuditEvent", headers=own)
        assert mine.status_code == 200 and mine.json()["entry"]
        refused = await http.get("/fhir/AuditEvent", headers=clinician)
        assert refused.status_code == 403
        assert refused.json()["resourceType"] == "OperationOutcome"
        hidden = await http.get(f"/fhir/AuditEvent/{newest['id']}", headers=clinician)
        assert hidden.status_code == 404
        bad = await http.get("/fhir/AuditEvent?Quackenbush=1", headers=officer)
        assert bad.status_code == 400 and "Quackenbush" not in bad.text

        statement = (await http.get("/fhir/metadata")).json()
        (audit,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "AuditEvent"]
        assert {i["code"] for i in audit["interaction"]} == {"read", "search-type"}
