"""The access matrix (role × resource type × interaction × element group) and its renderings.

Why: a hospital reviewer signs off on *what each job function can see*, not on rules; the
matrix expands the policy into exactly that, as Markdown for people and JSON for tools, and
policy problems become SARIF 2.1.0 results so that CI systems show them on the line of the
file where they are. Everything here is a pure function of a validated policy.
"""

from __future__ import annotations

from typing import Any

from phivault.access.policy import Policy, PolicyIssue, RolePolicy
from phivault.access.vocabulary import DIRECTORY_TYPES, Interaction
from phivault.identity.principal import Role
from phivault.records.classification import Classification, ElementGroup

__all__ = [
    "GROUP_ABBREVIATIONS",
    "access_matrix",
    "issue_json",
    "matrix_markdown",
    "sarif_report",
]

GROUP_ABBREVIATIONS: dict[ElementGroup, str] = {
    ElementGroup.DIRECT_IDENTIFIERS: "ID",
    ElementGroup.DEMOGRAPHICS: "DM",
    ElementGroup.CLINICAL: "CL",
    ElementGroup.FREE_TEXT: "FT",
    ElementGroup.FINANCIAL: "FI",
    ElementGroup.ADMINISTRATIVE: "AD",
}

_TOOL = "phivault policy check"
_SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def _cells(body: RolePolicy) -> dict[str, dict[Interaction, dict[ElementGroup, set[str]]]]:
    """type -> interaction -> group -> the purposes under which it is visible."""
    cells: dict[str, dict[Interaction, dict[ElementGroup, set[str]]]] = {}
    for rule in body.rules:
        purposes = {p.value for p in body.rule_purposes(rule)}
        for name in rule.types:
            for interaction in rule.interactions:
                slot = cells.setdefault(name, {}).setdefault(interaction, {})
                for group in rule.groups:
                    slot.setdefault(group, set()).update(purposes)
    return cells


def _roles(policy: Policy) -> list[tuple[Role, RolePolicy]]:
    return [(role, policy.roles[role]) for role in Role if role in policy.roles]


def access_matrix(policy: Policy, table: Classification) -> dict[str, Any]:
    """The matrix as JSON-ready data; only types and interactions with some access appear.

    ``roles.<role>.access.<type>.<interaction>.<group>`` lists the purposes of use under which
    that group is visible (all of the role's purposes unless a rule is limited to some).
    """
    roles: dict[str, Any] = {}
    for role, body in _roles(policy):
        cells = _cells(body)
        access: dict[str, Any] = {}
        for name in sorted(cells):
            access[name] = {
                interaction.value: {
                    group.value: sorted(cells[name][interaction][group])
                    for group in ElementGroup
                    if group in cells[name][interaction]
                }
                for interaction in Interaction
                if interaction in cells[name]
            }
        roles[role.value] = {
            "description": body.description,
            "relationship": None if body.relationship is None else body.relationship.value,
            "purposes": sorted(p.value for p in body.purposes),
            "default_purpose": None if body.default_purpose is None else body.default_purpose.value,
            "break_glass": body.break_glass,
            "operations": sorted(o.value for o in body.operations),
            "access": access,
        }
    return {
        "resource_types": sorted(table.resource_types),
        "directory_types": sorted(DIRECTORY_TYPES & table.resource_types),
        "interactions": [i.value for i in Interaction],
        "groups": [g.value for g in ElementGroup],
        "roles": roles,
    }


def matrix_markdown(policy: Policy, table: Classification, *, source: str) -> str:
    """The matrix as Markdown: one table per role, types down, interactions across."""
    legend = ", ".join(f"`{abbr}` {group.value}" for group, abbr in GROUP_ABBREVIATIONS.items())
    lines = [
        f"# Access matrix: {source}",
        "",
        f"Element groups: {legend}.",
        "Purposes in parentheses (for the cell) or brackets (for one group) limit access to",
        "those purposes of use; otherwise every purpose of the role applies. Types and",
        "interactions not listed are refused.",
        "Directory types (no patient, not PHI): "
        + ", ".join(sorted(DIRECTORY_TYPES & table.resource_types))
        + ".",
        "",
    ]
    header = "| type | " + " | ".join(i.value for i in Interaction) + " |"
    rule = "|---" * (len(Interaction) + 1) + "|"
    for role, body in _roles(policy):
        cells = _cells(body)
        lines.append(f"## {role.value}")
        lines.append("")
        if body.description:
            lines.append(body.description + ".")
            lines.append("")
        relationship = "none needed" if body.relationship is None else body.relationship.value
        purposes = ", ".join(sorted(p.value for p in body.purposes))
        default = "none" if body.default_purpose is None else body.default_purpose.value
        operations = ", ".join(sorted(o.value for o in body.operations)) or "none"
        lines += [
            f"- relationship to the patient: {relationship}",
            f"- purposes of use: {purposes} (default: {default})",
            f"- break-glass: {'yes' if body.break_glass else 'no'}",
            f"- operations: {operations}",
            "",
        ]
        if not cells:
            lines += ["No access to any record.", ""]
            continue
        lines += [header, rule]
        all_purposes = {p.value for p in body.purposes}
        for name in sorted(cells):
            row = [name]
            for interaction in Interaction:
                groups = cells[name].get(interaction, {})
                row.append(_cell(groups, all_purposes))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(groups: dict[ElementGroup, set[str]], all_purposes: set[str]) -> str:
    """``ID DM CL``, with the purposes in parentheses when the cell is limited to some of the
    role's purposes, and per group in brackets when groups differ in their purposes."""
    if not groups:
        return "-"
    ordered = [g for g in GROUP_ABBREVIATIONS if g in groups]
    shared = {frozenset(groups[g]) for g in ordered}
    if len(shared) == 1:
        (purposes,) = shared
        text = " ".join(GROUP_ABBREVIATIONS[g] for g in ordered)
        return text if purposes == all_purposes else f"{text} ({', '.join(sorted(purposes))})"
    return " ".join(
        GROUP_ABBREVIATIONS[g]
        if groups[g] == all_purposes
        else f"{GROUP_ABBREVIATIONS[g]}[{','.join(sorted(groups[g]))}]"
        for g in ordered
    )


def issue_json(issue: PolicyIssue) -> dict[str, Any]:
    return {"kind": issue.kind, "path": issue.path, "line": issue.line, "message": issue.message}


def sarif_report(
    issues: tuple[PolicyIssue, ...] | list[PolicyIssue], *, uri: str
) -> dict[str, Any]:
    """SARIF 2.1.0: one result per issue, rule ids from the issue kinds, a line when known."""
    kinds = sorted({issue.kind for issue in issues})
    rules = [
        {
            "id": kind,
            "name": "".join(part.capitalize() for part in kind.split("-")),
            "shortDescription": {"text": PolicyIssue.describe(kind)},
            "defaultConfiguration": {"level": "error"},
        }
        for kind in kinds
    ]
    results = []
    for issue in issues:
        physical: dict[str, Any] = {"artifactLocation": {"uri": uri}}
        if issue.line is not None:
            physical["region"] = {"startLine": issue.line}
        results.append(
            {
                "ruleId": issue.kind,
                "ruleIndex": kinds.index(issue.kind),
                "level": "error",
                "message": {"text": f"{issue.path}: {issue.message}"},
                "locations": [
                    {
                        "physicalLocation": physical,
                        "logicalLocations": [{"fullyQualifiedName": issue.path}],
                    }
                ],
            }
        )
    return {
        "$schema": _SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {"driver": {"name": _TOOL, "rules": rules}},
                "results": results,
            }
        ],
    }
