"""The words a policy is written in: interactions, purposes of use, relationships, operations.

Why a closed vocabulary: a policy file is reviewed by people who are not programmers, and a
typo in it (``"reed"``, ``"TREATMENT"``) must stop the server rather than silently grant or
deny. Every word a policy may use is an enum member here; anything else is refused at load.

Resource types and element groups are not listed here: they come from the records
classification (``phivault.records.classification``), so the policy can never name a type
phivault does not store, nor forget one it does (see ``phivault.access.policy``).
"""

from __future__ import annotations

from enum import StrEnum

from phivault.identity.scopes import Permission
from phivault.records.classification import Classification

__all__ = [
    "DIRECTORY_TYPES",
    "INTERACTION_PERMISSION",
    "PHI_OPERATIONS",
    "READ_INTERACTIONS",
    "Interaction",
    "Operation",
    "PurposeOfUse",
    "Relationship",
    "patient_types",
]


class Interaction(StrEnum):
    """The FHIR REST interactions a policy grants, one by one."""

    READ = "read"
    VREAD = "vread"
    SEARCH = "search"
    HISTORY = "history"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


#: Interactions that reveal stored elements: "seeing" a group means one of these opens it.
READ_INTERACTIONS = frozenset(
    {Interaction.READ, Interaction.VREAD, Interaction.SEARCH, Interaction.HISTORY}
)

#: The SMART v2 permission each interaction needs (history and vread are reads).
INTERACTION_PERMISSION: dict[Interaction, Permission] = {
    Interaction.READ: Permission.READ,
    Interaction.VREAD: Permission.READ,
    Interaction.HISTORY: Permission.READ,
    Interaction.SEARCH: Permission.SEARCH,
    Interaction.CREATE: Permission.CREATE,
    Interaction.UPDATE: Permission.UPDATE,
    Interaction.DELETE: Permission.DELETE,
}


class PurposeOfUse(StrEnum):
    """HL7 v3 PurposeOfUse codes (the ``purpose_of_use`` claim and IHE BALP's purposeOfUse).

    Only the codes a hospital's job functions claim; an unknown code in a policy is refused,
    and an unknown code in a token simply matches nothing.
    """

    TREAT = "TREAT"  # treatment
    ETREAT = "ETREAT"  # emergency treatment (break-glass)
    CAREMGT = "CAREMGT"  # care management
    PATADM = "PATADM"  # patient administration (registration, scheduling)
    HOPERAT = "HOPERAT"  # healthcare operations
    HPAYMT = "HPAYMT"  # healthcare payment
    COVERAGE = "COVERAGE"  # coverage under policy or program
    HRESCH = "HRESCH"  # healthcare research
    PATRQT = "PATRQT"  # patient requested (the patient's own access)
    PUBHLTH = "PUBHLTH"  # public health
    HCOMPL = "HCOMPL"  # health compliance (privacy officer, audit)
    HSYSADMIN = "HSYSADMIN"  # health system administration


class Relationship(StrEnum):
    """What must tie the caller to a patient before any of that patient's records open.

    Tenant isolation applies in every case; these say what is required *within* a tenant.
    """

    CARE = "care-relationship"  # CareTeam, Encounter participant, generalPractitioner, assignment
    OWN = "own-compartment"  # the caller's fhirUser is the patient
    TENANT = "tenant"  # any patient of the tenant (job functions that work across patients)


class Operation(StrEnum):
    """Non-record capabilities a role may hold (audit, reports, review, administration)."""

    AUDIT_EVENTS = "audit-events"  # search and read AuditEvents of any patient
    ACCESS_REPORTS = "access-reports"  # $access-report for any patient
    OWN_ACCESS_REPORT = "own-access-report"  # $access-report for the caller's own record
    BREAK_GLASS_REVIEW = "break-glass-review"  # the break-glass review queue
    CONFIGURATION = "configuration"  # settings, policy, keys custody ceremonies
    USERS = "users"  # users, roles and explicit care assignments


#: Operations that disclose which patient was seen by whom: PHI, so never for admin.
PHI_OPERATIONS = frozenset(
    {Operation.AUDIT_EVENTS, Operation.ACCESS_REPORTS, Operation.OWN_ACCESS_REPORT}
)

#: Resource types of no patient (a tenant directory), matching ``records.search_params.
#: patient_of``: they are not PHI, so no relationship to a patient can be required for them.
DIRECTORY_TYPES = frozenset(
    {"Practitioner", "PractitionerRole", "Organization", "Location", "Medication"}
)


def patient_types(classification: Classification) -> frozenset[str]:
    """The classified resource types that belong to a patient's compartment (PHI)."""
    return classification.resource_types - DIRECTORY_TYPES
