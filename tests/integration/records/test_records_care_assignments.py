"""Explicit care assignments: an administrator assigns a practitioner to a patient, which
opens that patient's records to the practitioner like a CareTeam would (in reads, searches and
totals, on both engines); removing it closes them again; only administrators may assign, and
every change is in the ledger before it happens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from records_store_support import StoreFactory
from repository_support import Kit, caller, loader, open_kit

from phivault.identity.principal import Role
from phivault.ledger.events import EventKind
from phivault.records.errors import AccessDenied, RecordNotFound
from phivault.records.query import parse_search


@pytest.fixture
async def kit(stores: StoreFactory, tmp_path: Path) -> AsyncIterator[Kit]:
    async with open_kit(stores, tmp_path) as opened:
        yield opened


async def test_an_assignment_opens_and_closes_a_patient(kit: Kit) -> None:
    writer = loader(kit.sink)
    patient = await kit.repo.create(writer, {"resourceType": "Patient", "gender": "male"})
    pid = patient.record.id
    obs = {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{pid}"},
    }  # fmt: skip
    await kit.repo.create(writer, obs)
    doctor = caller(kit.sink, Role.CLINICIAN, "user/*.rs", fhir_user="Practitioner/cover-1")
    admin = caller(kit.sink, Role.ADMIN, "user/Practitioner.cruds", who="admin-1")
    with pytest.raises(RecordNotFound):
        await kit.repo.read(doctor, "Patient", pid)
    with pytest.raises(AccessDenied):  # a clinician cannot assign themselves
        await kit.repo.assign_care(doctor, "Practitioner/cover-1", pid)

    assert await kit.repo.assign_care(admin, "Practitioner/cover-1", pid) is True
    assert await kit.repo.assign_care(admin, "Practitioner/cover-1", pid) is False
    assert kit.sink.events[-1].kind is EventKind.ADMINISTRATION
    assert kit.sink.events[-1].patient == f"Patient/{pid}"
    assert (await kit.repo.read(doctor, "Patient", pid)).resource is not None
    seen = await kit.repo.search(doctor, parse_search("Observation", "_total=accurate"))
    assert seen.total == 1

    assert await kit.repo.assign_care(admin, "Practitioner/cover-1", pid, assigned=False)
    with pytest.raises(RecordNotFound):
        await kit.repo.read(doctor, "Patient", pid)
    gone = await kit.repo.search(doctor, parse_search("Observation", "_total=accurate"))
    assert gone.total == 0
    with pytest.raises(Exception, match="practitioner"):
        await kit.repo.assign_care(admin, "Patient/x", pid)
