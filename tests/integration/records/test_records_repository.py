"""The records repository on both engines: a Synthea patient in, read back equal; access
decided in the query (other patients, roles, care relationships, tenants, masks); the audit
event durable before data moves; writes all-or-nothing with intents reconciled after a crash;
tampered ciphertext refused."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from records_store_support import StoreFactory
from repository_support import (
    Kit,
    bundle,
    caller,
    loader,
    open_kit,
    patient_caller,
)
from sqlalchemy import select, update

from phivault.errors import InvalidInput
from phivault.identity.principal import Role
from phivault.ledger.events import EventKind, Outcome
from phivault.ledger.service import initialize_ledger, open_ledger
from phivault.privacy.scrub import tainted_scope
from phivault.records.errors import (
    AccessDenied,
    IfMatchFailed,
    IntegrityFailure,
    RecordGone,
    RecordNotFound,
)
from phivault.records.query import parse_search
from phivault.records.repository import RecordsRepository
from phivault.records.store.schema import groups, idx_date, idx_token

PATIENT_FILE = "sof2019_Kathe_Zieme.json"


@pytest.fixture
async def kit(stores: StoreFactory, tmp_path: Path) -> AsyncIterator[Kit]:
    async with open_kit(stores, tmp_path) as opened:
        yield opened


async def load_patient(kit: Kit, fixtures_dir: Path) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Load one Synthea patient; return its id, fullUrl -> Type/id, and the bundle sent."""
    doc = bundle(fixtures_dir, PATIENT_FILE)
    outcome = await kit.repo.transaction(loader(kit.sink), doc)
    assert {e.status for e in outcome.entries} == {201}
    ids: dict[str, str] = {}
    patient_id = ""
    for sent, result in zip(doc["entry"], outcome.entries, strict=True):
        assert result.record is not None
        ids[sent["fullUrl"]] = result.record.reference
        if result.record.resource_type == "Patient":
            patient_id = result.record.id
    return patient_id, ids, doc


def without_meta_and_refs(resource: Any, ids: dict[str, str]) -> Any:
    """The resource as sent, with its references rewritten as the server rewrites them."""
    if isinstance(resource, dict):
        out = {}
        for key, value in resource.items():
            if key in ("meta", "id"):
                continue
            if key == "reference" and isinstance(value, str) and value in ids:
                out[key] = ids[value]
            else:
                out[key] = without_meta_and_refs(value, ids)
        return out
    if isinstance(resource, list):
        return [without_meta_and_refs(v, ids) for v in resource]
    return resource


async def test_a_patient_reads_back_equal_and_only_their_own(kit: Kit, fixtures_dir: Path) -> None:
    patient_id, ids, doc = await load_patient(kit, fixtures_dir)
    me = patient_caller(kit.sink, patient_id)
    for entry in doc["entry"]:
        kind, the_id = ids[entry["fullUrl"]].split("/")
        with tainted_scope() as tainted:
            got = await kit.repo.read(me, kind, the_id)
        assert got.resource is not None and not got.redacted
        assert got.resource["meta"]["versionId"] == "1"
        # PHI opened is tainted for the request (it can never reach a log line)
        assert tainted or kind in ("Organization", "Practitioner")
        assert without_meta_and_refs(got.resource, ids) == without_meta_and_refs(
            entry["resource"], ids
        )
    stranger = patient_caller(kit.sink, "someone-else")
    with pytest.raises(RecordNotFound):
        await kit.repo.read(stranger, "Patient", patient_id)
    found = await kit.repo.search(stranger, parse_search("Observation", "_total=accurate"))
    assert found.total == 0 and found.matches == []
    mine = await kit.repo.search(me, parse_search("Observation", "_total=accurate&_count=10"))
    assert mine.total == 128 and len(mine.matches) == 10 and mine.next_offset == 10


async def test_roles_are_decided_in_the_query(kit: Kit, fixtures_dir: Path) -> None:
    patient_id, ids, _ = await load_patient(kit, fixtures_dir)
    practitioner = next(v for v in ids.values() if v.startswith("Practitioner/"))
    # the loader writes but never reads PHI back, and cannot search patients
    with pytest.raises(RecordNotFound):
        await kit.repo.read(loader(kit.sink), "Patient", patient_id)
    with pytest.raises(AccessDenied):
        await kit.repo.search(loader(kit.sink), parse_search("Patient", ""))
    # a clinician sees the patients they care for (Encounter participant), nobody else
    treating = caller(kit.sink, Role.CLINICIAN, "user/*.rs", fhir_user=practitioner)
    other = caller(kit.sink, Role.CLINICIAN, "user/*.rs", fhir_user="Practitioner/nobody")
    seen = await kit.repo.search(treating, parse_search("Condition", "_total=accurate"))
    assert seen.total == 14
    unseen = await kit.repo.search(other, parse_search("Condition", "_total=accurate"))
    assert unseen.total == 0
    with pytest.raises(RecordNotFound):
        await kit.repo.read(other, "Patient", patient_id)
    assert (await kit.repo.read(treating, "Patient", patient_id)).resource is not None
    # billing sees the Encounter without its clinical content, marked REDACTED
    billing = caller(kit.sink, Role.BILLING, "user/*.rs")
    encounter_id = next(v for v in ids.values() if v.startswith("Encounter/")).split("/")[1]
    masked = await kit.repo.read(billing, "Encounter", encounter_id)
    assert masked.redacted and masked.resource is not None
    assert "type" not in masked.resource and "reasonCode" not in masked.resource
    assert {"code": "REDACTED"}.items() <= masked.resource["meta"]["security"][0].items()
    # another tenant's caller finds nothing, even with the right id
    elsewhere = caller(kit.sink, Role.PATIENT, "patient/*.rs", fhir_user=f"Patient/{patient_id}",
                       tenant="t2")  # fmt: skip
    with pytest.raises(RecordNotFound):
        await kit.repo.read(elsewhere, "Patient", patient_id)


async def test_the_event_is_durable_before_anything_is_disclosed(
    kit: Kit, fixtures_dir: Path
) -> None:
    patient_id, _, _ = await load_patient(kit, fixtures_dir)
    me = patient_caller(kit.sink, patient_id)
    before = len(kit.sink.events)
    got = await kit.repo.read(me, "Patient", patient_id)
    event = kit.sink.events[before]
    assert event.kind is EventKind.REST and event.subtype == "read"
    assert event.patient == f"Patient/{patient_id}"
    assert any(e.what == got.versioned_reference for e in event.entities)
    kit.sink.failing = True
    with tainted_scope() as tainted:
        with pytest.raises(Exception, match="failing"):
            await kit.repo.read(me, "Patient", patient_id)
        with pytest.raises(Exception, match="failing"):
            await kit.repo.search(me, parse_search("Observation", ""))
    assert not tainted  # nothing was even decrypted
    kit.sink.failing = False


async def test_writes_are_all_or_nothing(kit: Kit, fixtures_dir: Path) -> None:
    patient_id, ids, _ = await load_patient(kit, fixtures_dir)
    me = patient_caller(kit.sink, patient_id)
    doc = bundle(fixtures_dir, "sof2019_Felipe_Cazares.json")
    # the last entry updates a resource from a version it is not at: nothing is written
    observation_id = next(v for v in ids.values() if v.startswith("Observation/")).split("/")[1]
    current = (await kit.repo.read(me, "Observation", observation_id)).resource
    assert current is not None
    stale = copy.deepcopy(current)
    doc["entry"].append(
        {
            "resource": stale,
            "request": {
                "method": "PUT",
                "url": f"Observation/{observation_id}",
                "ifMatch": 'W/"7"',
            },
        }
    )
    before = len(kit.sink.events)
    with pytest.raises(IfMatchFailed):
        await kit.repo.transaction(loader(kit.sink), doc)
    refused = [e for e in kit.sink.events[before:] if e.kind is EventKind.REST]
    assert [e.outcome_reason for e in refused] == ["version-conflict"]
    total = await kit.repo.search(
        caller(kit.sink, Role.FRONT_DESK, "user/Patient.rs"),
        parse_search("Patient", "_total=accurate"),
    )
    assert total.total == 1  # Felipe was not created
    # a conflict found only when writing (a concurrent writer moved the version): the intent
    # was recorded, the database transaction rolled back, and the outcome says so
    doc["entry"][-1]["request"]["ifMatch"] = 'W/"1"'
    await kit.repo.update(loader(kit.sink), "Observation", observation_id, current)  # now v2
    real_prepare = kit.repo._prepare

    async def stale_head(caller_: Any, entry: Any, head: Any, now: Any, related: Any) -> Any:
        if head is not None and head.key.resource_type == "Observation":
            head = dataclasses.replace(head, version=1)
        return await real_prepare(caller_, entry, head, now, related)

    kit.repo._prepare = stale_head  # type: ignore[method-assign]
    before = len(kit.sink.events)
    with pytest.raises(IfMatchFailed):
        await kit.repo.transaction(loader(kit.sink), doc)
    reasons = [e.outcome_reason for e in kit.sink.events[before:] if e.kind is EventKind.REST]
    assert reasons[-1] == "rolled-back" and "intent" in reasons
    total = await kit.repo.search(
        caller(kit.sink, Role.FRONT_DESK, "user/Patient.rs"),
        parse_search("Patient", "_total=accurate"),
    )
    assert total.total == 1


async def test_update_delete_history_and_version_checks(kit: Kit, fixtures_dir: Path) -> None:
    patient_id, ids, _ = await load_patient(kit, fixtures_dir)
    me = patient_caller(kit.sink, patient_id)
    writer = loader(kit.sink)
    admin = caller(kit.sink, Role.ADMIN, "user/*.cruds")
    org_id = next(v for v in ids.values() if v.startswith("Organization/")).split("/")[1]
    org = (await kit.repo.read(me, "Organization", org_id)).resource
    assert org is not None
    updated = await kit.repo.update(
        writer, "Organization", org_id, {**org, "name": "New"}, if_match=1
    )
    assert updated.record.version == 2 and not updated.created
    with pytest.raises(IfMatchFailed):
        await kit.repo.update(writer, "Organization", org_id, {**org, "name": "Old"}, if_match=1)
    with pytest.raises(AccessDenied):  # nobody but admin deletes, and only the directory
        await kit.repo.delete(writer, "Organization", org_id)
    tomb = await kit.repo.delete(admin, "Organization", org_id)
    assert tomb is not None and tomb.deleted and tomb.version == 3
    with pytest.raises(RecordGone):
        await kit.repo.read(me, "Organization", org_id)
    assert await kit.repo.delete(admin, "Organization", org_id) is None
    history = await kit.repo.history(admin, "Organization", org_id)
    assert [(v.version, v.deleted) for v in history.versions] == [(3, True), (2, False), (1, False)]
    old = await kit.repo.vread(admin, "Organization", org_id, "2")
    assert old.resource is not None and old.resource["name"] == "New"
    with pytest.raises(RecordNotFound):
        await kit.repo.vread(admin, "Organization", org_id, "9")
    with pytest.raises(RecordNotFound):  # the patient role has no history of the directory
        await kit.repo.history(me, "Organization", org_id)


async def test_id_and_last_updated_are_searched_without_index_rows(
    kit: Kit, fixtures_dir: Path
) -> None:
    """A write stores no index rows for _id and _lastUpdated (searches of them run on the
    head row); searching them finds the written resource all the same."""
    patient_id, _, _ = await load_patient(kit, fixtures_dir)
    writer, me = loader(kit.sink), patient_caller(kit.sink, patient_id)
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2026-11-30T01:00:03Z",
    }
    created = await kit.repo.create(writer, observation)
    the_id = created.record.id
    with kit.stores._opened[0].engine.connect() as conn:
        for table in (idx_token, idx_date):
            params = conn.execute(
                select(table.c.param).where(table.c.resource_id == the_id)
            ).scalars()
            assert not set(params) & {"_id", "_lastUpdated"}
    stamp = created.record.last_updated.strftime("%Y-%m-%dT%H:%M:%S")
    for query in (f"_id={the_id}", f"_id={the_id}&_lastUpdated=ge{stamp}"):
        found = await kit.repo.search(me, parse_search("Observation", query))
        assert [r.id for r in found.matches] == [the_id]
    later = await kit.repo.search(
        me, parse_search("Observation", f"_id={the_id}&_lastUpdated=gt2100-01-01")
    )
    assert later.matches == []


async def test_tampered_ciphertext_is_refused(kit: Kit, fixtures_dir: Path) -> None:
    patient_id, _, _ = await load_patient(kit, fixtures_dir)
    engine = kit.stores._opened[0].engine
    with engine.begin() as conn:
        row = conn.execute(select(groups.c.position, groups.c.ciphertext).limit(1).where(
            groups.c.key_subject == patient_id)).one()  # fmt: skip
        flipped = bytes([row.ciphertext[0] ^ 1]) + bytes(row.ciphertext[1:])
        conn.execute(
            update(groups).where(groups.c.position == row.position).values(ciphertext=flipped)
        )
    me = patient_caller(kit.sink, patient_id)
    with pytest.raises(IntegrityFailure):
        result = await kit.repo.search(me, parse_search("Observation", "_count=500"))
        result = await kit.repo.search(me, parse_search("Encounter", "_count=500"))
        result = await kit.repo.search(me, parse_search("Claim", "_count=500"))
        result = await kit.repo.search(me, parse_search("ExplanationOfBenefit", "_count=500"))
        await kit.repo.read(me, "Patient", patient_id)
        del result
    assert any(e.outcome_reason == "integrity-failure" for e in kit.sink.events)


class Crash(BaseException):
    """The process dies here (nothing after it runs)."""


async def test_intents_left_open_by_a_crash_are_reconciled(
    stores: StoreFactory, tmp_path: Path
) -> None:
    from phivault.datadir import DataDir

    data_dir = DataDir.create(tmp_path / "data", dev=True)
    initialize_ledger(data_dir)
    async with open_kit(stores, tmp_path) as kit, open_ledger(data_dir) as ledger:
        writer = loader(ledger)
        repo = kit.repo
        org = {"resourceType": "Organization", "name": "Acme"}
        real_record = RecordsRepository._record_writes
        real_commit = RecordsRepository._commit_unit

        async def no_outcome(
            self: RecordsRepository, caller: Any, events: Any, **kwargs: Any
        ) -> None:  # the intent only: the process dies before the outcome event
            intents = [e for e in events if getattr(e, "outcome_reason", None) == "intent"]
            await real_record(self, caller, intents, **kwargs)

        # 1. committed, then the process died before the outcome event
        RecordsRepository._record_writes = no_outcome  # type: ignore[method-assign]
        try:
            done = await repo.create(writer, org)

            # 2. died after the intent, before the commit
            def crash(self: RecordsRepository, *args: Any, **kwargs: Any) -> Any:
                def unit(uow: Any) -> None:
                    raise Crash

                return unit

            RecordsRepository._commit_unit = crash  # type: ignore[method-assign]
            with pytest.raises(Crash):
                await repo.create(writer, org)
        finally:
            RecordsRepository._record_writes = real_record  # type: ignore[method-assign]
            RecordsRepository._commit_unit = real_commit  # type: ignore[method-assign]
        cursor = tmp_path / "reconciled"
        report = await repo.reconcile(ledger, sink=ledger, cursor=cursor)
        assert (report.committed, report.absent) == (1, 1)
        settled = [ledger.read(i).event for i in range(report.scanned_from, ledger.size)]
        reasons = {e.outcome_reason: e for e in settled if e.outcome_reason}
        assert reasons["reconciled-committed"].entities[0].what == (
            f"Organization/{done.record.id}/_history/1"
        )
        assert reasons["reconciled-absent"].outcome is Outcome.SERIOUS_FAILURE
        again = await repo.reconcile(ledger, sink=ledger, cursor=cursor)
        assert (again.committed, again.absent) == (0, 0)
        assert again.scanned_from == report.scanned_to


async def test_intents_that_may_still_be_in_flight_are_left_for_later(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """With several workers, an open intent may belong to a write still in flight: only
    intents older than ``settle_after_s`` are settled, and the cursor waits for the rest."""
    from phivault.datadir import DataDir

    data_dir = DataDir.create(tmp_path / "data", dev=True)
    initialize_ledger(data_dir)
    async with open_kit(stores, tmp_path) as kit, open_ledger(data_dir) as ledger:
        real_record = RecordsRepository._record_writes

        async def no_outcome(
            self: RecordsRepository, caller: Any, events: Any, **kwargs: Any
        ) -> None:  # the intent only: the process dies before the outcome event
            intents = [e for e in events if getattr(e, "outcome_reason", None) == "intent"]
            await real_record(self, caller, intents, **kwargs)

        RecordsRepository._record_writes = no_outcome  # type: ignore[method-assign]
        try:
            await kit.repo.create(loader(ledger), {"resourceType": "Organization", "name": "A"})
        finally:
            RecordsRepository._record_writes = real_record  # type: ignore[method-assign]
        intent_at = next(
            i for i in range(ledger.size) if ledger.read(i).event.outcome_reason == "intent"
        )
        cursor = tmp_path / "reconciled"
        young = await kit.repo.reconcile(ledger, sink=ledger, cursor=cursor, settle_after_s=60)
        assert (young.committed, young.absent) == (0, 0)
        assert young.scanned_to == intent_at  # the next run looks at it again
        kit.clock.t += 61
        old = await kit.repo.reconcile(ledger, sink=ledger, cursor=cursor, settle_after_s=60)
        assert (old.scanned_from, old.committed, old.absent) == (intent_at, 1, 0)
        assert old.scanned_to > intent_at


async def test_a_transaction_with_a_resource_of_two_patients_writes_nothing(
    kit: Kit, fixtures_dir: Path
) -> None:
    """Planning works out each resource's patient once; a resource naming two patients is
    left for the write to refuse, as before: the whole transaction fails (400, naming the
    element) and nothing of it is written, the Patient it also creates included."""
    doc = bundle(fixtures_dir, PATIENT_FILE)
    doc["entry"].append(
        {
            "request": {"method": "POST", "url": "Provenance"},
            "resource": {
                "resourceType": "Provenance",
                "target": [{"reference": "Patient/a"}, {"reference": "Patient/b"}],
                "recorded": "2020-01-01T00:00:00Z",
                "agent": [{"who": {"reference": "Practitioner/x"}}],
            },
        }
    )
    with pytest.raises(InvalidInput) as caught:
        await kit.repo.transaction(loader(kit.sink), doc)
    assert caught.value.path == "Provenance.patient"
    total = await kit.repo.search(
        caller(kit.sink, Role.FRONT_DESK, "user/Patient.rs"),
        parse_search("Patient", "_total=accurate"),
    )
    assert total.total == 0
    # and the bundle without it loads, each resource sealed under its patient's key
    doc["entry"].pop()
    patient_id, _, _ = await load_patient(kit, fixtures_dir)
    mine = await kit.repo.search(
        patient_caller(kit.sink, patient_id), parse_search("Observation", "_total=accurate")
    )
    assert mine.total == 128
