"""AuditEvent over HTTP, served read-only from the ledger by ``open_service``'s reader: a
privacy officer searches and reads, a patient sees their own, others are refused, and the
CapabilityStatement says what is supported."""

from __future__ import annotations

import json
from pathlib import Path

from service_support import bearer, served


async def test_audit_events_are_served_from_the_ledger(tmp_path: Path) -> None:
    async with served(tmp_path) as service:
        http, issuer = service.http, service.issuer
        loader, officer = service.loader(), service.officer()
        clinician = bearer(
            issuer, roles=["clinician"], scope="user/*.rs", fhirUser="Practitioner/nobody"
        )
        patient = {"resourceType": "Patient", "gender": "female"}
        created = await http.post("/fhir/Patient", content=json.dumps(patient), headers=loader)
        pid = created.json()["id"]
        own = service.patient(pid)
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
