"""``/admin/care-assignments`` over HTTP on the composed service: an administrator (with MFA)
assigns a covering clinician, who can then read the patient; a clinician cannot assign."""

from __future__ import annotations

import json
from pathlib import Path

from service_support import MFA, bearer, served


async def test_an_admin_assigns_a_covering_clinician(tmp_path: Path) -> None:
    async with served(tmp_path) as service:
        http, issuer, loader = service.http, service.issuer, service.loader()
        admin = bearer(
            issuer, sub="admin-1", roles=["admin"], scope="user/Practitioner.cruds",
            fhirUser=None, amr=["pwd", "otp"], acr=MFA,
        )  # fmt: skip
        doctor = bearer(
            issuer, roles=["clinician"], scope="user/*.rs", fhirUser="Practitioner/cov-1"
        )
        body = json.dumps({"resourceType": "Patient", "gender": "other"})
        pid = (await http.post("/fhir/Patient", content=body, headers=loader)).json()["id"]
        assert (await http.get(f"/fhir/Patient/{pid}", headers=doctor)).status_code == 404
        path = f"/admin/care-assignments/{pid}/Practitioner/cov-1"
        refused = await http.put(path, headers=doctor)
        assert refused.status_code == 403
        assert refused.json()["resourceType"] == "OperationOutcome"
        assert (await http.put(path, headers=admin)).status_code == 201
        assert (await http.put(path, headers=admin)).status_code == 204
        assert (await http.get(f"/fhir/Patient/{pid}", headers=doctor)).status_code == 200
        assert (await http.delete(path, headers=admin)).status_code == 204
        assert (await http.get(f"/fhir/Patient/{pid}", headers=doctor)).status_code == 404
        bad = await http.put(f"/admin/care-assignments/{pid}/Patient/cov-1", headers=admin)
        assert bad.status_code == 400
