"""Loading the access policy: the shipped default is valid; bad files are named precisely."""

from __future__ import annotations

import pytest
from access_support import default_text, line_of, replace_once

from phivault.access.policy import (
    Policy,
    PolicyInvalid,
    check_policy_text,
    default_policy,
    load_policy,
)
from phivault.access.vocabulary import (
    DIRECTORY_TYPES,
    Interaction,
    Operation,
    PurposeOfUse,
    Relationship,
    patient_types,
)
from phivault.errors import ConfigurationError
from phivault.identity.principal import Role
from phivault.records.classification import ElementGroup, default_classification
from phivault.records.search_params import search_params


def _sees(policy: Policy, role: Role, resource_type: str) -> set[ElementGroup]:
    found: set[ElementGroup] = set()
    for rule in policy.roles[role].rules:
        if resource_type in rule.types and Interaction.READ in rule.interactions:
            found |= rule.groups
    return found


def test_the_shipped_default_loads_and_declares_every_role() -> None:
    checked = check_policy_text(default_text())
    assert checked.ok, checked.issues
    policy = default_policy()
    assert set(policy.roles) == set(Role)


def test_directory_types_are_exactly_those_of_no_patient() -> None:
    table = default_classification()
    assert table.resource_types >= DIRECTORY_TYPES
    for name in table.resource_types:
        try:
            params = search_params(name)
        except Exception:  # types without search parameters yet (Coverage)
            continue
        has_patient = name == "Patient" or "patient" in params
        assert has_patient == (name in patient_types(table)), name


def test_defaults_a_reviewer_would_accept() -> None:
    policy = default_policy()
    clinician = policy.roles[Role.CLINICIAN]
    assert clinician.relationship is Relationship.CARE and clinician.break_glass
    assert ElementGroup.FREE_TEXT in _sees(policy, Role.CLINICIAN, "Observation")
    assert policy.roles[Role.NURSE].relationship is Relationship.CARE
    assert policy.roles[Role.PATIENT].relationship is Relationship.OWN
    # front desk and billing: no clinical content, no notes, no Observation values
    for role in (Role.FRONT_DESK, Role.BILLING):
        for name in default_classification().resource_types:
            seen = _sees(policy, role, name)
            assert ElementGroup.CLINICAL not in seen, (role, name)
            assert ElementGroup.FREE_TEXT not in seen, (role, name)
        assert not _sees(policy, role, "Observation")
    assert ElementGroup.FINANCIAL in _sees(policy, Role.BILLING, "Claim")
    # researcher, privacy officer: no records at all
    assert policy.roles[Role.RESEARCHER].rules == ()
    assert policy.roles[Role.PRIVACY_OFFICER].rules == ()
    assert Operation.ACCESS_REPORTS in policy.roles[Role.PRIVACY_OFFICER].operations
    # admin: the directory only
    for rule in policy.roles[Role.ADMIN].rules:
        assert rule.types <= DIRECTORY_TYPES
    # service: nothing without a declared purpose; every rule names its purpose
    service = policy.roles[Role.SERVICE]
    assert service.default_purpose is None
    assert all(rule.purposes for rule in service.rules)
    # nobody deletes PHI
    phi = patient_types(default_classification())
    for body in policy.roles.values():
        for rule in body.rules:
            if Interaction.DELETE in rule.interactions:
                assert not rule.types & phi


def test_load_policy_raises_a_configuration_error_listing_every_problem() -> None:
    text = replace_once(
        default_text(),
        'relationship = "tenant"\npurposes = ["PATADM"]',
        ('relationship = "tenant"\npurposes = ["PATADM"]\ncolour = "blue"'),
    )
    text = replace_once(text, 'purposes = ["HRESCH"]', 'purposes = ["HRESEARCH"]')
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(text, source="hospital.toml")
    assert isinstance(caught.value, ConfigurationError)
    paths = {issue.path for issue in caught.value.issues}
    assert paths == {"roles.front-desk.colour", "roles.researcher.purposes[0]"}
    lines = {issue.line for issue in caught.value.issues}
    assert lines == {line_of(text, "colour"), line_of(text, "HRESEARCH")}
    assert "hospital.toml" in str(caught.value)


def test_malformed_toml_names_the_line() -> None:
    text = default_text() + "\n[roles.clinician\n"
    checked = check_policy_text(text)
    assert checked.policy is None
    (issue,) = checked.issues
    assert issue.kind == "toml-syntax"
    assert issue.line == len(text.splitlines())


@pytest.mark.parametrize(
    ("old", "new", "path", "kind"),
    [
        ('interactions = ["read", "search"]\ngroups = ["clinical", "administrative"]',
         'interactions = ["read", "serch"]\ngroups = ["clinical", "administrative"]',
         "roles.service.rules[1].interactions[1]", "schema"),
        ('types = ["Immunization"]', 'types = ["Vaccination"]',
         "roles.service.rules[1].types[0]", "unknown-resource-type"),
        ('groups = ["clinical", "administrative"]', 'groups = ["clinical", "secret"]',
         "roles.service.rules[1].groups[1]", "schema"),
        ("[roles.researcher]", "[roles.astrologer]", "roles.astrologer", "schema"),
        ("format = 1", "format = 2", "format", "schema"),
        ('default_purpose = "HRESCH"', 'default_purpose = "TREAT"',
         "roles.researcher.default_purpose", "inconsistent-role"),
        ('types = ["Immunization"]\ninteractions = ["read", "search"]\n'
         'groups = ["clinical", "administrative"]\npurposes = ["PUBHLTH"]',
         'types = ["Immunization"]\ninteractions = ["read", "search"]\n'
         'groups = ["clinical", "administrative"]\npurposes = ["TREAT"]',
         "roles.service.rules[1].purposes[0]", "inconsistent-role"),
        ('purposes = ["TREAT", "ETREAT", "CAREMGT"]', 'purposes = ["TREAT", "CAREMGT"]',
         "roles.clinician.break_glass", "inconsistent-role"),
        ('relationship = "tenant"\npurposes = ["PUBHLTH", "HPAYMT", "HOPERAT"]',
         'purposes = ["PUBHLTH", "HPAYMT", "HOPERAT"]', "roles.service.relationship",
         "inconsistent-role"),
    ],
)  # fmt: skip
def test_each_kind_of_mistake_is_named_by_its_place(
    old: str, new: str, path: str, kind: str
) -> None:
    text = replace_once(default_text(), old, new)
    checked = check_policy_text(text)
    assert not checked.ok
    found = [(i.path, i.kind) for i in checked.issues]
    assert (path, kind) in found, found
    issue = next(i for i in checked.issues if i.path == path)
    assert issue.line is not None
    line = text.splitlines()[issue.line - 1]
    key = path.rsplit(".", maxsplit=1)[-1].split("[", maxsplit=1)[0]
    # the key's own line, or the role's table when the key is missing
    assert key in line or line.startswith("[roles."), (issue, line)
    if ".rules[1]." in path:
        second_rule = [
            n for n, t in enumerate(text.splitlines(), 1) if t.startswith("[[roles.service")
        ]
        assert second_rule[1] < issue.line < second_rule[2]


def test_a_role_declared_twice_is_a_toml_error() -> None:
    text = default_text() + '\n[roles.admin]\npurposes = ["HSYSADMIN"]\n'
    checked = check_policy_text(text)
    assert [i.kind for i in checked.issues] == ["toml-syntax"]


def test_values_of_the_vocabulary_round_trip() -> None:
    assert Interaction("vread") is Interaction.VREAD
    assert PurposeOfUse("ETREAT") is PurposeOfUse.ETREAT


def test_unknown_types_are_listed_beside_schema_errors() -> None:
    text = replace_once(default_text(), 'types = ["Immunization"]', 'types = ["Vaccination"]')
    text = replace_once(text, 'purposes = ["HRESCH"]', 'purposes = ["HRESCH"]\nsee_all = true')
    checked = check_policy_text(text)
    assert checked.policy is None
    assert sorted((i.kind, i.path) for i in checked.issues) == [
        ("schema", "roles.researcher.see_all"),
        ("unknown-resource-type", "roles.service.rules[1].types[0]"),
    ]
    assert all(i.line is not None for i in checked.issues)
