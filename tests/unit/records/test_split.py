"""Split and assemble: the round trip on every fixture resource, redaction, sealing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.crypto.elements import PatientCipher
from phivault.errors import InvalidInput
from phivault.records.classification import ElementGroup, UnclassifiedElement
from phivault.records.split import (
    REDACTED,
    ClassifiedResource,
    Envelope,
    GroupContent,
    assemble,
    group_element_ref,
    split,
)


def test_round_trip_on_every_fixture_resource(synthea_resources: list[dict[str, Any]]) -> None:
    for resource in synthea_resources:
        classified = split(resource)
        assert assemble(classified.envelope, classified.groups) == resource
        assert classified.assemble() == resource


def test_group_bytes_are_deterministic(
    synthea_resources: list[dict[str, Any]],
) -> None:
    for resource in synthea_resources[:300]:
        first = split(resource).groups
        # the same resource with its keys in another order gives the same bytes
        shuffled = json.loads(json.dumps(resource, sort_keys=True))
        shuffled = dict(reversed(list(shuffled.items())))
        assert split(shuffled).groups == first
        for data in first.values():  # and stable through a decode and encode
            assert GroupContent.decode(data).encode() == data
        # the numbers' written form survives (orjson keeps 4.0 as 4.0; JCS would write 4)
        assert assemble(split(resource).envelope, first) == resource


def _patient(bundles: dict[str, dict[str, Any]]) -> dict[str, Any]:
    bundle = bundles["wasee11_Alvin56_Jerde200.json"]
    return next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )


def test_patient_groups_hold_what_the_decision_says(
    synthea_bundles: dict[str, dict[str, Any]],
) -> None:
    patient = _patient(synthea_bundles)
    classified = split(patient)
    assert classified.envelope == Envelope("Patient", patient["id"])
    ids = GroupContent.decode(classified.groups[ElementGroup.DIRECT_IDENTIFIERS])
    assert {"identifier", "name", "telecom", "address", "birthDate"} <= set(ids.elements)
    urls = {v["url"] for p, v in ids.fragments if p[0] == "extension"}
    assert urls == {
        "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
        "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
    }
    demo = GroupContent.decode(classified.groups[ElementGroup.DEMOGRAPHICS])
    assert "gender" in demo.elements
    # no name, SSN or birth date appears in any other group's bytes
    secrets = [patient["name"][0]["family"], patient["birthDate"]]
    secrets += [i["value"] for i in patient["identifier"] if i["system"].endswith("us-ssn")]
    for group, data in classified.groups.items():
        if group is not ElementGroup.DIRECT_IDENTIFIERS:
            for secret in secrets:
                assert secret.encode() not in data, group


def test_reference_display_naming_the_patient_is_a_direct_identifier(
    synthea_bundles: dict[str, dict[str, Any]],
) -> None:
    bundle = synthea_bundles["wasee11_Alvin56_Jerde200.json"]
    encounter = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Encounter" and "display" in e["resource"]["subject"]
    )
    classified = split(encounter)
    clinical = classified.groups[ElementGroup.CLINICAL]
    assert encounter["subject"]["display"].encode() not in clinical
    seen = classified.assemble(visible={ElementGroup.CLINICAL, ElementGroup.ADMINISTRATIVE})
    assert "display" not in seen["subject"]
    assert seen["subject"]["reference"] == encounter["subject"]["reference"]
    assert all("display" not in p.get("individual", {}) for p in seen["participant"])
    assert dict(REDACTED) in seen["meta"]["security"]


def test_withheld_groups_are_marked_redacted_and_leave_no_orphans(
    synthea_bundles: dict[str, dict[str, Any]],
) -> None:
    patient = _patient(synthea_bundles)
    classified = split(patient)
    only_ids = classified.assemble(visible={ElementGroup.DIRECT_IDENTIFIERS})
    assert only_ids["name"] == patient["name"]
    assert "gender" not in only_ids and "text" not in only_ids
    assert only_ids["meta"] == {"security": [dict(REDACTED)]}
    # extensions are assembled from fragments alone, in their original relative order
    expected = [
        e for e in patient["extension"] if e["url"].endswith(("mothersMaidenName", "birthPlace"))
    ]
    assert only_ids["extension"] == expected
    # an element whose part lives in a visible group but whose parent is withheld is dropped
    encounter = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": "Patient/p1", "display": "Jane Roe"},
    }
    ids_only = split(encounter).assemble(visible={ElementGroup.DIRECT_IDENTIFIERS})
    assert "subject" not in ids_only
    everything = split(encounter).assemble()
    assert everything == encounter and "meta" not in everything


def test_envelope_meta_stays_out_of_groups() -> None:
    resource = {
        "resourceType": "Observation",
        "id": "o1",
        "meta": {"versionId": "3", "lastUpdated": "2026-11-22T04:00:00Z", "profile": ["x"]},
        "status": "final",
        "code": {"text": "t"},
    }
    classified = split(resource)
    assert classified.envelope == Envelope("Observation", "o1", "3", "2026-11-22T04:00:00Z")
    admin = GroupContent.decode(classified.groups[ElementGroup.ADMINISTRATIVE])
    assert admin.elements == {"meta": {"profile": ["x"]}}
    assert classified.assemble() == resource
    partial = classified.assemble(visible={ElementGroup.CLINICAL})
    assert partial["meta"] == {
        "versionId": "3",
        "lastUpdated": "2026-11-22T04:00:00Z",
        "security": [dict(REDACTED)],
    }


@pytest.mark.parametrize(
    ("resource", "error", "path"),
    [
        ({"resourceType": "Patient", "shoeSize": 9}, UnclassifiedElement, "Patient.shoeSize"),
        ({"resourceType": "Patient", "id": 7}, InvalidInput, "Patient.id"),
        ({"resourceType": "Patient", "meta": []}, InvalidInput, "Patient.meta"),
        ({"resourceType": "Patient", "extension": {}}, InvalidInput, "Patient.extension"),
        ({"resourceType": "Patient", "contained": [1]}, InvalidInput, "Patient.contained[0]"),
        ({"resourceType": 5}, InvalidInput, "resourceType"),
    ],
)
def test_bad_resources_are_refused_by_path(
    resource: dict[str, Any], error: type[Exception], path: str
) -> None:
    with pytest.raises(error) as caught:
        split(resource)
    assert getattr(caught.value, "path", None) == path


@pytest.mark.parametrize(
    "data",
    [b"[", b"[]", b'{"elements": {}}', b'{"elements": {}, "fragments": [[[], 1]]}',
     b'{"elements": {}, "fragments": [[[1], 1]]}', b'{"elements": [], "fragments": []}'],
)  # fmt: skip
def test_malformed_group_content_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        GroupContent.decode(data)


_URLS = [
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
    "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
    "http://synthetichealth.github.io/synthea/quality-adjusted-life-years",
    "http://example.org/unknown",
]
_value = st.text(min_size=1, max_size=5)  # FHIR has no empty values


@settings(max_examples=200, deadline=None)
@given(
    extensions=st.lists(st.tuples(st.sampled_from(_URLS), _value), max_size=6),
    participants=st.lists(
        st.fixed_dictionaries(
            {"individual": st.fixed_dictionaries({"display": st.text(min_size=1)})}
        ),
        max_size=4,
    ),
    visible=st.sets(st.sampled_from(list(ElementGroup))),
)
def test_round_trip_and_redaction_hold_for_any_extension_mix(
    extensions: list[tuple[str, Any]],
    participants: list[dict[str, Any]],
    visible: set[ElementGroup],
) -> None:
    resource: dict[str, Any] = {"resourceType": "Encounter", "id": "e", "status": "finished"}
    if extensions:
        resource["extension"] = [{"url": u, "valueString": v} for u, v in extensions]
    if participants:
        resource["participant"] = participants
    classified = split(resource)
    assert classified.assemble() == resource
    partial = classified.assemble(visible=visible)
    withheld = set(classified.groups) - visible
    assert (dict(REDACTED) in partial.get("meta", {}).get("security", [])) == bool(withheld)
    shown = [e for e in resource.get("extension", []) if split_group(e["url"]) in visible]
    assert partial.get("extension", []) == shown


def split_group(url: str) -> ElementGroup:
    from phivault.records.classification import default_classification

    return default_classification().extension_group(url)


async def test_a_group_seals_and_opens_under_a_real_patient_key(
    tmp_path: Path, synthea_bundles: dict[str, dict[str, Any]]
) -> None:
    from phivault.crypto.errors import DecryptionFailed
    from phivault.crypto.keyring import KeyRing
    from phivault.crypto.keystore import SqliteKeyStore
    from phivault.crypto.providers.sealed import SealedLocalProvider
    from phivault.ledger.testing import InMemoryAuditSink

    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=2)
    store = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    ring = KeyRing(
        store=store, provider=SealedLocalProvider(keys_dir), audit=InMemoryAuditSink(),
        observer="records-test",
    )  # fmt: skip
    try:
        await ring.unseal(shares)
        stored = _patient(synthea_bundles)
        # The repository numbers versions before sealing: the version is bound into each group.
        patient = {**stored, "meta": {**stored.get("meta", {}), "versionId": "1"}}
        cipher: PatientCipher = await ring.patient_cipher("t1", patient["id"], create=True)
        classified = split(patient)
        sealed = {
            group: cipher.seal(group_element_ref("t1", classified.envelope, group), data)
            for group, data in classified.groups.items()
        }
        for data in sealed.values():
            assert patient["name"][0]["family"].encode() not in data
        opened = {
            group: cipher.open(group_element_ref("t1", classified.envelope, group), data)
            for group, data in sealed.items()
        }
        assert ClassifiedResource(classified.envelope, opened).assemble() == patient
        # a group's ciphertext cannot be opened as another group
        ids, demo = ElementGroup.DIRECT_IDENTIFIERS, ElementGroup.DEMOGRAPHICS
        with pytest.raises(DecryptionFailed):
            cipher.open(group_element_ref("t1", classified.envelope, demo), sealed[ids])
        # ...nor as the same group of another version of the same resource (an old value
        # cannot be put back into the current version)
        other_version = dataclasses.replace(classified.envelope, version_id="2")
        with pytest.raises(DecryptionFailed):
            cipher.open(group_element_ref("t1", other_version, ids), sealed[ids])
    finally:
        store.close()


def test_group_refs_need_an_id_and_a_version() -> None:
    with pytest.raises(InvalidInput):
        group_element_ref("t1", Envelope("Patient"), ElementGroup.CLINICAL)
    with pytest.raises(InvalidInput):
        group_element_ref("t1", Envelope("Patient", "p-1"), ElementGroup.CLINICAL)
