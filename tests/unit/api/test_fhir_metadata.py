"""GET /fhir/metadata: public, PHI-free, up when the ledger is down, and exact about what
the server supports (types from the classification, parameters from the search table)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fhir_harness import FHIR_JSON, Fhir, open_fhir

from phivault.api.routes import PUBLIC_PATHS
from phivault.records.classification import default_classification
from phivault.records.search_params import UnknownSearchParameter, search_params


@pytest.fixture
async def fhir(tmp_path: Path) -> AsyncIterator[Fhir]:
    async with open_fhir(tmp_path) as h:
        yield h


async def statement(fhir: Fhir) -> dict[str, Any]:
    response = await fhir.client.get("/fhir/metadata")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body: dict[str, Any] = response.json()
    return body


def test_metadata_is_public() -> None:
    assert "/fhir/metadata" in PUBLIC_PATHS


async def test_capability_statement_states_what_is_supported(fhir: Fhir) -> None:
    body = await statement(fhir)
    assert body["resourceType"] == "CapabilityStatement"
    assert body["kind"] == "instance"
    assert body["fhirVersion"] == "4.0.1"
    assert "application/fhir+json" in body["format"]
    assert body["implementation"]["url"] == "http://testserver/fhir"
    (rest,) = body["rest"]
    assert rest["mode"] == "server"
    assert rest["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    resources = {r["type"]: r for r in rest["resource"]}
    # every stored type, and AuditEvent (read-only, from the ledger)
    assert set(resources) == set(default_classification().resource_types) | {"AuditEvent"}
    audit = resources.pop("AuditEvent")
    assert {i["code"] for i in audit["interaction"]} == {"read", "search-type"}
    assert {p["name"] for p in audit["searchParam"]} == {"patient", "agent", "date"}
    for name, resource in resources.items():
        codes = {i["code"] for i in resource["interaction"]}
        assert {"read", "vread", "update", "delete", "create"} <= codes
        assert {"history-instance", "history-type"} <= codes
        assert resource["versioning"] == "versioned-update"
        assert resource["readHistory"] is True
        # honoured only for callers who see every resource of the type: not promised
        assert resource["updateCreate"] is False
        assert "Update-as-create" in resource["documentation"]
        try:
            params = search_params(name)
        except UnknownSearchParameter:
            params = {}
        assert ("search-type" in codes) == bool(params)
        assert resource["conditionalCreate"] is bool(params)
        assert resource["conditionalUpdate"] is bool(params)
        assert {p["name"] for p in resource.get("searchParam", [])} == set(params)
    patient = resources["Patient"]
    by_name = {p["name"]: p["type"] for p in patient["searchParam"]}
    assert by_name["birthdate"] == "date"
    assert by_name["name"] == "string"
    assert by_name["_id"] == "token"
    assert resources["Observation"]["searchInclude"] == [
        "Observation:patient",
        "Observation:subject",
    ]


async def test_metadata_answers_when_the_ledger_is_down(fhir: Fhir) -> None:
    fhir.sink.failing = True
    body = await statement(fhir)
    assert body["resourceType"] == "CapabilityStatement"
    # ...while PHI interactions fail closed.
    refused = await fhir.client.get("/fhir/Patient?_id=x", headers=fhir.service())
    assert refused.status_code == 503


async def test_metadata_records_no_event_and_needs_no_token(fhir: Fhir) -> None:
    before = len(fhir.sink.events)  # the key ring's unseal
    await statement(fhir)
    junk = await fhir.client.get("/fhir/metadata", headers={"Authorization": "Bearer junk"})
    assert junk.status_code == 200
    assert len(fhir.sink.events) == before
