"""The access policy: roles as job functions, written as code (TOML) and checked before use.

Why a file: operators must be able to read, review and replace who may see what, and a
hospital reviewer must be able to sign off on it without reading Python. Why so strict: the
policy is the one place where a mistake silently widens access to PHI, so loading refuses
anything it does not understand (unknown keys, roles, types, groups, interactions, purposes)
and then checks invariants that no operator may switch off (no standing access to all PHI,
admin sees no PHI, every classified element group is reachable by some role, every role is
declared). Every problem is reported with the place in the file (a key path and, where it can
be found, a line), all at once, so a CI run lists them together.

The file format (``default_policy.toml`` beside this module is the shipped default)::

    format = 1

    [roles.clinician]
    description = "..."
    relationship = "care-relationship"   # or own-compartment, tenant
    purposes = ["TREAT", "ETREAT"]       # purposes of use the role may claim
    default_purpose = "TREAT"            # used when the token claims none (optional)
    break_glass = true                   # may use break-glass grants (optional)
    operations = []                      # non-record capabilities (optional)

    [[roles.clinician.rules]]
    types = ["Observation", "Condition"]
    interactions = ["read", "search"]
    groups = ["clinical", "demographics"]
    purposes = ["TREAT"]                 # optional: only under these purposes

See docs/decisions/access-policy.md.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phivault.access.vocabulary import (
    DIRECTORY_TYPES,
    PHI_OPERATIONS,
    READ_INTERACTIONS,
    Interaction,
    Operation,
    PurposeOfUse,
    Relationship,
    patient_types,
)
from phivault.errors import ConfigurationError
from phivault.identity.principal import Role
from phivault.records.classification import (
    MOST_PROTECTIVE,
    Classification,
    ElementGroup,
    default_classification,
)

__all__ = [
    "DEFAULT_POLICY_SOURCE",
    "IssueKind",
    "Policy",
    "PolicyCheck",
    "PolicyInvalid",
    "PolicyIssue",
    "RolePolicy",
    "Rule",
    "check_invariants",
    "check_policy_text",
    "declared_groups",
    "default_policy",
    "default_policy_text",
    "load_policy",
    "possible_groups",
]

DEFAULT_POLICY_SOURCE = "phivault/access/default_policy.toml"


# --- the typed policy ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One grant: these interactions on these types open these groups (under these purposes).

    ``purposes`` empty means "under every purpose the role may claim".
    """

    types: frozenset[str]
    interactions: frozenset[Interaction]
    groups: frozenset[ElementGroup]
    purposes: frozenset[PurposeOfUse] = frozenset()


@dataclass(frozen=True, slots=True)
class RolePolicy:
    """What one job function may do. ``relationship`` is None only for roles without PHI rules."""

    role: Role
    relationship: Relationship | None
    purposes: frozenset[PurposeOfUse]
    default_purpose: PurposeOfUse | None = None
    break_glass: bool = False
    operations: frozenset[Operation] = frozenset()
    rules: tuple[Rule, ...] = ()
    description: str = ""

    def rule_purposes(self, rule: Rule) -> frozenset[PurposeOfUse]:
        """The purposes under which ``rule`` applies."""
        return rule.purposes or self.purposes


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy: one entry per declared role."""

    roles: Mapping[Role, RolePolicy]


# --- problems --------------------------------------------------------------------------------

IssueKind = Literal[
    "toml-syntax",
    "schema",
    "unknown-resource-type",
    "inconsistent-role",
    "missing-role",
    "standing-access-to-all-phi",
    "admin-sees-phi",
    "uncovered-element-group",
]

_ISSUE_TEXT: dict[str, str] = {
    "toml-syntax": "The policy file is not valid TOML.",
    "schema": "A key, value or type in the policy file is not allowed.",
    "unknown-resource-type": "A rule names a resource type phivault does not classify.",
    "inconsistent-role": "A role's settings contradict each other.",
    "missing-role": "Every job function must be declared, even with no access.",
    "standing-access-to-all-phi": "No role may see all PHI without a relationship (invariant 6).",
    "admin-sees-phi": "The admin role may see no PHI at all.",
    "uncovered-element-group": "Every classified element group must be visible to some role.",
}


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem, with its place: ``path`` is a key path (``roles.nurse.rules[1].groups``)."""

    kind: IssueKind
    path: str
    message: str
    line: int | None = None

    @staticmethod
    def describe(kind: IssueKind) -> str:
        """What the rule behind ``kind`` protects (for SARIF rule descriptions)."""
        return _ISSUE_TEXT[kind]

    def __str__(self) -> str:
        where = self.path if self.line is None else f"line {self.line}: {self.path}"
        return f"{where}: {self.message} [{self.kind}]"


class PolicyInvalid(ConfigurationError):
    """The policy cannot be used; ``issues`` lists every problem found (never empty)."""

    def __init__(self, issues: Sequence[PolicyIssue], *, source: str) -> None:
        self.issues = tuple(issues)
        self.source = source
        lines = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"invalid access policy {source}: {len(self.issues)} problem(s)\n{lines}")


@dataclass(frozen=True, slots=True)
class PolicyCheck:
    """The outcome of checking a policy text: the policy if it parsed, and every issue."""

    policy: Policy | None
    issues: tuple[PolicyIssue, ...]

    @property
    def ok(self) -> bool:
        return self.policy is not None and not self.issues


# --- the raw file (pydantic: precise locations for every schema error) ----------------------


class _RawRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    types: list[str] = Field(min_length=1)
    interactions: list[Interaction] = Field(min_length=1)
    groups: list[ElementGroup] = Field(min_length=1)
    purposes: list[PurposeOfUse] = Field(default_factory=list)


class _RawRole(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    relationship: Relationship | None = None
    purposes: list[PurposeOfUse] = Field(min_length=1)
    default_purpose: PurposeOfUse | None = None
    break_glass: bool = False
    operations: list[Operation] = Field(default_factory=list)
    rules: list[_RawRule] = Field(default_factory=list)


class _RawPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1]
    roles: dict[Role, _RawRole]


# --- loading ---------------------------------------------------------------------------------

_TOML_LINE = re.compile(r"at line (\d+)")
# Plain words for the errors a policy author meets most (pydantic's name the models).
_SCHEMA_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "model_type": "must be a table",
    "dict_type": "must be a table",
    "list_type": "must be an array",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "literal_error": "must be 1 (the only format version)",
    "too_short": "must not be empty",
}


def check_policy_text(text: str, *, classification: Classification | None = None) -> PolicyCheck:
    """Parse, validate and check the invariants of a policy text; never raises on bad input.

    Returns the policy whenever it is structurally valid (so a matrix can still be shown next
    to invariant violations), and every issue found, each located in the file.
    """
    table = classification or default_classification()
    try:
        raw_doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_LINE.search(str(exc))
        line = int(found.group(1)) if found else None
        return PolicyCheck(None, (PolicyIssue("toml-syntax", "(file)", str(exc), line),))
    locate = _Locator(text)
    try:
        raw = _RawPolicy.model_validate(raw_doc)
    except ValidationError as exc:
        issues = []
        for error in exc.errors(include_url=False, include_input=False):
            path = _path_text(error["loc"])
            message = _SCHEMA_MESSAGES.get(error["type"], error["msg"])
            issues.append(PolicyIssue("schema", path, message, locate(error["loc"])))
        issues += _unknown_types(raw_doc, table, locate)
        return PolicyCheck(None, tuple(issues))
    issues = _structural_issues(raw, table, locate)
    if any(issue.kind == "unknown-resource-type" for issue in issues):
        return PolicyCheck(None, tuple(issues))
    # Contradictions inside a role do not stop the build: the matrix and the invariants still
    # show a reviewer what the policy would do, and load_policy refuses it all the same.
    policy = _build(raw)
    violations = [
        PolicyIssue(v.kind, v.path, v.message, locate(_path_parts(v.path)))
        for v in check_invariants(policy, table)
    ]
    return PolicyCheck(policy, (*issues, *violations))


def load_policy(
    text: str, *, source: str = "<policy>", classification: Classification | None = None
) -> Policy:
    """Load a policy for use; raises :class:`PolicyInvalid` listing every problem."""
    checked = check_policy_text(text, classification=classification)
    if checked.policy is None or checked.issues:
        raise PolicyInvalid(checked.issues, source=source)
    return checked.policy


def default_policy_text() -> str:
    """The text of the shipped default policy (package data, read on demand)."""
    return (
        importlib.resources.files("phivault.access")
        .joinpath("default_policy.toml")
        .read_text(encoding="utf-8")
    )


@functools.cache
def default_policy() -> Policy:
    """The shipped default policy, loaded and checked once, on first use (never at import)."""
    return load_policy(default_policy_text(), source=DEFAULT_POLICY_SOURCE)


def _unknown_types(
    raw_doc: Mapping[str, object], table: Classification, locate: _Locator
) -> list[PolicyIssue]:
    """Unknown resource types in a file that failed the schema, so one run lists them too."""
    issues: list[PolicyIssue] = []
    roles = raw_doc.get("roles")
    for role, body in roles.items() if isinstance(roles, dict) else ():
        rules = body.get("rules") if isinstance(body, dict) else None
        for index, rule in enumerate(rules if isinstance(rules, list) else ()):
            types = rule.get("types") if isinstance(rule, dict) else None
            for t_index, name in enumerate(types if isinstance(types, list) else ()):
                if isinstance(name, str) and name not in table.resource_types:
                    loc = ("roles", str(role), "rules", index, "types", t_index)
                    issues.append(
                        PolicyIssue(
                            "unknown-resource-type", _path_text(loc), "unknown type", locate(loc)
                        )
                    )
    return issues


def _structural_issues(
    raw: _RawPolicy, table: Classification, locate: _Locator
) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []

    def add(kind: IssueKind, parts: tuple[str | int, ...], message: str) -> None:
        issues.append(PolicyIssue(kind, _path_text(parts), message, locate(parts)))

    phi_types = patient_types(table)
    for role, body in raw.roles.items():
        base: tuple[str | int, ...] = ("roles", role.value)
        purposes = set(body.purposes)
        if body.default_purpose is not None and body.default_purpose not in purposes:
            add("inconsistent-role", (*base, "default_purpose"), "not one of the role's purposes")
        touches_phi = False
        for index, rule in enumerate(body.rules):
            where = (*base, "rules", index)
            for t_index, name in enumerate(rule.types):
                if name not in table.resource_types:
                    add("unknown-resource-type", (*where, "types", t_index), "unknown type")
                touches_phi = touches_phi or name in phi_types
            for p_index, purpose in enumerate(rule.purposes):
                if purpose not in purposes:
                    add(
                        "inconsistent-role",
                        (*where, "purposes", p_index),
                        "not one of the role's purposes",
                    )
        if touches_phi and body.relationship is None:
            add(
                "inconsistent-role",
                (*base, "relationship"),
                "a role with rules on patient resource types must state its relationship",
            )
        if body.break_glass:
            if body.relationship is not Relationship.CARE:
                add(
                    "inconsistent-role",
                    (*base, "break_glass"),
                    "break-glass widens a care relationship; the role must require one",
                )
            if PurposeOfUse.ETREAT not in purposes:
                add(
                    "inconsistent-role",
                    (*base, "break_glass"),
                    "break-glass access is emergency treatment; the role must allow ETREAT",
                )
    return issues


def _build(raw: _RawPolicy) -> Policy:
    roles: dict[Role, RolePolicy] = {}
    for role, body in raw.roles.items():
        roles[role] = RolePolicy(
            role=role,
            relationship=body.relationship,
            purposes=frozenset(body.purposes),
            default_purpose=body.default_purpose,
            break_glass=body.break_glass,
            operations=frozenset(body.operations),
            rules=tuple(
                Rule(
                    types=frozenset(rule.types),
                    interactions=frozenset(rule.interactions),
                    groups=frozenset(rule.groups),
                    purposes=frozenset(rule.purposes),
                )
                for rule in body.rules
            ),
            description=body.description,
        )
    return Policy(MappingProxyType(roles))


# --- invariants ------------------------------------------------------------------------------


def declared_groups(table: Classification, resource_type: str) -> frozenset[ElementGroup]:
    """The groups the classification assigns to some element of ``resource_type``."""
    tc = table.for_type(resource_type)
    nested = {rule.group for rules in tc.nested.values() for rule in rules}
    return frozenset(tc.elements.values()) | frozenset(tc.choices.values()) | nested


def possible_groups(table: Classification, resource_type: str) -> frozenset[ElementGroup]:
    """Every group an instance of the type can hold: declared ones, plus whatever top-level
    extensions and contained resources bring (unknown ones fall into the most protective)."""
    return (
        declared_groups(table, resource_type)
        | frozenset(table.extensions.values())
        | frozenset(table.contained.values())
        | {MOST_PROTECTIVE}
    )


def _seen(role: RolePolicy, resource_type: str) -> frozenset[ElementGroup]:
    """Groups of ``resource_type`` some read interaction opens for ``role`` (any purpose)."""
    found: set[ElementGroup] = set()
    for rule in role.rules:
        if resource_type in rule.types and not rule.interactions.isdisjoint(READ_INTERACTIONS):
            found |= rule.groups
    return frozenset(found)


def check_invariants(policy: Policy, table: Classification) -> list[PolicyIssue]:
    """The invariants no policy may break; an empty list means the policy may be used.

    - every job function is declared (an undeclared role would be a silent deny-all);
    - no role sees, without a relationship to the patient, every group of every patient
      resource type (no standing god-mode, DESIGN.md invariant 6);
    - admin has no rule on a patient resource type, no break-glass, no PHI operation;
    - every element group of every classified type is visible to some role (completeness:
      a type added to the classification but forgotten by the policy shows up here).
    """
    issues: list[PolicyIssue] = []
    phi_types = sorted(patient_types(table))
    for role in Role:
        if role not in policy.roles:
            issues.append(PolicyIssue("missing-role", f"roles.{role.value}", "not declared"))
    for role, body in policy.roles.items():
        if body.relationship is Relationship.TENANT and all(
            _seen(body, name) >= possible_groups(table, name) for name in phi_types
        ):
            issues.append(
                PolicyIssue(
                    "standing-access-to-all-phi",
                    f"roles.{role.value}",
                    "sees every element group of every patient resource type of every patient",
                )
            )
    admin = policy.roles.get(Role.ADMIN)
    if admin is not None:
        base = f"roles.{Role.ADMIN.value}"
        for index, rule in enumerate(admin.rules):
            phi = sorted(rule.types - DIRECTORY_TYPES)
            if phi:
                issues.append(
                    PolicyIssue(
                        "admin-sees-phi",
                        f"{base}.rules[{index}].types",
                        "patient resource types for admin: " + ", ".join(phi),
                    )
                )
        if admin.break_glass:
            issues.append(PolicyIssue("admin-sees-phi", f"{base}.break_glass", "must be false"))
        for operation in sorted(admin.operations & PHI_OPERATIONS):
            issues.append(
                PolicyIssue(
                    "admin-sees-phi", f"{base}.operations", f"{operation.value} discloses PHI"
                )
            )
    for name in sorted(table.resource_types):
        seen: set[ElementGroup] = set()
        for body in policy.roles.values():
            seen |= _seen(body, name)
        for group in sorted(declared_groups(table, name) - seen):
            issues.append(
                PolicyIssue(
                    "uncovered-element-group",
                    "roles",
                    f"{name}: group {group.value} is visible to no role",
                )
            )
    return issues


# --- places in the file ----------------------------------------------------------------------


def _path_text(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself" (an unknown role)
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += part if not text else f".{part}"
    return text or "(file)"


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _path_parts(path: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    for match in _PATH_PART.finditer(path):
        parts.append(match.group(1) if match.group(1) is not None else int(match.group(2)))
    return tuple(parts)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in text.split("."))


class _Locator:
    """Finds the line of a key path in a TOML text: tables, arrays of tables and keys.

    Good enough for policy files (it does not follow multi-line values or inline tables, where
    it answers with the line of the enclosing key): the answer points a reviewer at the place.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str | int, ...], int] = {}
        counts: dict[tuple[str, ...], int] = {}
        current: tuple[str | int, ...] = ()
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                keys = _split_key(header.group(2))
                if header.group(1) == "[[":
                    index = counts.get(keys, 0)
                    counts[keys] = index + 1
                    current = (*keys, index)
                    self._lines.setdefault(keys, number)
                else:
                    current = keys
                self._lines.setdefault(current, number)
                continue
            key = _KEY.match(line)
            if key and not line.lstrip().startswith("#"):
                self._lines.setdefault((*current, *_split_key(key.group(1))), number)

    def __call__(self, loc: Sequence[str | int]) -> int | None:
        parts = tuple(loc)
        while parts:
            found = self._lines.get(parts)
            if found is not None:
                return found
            parts = parts[:-1]
        return None
