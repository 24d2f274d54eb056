"""AuditEvents read back from the real ledger: privacy officers search by patient, agent and
date; a patient sees only events about themselves; everyone else is refused; other tenants
see nothing; and reading the trail is itself recorded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from records_store_support import StoreFactory
from repository_support import Kit, caller, loader, open_kit, patient_caller

from phivault.access.decision import compile_policy
from phivault.access.policy import default_policy
from phivault.datadir import DataDir
from phivault.errors import InvalidInput
from phivault.identity.principal import Role
from phivault.ledger.fhir import audit_event_from_fhir
from phivault.ledger.service import Ledger, initialize_ledger, open_ledger
from phivault.records.audit_events import AuditEventReader, parse_audit_query
from phivault.records.errors import AccessDenied, RecordNotFound

ORG = {"resourceType": "Organization", "name": "Acme"}


@pytest.fixture(params=["sqlite"])
async def setup(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Kit, Ledger, AuditEventReader, str]]:
    data_dir = DataDir.create(tmp_path / "data", dev=True)
    initialize_ledger(data_dir)
    stores = StoreFactory(request.param, tmp_path, None)
    async with open_kit(stores, tmp_path) as kit, open_ledger(data_dir) as ledger:
        writer = loader(ledger)
        patient = {"resourceType": "Patient", "gender": "female", "birthDate": "1970-01-01"}
        created = await kit.repo.create(writer, patient)
        me = patient_caller(ledger, created.record.id)
        await kit.repo.read(me, "Patient", created.record.id)
        other = await kit.repo.create(writer, {**patient, "gender": "male"})
        await kit.repo.read(patient_caller(ledger, other.record.id), "Patient", other.record.id)
        reader = AuditEventReader(ledger, compile_policy(default_policy()), clock=kit.clock)
        yield kit, ledger, reader, created.record.id
    stores.close_all()


def officer(ledger: Ledger, tenant: str = "t1") -> object:
    return caller(ledger, Role.PRIVACY_OFFICER, "user/AuditEvent.rs", who="po-1", tenant=tenant)


async def test_privacy_officers_search_by_patient_agent_and_date(
    setup: tuple[Kit, Ledger, AuditEventReader, str],
) -> None:
    _, ledger, reader, patient_id = setup
    po = officer(ledger)
    query, before = parse_audit_query([("patient", f"Patient/{patient_id}")])
    page = await reader.search(po, query, before=before)  # type: ignore[arg-type]
    subtypes = [e["subtype"][-1]["code"] for e in page.events]
    assert subtypes[0] == "read"  # newest first: the patient's own read
    assert all(audit_event_from_fhir(e).patient == f"Patient/{patient_id}" for e in page.events)
    # the search itself is in the ledger, naming what it disclosed
    last = ledger.read(ledger.size - 1).event
    assert last.agents[0].who == "po-1" and last.subtype == "search"
    assert {e.what for e in last.entities} >= {f"AuditEvent/{e['id']}" for e in page.events}
    by_agent, _ = parse_audit_query([("agent", "loader"), ("date", "ge2027-01-15")])
    found = await reader.search(po, by_agent)  # type: ignore[arg-type]
    assert found.events and all(
        "loader" in {a.who for a in audit_event_from_fhir(e).agents} for e in found.events
    )
    none, _ = parse_audit_query([("date", "lt2000")])
    assert (await reader.search(po, none)).events == []  # type: ignore[arg-type]
    one = await reader.read(po, page.events[0]["id"])  # type: ignore[arg-type]
    assert one["id"] == page.events[0]["id"]
    # the chunked read the scans use gives exactly the entries one read at a time gives
    assert ledger.read_range(0, ledger.size) == [ledger.read(i) for i in range(ledger.size)]
    with pytest.raises(Exception, match="no entries"):
        ledger.read_range(0, ledger.size + 1)


async def test_a_patient_sees_only_their_own_and_others_nothing(
    setup: tuple[Kit, Ledger, AuditEventReader, str],
) -> None:
    _, ledger, reader, patient_id = setup
    me = caller(ledger, Role.PATIENT, "patient/AuditEvent.rs", fhir_user=f"Patient/{patient_id}")
    everything, _ = parse_audit_query([])
    page = await reader.search(me, everything)  # type: ignore[arg-type]
    assert page.events and all(
        audit_event_from_fhir(e).patient == f"Patient/{patient_id}" for e in page.events
    )
    stranger, _ = parse_audit_query([("patient", "someone-else")])
    with pytest.raises(AccessDenied):
        await reader.search(me, stranger)  # type: ignore[arg-type]
    clinician = caller(ledger, Role.CLINICIAN, "user/*.rs", fhir_user="Practitioner/x")
    with pytest.raises(AccessDenied):
        await reader.search(clinician, everything)  # type: ignore[arg-type]
    with pytest.raises(RecordNotFound):
        await reader.read(clinician, page.events[0]["id"])  # type: ignore[arg-type]
    # right role, wrong tenant: nothing; right role, no AuditEvent scope: refused
    elsewhere = officer(ledger, tenant="t2")
    assert (await reader.search(elsewhere, everything)).events == []  # type: ignore[arg-type]
    unscoped = caller(ledger, Role.PRIVACY_OFFICER, "user/Patient.rs", who="po-2")
    with pytest.raises(AccessDenied):
        await reader.search(unscoped, everything)  # type: ignore[arg-type]
    with pytest.raises(RecordNotFound):
        await reader.read(officer(ledger), "ledger-999999")  # type: ignore[arg-type]


def test_bad_queries_name_the_parameter_not_the_value() -> None:
    for pairs, path in (
        ([("Quackenbush", "1")], "(parameter)"),
        ([("date", "not-a-date")], "date"),
        ([("_count", "0")], "_count"),
        ([("patient", "a/b")], "patient"),
    ):
        with pytest.raises(InvalidInput) as caught:
            parse_audit_query(pairs)
        assert caught.value.path == path
        assert "Quackenbush" not in str(caught.value)
