"""A small clinic for the write-visibility tests: who cares for whom, which resource belongs
to which patient, written down here by hand (not read back from the store), and the HTTP
answer of a request reduced to what must not depend on an unseen resource."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import httpx
from fhir_harness import Fhir, observation, organization, patient

from phivault.access.policy import Policy, RolePolicy, Rule, default_policy
from phivault.access.vocabulary import Interaction
from phivault.identity.principal import Role
from phivault.records.classification import ElementGroup

TENANT = "default"  # the FakeIssuer's tenant claim
#: doctor label -> the patient labels they care for (an Encounter, a CareTeam)
CARE = {"dr1": {"p1"}, "dr2": {"p2"}}
#: headers that differ from one request to the next whatever it asks
VOLATILE_HEADERS = frozenset({"date", "x-request-id", "content-length", "traceparent"})


@dataclass
class Target:
    """One stored resource: its type, id, patient label (None: directory) and version."""

    resource_type: str
    id: str
    patient: str | None
    version: int
    deleted: bool = False


@dataclass
class Clinic:
    patients: dict[str, str]  # label -> Patient id
    doctors: dict[str, str]  # label -> Practitioner id
    targets: dict[str, Target]  # label -> resource

    def patient_id(self, label: str | None) -> str | None:
        return None if label is None else self.patients[label]

    def cares(self, fhir_user: str | None, patient_label: str | None) -> bool:
        for label, practitioner in self.doctors.items():
            if fhir_user == f"Practitioner/{practitioner}":
                return patient_label in CARE.get(label, set())
        return False


def claim(patient_id: str, provider: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Claim",
        "status": "active",
        "use": "claim",
        "patient": {"reference": f"Patient/{patient_id}"},
        "created": "2020-01-01",
        "provider": {"reference": f"Practitioner/{provider}"},
        "priority": {"coding": [{"code": "normal"}]},
        "type": {"coding": [{"code": "professional"}]},
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "x"}}],
        **extra,
    }


def body_for(clinic: Clinic, resource_type: str, resource_id: str, subject: str) -> dict[str, Any]:
    """A resource of ``resource_type`` with ``resource_id``, about patient label ``subject``."""
    pid = clinic.patients[subject]
    if resource_type == "Observation":
        return observation(pid, id=resource_id)
    if resource_type == "Claim":
        return claim(pid, clinic.doctors["dr1"], id=resource_id)
    if resource_type == "Patient":
        return patient("Written", id=resource_id)
    return organization("Written Org", id=resource_id)


def with_rule(policy: Policy, role: Role, rule: Rule, **changes: Any) -> Policy:
    """``policy`` with one more rule for ``role`` (and other fields of the role changed)."""
    current: RolePolicy = policy.roles[role]
    changed = dataclasses.replace(current, rules=(*current.rules, rule), **changes)
    return Policy({**policy.roles, role: changed})


def deleting_clinicians() -> Policy:
    """The default policy, plus: clinicians may delete the Observations of their patients."""
    return with_rule(
        default_policy(),
        Role.CLINICIAN,
        Rule(frozenset({"Observation"}), frozenset({Interaction.DELETE}), frozenset(ElementGroup)),
    )


def loader_deletes() -> Policy:
    return with_rule(
        default_policy(),
        Role.SERVICE,
        Rule(
            frozenset({"Observation"}),
            frozenset({Interaction.DELETE}),
            frozenset(ElementGroup),
        ),
    )


async def _post(fhir: Fhir, resource: dict[str, Any]) -> str:
    response = await fhir.create(resource)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def build_clinic(fhir: Fhir) -> Clinic:
    """Practitioners dr1, dr2; patients p1-p3 (dr1 cares for p1 by an Encounter, dr2 for p2
    by a CareTeam, nobody for p3); an Observation of each (o2 at version 2), a Claim of p2,
    an Organization, and a deleted Observation of p3 (a tombstone)."""
    doctors = {}
    for label in ("dr1", "dr2"):
        doctors[label] = await _post(
            fhir, {"resourceType": "Practitioner", "name": [{"family": label}]}
        )
    patients = {label: await _post(fhir, patient(label.upper())) for label in ("p1", "p2", "p3")}
    await _post(
        fhir,
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{patients['p1']}"},
            "participant": [{"individual": {"reference": f"Practitioner/{doctors['dr1']}"}}],
        },
    )
    await _post(
        fhir,
        {
            "resourceType": "CareTeam",
            "status": "active",
            "subject": {"reference": f"Patient/{patients['p2']}"},
            "participant": [{"member": {"reference": f"Practitioner/{doctors['dr2']}"}}],
        },
    )
    targets: dict[str, Target] = {}
    for label in ("p1", "p2", "p3"):
        oid = await _post(fhir, observation(patients[label]))
        targets[f"o-{label}"] = Target("Observation", oid, label, 1)
        targets[label] = Target("Patient", patients[label], label, 1)
    o2 = targets["o-p2"]
    again = await fhir.client.put(
        f"/fhir/Observation/{o2.id}",
        content=json.dumps(observation(patients["p2"], id=o2.id, status="amended")),
        headers=fhir.service(),
    )
    assert again.status_code == 200, again.text
    o2.version = 2
    cid = await _post(fhir, claim(patients["p2"], doctors["dr1"]))
    targets["claim-p2"] = Target("Claim", cid, "p2", 1)
    org = await _post(fhir, organization())
    targets["org"] = Target("Organization", org, None, 1)
    gone = await _post(fhir, observation(patients["p3"], code="1234-5"))
    default = fhir.app.state.records
    fhir.use_policy(loader_deletes())
    deleted = await fhir.client.delete(f"/fhir/Observation/{gone}", headers=fhir.service())
    assert deleted.status_code == 204, deleted.text
    fhir.app.state.records = default
    targets["gone-p3"] = Target("Observation", gone, "p3", 2, deleted=True)
    return Clinic(patients, doctors, targets)


def answer(response: httpx.Response, *ids: str) -> tuple[int, Any, dict[str, str]]:
    """(status, body, headers) with what differs between any two requests (dates, request
    ids, a response Bundle's own id and time) left out and ``ids`` replaced by one placeholder."""
    text = response.text
    for value in ids:
        text = text.replace(value, "{id}")
    body: Any = json.loads(text) if text else None
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        for volatile in ("id", "meta", "timestamp"):  # a new Bundle every time
            body.pop(volatile, None)
    headers = {
        k.lower(): v.replace(ids[0], "{id}") if ids else v
        for k, v in response.headers.items()
        if k.lower() not in VOLATILE_HEADERS
    }
    for value in ids[1:]:
        headers = {k: v.replace(value, "{id}") for k, v in headers.items()}
    return response.status_code, body, headers
