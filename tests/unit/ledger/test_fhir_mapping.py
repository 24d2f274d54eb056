"""FHIR R4 AuditEvent (IHE BALP shape) in and out: round trips, BALP inputs, and refusals that
name the path and never echo the value."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from event_strategies import audit_events  # tests/unit/ledger/event_strategies.py
from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.errors import InvalidInput
from phivault.ledger.events import (
    Action,
    Agent,
    AuditEvent,
    Entity,
    EntityRole,
    EntityType,
    EventKind,
    Outcome,
    Source,
)
from phivault.ledger.fhir import (
    DICOM,
    EVENT_KIND_SYSTEM,
    EVENT_SUBTYPE_SYSTEM,
    EXTENSION_BASE,
    NODE_SYSTEM,
    PRINCIPAL_SYSTEM,
    RESTFUL_INTERACTION,
    TENANT_SYSTEM,
    audit_event_from_fhir,
    audit_event_to_fhir,
    to_fhir_ndjson_line,
)

WHEN = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def _event(**changes: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "kind": EventKind.REST,
        "subtype": "read",
        "action": Action.READ,
        "recorded": WHEN,
        "tenant": "tenant-a",
        "patient": "Patient/p-1",
        "agents": (
            Agent(
                who="Practitioner/pr-1",
                roles=("clinician",),
                client_id="ehr-web",
                network_address="10.0.0.7",
                purpose_of_use=("TREAT",),
            ),
            Agent(who="client:loader", requestor=False),
        ),
        "source": Source(observer="node-1", site="site-a"),
        "entities": (
            Entity(what="Patient/p-1", type=EntityType.PERSON, role=EntityRole.PATIENT),
            Entity(what="Observation/o-1/_history/2", security_labels=("REDACTED",)),
            Entity(query_hash="Q" * 43, role=EntityRole.QUERY),
        ),
        "purpose_of_use": ("TREAT",),
        "request_id": "req-1",
        "break_glass_grant": "bg-7",
        "outcome": Outcome.MINOR_FAILURE,
        "outcome_reason": "not-found",
    }
    fields.update(changes)
    return AuditEvent(**fields)


# --- out and back -----------------------------------------------------------------------------


def test_round_trip_of_a_full_event() -> None:
    event = _event()
    resource = audit_event_to_fhir(event, index=12, patient_prev=7)
    assert resource["id"] == "ledger-12"
    assert {"url": EXTENSION_BASE + "patient-prev", "valueUnsignedInt": 7} in resource["extension"]
    assert resource["meta"]["tag"] == [{"system": TENANT_SYSTEM, "code": "tenant-a"}]
    assert resource["outcome"] == "4"
    assert resource["recorded"] == "2026-01-02T03:04:05.678Z"
    assert audit_event_from_fhir(resource) == event


def test_output_is_balp_shaped() -> None:
    resource = audit_event_to_fhir(_event(), index=0)
    assert resource["type"] == {
        "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "code": "rest",
        "display": "RESTful Operation",
    }
    assert resource["subtype"] == [
        {"system": RESTFUL_INTERACTION, "code": "read", "display": "read"}
    ]
    patient = resource["entity"][0]
    assert patient["what"] == {"reference": "Patient/p-1"}
    assert patient["type"]["code"] == "1" and patient["role"]["code"] == "1"
    user = resource["agent"][0]
    assert user["who"] == {"reference": "Practitioner/pr-1"}
    assert user["requestor"] is True
    assert user["network"] == {"address": "10.0.0.7", "type": "2"}
    assert resource["agent"][1]["who"] == {
        "identifier": {"system": PRINCIPAL_SYSTEM, "value": "client:loader"}
    }
    assert "text" not in resource and "outcomeDesc" not in resource
    # The query is only ever its keyed hash.
    assert "query" not in resource["entity"][2]


@pytest.mark.parametrize(
    ("kind", "subtype", "type_code", "subtype_codes"),
    [
        (EventKind.LOGIN, "login", (DICOM, "110114"), [(DICOM, "110122")]),
        (
            EventKind.LOGIN,
            "session-start",
            (DICOM, "110114"),
            [(DICOM, "110122"), (EVENT_SUBTYPE_SYSTEM, "session-start")],
        ),
        (EventKind.LOGOUT, "logout", (DICOM, "110114"), [(DICOM, "110123")]),
        (EventKind.EXPORT, "bulk", (DICOM, "110106"), [(EVENT_SUBTYPE_SYSTEM, "bulk")]),
        (
            EventKind.SECURITY_ALERT,
            "replayed-token",
            (DICOM, "110113"),
            [(EVENT_SUBTYPE_SYSTEM, "replayed-token")],
        ),
        (
            EventKind.BREAK_GLASS,
            "grant",
            (EVENT_KIND_SYSTEM, "break-glass"),
            [(EVENT_SUBTYPE_SYSTEM, "grant")],
        ),
        (
            EventKind.KEY_OPERATION,
            "rotate",
            (EVENT_KIND_SYSTEM, "key-operation"),
            [(EVENT_SUBTYPE_SYSTEM, "rotate")],
        ),
        (
            EventKind.ADMINISTRATION,
            "policy-change",
            (EVENT_KIND_SYSTEM, "administration"),
            [(EVENT_SUBTYPE_SYSTEM, "policy-change")],
        ),
        (
            EventKind.LEDGER,
            "checkpoint",
            (EVENT_KIND_SYSTEM, "ledger"),
            [(EVENT_SUBTYPE_SYSTEM, "checkpoint")],
        ),
        (EventKind.REST, "reindex", None, [(EVENT_SUBTYPE_SYSTEM, "reindex")]),
    ],
)
def test_each_kind_has_its_coding(
    kind: EventKind,
    subtype: str,
    type_code: tuple[str, str] | None,
    subtype_codes: list[tuple[str, str]],
) -> None:
    event = _event(kind=kind, subtype=subtype)
    resource = audit_event_to_fhir(event, index=3)
    if type_code is not None:
        assert (resource["type"]["system"], resource["type"]["code"]) == type_code
    assert [(c["system"], c["code"]) for c in resource["subtype"]] == subtype_codes
    assert audit_event_from_fhir(resource) == event


def test_ndjson_line() -> None:
    event = _event()
    line = to_fhir_ndjson_line(event, index=5, patient_prev=2)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == audit_event_to_fhir(event, index=5, patient_prev=2)


def test_index_and_back_link_are_checked() -> None:
    with pytest.raises(ValueError):
        audit_event_to_fhir(_event(), index=-1)
    with pytest.raises(ValueError):
        audit_event_to_fhir(_event(), index=3, patient_prev=3)


# --- hypothesis: any valid event survives the trip --------------------------------------------


@settings(max_examples=300, deadline=None)
@given(audit_events(), st.integers(0, 2**40), st.booleans())
def test_any_valid_event_round_trips(event: AuditEvent, index: int, linked: bool) -> None:
    prev = index - 1 if linked and index > 0 else None
    resource = audit_event_to_fhir(event, index=index, patient_prev=prev)
    assert audit_event_from_fhir(json.loads(json.dumps(resource))) == event
    assert audit_event_from_fhir(resource, tenant=event.tenant) == event


# --- BALP inputs from elsewhere ---------------------------------------------------------------


def _balp_read() -> dict[str, Any]:
    """A BALP-style patient read as another server might send it (no phivault extensions)."""
    return {
        "resourceType": "AuditEvent",
        "id": "ex-read-1",
        "meta": {
            "profile": ["https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.Read"]
        },
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [{"system": RESTFUL_INTERACTION, "code": "read", "display": "read"}],
        "action": "R",
        "recorded": "2026-01-02T05:04:05.6789+02:00",
        "outcome": "0",
        "agent": [
            {
                "type": {
                    "coding": [{"system": DICOM, "code": "110153", "display": "Source Role ID"}]
                },
                "who": {"identifier": {"system": PRINCIPAL_SYSTEM, "value": "client:app"}},
                "requestor": False,
                "network": {"address": "192.0.2.10", "type": "2"},
            },
            {
                "who": {"reference": "Practitioner/pr-1"},
                "requestor": True,
                "purposeOfUse": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                "code": "TREAT",
                            }
                        ]
                    }
                ],
            },
        ],
        "source": {
            "observer": {"identifier": {"system": NODE_SYSTEM, "value": "fhir-1"}},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server",
                }
            ],
        },
        "entity": [
            {
                "what": {"reference": "Patient/p-1"},
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "1",
                    "display": "Person",
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                    "display": "Patient",
                },
            },
            {"what": {"reference": "Observation/o-1/_history/3", "type": "Observation"}},
        ],
    }


def test_balp_read_maps_to_the_model() -> None:
    event = audit_event_from_fhir(_balp_read(), tenant="tenant-b")
    assert event.kind is EventKind.REST and event.subtype == "read"
    assert event.tenant == "tenant-b"
    assert event.patient == "Patient/p-1"
    assert event.recorded == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert event.agents[0].who == "client:app" and event.agents[0].network_address == "192.0.2.10"
    assert event.agents[1].purpose_of_use == ("TREAT",)
    assert event.entities[0].role is EntityRole.PATIENT
    assert event.entities[1].what == "Observation/o-1/_history/3"
    assert event.entities[1].role is EntityRole.DOMAIN_RESOURCE


def test_patient_is_the_entity_pointing_to_a_patient_when_no_role_says_so() -> None:
    resource = _balp_read()
    resource["entity"] = [{"what": {"reference": "Patient/p-9/_history/2"}}]
    event = audit_event_from_fhir(resource, tenant="t")
    assert event.patient == "Patient/p-9"
    assert event.entities == (Entity(what="Patient/p-9/_history/2", role=EntityRole.PATIENT),)


def test_several_patients_without_a_patient_role_leave_patient_unset() -> None:
    resource = _balp_read()
    resource["entity"] = [
        {"what": {"reference": "Patient/a"}},
        {"what": {"reference": "Patient/b"}},
    ]
    event = audit_event_from_fhir(resource, tenant="t")
    assert event.patient is None


def test_login_from_dicom_codes() -> None:
    resource = _balp_read()
    resource["type"] = {"system": DICOM, "code": "110114", "display": "User Authentication"}
    resource["subtype"] = [{"system": DICOM, "code": "110122", "display": "Login"}]
    resource["action"] = "E"
    del resource["entity"]
    event = audit_event_from_fhir(resource, tenant="t")
    assert (event.kind, event.subtype) == (EventKind.LOGIN, "login")


def test_tenant_tag_wins_and_must_agree() -> None:
    resource = audit_event_to_fhir(_event(), index=1)
    assert audit_event_from_fhir(resource).tenant == "tenant-a"
    with pytest.raises(InvalidInput) as info:
        audit_event_from_fhir(resource, tenant="tenant-b")
    assert info.value.path == "meta.tag"


def test_no_tenant_at_all_is_refused() -> None:
    with pytest.raises(InvalidInput) as info:
        audit_event_from_fhir(_balp_read())
    assert info.value.path == "meta.tag"


def test_query_as_keyed_token_is_accepted() -> None:
    resource = _balp_read()
    resource["entity"].append(
        {
            "extension": [{"url": EXTENSION_BASE + "query-hash", "valueString": "k" * 43}],
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24"},
        }
    )
    event = audit_event_from_fhir(resource, tenant="t")
    assert event.entities[-1].query_hash == "k" * 43


# --- refusals ---------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: list[Any], value: Any) -> Mutation:
    def mutate(resource: dict[str, Any]) -> None:
        target: Any = resource
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: list[Any]) -> Mutation:
    def mutate(resource: dict[str, Any]) -> None:
        target: Any = resource
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


NAME = "Beatrice Aufderhar"
SSN = "999-68-9353"
B64_QUERY = base64.b64encode(b"Patient?name=Aufderhar&birthdate=1924-08-04").decode()

REFUSALS: list[tuple[str, Mutation, str, str]] = [
    ("resource-type", _set(["resourceType"], "Patient"), "resourceType", "AuditEvent"),
    ("unknown-top", _set(["period"], {"start": "2024-01-01"}), "period", "not accepted"),
    ("language", _set(["language"], "en"), "language", "not accepted"),
    ("modifier", _set(["modifierExtension"], []), "modifierExtension", "not accepted"),
    (
        "description",
        _set(["entity", 0, "description"], f"Chart of {NAME}"),
        "entity[0].description",
        "free text is not accepted and this value looks like PHI (person-name)",
    ),
    (
        "entity-name",
        _set(["entity", 1, "name"], SSN),
        "entity[1].name",
        "free text is not accepted and this value looks like PHI (ssn)",
    ),
    ("agent-name", _set(["agent", 1, "name"], NAME), "agent[1].name", "looks like PHI"),
    ("outcome-desc", _set(["outcomeDesc"], "all fine"), "outcomeDesc", "free text is not accepted"),
    (
        "narrative",
        _set(["text"], {"status": "generated", "div": f"<div>{NAME}</div>"}),
        "text",
        "looks like PHI (person-name)",
    ),
    (
        "detail",
        _set(
            ["entity", 1, "detail"],
            [{"type": "note", "valueBase64Binary": base64.b64encode(SSN.encode()).decode()}],
        ),
        "entity[1].detail",
        "looks like PHI (ssn)",
    ),
    ("raw-query", _set(["entity", 1, "query"], B64_QUERY), "entity[1].query", "keyed hash"),
    (
        "what-identifier",
        _set(["entity", 0, "what"], {"identifier": {"value": SSN}}),
        "entity[0].what.identifier",
        "identifiers are not accepted",
    ),
    (
        "what-display",
        _set(["entity", 0, "what", "display"], NAME),
        "entity[0].what.display",
        "looks like PHI",
    ),
    (
        "who-display",
        _set(["agent", 1, "who", "display"], NAME),
        "agent[1].who.display",
        "looks like PHI",
    ),
    (
        "odd-display",
        _set(["entity", 0, "role", "display"], "The patient, Beatrice Aufderhar"),
        "entity[0].role.display",
        "looks like PHI",
    ),
    (
        "cc-text",
        _set(["agent", 1, "purposeOfUse", 0, "text"], "treating Beatrice Aufderhar"),
        "agent[1].purposeOfUse[0].text",
        "free text",
    ),
    (
        "ssn-code",
        _set(["agent", 1, "purposeOfUse", 0, "coding", 0, "code"], SSN),
        "agent[1].purposeOfUse[0].coding[0].code",
        "looks like PHI (ssn)",
    ),
    (
        "spaced-code",
        _set(["agent", 1, "purposeOfUse", 0, "coding", 0, "code"], "TREAT NOW"),
        "agent[1].purposeOfUse[0].coding[0].code",
        "not a valid code",
    ),
    (
        "email-id",
        _set(["agent", 0, "who", "identifier", "value"], "beatrice@example.com"),
        "agent[0].who.identifier.value",
        "looks like PHI (email)",
    ),
    (
        "foreign-id-system",
        _set(["agent", 0, "who", "identifier", "system"], "urn:oid:1.2.3"),
        "agent[0].who.identifier.system",
        PRINCIPAL_SYSTEM,
    ),
    (
        "bad-reference",
        _set(["agent", 1, "who", "reference"], "http://x.example/Practitioner/1"),
        "agent[1].who.reference",
        "not a valid reference",
    ),
    ("no-requestor", _delete(["agent", 1, "requestor"]), "agent[1].requestor", "required"),
    ("location", _set(["agent", 1, "location"], {}), "agent[1].location", "not accepted"),
    ("alt-id", _set(["agent", 1, "altId"], "emp-77"), "agent[1].altId", "not accepted"),
    (
        "network-name",
        _set(["agent", 0, "network"], {"address": "ws-beatrice", "type": "1"}),
        "agent[0].network.type",
        "IP address",
    ),
    (
        "network-ip",
        _set(["agent", 0, "network", "address"], "10.0.0.300"),
        "agent[0].network.address",
        "IP address",
    ),
    ("lifecycle", _set(["entity", 0, "lifecycle"], {}), "entity[0].lifecycle", "not accepted"),
    ("naive-time", _set(["recorded"], "2026-01-02T03:04:05"), "recorded", "time zone"),
    ("date-only", _set(["recorded"], "2026-01-02"), "recorded", "time zone"),
    ("no-recorded", _delete(["recorded"]), "recorded", "required"),
    ("outcome", _set(["outcome"], "3"), "outcome", "0, 4, 8, 12"),
    ("action", _set(["action"], "X"), "action", "C, R, U, D, E"),
    ("no-agent", _delete(["agent"]), "agent", "required"),
    ("empty-agent", _set(["agent"], []), "agent", "empty"),
    ("agent-not-object", _set(["agent"], ["x"]), "agent[0]", "JSON object"),
    ("no-source", _delete(["source"]), "source", "required"),
    (
        "observer-reference",
        _set(["source", "observer"], {"reference": "Device/d-1"}),
        "source.observer.reference",
        "not accepted",
    ),
    ("no-type", _delete(["type"]), "type", "required"),
    ("unknown-type", _set(["type"], {"system": DICOM, "code": "110100"}), "type", "not an event"),
    (
        "restful-unknown",
        _set(["subtype", 0], {"system": RESTFUL_INTERACTION, "code": "peek"}),
        "subtype[0].code",
        "restful-interaction",
    ),
    (
        "two-subtypes",
        _set(
            ["subtype"],
            [
                {"system": RESTFUL_INTERACTION, "code": "read"},
                {"system": RESTFUL_INTERACTION, "code": "search"},
            ],
        ),
        "subtype",
        "exactly one",
    ),
    (
        "entity-type",
        _set(
            ["entity", 0, "type"],
            {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "9"},
        ),
        "entity[0].type",
        "audit-entity-type",
    ),
    (
        "patients-differ",
        _set(
            ["entity", 1],
            {
                "what": {"reference": "Patient/other"},
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "1",
                },
            },
        ),
        "entity[1].what",
        "different patients",
    ),
    (
        "patient-role-not-patient",
        _set(
            ["entity", 1, "role"],
            {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
        ),
        "entity[1]",
        "Patient",
    ),
    (
        "unknown-extension",
        _set(["extension"], [{"url": "http://example.org/note", "valueString": NAME}]),
        "extension[0].url",
        "not an extension",
    ),
    (
        "extension-value-type",
        _set(["extension"], [{"url": EXTENSION_BASE + "request-id", "valueInteger": 3}]),
        "extension[0].valueInteger",
        "not accepted",
    ),
    ("primitive-extension", _set(["_recorded"], {"id": "x"}), "_recorded", "not accepted"),
    (
        "other-tag",
        _set(["meta", "tag"], [{"system": "http://example.org/tags", "code": "x"}]),
        "meta.tag[0].system",
        "tenant",
    ),
    ("meta-security", _set(["meta", "security"], []), "meta.security", "not accepted"),
    ("bad-id", _set(["id"], "has space"), "id", "FHIR id"),
]


@pytest.mark.parametrize(
    ("mutate", "path", "message"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_refusals_name_the_path_and_never_the_value(
    mutate: Mutation, path: str, message: str
) -> None:
    resource = copy.deepcopy(_balp_read())
    mutate(resource)
    with pytest.raises(InvalidInput) as info:
        audit_event_from_fhir(resource, tenant="t")
    assert info.value.path == path, str(info.value)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert message in text
    for secret in ("Beatrice", "Aufderhar", "9353", "beatrice@", "emp-77", "ws-beatrice", "peek"):
        assert secret not in text
    assert "input_value" not in text and "input" not in text.lower().replace("inputs", "")


def test_the_example_message_from_the_design() -> None:
    resource = _balp_read()
    resource["entity"][0]["description"] = "Beatrice Aufderhar"
    with pytest.raises(InvalidInput) as info:
        audit_event_from_fhir(resource, tenant="t")
    assert str(info.value) == (
        "entity[0].description: free text is not accepted and this value looks like PHI "
        "(person-name)"
    )


@pytest.mark.parametrize("value", [None, [], "AuditEvent", 3, {"resourceType": "AuditEvent", 1: 2}])
def test_malformed_structure(value: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        audit_event_from_fhir(value, tenant="t")
    assert info.value.path in ("AuditEvent", "resourceType")


@pytest.mark.parametrize(
    "field",
    ["agent", "entity", "subtype", "purposeOfEvent", "meta", "source", "type", "recorded"],
)
@pytest.mark.parametrize("wrong", [None, 1, "x", True, {"a": 1}, [1]])
def test_wrong_json_types_are_refused_by_path(field: str, wrong: Any) -> None:
    resource = _balp_read()
    resource[field] = wrong
    try:
        audit_event_from_fhir(resource, tenant="t")
    except InvalidInput as exc:
        assert exc.path is not None and exc.path.startswith(field)
    else:  # pragma: no cover - every one of these is malformed
        pytest.fail("accepted")


def test_agent_type_is_checked_by_path() -> None:
    resource = _balp_read()
    resource["agent"][0]["type"]["coding"][0] = {"system": DICOM, "code": "110100"}
    with pytest.raises(InvalidInput) as info:
        audit_event_from_fhir(resource, tenant="t")
    assert info.value.path == "agent[0].type.coding[0]"
