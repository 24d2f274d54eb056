"""Property tests: ``decide`` agrees with a reference model written separately, here.

The reference model reads the uncompiled policy rule by rule, the way a reviewer reads the
file; the implementation uses the compiled tables. For random valid policies, callers,
scopes, purposes, grants and relationships the two must agree on whether access is allowed,
on the visible groups and on the grant used. Then the safety properties on their own: admin
never gets a PHI group, nothing is allowed that the scopes do not allow, and an expired or
revoked grant never widens access.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.access.decision import (
    AccessContext,
    BreakGlassGrant,
    Decision,
    RelationshipFacts,
    SearchScope,
    compile_policy,
    decide,
    search_scope,
)
from phivault.access.policy import Policy, RolePolicy, Rule, default_policy
from phivault.access.vocabulary import (
    DIRECTORY_TYPES,
    INTERACTION_PERMISSION,
    Interaction,
    PurposeOfUse,
    Relationship,
)
from phivault.identity.principal import Role
from phivault.identity.scopes import Permission, ScopeContext, SmartScope
from phivault.records.classification import ElementGroup, default_classification

# Small vocabularies on purpose: rules, claims, scopes and grants must often meet, or the
# interesting cases (a rule limited to a purpose, a grant at its expiry second) never arise.
TYPES = ["Patient", "Observation", "Claim", "Practitioner"]
PURPOSES = [PurposeOfUse.TREAT, PurposeOfUse.ETREAT, PurposeOfUse.HPAYMT]
TIMES = st.integers(0, 12).map(float)
PHI_TYPES = frozenset(default_classification().resource_types) - DIRECTORY_TYPES
NOW = 1000.0
# decide treats every role alike; three keep the examples small and the overlaps frequent
ROLES = [Role.CLINICIAN, Role.BILLING, Role.PATIENT]


def subset(items: list, min_size: int = 0) -> st.SearchStrategy:  # type: ignore[type-arg]
    return st.frozensets(st.sampled_from(items), min_size=min_size)


@st.composite
def role_policies(draw: st.DrawFn, role: Role) -> RolePolicy:
    purposes = draw(subset(PURPOSES, min_size=1))
    relationship = draw(st.sampled_from([*Relationship, Relationship.CARE, None]))
    rules = draw(
        st.lists(
            st.builds(
                Rule,
                types=subset(TYPES, 1),
                interactions=subset(list(Interaction), 1),
                groups=subset(list(ElementGroup), 1),
                purposes=subset(sorted(purposes)),
            ),
            min_size=1,
            max_size=3,
        )
    )
    default = draw(st.none() | st.sampled_from(sorted(purposes)))
    return RolePolicy(
        role=role,
        relationship=relationship,
        purposes=purposes,
        default_purpose=default,
        break_glass=draw(st.booleans()),
        rules=tuple(rules),
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    roles = draw(st.sampled_from([ROLES, ROLES, ROLES[:2]]))  # sometimes a role is undeclared
    return Policy(MappingProxyType({role: draw(role_policies(role)) for role in roles}))


scopes = st.builds(
    SmartScope,
    context=st.sampled_from(list(ScopeContext)),
    resource=st.sampled_from([*TYPES, "*", "*"]),
    permissions=subset(list(Permission), 1),
    query=st.sampled_from([None, None, None, "category=laboratory"]),
)


@st.composite
def grants(draw: st.DrawFn) -> BreakGlassGrant:
    starts = draw(TIMES)
    return BreakGlassGrant(
        grant_id=draw(st.sampled_from(["g1", "g2"])),
        tenant=draw(st.sampled_from(["t1", "t1", "t2"])),
        subject=draw(st.sampled_from(["u1", "u1", "u2"])),
        patient=draw(st.sampled_from(["p1", "p1", "p2"])),
        starts_at=starts,
        expires_at=starts + draw(st.integers(0, 6)),
        revoked=draw(st.booleans()),
    )


contexts = st.builds(
    AccessContext,
    subject=st.just("u1"),
    tenant=st.just("t1"),
    roles=subset(ROLES, 1),
    scopes=st.lists(scopes, min_size=1, max_size=3).map(tuple),
    purposes=st.lists(st.sampled_from([*PURPOSES, "BOGUS"]), max_size=2).map(tuple),
    fhir_user=st.sampled_from(["Patient/p1", "Patient/p1", None, "Patient/p2", "Practitioner/x"]),
    patient_context=st.sampled_from([None, "p1", "p2"]),
    grants=st.lists(grants(), max_size=2).map(tuple),
)

facts = st.builds(
    RelationshipFacts,
    tenant=st.sampled_from(["t1", "t1", "t1", "t1", "t2"]),
    patient=st.sampled_from(["p1", "p1", "p1", None, "p2"]),
    care_relationship=st.booleans(),
)


# --- the reference model ----------------------------------------------------------------------


def reference(
    policy: Policy,
    ctx: AccessContext,
    resource_type: str,
    interaction: Interaction,
    f: RelationshipFacts,
    now: float,
) -> tuple[bool, frozenset[ElementGroup], str | None]:
    """(allowed, groups, grant id), read straight from the rules."""
    if f.tenant != ctx.tenant:
        return False, frozenset(), None
    visible: set[ElementGroup] = set()
    grant_used = None
    for role in ctx.roles:
        body = policy.roles.get(role)
        if body is None:
            continue
        if resource_type not in PHI_TYPES or body.relationship is Relationship.TENANT:
            related = True
        elif f.patient is None:
            related = False
        elif body.relationship is Relationship.CARE:
            related = f.care_relationship
        elif body.relationship is Relationship.OWN:
            related = ctx.fhir_user == "Patient/" + f.patient
        else:
            related = False
        via = None
        if related:
            if ctx.purposes:
                claimed = {p for p in ctx.purposes if p in set(body.purposes)}
            else:
                claimed = set() if body.default_purpose is None else {body.default_purpose}
        elif body.break_glass and f.patient is not None:
            active = [
                g.grant_id
                for g in ctx.grants
                if g.patient == f.patient
                and g.subject == ctx.subject
                and g.tenant == ctx.tenant
                and not g.revoked
                and g.starts_at <= now < g.expires_at
            ]
            if not active:
                continue
            via = active[0]
            claimed = {"ETREAT"}
        else:
            continue
        for rule in body.rules:
            applies = rule.purposes or body.purposes
            if (
                resource_type in rule.types
                and interaction in rule.interactions
                and any(p in claimed for p in applies)
            ):
                visible |= rule.groups
                if via is not None:
                    grant_used = via
    if not visible:
        return False, frozenset(), None
    permission = INTERACTION_PERMISSION[interaction]
    for scope in ctx.scopes:
        if (
            scope.query is None
            and permission in scope.permissions
            and scope.resource in ("*", resource_type)
            and not (
                scope.context is ScopeContext.PATIENT
                and f.patient is not None
                and f.patient != ctx.patient_context
            )
        ):
            return True, frozenset(visible), grant_used
    return False, frozenset(), None


def outcome(d: Decision) -> tuple[bool, frozenset[ElementGroup], str | None]:
    return d.allowed, d.groups, d.grant_id


FACTS = [
    RelationshipFacts("t1", "p1", care_relationship=True),
    RelationshipFacts("t1", "p1", care_relationship=False),
    RelationshipFacts("t1", "p2", care_relationship=False),
    RelationshipFacts("t1", None, care_relationship=True),
    RelationshipFacts("t2", "p1", care_relationship=True),
]


def moments(ctx: AccessContext) -> set[float]:
    """Times where something changes: every grant's start, last second and expiry."""
    found = {0.0, 6.0}
    for g in ctx.grants:
        found |= {g.starts_at, g.expires_at, max(g.starts_at, g.expires_at - 1)}
    return found


def every_question(
    ctx: AccessContext,
) -> Iterator[tuple[str, Interaction, RelationshipFacts, float]]:
    """Every type, interaction, relationship and significant moment, for one caller: cheap
    to ask, and far likelier to meet the rare combinations than drawing them one by one."""
    for resource_type in TYPES:
        for interaction in Interaction:
            for f in FACTS:
                for now in moments(ctx):
                    yield resource_type, interaction, f, now


@settings(max_examples=150, deadline=None)
@given(policy=policies(), ctx=contexts)
def test_decide_agrees_with_the_reference_model(policy: Policy, ctx: AccessContext) -> None:
    compiled = compile_policy(policy)
    for resource_type, interaction, f, now in every_question(ctx):
        decision = decide(compiled, ctx, resource_type, interaction, f, now=now)
        expected = reference(policy, ctx, resource_type, interaction, f, now)
        assert outcome(decision) == expected, (resource_type, interaction, f, now)
        assert (decision.reason is None) == decision.allowed
        if decision.grant_id is not None:
            assert "ETREAT" in decision.purposes


@settings(max_examples=150, deadline=None)
@given(ctx=contexts, resource_type=st.sampled_from(TYPES), f=facts, now=TIMES)
def test_admin_never_gets_a_phi_group(
    ctx: AccessContext, resource_type: str, f: RelationshipFacts, now: float
) -> None:
    policy = compile_policy(default_policy())
    admin = replace(ctx, roles=frozenset({Role.ADMIN}))
    for interaction in Interaction:
        decision = decide(policy, admin, resource_type, interaction, f, now=now)
        if resource_type in PHI_TYPES:
            assert not decision.allowed and not decision.groups


@settings(max_examples=100, deadline=None)
@given(policy=policies(), ctx=contexts)
def test_nothing_is_allowed_that_the_scopes_do_not_allow(
    policy: Policy, ctx: AccessContext
) -> None:
    compiled = compile_policy(policy)
    bare = replace(ctx, scopes=())
    for resource_type, interaction, f, now in every_question(ctx):
        decision = decide(compiled, ctx, resource_type, interaction, f, now=now)
        if decision.allowed:
            permission = INTERACTION_PERMISSION[interaction]
            assert any(s.grants(resource_type, permission) and s.query is None for s in ctx.scopes)
        # and removing every scope removes every access
        assert not decide(compiled, bare, resource_type, interaction, f, now=now).allowed


@settings(max_examples=100, deadline=None)
@given(policy=policies(), ctx=contexts)
def test_an_expired_or_revoked_grant_never_widens_access(
    policy: Policy, ctx: AccessContext
) -> None:
    compiled = compile_policy(policy)
    for resource_type, interaction, f, now in every_question(ctx):
        live = replace(ctx, grants=tuple(g for g in ctx.grants if g.active(now)))
        with_all = decide(compiled, ctx, resource_type, interaction, f, now=now)
        assert outcome(with_all) == outcome(
            decide(compiled, live, resource_type, interaction, f, now=now)
        )
        if not live.grants:
            without = decide(
                compiled, replace(ctx, grants=()), resource_type, interaction, f, now=now
            )
            assert outcome(with_all) == outcome(without) and with_all.grant_id is None


@settings(max_examples=60, deadline=None)
@given(policy=policies(), ctx=contexts, f=facts)
def test_groups_never_exceed_what_the_rules_name(
    policy: Policy, ctx: AccessContext, f: RelationshipFacts
) -> None:
    compiled = compile_policy(policy)
    for resource_type in TYPES:
        for interaction in Interaction:
            decision = decide(compiled, ctx, resource_type, interaction, f, now=NOW)
            named: set[ElementGroup] = set()
            for role in ctx.roles & set(policy.roles):
                for rule in policy.roles[role].rules:
                    if resource_type in rule.types and interaction in rule.interactions:
                        named |= rule.groups
            assert decision.groups <= named


@settings(max_examples=120, deadline=None)
@given(policy=policies(), ctx=contexts)
def test_search_scope_admits_exactly_the_rows_decide_allows(
    policy: Policy, ctx: AccessContext
) -> None:
    compiled = compile_policy(policy)
    scopes: dict[tuple[str, Interaction, float], SearchScope] = {}
    for resource_type, interaction, f, now in every_question(ctx):
        key = (resource_type, interaction, now)
        if key not in scopes:
            scopes[key] = search_scope(compiled, ctx, resource_type, interaction, now=now)
        allowed = decide(compiled, ctx, resource_type, interaction, f, now=now).allowed
        assert scopes[key].admits(f) == allowed, (resource_type, interaction, f, now)
        if scopes[key].empty:
            assert not allowed
