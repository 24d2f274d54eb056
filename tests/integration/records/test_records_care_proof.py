"""A clinician's search takes its care relationships from the query that admitted the rows
(the SQL predicate proves them in the same statement) and asks the store only about rows that
something else could have admitted (a break-glass grant, a tenant-wide role); a read asks the
store in one statement. Nothing the care relationship withholds is shown: not after the
clinician leaves the care team (between pages, in ``_include``, in totals), not a patient
they do not care for through an ``_include`` target. On both engines."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from records_store_support import StoreFactory
from repository_support import TENANT, Kit, caller, loader, open_kit

from phivault.access.decision import BreakGlassGrant
from phivault.access.vocabulary import Interaction
from phivault.identity.principal import Role
from phivault.records.errors import RecordNotFound
from phivault.records.query import parse_search
from phivault.records.results import Caller
from phivault.records.store.routing import PRIMARY
from phivault.records.store.unit_of_work import SqlUnitOfWork

DOCTOR = "Practitioner/doc-1"


@pytest.fixture
async def kit(stores: StoreFactory, tmp_path: Path) -> AsyncIterator[Kit]:
    async with open_kit(stores, tmp_path) as opened:
        yield opened


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[set[str]]:
    """The patients each ``care_related`` call asked the store about."""
    calls: list[set[str]] = []
    original = SqlUnitOfWork.care_related

    def spy(
        self: SqlUnitOfWork, tenant: str, practitioner: tuple[str, str], patients: Collection[str]
    ) -> set[str]:
        calls.append(set(patients))
        return original(self, tenant, practitioner, patients)

    monkeypatch.setattr(SqlUnitOfWork, "care_related", spy)
    return calls


def observation(patient: str, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"}, **extra,
    }  # fmt: skip


async def two_patients(kit: Kit) -> tuple[str, str, str, list[str]]:
    """Patients A (with a CareTeam of the doctor, returned by id) and B; two Observations of
    A, one of which names B as its performer, and one of B."""
    writer = loader(kit.sink)
    a = (await kit.repo.create(writer, {"resourceType": "Patient", "gender": "male"})).record.id
    b = (await kit.repo.create(writer, {"resourceType": "Patient", "gender": "female"})).record.id
    team = await kit.repo.create(writer, {
        "resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{a}"},
        "participant": [{"member": {"reference": DOCTOR}}],
    })  # fmt: skip
    first = await kit.repo.create(writer, observation(a, "8867-4"))
    second = await kit.repo.create(
        writer, observation(a, "8310-5", performer=[{"reference": f"Patient/{b}"}])
    )
    await kit.repo.create(writer, observation(b, "8867-4"))
    return a, b, team.record.id, [first.record.id, second.record.id]


def doctor(kit: Kit, *, grants: tuple[BreakGlassGrant, ...] = ()) -> Caller:
    who = caller(kit.sink, Role.CLINICIAN, "user/*.rs", who="doc-user", fhir_user=DOCTOR)
    return Caller(dataclasses.replace(who.access, grants=grants), who.audit)


async def test_a_search_proved_by_its_query_asks_the_store_nothing_more(
    kit: Kit, asked: list[set[str]]
) -> None:
    a, b, _, observations = await two_patients(kit)
    found = await kit.repo.search(
        doctor(kit), parse_search("Observation", "_total=accurate&_include=Observation:subject")
    )
    assert sorted(m.id for m in found.matches) == sorted(observations)
    assert found.total == 2  # B's Observation is not counted
    assert [i.id for i in found.included] == [a]
    assert all(not m.redacted for m in found.matches)  # the clinician's full mask
    assert asked == []  # the search's own predicate proved the care relationship
    read = await kit.repo.read(doctor(kit), "Observation", observations[0])
    assert read.resource is not None and not read.redacted
    assert asked == [{a}]  # a read asks once, for its one patient
    with pytest.raises(RecordNotFound):
        await kit.repo.read(doctor(kit), "Patient", b)


async def test_include_targets_of_unrelated_patients_are_withheld(kit: Kit) -> None:
    # B's records reach the doctor only through a grant; once it has expired, neither B's
    # Observations nor B's Patient (as an _include target) show, nor count.
    a, b, _, observations = await two_patients(kit)
    now = kit.clock()
    expired = BreakGlassGrant("g-0", TENANT, "doc-user", b, now - 900, now - 60)
    for query in ("_total=accurate&_include=Observation:subject", "_total=accurate"):
        found = await kit.repo.search(
            doctor(kit, grants=(expired,)), parse_search("Observation", query)
        )
        assert sorted(m.id for m in found.matches) == sorted(observations)
        assert found.total == 2
        assert [i.id for i in found.included] == ([a] if "_include" in query else [])
    patients = await kit.repo.search(
        doctor(kit, grants=(expired,)), parse_search("Patient", "_total=accurate")
    )
    assert [m.id for m in patients.matches] == [a] and patients.total == 1


async def test_leaving_the_care_team_mid_way_closes_every_page_and_include(kit: Kit) -> None:
    a, _, team, _ = await two_patients(kit)
    query = "_count=1&_total=accurate&_include=Observation:subject"
    first = await kit.repo.search(doctor(kit), parse_search("Observation", query))
    assert len(first.matches) == 1 and first.total == 2 and first.next_offset == 1
    assert [i.id for i in first.included] == [a]
    await kit.repo.update(loader(kit.sink), "CareTeam", team, {
        "resourceType": "CareTeam", "id": team, "status": "inactive",
        "subject": {"reference": f"Patient/{a}"},
        "participant": [{"member": {"reference": DOCTOR}}],
    })  # fmt: skip
    rest = await kit.repo.search(doctor(kit), parse_search("Observation", query), offset=1)
    assert rest.matches == [] and rest.included == [] and rest.total == 0
    again = await kit.repo.search(doctor(kit), parse_search("Patient", "_total=accurate"))
    assert again.matches == [] and again.total == 0
    with pytest.raises(RecordNotFound):
        await kit.repo.read(doctor(kit), "Patient", a)


async def test_an_assignment_removed_mid_way_closes_the_next_page(kit: Kit) -> None:
    writer = loader(kit.sink)
    pid = (await kit.repo.create(writer, {"resourceType": "Patient", "gender": "male"})).record.id
    for code in ("8867-4", "8310-5"):
        await kit.repo.create(writer, observation(pid, code))
    admin = caller(kit.sink, Role.ADMIN, "user/Practitioner.cruds", who="admin-1")
    assert await kit.repo.assign_care(admin, DOCTOR, pid)
    query = parse_search("Observation", "_count=1&_total=accurate")
    first = await kit.repo.search(doctor(kit), query)
    assert len(first.matches) == 1 and first.total == 2
    assert await kit.repo.assign_care(admin, DOCTOR, pid, assigned=False)
    rest = await kit.repo.search(doctor(kit), query, offset=1)
    assert rest.matches == [] and rest.total == 0


async def test_a_row_a_grant_admitted_is_not_taken_as_proved(
    kit: Kit, asked: list[set[str]]
) -> None:
    # The doctor cares for A and holds a break-glass grant for B: B's rows were admitted by
    # the grant, not by a care relationship, so the store is asked about B (and only B), and
    # B's disclosure names the grant while A's does not.
    a, b, _, _ = await two_patients(kit)
    now = kit.clock()
    grant = BreakGlassGrant("g-1", TENANT, "doc-user", b, now - 60, now + 600)
    kit.sink.events.clear()
    found = await kit.repo.search(
        doctor(kit, grants=(grant,)),
        parse_search("Observation", "_total=accurate&_include=Observation:subject"),
    )
    assert found.total == 3 and len(found.matches) == 3
    assert sorted(i.id for i in found.included) == sorted([a, b])
    assert asked == [{b}]  # once for the page and its includes
    disclosed = {e.patient: e.break_glass_grant for e in kit.sink.events}
    assert disclosed == {f"Patient/{a}": None, f"Patient/{b}": "g-1"}


async def test_a_row_a_tenant_wide_role_admitted_is_not_taken_as_proved(
    kit: Kit, asked: list[set[str]]
) -> None:
    # A clinician who also works the front desk: the front desk admits every patient's
    # Encounters (administrative groups only). B's Encounter came in through that role, not
    # a care relationship, so it keeps the front desk's mask: no clinical reason.
    a, b, _, _ = await two_patients(kit)
    writer = loader(kit.sink)
    encounters: dict[str, str] = {}
    for patient in (a, b):
        created = await kit.repo.create(writer, {
            "resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{patient}"},
            "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "1023001"}]}],
        })  # fmt: skip
        encounters[patient] = created.record.id
    both = doctor(kit)
    both = Caller(
        dataclasses.replace(both.access, roles=frozenset({Role.CLINICIAN, Role.FRONT_DESK})),
        both.audit,
    )
    found = await kit.repo.search(both, parse_search("Encounter", "_total=accurate"))
    assert found.total == 2
    shown = {m.id: m for m in found.matches}
    cared, other = shown[encounters[a]], shown[encounters[b]]
    assert cared.resource is not None and other.resource is not None
    assert "reasonCode" in cared.resource and not cared.redacted
    assert "reasonCode" not in other.resource and other.redacted
    assert asked == [{a, b}]  # nothing proved: the front desk could have admitted either


async def test_rows_a_replica_served_prove_nothing(kit: Kit) -> None:
    # A replica may not have a revocation yet: rows it admitted are checked on the primary
    # (care_related), never taken as proved; the same rows on the primary are.
    a, _, _, _ = await two_patients(kit)
    scopes = kit.repo._scopes(doctor(kit), "Observation", Interaction.SEARCH)
    assert scopes is not None
    admitted = {"Observation": [scopes]}
    rows = [("Observation", a)]
    on_replica = SimpleNamespace(nodes=("replica:10.0.0.2:5432",))
    after_failover = SimpleNamespace(nodes=("replica:10.0.0.2:5432", PRIMARY))
    on_primary = SimpleNamespace(nodes=(PRIMARY,))
    assert kit.repo._care_proven(on_replica, admitted, rows) == set()  # type: ignore[arg-type]
    assert kit.repo._care_proven(after_failover, admitted, rows) == set()  # type: ignore[arg-type]
    assert kit.repo._care_proven(on_primary, admitted, rows) == {a}  # type: ignore[arg-type]


async def test_two_clinicians_alternating_each_see_their_own_patients(kit: Kit) -> None:
    # The care predicate is built once per practitioner and reused: never another's.
    a, b, _, observations = await two_patients(kit)
    admin = caller(kit.sink, Role.ADMIN, "user/Practitioner.cruds", who="admin-1")
    assert await kit.repo.assign_care(admin, "Practitioner/doc-2", b)
    second = caller(
        kit.sink, Role.CLINICIAN, "user/*.rs", who="doc-2", fhir_user="Practitioner/doc-2"
    )
    query = parse_search("Observation", "_total=accurate&_include=Observation:subject")
    for _ in range(2):
        mine = await kit.repo.search(doctor(kit), query)
        theirs = await kit.repo.search(second, query)
        assert sorted(m.id for m in mine.matches) == sorted(observations) and mine.total == 2
        assert [i.id for i in mine.included] == [a]
        assert theirs.total == 1 and [i.id for i in theirs.included] == [b]
