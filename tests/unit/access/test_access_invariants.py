"""Policy invariants: no standing access to all PHI, admin sees none, everything covered."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from access_support import default_text, line_of, replace_once

from phivault.access.policy import (
    Policy,
    Rule,
    check_invariants,
    check_policy_text,
    default_policy,
    possible_groups,
)
from phivault.access.vocabulary import Interaction, Operation, Relationship, patient_types
from phivault.identity.principal import Role
from phivault.records.classification import ElementGroup, default_classification

TABLE = default_classification()
ALL = frozenset(ElementGroup)


def _with_role(policy: Policy, role: Role, **changes: object) -> Policy:
    roles = dict(policy.roles)
    roles[role] = replace(roles[role], **changes)  # type: ignore[arg-type]
    return Policy(MappingProxyType(roles))


def test_the_default_breaks_no_invariant() -> None:
    assert check_invariants(default_policy(), TABLE) == []


def test_a_role_that_reads_everything_of_everyone_is_refused() -> None:
    god = Rule(frozenset(patient_types(TABLE)), frozenset({Interaction.SEARCH}), ALL)
    policy = _with_role(default_policy(), Role.BILLING, rules=(god,))
    issues = check_invariants(policy, TABLE)
    assert [(i.kind, i.path) for i in issues] == [("standing-access-to-all-phi", "roles.billing")]


def test_reading_everything_of_ones_own_patients_is_not_god_mode() -> None:
    god = Rule(frozenset(patient_types(TABLE)), frozenset({Interaction.READ}), ALL)
    for relationship in (Relationship.CARE, Relationship.OWN):
        policy = _with_role(default_policy(), Role.BILLING, rules=(god,), relationship=relationship)
        assert check_invariants(policy, TABLE) == []


def test_one_group_held_back_on_one_type_is_enough() -> None:
    types = patient_types(TABLE)
    almost = (
        Rule(frozenset(types - {"Observation"}), frozenset({Interaction.READ}), ALL),
        Rule(
            frozenset({"Observation"}),
            frozenset({Interaction.READ}),
            ALL - {ElementGroup.FREE_TEXT},
        ),
    )
    policy = _with_role(default_policy(), Role.BILLING, rules=almost)
    assert check_invariants(policy, TABLE) == []


def test_every_type_can_hold_every_group_through_extensions_and_contained() -> None:
    # Why "all PHI" means all six groups on every type, not only the declared ones.
    for name in patient_types(TABLE):
        assert possible_groups(TABLE, name) == ALL


def test_admin_may_see_no_phi_in_the_file() -> None:
    text = replace_once(
        default_text(),
        'types = ["Practitioner", "PractitionerRole", "Organization", "Location", "Medication"]\n'
        'interactions = ["read", "vread", "search", "history", "create", "update", "delete"]',
        'types = ["Practitioner", "Patient", "Organization", "Location", "Medication"]\n'
        'interactions = ["read", "vread", "search", "history", "create", "update", "delete"]',
    )
    text = replace_once(
        text, 'operations = ["configuration", "users"]',
        'operations = ["configuration", "users", "audit-events"]\n'
        'relationship = "care-relationship"',
    )  # fmt: skip
    checked = check_policy_text(text)
    assert checked.policy is not None  # structurally fine: the matrix can still be shown
    issues = [(i.kind, i.path, i.line) for i in checked.issues]
    assert issues == [
        (
            "admin-sees-phi",
            "roles.admin.rules[0].types",
            line_of(text, '"Practitioner", "Patient"'),
        ),
        ("admin-sees-phi", "roles.admin.operations", line_of(text, '"users", "audit-events"')),
    ]
    assert "Patient" in checked.issues[0].message


def test_admin_break_glass_is_refused() -> None:
    policy = _with_role(default_policy(), Role.ADMIN, break_glass=True)
    assert [i.path for i in check_invariants(policy, TABLE)] == ["roles.admin.break_glass"]


def test_a_missing_role_is_a_violation() -> None:
    roles = {r: b for r, b in default_policy().roles.items() if r is not Role.RESEARCHER}
    issues = check_invariants(Policy(MappingProxyType(roles)), TABLE)
    assert [(i.kind, i.path) for i in issues] == [("missing-role", "roles.researcher")]


def test_a_group_nobody_sees_is_reported_per_type() -> None:
    policy = _with_role(default_policy(), Role.PATIENT, rules=())
    issues = check_invariants(policy, TABLE)
    uncovered = {i.message for i in issues if i.kind == "uncovered-element-group"}
    # financial parts of clinical resources were the patient's alone to see
    assert "MedicationRequest: group financial is visible to no role" in uncovered
    assert "Observation: group clinical is visible to no role" not in uncovered


def test_operations_vocabulary_is_closed() -> None:
    text = replace_once(default_text(), '"break-glass-review"]', '"everything"]')
    checked = check_policy_text(text)
    assert [i.path for i in checked.issues] == ["roles.privacy-officer.operations[2]"]
    assert Operation("break-glass-review") is Operation.BREAK_GLASS_REVIEW
