"""Element classification: every element of every fixture resource has a group."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from phivault.errors import InvalidInput
from phivault.records.classification import (
    CONTAINED,
    ENVELOPE_ELEMENTS,
    EXTENSION_ELEMENTS,
    MOST_PROTECTIVE,
    ElementGroup,
    UnclassifiedElement,
    UnsupportedResourceType,
    default_classification,
    load_classification,
)

ISSUE_TYPES = {
    "Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "Encounter",
    "Observation", "Condition", "Procedure", "DiagnosticReport", "DocumentReference",
    "MedicationRequest", "MedicationAdministration", "Immunization", "AllergyIntolerance",
    "CarePlan", "CareTeam", "Claim", "ExplanationOfBenefit", "Device", "ImagingStudy",
    "SupplyDelivery", "Provenance",
}  # fmt: skip


def test_every_issue_type_and_every_fixture_type_is_classified(
    synthea_resources: list[dict[str, Any]],
) -> None:
    table = default_classification()
    fixture_types = {r["resourceType"] for r in synthea_resources}
    assert table.resource_types >= ISSUE_TYPES
    assert fixture_types <= table.resource_types
    assert {"Medication", "Goal"} <= fixture_types  # found in the fixtures beyond the list


def test_every_element_of_every_fixture_resource_has_a_group(
    synthea_resources: list[dict[str, Any]],
) -> None:
    table = default_classification()
    seen: Counter[ElementGroup] = Counter()
    for resource in synthea_resources:
        tc = table.for_type(resource["resourceType"])
        for element, value in resource.items():
            if element in ENVELOPE_ELEMENTS:
                continue
            if element in ("extension", "modifierExtension"):
                for ext in value:
                    # fixture extensions are all listed: none falls to the default
                    assert ext["url"] in table.extensions, ext["url"]
                    seen[table.extension_group(ext["url"])] += 1
            elif element == "contained":
                for inner in value:
                    assert inner["resourceType"] in table.contained
                    table.for_type(inner["resourceType"])  # and its own elements are known
                    for inner_element in inner:
                        if inner_element not in ENVELOPE_ELEMENTS:
                            table.for_type(inner["resourceType"]).group_of(inner_element)
            else:
                seen[tc.group_of(element)] += 1
    assert set(seen) == set(ElementGroup)  # the fixtures exercise every group


@pytest.mark.parametrize(
    ("resource_type", "path", "group"),
    [
        ("Patient", "identifier", ElementGroup.DIRECT_IDENTIFIERS),
        ("Patient", "name", ElementGroup.DIRECT_IDENTIFIERS),
        ("Patient", "telecom", ElementGroup.DIRECT_IDENTIFIERS),
        ("Patient", "address", ElementGroup.DIRECT_IDENTIFIERS),
        ("Patient", "birthDate", ElementGroup.DIRECT_IDENTIFIERS),
        ("Patient", "_birthDate", ElementGroup.DIRECT_IDENTIFIERS),
        ("Patient", "photo", ElementGroup.DIRECT_IDENTIFIERS),
        ("Patient", "deceasedDateTime", ElementGroup.DIRECT_IDENTIFIERS),
        ("Patient", "gender", ElementGroup.DEMOGRAPHICS),
        ("Patient", "multipleBirthInteger", ElementGroup.DEMOGRAPHICS),
        ("Patient", "text", ElementGroup.FREE_TEXT),
        ("Observation", "valueQuantity", ElementGroup.CLINICAL),
        ("Observation", "valueString", ElementGroup.CLINICAL),
        ("Observation", "note", ElementGroup.FREE_TEXT),
        ("Observation", "meta", ElementGroup.ADMINISTRATIVE),
        ("DocumentReference", "content", ElementGroup.CLINICAL),
        ("DocumentReference", "content.attachment", ElementGroup.FREE_TEXT),
        ("DocumentReference", "content.attachment.data", ElementGroup.FREE_TEXT),
        ("DiagnosticReport", "presentedForm", ElementGroup.FREE_TEXT),
        ("Encounter", "Encounter.subject.display", ElementGroup.DIRECT_IDENTIFIERS),
        ("Encounter", "subject.reference", ElementGroup.CLINICAL),
        ("Claim", "total", ElementGroup.FINANCIAL),
        ("Device", "serialNumber", ElementGroup.DIRECT_IDENTIFIERS),
        ("Organization", "name", ElementGroup.ADMINISTRATIVE),
    ],
)
def test_groups_of_paths(resource_type: str, path: str, group: ElementGroup) -> None:
    assert default_classification().group_of_path(resource_type, path) is group


def test_unknown_element_is_refused_with_its_path_only() -> None:
    tc = default_classification().for_type("Patient")
    with pytest.raises(UnclassifiedElement) as caught:
        tc.group_of("favouriteColour")
    assert caught.value.path == "Patient.favouriteColour"
    with pytest.raises(UnclassifiedElement):
        tc.group_of("valueQuantity")  # Patient has no value[x]
    with pytest.raises(UnclassifiedElement):
        tc.group_of("birthdate")  # names are case-sensitive


def test_unknown_type_is_refused() -> None:
    with pytest.raises(UnsupportedResourceType):
        default_classification().for_type("Basic")


def test_unknown_extension_and_contained_type_fall_into_the_most_protective_group() -> None:
    table = default_classification()
    assert table.extension_group("http://example.org/secret") is MOST_PROTECTIVE
    assert table.extension_group(None) is MOST_PROTECTIVE
    assert table.contained_group("Basic") is MOST_PROTECTIVE
    assert MOST_PROTECTIVE is ElementGroup.DIRECT_IDENTIFIERS


@pytest.mark.parametrize(
    "text",
    [
        "[types.Patient]\nname = 'secret-ish'\n",
        "[types.Patient]\n'name.family' = 'clinical'\n",  # nested under an undeclared element
        "[types.Patient]\nid = 'clinical'\n",  # the envelope is not grouped
        "[types.Patient]\nextension = 'clinical'\n",  # classified by URL
        "[types.Patient]\n'Name' = 'clinical'\n",
        "[types.patient]\nname = 'clinical'\n",
        "[extensions]\n'http://x' = 'nope'\n",
        "not toml [",
    ],
)
def test_bad_tables_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        load_classification(text)


def test_placement_is_group_of_and_nested_rules_remembered(
    synthea_resources: list[dict[str, Any]],
) -> None:
    """``placement`` (what ``split`` asks) answers as ``group_of`` and ``nested_rules`` do,
    for every fixture element and every declared name; a refused element is refused every
    time and not remembered; the memory is bounded (choice names admit any suffix)."""
    from phivault.records.classification import _PLACED_MAX, TypeClassification

    table = default_classification()
    for resource in synthea_resources:
        tc = table.for_type(resource["resourceType"])
        for key in resource:
            if key in ENVELOPE_ELEMENTS or key in EXTENSION_ELEMENTS or key == CONTAINED:
                continue  # split places these item by item, not by placement
            for _ in range(2):  # worked out, then remembered
                assert tc.placement(key) == (tc.group_of(key), tc.nested_rules(key))
    observation = table.for_type("Observation")
    for name in observation.declared():
        assert observation.placement(name) == (
            observation.group_of(name),
            observation.nested_rules(name),
        )
    fresh = TypeClassification(
        "Observation", observation.elements, observation.choices, observation.nested
    )
    for _ in range(2):
        with pytest.raises(UnclassifiedElement):
            fresh.placement("notAnElement")
    assert "notAnElement" not in fresh._placed
    for index in range(_PLACED_MAX + 10):
        fresh.placement(f"valueQ{index}")  # any suffix of a choice is value[x]
    assert len(fresh._placed) == _PLACED_MAX
    assert fresh.placement(f"valueQ{_PLACED_MAX + 5}") == fresh.placement("valueQuantity")
