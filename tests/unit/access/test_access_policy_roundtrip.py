"""For random valid policies written as TOML, the loader gives back exactly that policy."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.access.policy import Policy, RolePolicy, Rule, check_policy_text
from phivault.access.vocabulary import Interaction, Operation, PurposeOfUse, Relationship
from phivault.identity.principal import Role
from phivault.records.classification import ElementGroup, default_classification

TYPES = sorted(default_classification().resource_types)


def toml_list(values: object) -> str:
    return json.dumps(sorted(str(v) for v in values))


def to_toml(policy: Policy) -> str:
    """A writer of its own, as an operator would write the file by hand."""
    lines = ["format = 1"]
    for role, body in policy.roles.items():
        lines += [
            "",
            f"[roles.{role.value}]",
            f"description = {json.dumps(body.description, ensure_ascii=False)}",
        ]
        if body.relationship is not None:
            lines.append(f'relationship = "{body.relationship.value}"')
        lines.append(f"purposes = {toml_list(body.purposes)}")
        if body.default_purpose is not None:
            lines.append(f'default_purpose = "{body.default_purpose.value}"')
        lines.append(f"break_glass = {str(body.break_glass).lower()}")
        lines.append(f"operations = {toml_list(body.operations)}")
        for rule in body.rules:
            lines += [
                "",
                f"[[roles.{role.value}.rules]]",
                f"types = {toml_list(rule.types)}",
                f"interactions = {toml_list(rule.interactions)}",
                f"groups = {toml_list(rule.groups)}",
            ]
            if rule.purposes:
                lines.append(f"purposes = {toml_list(rule.purposes)}")
    return "\n".join(lines) + "\n"


def subset(items: list, min_size: int = 0) -> st.SearchStrategy:  # type: ignore[type-arg]
    return st.frozensets(st.sampled_from(items), min_size=min_size)


@st.composite
def valid_policies(draw: st.DrawFn) -> Policy:
    roles = {}
    for role in draw(subset(list(Role), 1)):
        purposes = draw(subset(list(PurposeOfUse), 1))
        rules = tuple(
            Rule(
                draw(subset(TYPES, 1)),
                draw(subset(list(Interaction), 1)),
                draw(subset(list(ElementGroup), 1)),
                draw(subset(sorted(purposes))),
            )
            for _ in range(draw(st.integers(0, 3)))
        )
        relationship = draw(st.sampled_from(list(Relationship)))
        roles[role] = RolePolicy(
            role=role,
            relationship=relationship,
            purposes=purposes,
            default_purpose=draw(st.none() | st.sampled_from(sorted(purposes))),
            break_glass=relationship is Relationship.CARE and PurposeOfUse.ETREAT in purposes,
            operations=draw(subset(list(Operation))),
            rules=rules,
            description=draw(st.text(st.characters(categories=("L", "N", "P", "Zs")), max_size=20)),
        )
    return Policy(roles)


@settings(max_examples=100, deadline=None)
@given(policy=valid_policies())
def test_written_policies_load_back_unchanged(policy: Policy) -> None:
    checked = check_policy_text(to_toml(policy))
    assert checked.policy is not None, checked.issues
    assert dict(checked.policy.roles) == dict(policy.roles)
    # structural problems never arise from a valid policy; only invariants may be reported
    structural = {"toml-syntax", "schema", "unknown-resource-type", "inconsistent-role"}
    assert not [i for i in checked.issues if i.kind in structural]
