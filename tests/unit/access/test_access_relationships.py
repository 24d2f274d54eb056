"""Care relationships derived from stored records (references already resolved)."""

from __future__ import annotations

import pytest

from phivault.access.relationships import CareLink, care_links, has_care_relationship
from phivault.errors import InvalidInput


def care_team(status: str = "active") -> dict[str, object]:
    return {
        "resourceType": "CareTeam",
        "id": "ct1",
        "status": status,
        "subject": {"reference": "Patient/p1", "display": "not read"},
        "participant": [
            {"member": {"reference": "Patient/p1"}},  # the patient on their own team
            {"member": {"reference": "Practitioner/dr1"}},
            {"member": {"reference": "Organization/org1"}},  # never every employee
            {"member": {"reference": "PractitionerRole/role1"}},
            {"role": [{"text": "no member"}]},
        ],
    }


def test_care_team_members_who_are_practitioners_link() -> None:
    assert care_links(care_team()) == {
        CareLink("Practitioner/dr1", "p1", "CareTeam.participant"),
        CareLink("PractitionerRole/role1", "p1", "CareTeam.participant"),
    }


@pytest.mark.parametrize("status", ["proposed", "suspended", "inactive", "entered-in-error"])
def test_care_teams_that_are_not_active_do_not_link(status: str) -> None:
    assert care_links(care_team(status)) == frozenset()


def test_encounter_participants_link_unless_void() -> None:
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "subject": {"reference": "https://fhir.example/fhir/Patient/p2"},
        "participant": [{"individual": {"reference": "Practitioner/dr2"}}],
    }
    assert care_links(encounter) == {CareLink("Practitioner/dr2", "p2", "Encounter.participant")}
    assert care_links({**encounter, "status": "entered-in-error"}) == frozenset()
    assert care_links({**encounter, "subject": {"reference": "Group/g1"}}) == frozenset()


def test_general_practitioner_links() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p3",
        "generalPractitioner": [
            {"reference": "Practitioner/gp"},
            {"reference": "Organization/clinic"},
        ],
    }
    assert care_links(patient) == {CareLink("Practitioner/gp", "p3", "Patient.generalPractitioner")}


def test_unresolved_references_are_refused_by_path() -> None:
    team = care_team()
    team["subject"] = {"reference": "urn:uuid:0b2d"}
    with pytest.raises(InvalidInput) as caught:
        care_links(team)
    assert caught.value.path == "CareTeam.subject"


def test_has_care_relationship_through_any_of_the_callers_references() -> None:
    links = care_links(care_team())
    assert has_care_relationship({"Practitioner/dr1"}, "p1", links)
    assert has_care_relationship({"Practitioner/dr9", "PractitionerRole/role1"}, "p1", links)
    assert not has_care_relationship({"Practitioner/dr1"}, "p2", links)
    assert not has_care_relationship({"Organization/org1"}, "p1", links)
    assigned = [CareLink("Practitioner/dr5", "p1", "assignment")]
    assert has_care_relationship({"Practitioner/dr5"}, "p1", assigned)
