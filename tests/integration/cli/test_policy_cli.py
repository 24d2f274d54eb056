"""`phivault policy check`, run as a user runs it, on good and bad policy files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import phivault

from phivault.access.policy import default_policy_text

pytestmark = pytest.mark.integration

ADMIN_RULE_TYPES = (
    'types = ["Practitioner", "PractitionerRole", "Organization", "Location", "Medication"]\n'
    'interactions = ["read", "vread", "search", "history", "create", "update", "delete"]'
)


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.fixture
def broken(tmp_path: Path) -> tuple[Path, str]:
    """Admin reads patients; billing reads everything of everyone: two invariants broken."""
    text = default_policy_text()
    text = text.replace(ADMIN_RULE_TYPES, ADMIN_RULE_TYPES.replace('"Location"', '"Patient"'))
    text = text.replace(
        'types = ["Claim", "ExplanationOfBenefit", "Coverage"]\n'
        'interactions = ["read", "vread", "search", "history", "create", "update"]\n'
        'groups = ["direct-identifiers", "financial", "administrative"]',
        'types = ["Claim", "ExplanationOfBenefit", "Coverage"]\n'
        'interactions = ["read", "vread", "search", "history", "create", "update"]\n'
        'groups = ["direct-identifiers", "financial", "administrative"]\n\n'
        "[[roles.billing.rules]]\n"
        "types = [" + ", ".join(f'"{t}"' for t in _patient_types()) + "]\n"
        'interactions = ["search"]\n'
        'groups = ["direct-identifiers", "demographics", "clinical",'
        ' "free-text-and-attachments", "financial", "administrative"]',
    )
    return write(tmp_path, text), text


def _patient_types() -> list[str]:
    from phivault.access.vocabulary import patient_types
    from phivault.records.classification import default_classification

    return sorted(patient_types(default_classification()))


def test_the_default_policy_is_valid_and_its_matrix_is_markdown() -> None:
    result = phivault("policy", "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Access matrix: phivault/access/default_policy.toml")
    for role in ("clinician", "front-desk", "privacy-officer", "admin", "service"):
        assert f"## {role}\n" in result.stdout
    assert "| Observation | ID DM CL FT AD |" in result.stdout
    assert "valid" in result.stderr


def test_json_matrix_for_tools(tmp_path: Path) -> None:
    path = write(tmp_path, default_policy_text())
    for args in (("--format", "json"), ("--json",)):
        result = phivault("policy", "check", str(path), *args)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["ok"] is True and report["issues"] == []
        roles = report["matrix"]["roles"]
        assert len(roles) == 9
        assert set(roles["admin"]["access"]) <= set(report["matrix"]["directory_types"])
        assert roles["billing"]["access"]["Claim"]["read"]["financial"] == ["COVERAGE", "HPAYMT"]
        assert "Observation" not in roles["billing"]["access"]
        assert roles["researcher"]["access"] == {}


def test_a_policy_breaking_invariants_exits_1_listing_each_violation_with_its_place(
    broken: tuple[Path, str],
) -> None:
    path, text = broken
    result = phivault("policy", "check", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    admin_line = line_of(text, '"Patient", "Medication"]')
    assert f"{path.as_posix()}:{admin_line}: roles.admin.rules[0].types:" in result.stderr
    assert "[standing-access-to-all-phi]" in result.stderr
    assert "roles.billing:" in result.stderr
    assert "the policy is refused" in result.stderr
    assert "## billing" in result.stdout  # the matrix still shows what the policy would do

    as_json = json.loads(phivault("policy", "check", str(path), "--json").stdout)
    assert as_json["ok"] is False
    kinds = sorted(issue["kind"] for issue in as_json["issues"])
    # admin also lacks a relationship for its (forbidden) patient rule
    assert kinds == ["admin-sees-phi", "inconsistent-role", "standing-access-to-all-phi"]
    lines = {i["kind"]: i["line"] for i in as_json["issues"]}
    assert lines["admin-sees-phi"] == admin_line
    assert lines["standing-access-to-all-phi"] == line_of(text, "[roles.billing]")
    assert lines["inconsistent-role"] == line_of(text, "[roles.admin]")


def test_sarif_has_one_result_per_violation(broken: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = broken
    result = phivault("policy", "check", str(path), "--format", "sarif")
    assert result.returncode == 1
    sarif = json.loads(result.stdout)
    assert sarif["version"] == "2.1.0"
    (run,) = sarif["runs"]
    rules = [rule["id"] for rule in run["tool"]["driver"]["rules"]]
    assert rules == ["admin-sees-phi", "inconsistent-role", "standing-access-to-all-phi"]
    assert len(run["results"]) == 3
    for found in run["results"]:
        assert found["ruleId"] == rules[found["ruleIndex"]]
        location = found["locations"][0]["physicalLocation"]
        assert location["artifactLocation"]["uri"] == path.as_posix()
        assert location["region"]["startLine"] >= 1
    good = write(tmp_path, default_policy_text(), "good.toml")
    clean = phivault("policy", "check", str(good), "--format", "sarif")
    assert clean.returncode == 0
    assert json.loads(clean.stdout)["runs"][0]["results"] == []


def test_malformed_toml_and_unknown_keys_get_a_clear_message(tmp_path: Path) -> None:
    bad_toml = write(tmp_path, default_policy_text() + "\n[roles.nurse\n", "bad.toml")
    result = phivault("policy", "check", str(bad_toml))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"bad.toml:{len(default_policy_text().splitlines()) + 2}:" in result.stderr
    assert "[toml-syntax]" in result.stderr
    assert result.stdout == ""

    text = default_policy_text().replace(
        'purposes = ["HCOMPL"]', 'purposes = ["HCOMPL"]\nsee_all = true'
    )
    unknown = write(tmp_path, text, "unknown.toml")
    as_json = json.loads(phivault("policy", "check", str(unknown), "--json").stdout)
    assert as_json["ok"] is False and as_json["matrix"] is None
    (issue,) = as_json["issues"]
    assert issue["path"] == "roles.privacy-officer.see_all"
    assert issue["line"] == line_of(text, "see_all")


def test_files_that_cannot_be_read(tmp_path: Path) -> None:
    missing = phivault("policy", "check", str(tmp_path / "nowhere.toml"))
    assert missing.returncode == 1
    assert "no such file" in missing.stderr and "Traceback" not in missing.stderr
    directory = phivault("policy", "check", str(tmp_path), "--json")
    assert directory.returncode == 1
    assert json.loads(directory.stdout)["error"] == "unreadable"
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00format = 1")
    result = phivault("policy", "check", str(binary))
    assert result.returncode == 1 and "not UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_format_is_a_usage_error() -> None:
    result = phivault("policy", "check", "--format", "xml")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
