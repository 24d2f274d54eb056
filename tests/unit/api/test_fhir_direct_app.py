"""FHIR routes run their endpoints without FastAPI's request_response wrapper; overridden
dependencies (tests) still go through FastAPI's solving; errors are the same answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import Request
from fhir_harness import Fhir, open_fhir, patient

from phivault.api.context import AuditCtx, CurrentPrincipal
from phivault.api.fhir._routes import FhirRoute, _caller
from phivault.records.results import Caller


@pytest.fixture
async def fhir(tmp_path: Path) -> AsyncIterator[Fhir]:
    async with open_fhir(tmp_path) as h:
        yield h


def _read_route(fhir: Fhir) -> FhirRoute:
    [route] = [
        r
        for r in fhir.app.routes
        if isinstance(r, FhirRoute)
        and r.path == "/fhir/{resource_type}/{resource_id}"
        and "GET" in r.methods
    ]
    return route


async def test_fhir_routes_answer_through_the_direct_app(fhir: Fhir) -> None:
    assert _read_route(fhir).app.__qualname__.startswith("_direct_app")
    pid = (await fhir.created(patient()))["id"]
    read = await fhir.client.get(f"/fhir/Patient/{pid}", headers=fhir.patient(pid))
    assert read.status_code == 200
    missing = await fhir.client.get("/fhir/Patient/nope-1", headers=fhir.patient(pid))
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"
    unknown = await fhir.client.get("/fhir/Nonsense/x", headers=fhir.patient(pid))
    assert unknown.status_code == 404
    refused = await fhir.client.get("/fhir/Patient/123-45-6789", headers=fhir.patient(pid))
    assert refused.status_code == 400  # an id with the shape of PHI is never recorded
    assert "123-45-6789" not in refused.text


async def test_overridden_dependencies_are_solved_by_fastapi(fhir: Fhir) -> None:
    pid = (await fhir.created(patient()))["id"]
    calls: list[str] = []

    async def spying_caller(
        request: Request, principal: CurrentPrincipal, audit: AuditCtx
    ) -> Caller:
        calls.append(principal.subject)
        return await _caller(request, principal, audit)

    fhir.app.dependency_overrides[_caller] = spying_caller
    try:
        read = await fhir.client.get(f"/fhir/Patient/{pid}", headers=fhir.patient(pid))
    finally:
        fhir.app.dependency_overrides.clear()
    assert read.status_code == 200
    assert calls == [f"patient-{pid}"]
