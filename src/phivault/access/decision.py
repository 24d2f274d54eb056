"""Access decisions: policy ∩ the token's SMART scopes ∩ purpose of use, per patient.

Why pure: a decision is a function of the compiled policy, the caller's access context, the
resource type, the interaction, the facts tying the caller to the patient, and ``now`` (the
server's clock, for break-glass expiry). No I/O, no clock read, so the records repository can
call it inside a query and the property tests can compare it with a reference model.

Why compiled: the policy is turned once into per-role tables ``(type, interaction) ->
{purpose: group bitmask}``, so a decision is a few dictionary look-ups (well under 20 µs;
``bench/policy_bench.py`` measures it).

How a decision is made, for each role the caller holds (the results are united):

1. the role's rules must allow the interaction on the type (else ``role-not-permitted``);
2. the relationship the role requires must hold for the resource's patient (directory
   resources have none); if it does not, an active break-glass grant of this caller for this
   patient stands in for a care relationship, under purpose ETREAT (else ``no-relationship``,
   or ``break-glass-expired`` when the only grant has expired or was revoked);
3. the purposes of use the token claims, intersected with the role's, select the rules that
   apply; with no claim, the role's default purpose (else ``purpose-not-permitted``).

Tenant isolation is checked first and always. Finally the token's SMART scopes must grant the
interaction's permission on the type (else ``scope-not-granted``): scopes narrow, never widen.
Scopes with a fine-grained ``?query`` grant nothing yet (fail closed until the query layer can
enforce them), and ``patient/`` scopes hold only inside the launch patient's compartment.

:func:`search_scope` describes the same answer for a whole type at once (which rows a search
may return) for the SQL layer; :func:`allows_operation` answers for non-record capabilities.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from phivault.access.policy import Policy
from phivault.access.vocabulary import (
    INTERACTION_PERMISSION,
    Interaction,
    Operation,
    PurposeOfUse,
    Relationship,
    patient_types,
)
from phivault.identity.principal import Principal, Role
from phivault.identity.scopes import Permission, ScopeContext, SmartScope
from phivault.records.classification import (
    Classification,
    ElementGroup,
    default_classification,
)

__all__ = [
    "AccessContext",
    "BreakGlassGrant",
    "CompiledPolicy",
    "Decision",
    "DenyReason",
    "RelationshipFacts",
    "ScopeClause",
    "SearchScope",
    "allows_operation",
    "compile_policy",
    "decide",
    "groups_of_mask",
    "mask_of_groups",
    "scopes_allow",
    "search_scope",
]


class DenyReason(StrEnum):
    """Why access was refused: a code for the audit event's outcome, never PHI."""

    UNKNOWN_RESOURCE_TYPE = "unknown-resource-type"
    TENANT_MISMATCH = "tenant-mismatch"
    NO_ROLE = "no-role"
    ROLE_NOT_PERMITTED = "role-not-permitted"
    NO_RELATIONSHIP = "no-relationship"
    BREAK_GLASS_EXPIRED = "break-glass-expired"
    PURPOSE_NOT_PERMITTED = "purpose-not-permitted"
    SCOPE_NOT_GRANTED = "scope-not-granted"


# How far a role got before it was refused; the furthest role names the reason.
_STAGE = {
    DenyReason.ROLE_NOT_PERMITTED: 1,
    DenyReason.NO_RELATIONSHIP: 2,
    DenyReason.BREAK_GLASS_EXPIRED: 3,
    DenyReason.PURPOSE_NOT_PERMITTED: 4,
}

_GROUPS: tuple[ElementGroup, ...] = tuple(ElementGroup)
_BIT = {group: 1 << index for index, group in enumerate(_GROUPS)}


def _all_masks() -> tuple[frozenset[ElementGroup], ...]:
    masks: list[frozenset[ElementGroup]] = []
    for mask in range(1 << len(_GROUPS)):
        masks.append(frozenset(g for g in _GROUPS if mask & _BIT[g]))
    return tuple(masks)


_MASKS = _all_masks()


def mask_of_groups(groups: Iterable[ElementGroup]) -> int:
    """The bitmask of a set of groups (the compiled tables' representation)."""
    mask = 0
    for group in groups:
        mask |= _BIT[group]
    return mask


def groups_of_mask(mask: int) -> frozenset[ElementGroup]:
    """The groups of a bitmask (shared frozensets: no allocation per decision)."""
    return _MASKS[mask]


@dataclass(frozen=True, slots=True)
class BreakGlassGrant:
    """Emergency access of one caller to one patient, time-boxed on the server's clock.

    Times are seconds since the epoch. A revoked grant, or one outside ``[starts_at,
    expires_at)``, widens nothing.
    """

    grant_id: str
    tenant: str
    subject: str
    patient: str
    starts_at: float
    expires_at: float
    revoked: bool = False

    def active(self, now: float) -> bool:
        return not self.revoked and self.starts_at <= now < self.expires_at


@dataclass(frozen=True, slots=True)
class AccessContext:
    """Everything about the caller a decision needs (built from a :class:`Principal`).

    ``purposes`` are the purposes of use the token claims (unknown codes match nothing);
    ``patient_context`` is the SMART launch patient that ``patient/`` scopes refer to;
    ``grants`` are the caller's break-glass grants, as the server knows them now.
    """

    subject: str
    tenant: str
    roles: frozenset[Role]
    scopes: tuple[SmartScope, ...]
    purposes: tuple[str, ...] = ()
    fhir_user: str | None = None
    patient_context: str | None = None
    grants: tuple[BreakGlassGrant, ...] = field(default=())

    @classmethod
    def from_principal(
        cls,
        principal: Principal,
        *,
        grants: tuple[BreakGlassGrant, ...] = (),
        patient_context: str | None = None,
    ) -> AccessContext:
        """The context of a validated principal; a patient's own id is the default launch
        context of their ``patient/`` scopes."""
        if patient_context is None:
            patient_context = _own_patient(principal.fhir_user)
        return cls(
            subject=principal.subject,
            tenant=principal.tenant,
            roles=principal.roles,
            scopes=principal.scopes,
            purposes=principal.purpose_of_use,
            fhir_user=principal.fhir_user,
            patient_context=patient_context,
            grants=grants,
        )


@dataclass(frozen=True, slots=True)
class RelationshipFacts:
    """What ties the resource to the caller, established by the records layer.

    ``patient`` is the id of the patient whose compartment holds the resource (None for a
    directory resource); ``care_relationship`` says whether the caller's ``fhirUser`` has a
    care relationship with that patient (CareTeam or Encounter participant, general
    practitioner, or an explicit assignment), within ``tenant``.
    """

    tenant: str
    patient: str | None
    care_relationship: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: whether allowed, the visible element groups (the mask), and why.

    ``purposes`` are the purposes of use the access was granted under (for the audit event);
    ``grant_id`` names the break-glass grant that made it possible, if one did.
    """

    allowed: bool
    groups: frozenset[ElementGroup]
    reason: DenyReason | None = None
    purposes: frozenset[str] = frozenset()
    grant_id: str | None = None


_DENY = {reason: Decision(False, frozenset(), reason) for reason in DenyReason}


@dataclass(frozen=True, slots=True)
class _CompiledRole:
    relationship: Relationship | None
    purposes: frozenset[str]
    default: frozenset[str]
    break_glass: bool
    # (type, interaction) -> {purpose: group bitmask}; only non-empty entries.
    table: Mapping[tuple[str, Interaction], Mapping[str, int]]


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy turned into lookup tables; build with :func:`compile_policy`."""

    policy: Policy
    resource_types: frozenset[str]
    patient_types: frozenset[str]
    roles: Mapping[Role, _CompiledRole]


def compile_policy(policy: Policy, classification: Classification | None = None) -> CompiledPolicy:
    """Pre-compute every role's ``(type, interaction) -> {purpose: mask}`` table."""
    table = classification or default_classification()
    roles: dict[Role, _CompiledRole] = {}
    for role, body in policy.roles.items():
        entries: dict[tuple[str, Interaction], dict[str, int]] = {}
        for rule in body.rules:
            mask = mask_of_groups(rule.groups)
            for purpose in body.rule_purposes(rule):
                for name in rule.types:
                    for interaction in rule.interactions:
                        slot = entries.setdefault((name, interaction), {})
                        slot[purpose.value] = slot.get(purpose.value, 0) | mask
        roles[role] = _CompiledRole(
            relationship=body.relationship,
            purposes=frozenset(p.value for p in body.purposes),
            default=frozenset(
                () if body.default_purpose is None else (body.default_purpose.value,)
            ),
            break_glass=body.break_glass,
            table=entries,
        )
    return CompiledPolicy(policy, table.resource_types, patient_types(table), roles)


_ETREAT = frozenset({PurposeOfUse.ETREAT.value})


def decide(
    policy: CompiledPolicy,
    ctx: AccessContext,
    resource_type: str,
    interaction: Interaction,
    facts: RelationshipFacts,
    *,
    now: float,
) -> Decision:
    """Decide one access. Pure: ``now`` is the server's clock, in seconds since the epoch."""
    if resource_type not in policy.resource_types:
        return _DENY[DenyReason.UNKNOWN_RESOURCE_TYPE]
    if facts.tenant != ctx.tenant:
        return _DENY[DenyReason.TENANT_MISMATCH]
    patient = facts.patient
    # Directory resources belong to no patient. A patient type without a patient (a subject-
    # less Observation) is not a directory resource: only tenant-wide roles reach it.
    directory = resource_type not in policy.patient_types
    key = (resource_type, interaction)
    mask = 0
    purposes: set[str] = set()
    grant_used: str | None = None
    worst: DenyReason | None = None
    for role in ctx.roles:
        compiled = policy.roles.get(role)
        if compiled is None:
            continue
        refusal: DenyReason | None = None
        slots = compiled.table.get(key)
        if slots is None:
            refusal = DenyReason.ROLE_NOT_PERMITTED
        else:
            via_grant: str | None = None
            if directory or _related(compiled.relationship, ctx, facts):
                claimed = (
                    compiled.purposes.intersection(ctx.purposes)
                    if ctx.purposes
                    else compiled.default
                )
            elif compiled.break_glass and patient is not None:
                via_grant, refusal = _grant_for(ctx, patient, now)
                claimed = _ETREAT
            else:
                refusal = DenyReason.NO_RELATIONSHIP
                claimed = frozenset()
            if refusal is None:
                role_mask = 0
                for purpose in claimed:
                    found = slots.get(purpose, 0)
                    if found:
                        role_mask |= found
                        purposes.add(purpose)
                if role_mask:
                    mask |= role_mask
                    if via_grant is not None:
                        grant_used = via_grant
                    continue
                refusal = DenyReason.PURPOSE_NOT_PERMITTED
        if refusal is not None and (worst is None or _STAGE[refusal] > _STAGE[worst]):
            worst = refusal
    if not mask:
        return _DENY[worst if worst is not None else DenyReason.NO_ROLE]
    if not _scope_allows(ctx, resource_type, INTERACTION_PERMISSION[interaction], patient):
        return _DENY[DenyReason.SCOPE_NOT_GRANTED]
    return Decision(True, _MASKS[mask], None, frozenset(purposes), grant_used)


@dataclass(frozen=True, slots=True)
class ScopeClause:
    """One role's contribution to a search: rows whose patient relates to the caller by
    ``relationship`` (when ``by_relationship``: the role's purposes open something), and rows
    of the ``granted`` patients that do not so relate (active break-glass grants)."""

    relationship: Relationship | None
    by_relationship: bool
    granted: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SearchScope:
    """Which rows of one type a query may return, for the SQL layer to compile.

    A row is admitted when its tenant is ``tenant``; when ``patient_only`` is set (only
    ``patient/`` scopes grant the interaction), its patient, if it has one, is
    ``patient_context``; and some clause admits it (for directory types, any clause with
    ``by_relationship``). :meth:`admits` is the exact meaning: for every row it agrees with
    :func:`decide` on whether access is allowed (property-tested), so the SQL compiler can be
    tested against it. The mask of each row still comes from :func:`decide`.
    """

    tenant: str
    directory: bool
    clauses: tuple[ScopeClause, ...]
    own_patient: str | None = None
    patient_only: bool = False
    patient_context: str | None = None

    @property
    def empty(self) -> bool:
        """No row can be admitted: answer without touching storage."""
        return not any(c.by_relationship or c.granted for c in self.clauses)

    def admits(self, facts: RelationshipFacts) -> bool:
        if facts.tenant != self.tenant:
            return False
        patient = facts.patient
        if self.patient_only and patient is not None and patient != self.patient_context:
            return False
        for clause in self.clauses:
            if self.directory:
                if clause.by_relationship:
                    return True
                continue
            required = clause.relationship
            related = required is Relationship.TENANT or (
                patient is not None
                and (
                    (required is Relationship.CARE and facts.care_relationship)
                    or (required is Relationship.OWN and patient == self.own_patient)
                )
            )
            if related:
                if clause.by_relationship:
                    return True
            elif patient is not None and patient in clause.granted:
                return True
        return False


def search_scope(
    policy: CompiledPolicy,
    ctx: AccessContext,
    resource_type: str,
    interaction: Interaction,
    *,
    now: float,
) -> SearchScope:
    """The rows of ``resource_type`` that ``interaction`` (a search, a history) may return."""
    directory = resource_type not in policy.patient_types
    permission = INTERACTION_PERMISSION[interaction]
    granting = [
        s
        for s in ctx.scopes
        if s.query is None and permission in s.permissions and s.resource in ("*", resource_type)
    ]
    nothing = SearchScope(ctx.tenant, directory, ())
    if resource_type not in policy.resource_types or not granting:
        return nothing
    clauses: list[ScopeClause] = []
    for role in ctx.roles:
        compiled = policy.roles.get(role)
        slots = None if compiled is None else compiled.table.get((resource_type, interaction))
        if compiled is None or slots is None:
            continue
        claimed = compiled.purposes.intersection(ctx.purposes) if ctx.purposes else compiled.default
        by_relationship = any(slots.get(p, 0) for p in claimed)
        granted: frozenset[str] = frozenset()
        if compiled.break_glass and slots.get(PurposeOfUse.ETREAT.value, 0):
            granted = frozenset(
                g.patient
                for g in ctx.grants
                if g.subject == ctx.subject and g.tenant == ctx.tenant and g.active(now)
            )
        if by_relationship or granted:
            clauses.append(ScopeClause(compiled.relationship, by_relationship, granted))
    return SearchScope(
        tenant=ctx.tenant,
        directory=directory,
        clauses=tuple(clauses),
        own_patient=_own_patient(ctx.fhir_user),
        patient_only=all(s.context is ScopeContext.PATIENT for s in granting),
        patient_context=ctx.patient_context,
    )


def allows_operation(
    policy: CompiledPolicy, ctx: AccessContext, operation: Operation, *, patient: str | None = None
) -> bool:
    """Whether a role of the caller holds ``operation`` (audit events, access reports, review,
    configuration, users). ``own-access-report`` holds only for the caller's own ``patient``."""
    for role in ctx.roles:
        body = policy.policy.roles.get(role)
        if body is None or operation not in body.operations:
            continue
        if operation is Operation.OWN_ACCESS_REPORT:
            if patient is not None and patient == _own_patient(ctx.fhir_user):
                return True
            continue
        return True
    return False


def _related(required: Relationship | None, ctx: AccessContext, facts: RelationshipFacts) -> bool:
    if required is Relationship.TENANT:
        return True
    if facts.patient is None:
        return False
    if required is Relationship.CARE:
        return facts.care_relationship
    if required is Relationship.OWN:
        return ctx.fhir_user == f"Patient/{facts.patient}"
    return False


def _grant_for(
    ctx: AccessContext, patient: str, now: float
) -> tuple[str | None, DenyReason | None]:
    expired = False
    for grant in ctx.grants:
        if grant.patient != patient or grant.subject != ctx.subject or grant.tenant != ctx.tenant:
            continue
        if grant.active(now):
            return grant.grant_id, None
        expired = True
    return None, DenyReason.BREAK_GLASS_EXPIRED if expired else DenyReason.NO_RELATIONSHIP


def scopes_allow(
    ctx: AccessContext, resource_type: str, permission: Permission, patient: str | None = None
) -> bool:
    """Whether the token's SMART scopes grant ``permission`` on ``resource_type`` (for
    ``patient``'s compartment, when the scope is a ``patient/`` one). Scopes narrow access,
    never widen it: every check of a resource type outside the policy's tables uses this."""
    return _scope_allows(ctx, resource_type, permission, patient)


def _scope_allows(
    ctx: AccessContext, resource_type: str, permission: Permission, patient: str | None
) -> bool:
    for scope in ctx.scopes:
        if scope.query is not None or permission not in scope.permissions:
            continue
        if scope.resource not in ("*", resource_type):
            continue
        if (
            scope.context is ScopeContext.PATIENT
            and patient is not None
            and patient != ctx.patient_context
        ):
            continue
        return True
    return False


def _own_patient(fhir_user: str | None) -> str | None:
    if fhir_user is not None and fhir_user.startswith("Patient/"):
        return fhir_user.removeprefix("Patient/")
    return None
