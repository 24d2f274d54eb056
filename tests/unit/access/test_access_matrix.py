"""The access matrix and the SARIF report, from policies small enough to read."""

from __future__ import annotations

from types import MappingProxyType

from phivault.access.matrix import access_matrix, matrix_markdown, sarif_report
from phivault.access.policy import (
    Policy,
    PolicyIssue,
    RolePolicy,
    Rule,
    check_policy_text,
    default_policy,
)
from phivault.access.vocabulary import Interaction, PurposeOfUse, Relationship
from phivault.identity.principal import Role
from phivault.records.classification import ElementGroup as G
from phivault.records.classification import default_classification

TABLE = default_classification()
P = PurposeOfUse


def small_policy() -> Policy:
    billing = RolePolicy(
        role=Role.BILLING,
        relationship=Relationship.TENANT,
        purposes=frozenset({P.HPAYMT, P.COVERAGE}),
        rules=(
            Rule(frozenset({"Claim"}), frozenset({Interaction.READ}), frozenset({G.FINANCIAL})),
            Rule(
                frozenset({"Claim"}),
                frozenset({Interaction.READ, Interaction.CREATE}),
                frozenset({G.DIRECT_IDENTIFIERS}),
                frozenset({P.HPAYMT}),
            ),
        ),
        description="Billing",
    )
    admin = RolePolicy(role=Role.ADMIN, relationship=None, purposes=frozenset({P.HSYSADMIN}))
    return Policy(MappingProxyType({Role.ADMIN: admin, Role.BILLING: billing}))


def test_markdown_cells_show_groups_and_purpose_limits() -> None:
    text = matrix_markdown(small_policy(), TABLE, source="small.toml")
    assert text.startswith("# Access matrix: small.toml")
    # roles in job-function order, whatever the file's order
    assert text.index("## billing") < text.index("## admin")
    row = next(line for line in text.splitlines() if line.startswith("| Claim |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "ID[HPAYMT] FI"  # read: groups differ in their purposes
    assert cells[5] == "ID (HPAYMT)"  # create: the whole cell is limited
    assert cells[2] == "-"
    assert "No access to any record." in text.split("## admin")[1]


def test_json_matrix_lists_purposes_per_group() -> None:
    matrix = access_matrix(small_policy(), TABLE)
    claim = matrix["roles"]["billing"]["access"]["Claim"]
    assert claim == {
        "read": {"direct-identifiers": ["HPAYMT"], "financial": ["COVERAGE", "HPAYMT"]},
        "create": {"direct-identifiers": ["HPAYMT"]},
    }
    assert matrix["roles"]["admin"]["access"] == {}
    assert matrix["groups"] == [g.value for g in G]


def test_the_default_matrix_has_every_role() -> None:
    matrix = access_matrix(default_policy(), TABLE)
    assert list(matrix["roles"]) == [r.value for r in Role]


def test_sarif_without_a_line_has_no_region() -> None:
    issues = [
        PolicyIssue("missing-role", "roles.nurse", "not declared"),
        PolicyIssue("schema", "roles.admin.colour", "unknown key", 12),
    ]
    report = sarif_report(issues, uri="p.toml")
    first, second = report["runs"][0]["results"]
    assert "region" not in first["locations"][0]["physicalLocation"]
    assert second["locations"][0]["physicalLocation"]["region"] == {"startLine": 12}
    assert [r["id"] for r in report["runs"][0]["tool"]["driver"]["rules"]] == [
        "missing-role",
        "schema",
    ]


def test_schema_messages_are_plain_words() -> None:
    checked = check_policy_text("format = 1\nroles = 5\n[x]\n")
    messages = {i.path: i.message for i in checked.issues}
    assert messages == {"roles": "must be a table", "x": "unknown key"}
    empty = check_policy_text("")
    assert {i.message for i in empty.issues} == {"required key is missing"}
    array_role = check_policy_text('format = 1\n[[roles.nurse]]\npurposes = ["TREAT"]\n')
    (issue,) = array_role.issues
    assert (issue.path, issue.message, issue.line) == ("roles.nurse", "must be a table", 2)
