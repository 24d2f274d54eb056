"""``/admin/care-assignments`` over HTTP on the composed service: an administrator (with MFA)
assigns a covering clinician, who can then read the patient; a clinician cannot assign."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from phivault.api.serve import open_service
from phivault.datadir import DataDir
from phivault.identity.testing import FakeIssuer
from phivault.initialize import initialize_data_dir
from phivault.settings import Settings

MFA = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"


def bearer(issuer: FakeIssuer, **claims: object) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {issuer.token(**claims)}",
        "Content-Type": "application/fhir+json",
    }


async def test_an_admin_assigns_a_covering_clinician(tmp_path: Path) -> None:
    init = initialize_data_dir(tmp_path / "data", dev=False, threshold=2, shares=3)
    issuer = FakeIssuer()
    loader = bearer(
        issuer, roles=["service"], scope="system/*.cruds", purpose_of_use=["HOPERAT"], fhirUser=None
    )
    admin = bearer(
        issuer, sub="admin-1", roles=["admin"], scope="user/Practitioner.cruds", fhirUser=None,
        amr=["pwd", "otp"], acr=MFA,
    )  # fmt: skip
    doctor = bearer(issuer, roles=["clinician"], scope="user/*.rs", fhirUser="Practitioner/cov-1")
    async with (
        open_service(
            Settings(),
            DataDir.open(tmp_path / "data"),
            key_sources={issuer.issuer: issuer.key_source()},
            unseal_shares=init.keystore.shares[:2],
        ) as app,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as http,
    ):
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
