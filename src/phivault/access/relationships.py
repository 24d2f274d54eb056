"""Care relationships: which stored resources tie a practitioner to a patient.

Why here and pure: the policy's ``care-relationship`` requirement is only as good as the facts
behind it, and those facts come from the records themselves (issue 6): CareTeam participants,
Encounter participants and ``Patient.generalPractitioner``, plus explicit assignments that an
administrator records. This module reads one stored resource at a time and says which links
it establishes, so the records layer can keep a (tenant, member, patient) table up to date on
every write and answer :class:`~phivault.access.decision.RelationshipFacts` with one lookup,
and so the rules are tested without a database.

What does not count: CareTeams that are not active (proposed, suspended, inactive,
entered-in-error), Encounters that were cancelled or entered in error, subjects that are not
a Patient, and members other than ``Practitioner`` and ``PractitionerRole`` (an Organization
on a care team does not give every employee access; a patient on their own team gains
nothing). References must be resolved (``Type/id``); unresolved ones raise, as in the search
index. Encounters link for as long as they are stored: a time window, if a hospital wants
one, is the records layer's choice when it builds the link table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from phivault.records.care import VOID_STATUSES
from phivault.records.search_params import parse_reference

__all__ = ["CareLink", "care_links", "has_care_relationship"]

_MEMBER_TYPES = frozenset({"Practitioner", "PractitionerRole"})
_INACTIVE_CARE_TEAM = VOID_STATUSES["CareTeam"]
_VOID_ENCOUNTER = VOID_STATUSES["Encounter"]


@dataclass(frozen=True, slots=True, order=True)
class CareLink:
    """``member`` (``Practitioner/x`` or ``PractitionerRole/y``) cares for patient ``patient``;
    ``source`` names the kind of record that says so (for review, never PHI)."""

    member: str
    patient: str
    source: str


def _reference(value: object, path: str) -> tuple[str, str] | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return parse_reference(value["reference"], path=path)
    return None


def _patient(value: object, path: str) -> str | None:
    target = _reference(value, path)
    return target[1] if target is not None and target[0] == "Patient" else None


def _members(items: object, key: str, path: str) -> Iterator[str]:
    if not isinstance(items, list):
        return
    for item in items:
        if isinstance(item, dict):
            target = _reference(item.get(key), f"{path}.{key}")
            if target is not None and target[0] in _MEMBER_TYPES:
                yield f"{target[0]}/{target[1]}"


def care_links(resource: Mapping[str, Any]) -> frozenset[CareLink]:
    """The care links one stored resource establishes (empty for other types)."""
    kind = resource.get("resourceType")
    links: set[CareLink] = set()
    if kind == "CareTeam" and resource.get("status") not in _INACTIVE_CARE_TEAM:
        patient = _patient(resource.get("subject"), "CareTeam.subject")
        if patient is not None:
            for member in _members(resource.get("participant"), "member", "CareTeam.participant"):
                links.add(CareLink(member, patient, "CareTeam.participant"))
    elif kind == "Encounter" and resource.get("status") not in _VOID_ENCOUNTER:
        patient = _patient(resource.get("subject"), "Encounter.subject")
        if patient is not None:
            for member in _members(
                resource.get("participant"), "individual", "Encounter.participant"
            ):
                links.add(CareLink(member, patient, "Encounter.participant"))
    elif kind == "Patient" and isinstance(resource.get("id"), str):
        practitioners = resource.get("generalPractitioner")
        if isinstance(practitioners, list):
            for index, ref in enumerate(practitioners):
                target = _reference(ref, f"Patient.generalPractitioner[{index}]")
                if target is not None and target[0] in _MEMBER_TYPES:
                    links.add(
                        CareLink(
                            f"{target[0]}/{target[1]}",
                            resource["id"],
                            "Patient.generalPractitioner",
                        )
                    )
    return frozenset(links)


def has_care_relationship(caller: Iterable[str], patient: str, links: Iterable[CareLink]) -> bool:
    """Whether any of ``caller``'s references (the ``fhirUser`` and the PractitionerRoles it
    holds) has a link to ``patient``; explicit assignments are links like any other."""
    who = frozenset(caller)
    return any(link.patient == patient and link.member in who for link in links)
