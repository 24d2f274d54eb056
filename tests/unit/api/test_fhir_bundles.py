"""Batch and transaction Bundles at POST /fhir: atomic transactions (a failure on the last
entry writes nothing), batches that answer each entry, and Synthea bundles with urn:uuid and
conditional references."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fhir_harness import FHIR_JSON, Fhir, observation, open_fhir, organization, patient

FIXTURES = Path(__file__).resolve().parents[4] / "shared" / "fixtures" / "synthea"


@pytest.fixture
async def fhir(tmp_path: Path) -> AsyncIterator[Fhir]:
    async with open_fhir(tmp_path) as h:
        yield h


def entry(resource: dict[str, Any], full_url: str | None = None, **request: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        out["fullUrl"] = full_url
    return out


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


async def post(fhir: Fhir, doc: Any, **headers: str) -> Any:
    return await fhir.client.post("/fhir", content=json.dumps(doc), headers=fhir.service(**headers))


async def test_transaction_rewrites_urn_uuid_references(fhir: Fhir) -> None:
    urn = "urn:uuid:5b4f1f6e-1d3c-4a55-9d0e-0123456789ab"
    obs = observation("ignored")
    obs["subject"] = {"reference": urn}
    response = await post(fhir, bundle("transaction", entry(patient(), urn), entry(obs)))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["201 Created", "201 Created"]
    first = body["entry"][0]
    pid = first["fullUrl"].rsplit("/", 1)[-1]
    assert first["response"]["location"] == f"Patient/{pid}/_history/1"
    assert first["response"]["etag"] == 'W/"1"'
    assert "lastModified" in first["response"]
    assert "resource" not in first  # written resources only with Prefer: return=representation
    oid = body["entry"][1]["fullUrl"].rsplit("/", 1)[-1]
    read = await fhir.client.get(f"/fhir/Observation/{oid}", headers=fhir.patient(pid))
    assert read.status_code == 200, read.text
    assert read.json()["subject"] == {"reference": f"Patient/{pid}"}


async def test_representation_on_request(fhir: Fhir) -> None:
    response = await post(
        fhir, bundle("transaction", entry(organization())), Prefer="return=representation"
    )
    assert response.status_code == 200, response.text
    assert response.json()["entry"][0]["resource"]["name"] == "Acme Clinic"


async def test_a_transaction_failing_on_its_last_entry_writes_nothing(fhir: Fhir) -> None:
    await fhir.created(organization("Warmup"))
    before = fhir.row_count()
    unresolvable = observation("x")
    unresolvable["subject"] = {"reference": "Patient?identifier=urn:mrn|nobody"}
    for last, status in (
        (entry(unresolvable), 400),
        (entry(patient(favouriteColour="green")), 422),
        (entry(organization(), ifNoneExist="name=nothing-like-this&colour=blue"), 400),
    ):
        doc = bundle("transaction", entry(patient()), entry(organization("Second")), last)
        response = await post(fhir, doc)
        assert response.status_code == status, response.text
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0].get("expression"), outcome
        assert fhir.row_count() == before


async def test_batch_answers_each_entry(fhir: Fhir) -> None:
    bad = patient(favouriteColour="green")
    doc = bundle(
        "batch",
        entry(patient()),
        entry(bad),
        entry(organization()),
        {"request": {"method": "GET", "url": "Organization?name=Acme"}},
    )
    response = await post(fhir, doc)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses[0] == "201 Created"
    assert statuses[1].startswith("4")
    assert statuses[2] == "201 Created"
    outcome = body["entry"][1]["response"]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["Patient.favouriteColour"]
    assert "green" not in response.text
    assert body["entry"][3]["response"]["status"] == "200 OK"
    found = body["entry"][3]["resource"]
    assert found["type"] == "searchset"


async def test_an_entry_id_shaped_like_personal_data_is_400(fhir: Fhir) -> None:
    before = fhir.row_count()
    ssn = "123-45-6789"
    for kind in ("transaction", "batch"):
        doc = bundle(
            kind,
            entry(organization("Fine")),
            entry(organization(id=ssn), method="PUT", url=f"Organization/{ssn}"),
        )
        response = await post(fhir, doc)
        assert response.status_code == 400, response.text
        assert response.json()["issue"][0]["expression"] == ["Bundle.entry[1].request.url"]
        assert ssn not in response.text
    assert fhir.row_count() == before


async def test_what_is_not_a_batch_or_transaction_is_400(fhir: Fhir) -> None:
    for doc, where in (
        (patient(), "resourceType"),
        (bundle("collection", entry(patient())), "Bundle.type"),
        ([bundle("batch")], None),
    ):
        response = await post(fhir, doc)
        assert response.status_code == 400, doc
        if where:
            assert response.json()["issue"][0]["expression"] == [where]
    malformed = await fhir.client.post("/fhir", content=b"{", headers=fhir.service())
    assert malformed.status_code == 400
    entries_not_a_list = await post(fhir, {"resourceType": "Bundle", "type": "batch", "entry": 3})
    assert entries_not_a_list.status_code == 400


async def test_a_bundle_with_too_many_entries_is_413(tmp_path: Path) -> None:
    async with open_fhir(tmp_path, max_bundle_entries=5) as fhir:
        before = fhir.row_count()
        for kind in ("transaction", "batch"):
            doc = bundle(kind, *[entry(organization(f"Clinic {n}")) for n in range(6)])
            response = await post(fhir, doc)
            assert response.status_code == 413
            assert response.json()["issue"][0]["expression"] == ["Bundle.entry"]
        assert fhir.row_count() == before
        doc = bundle("transaction", *[entry(organization(f"Clinic {n}")) for n in range(5)])
        assert (await post(fhir, doc)).status_code == 200


async def test_a_bundle_above_the_body_limit_is_413(fhir: Fhir) -> None:
    doc = bundle("transaction", *[entry(organization(f"Clinic {n}")) for n in range(5000)])
    response = await post(fhir, doc)
    assert response.status_code == 413


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="the Synthea fixtures are not here")
async def test_synthea_patient_with_its_companions(fhir: Fhir) -> None:
    for name in (
        "sof2019_hospitalInformation1559319163815.json",
        "sof2019_practitionerInformation1559319163815.json",
        "sof2019_Clemente_Kreiger.json",
    ):
        doc = json.loads((FIXTURES / name).read_bytes())
        response = await post(fhir, doc)
        assert response.status_code == 200, (name, response.text[:500])
        statuses = {e["response"]["status"] for e in response.json()["entry"]}
        assert statuses <= {"201 Created", "200 OK"}, statuses
    # The patient reads their own record back, references rewritten to stored ids.
    doc = json.loads((FIXTURES / "sof2019_Clemente_Kreiger.json").read_bytes())
    last = response.json()["entry"]
    kinds = [e["resource"]["resourceType"] for e in doc["entry"]]
    pid = last[kinds.index("Patient")]["fullUrl"].rsplit("/", 1)[-1]
    mine = await fhir.client.get(
        f"/fhir/Encounter?patient={pid}&_total=accurate", headers=fhir.patient(pid)
    )
    assert mine.status_code == 200, mine.text
    assert mine.json()["total"] == kinds.count("Encounter")
    first = mine.json()["entry"][0]["resource"]
    assert first["subject"]["reference"] == f"Patient/{pid}"
    assert first["participant"][0]["individual"]["reference"].startswith("Practitioner/")
