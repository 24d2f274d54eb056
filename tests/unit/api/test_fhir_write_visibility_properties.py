"""Property: for random policies (extra rules, changed relationships), callers (roles,
fhirUser, SMART scopes, purposes) and stored resources (current, updated, deleted; patient
records and the directory), every write naming a resource the caller may neither read nor so
change -- PUT (moving it or not), PUT with If-Match, DELETE, and the same as transaction and
batch entries -- answers exactly as the same write naming an id nobody ever used: status,
body (OperationOutcome or response Bundle) and headers, but for dates and request ids. Both
write nothing, and both leave an event in the ledger.

Who may see what is computed here with ``decide`` from a care table written by hand
(``write_visibility_support.CARE``), not read from the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fhir_harness import Fhir, open_fhir
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from write_visibility_support import (
    TENANT,
    Clinic,
    Target,
    answer,
    body_for,
    build_clinic,
    with_rule,
)

from phivault.access.decision import (
    AccessContext,
    RelationshipFacts,
    compile_policy,
    decide,
    search_scope,
)
from phivault.access.policy import Policy, Rule, default_policy
from phivault.access.vocabulary import Interaction, Relationship
from phivault.identity.principal import Role
from phivault.identity.scopes import parse_scopes
from phivault.records.classification import ElementGroup
from phivault.records.repository import _covers_tenant
from phivault.records.search_params import search_params

UNUSED = "never-used-prop"
ROLES = (
    Role.CLINICIAN, Role.NURSE, Role.FRONT_DESK, Role.BILLING, Role.PATIENT, Role.SERVICE,
    Role.ADMIN,
)  # fmt: skip
TYPES = ("Observation", "Claim", "Patient", "Organization")
SCOPES = (
    "user/*.cruds", "user/*.cruds", "user/*.cruds", "system/*.cruds", "user/*.rs",
    "user/Observation.cruds", "user/*.ud",
    "patient/*.cruds", "system/*.cruds", "user/*.cu user/Claim.r", "user/Patient.cruds",
)  # fmt: skip
PURPOSES = (None, None, ["TREAT"], ["HOPERAT"], ["PATADM"], ["HPAYMT"], ["TREAT", "HOPERAT"])
WHO = (None, "dr1", "dr2", "p1", "p2")
WRITES = (
    "put", "put-if-match", "delete", "delete-outcome", "transaction-put",
    "transaction-put-if-match", "transaction-delete", "batch-put", "batch-put-if-match",
    "batch-delete",
)  # fmt: skip


@dataclass
class World:
    fhir: Fhir
    clinic: Clinic
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("write-visibility")
    loop = asyncio.new_event_loop()
    opened = open_fhir(tmp)
    fhir = loop.run_until_complete(opened.__aenter__())
    try:
        clinic = loop.run_until_complete(build_clinic(fhir))
        yield World(fhir, clinic, loop)
    finally:
        loop.run_until_complete(opened.__aexit__(None, None, None))
        loop.close()


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    """The default policy with up to three extra rules (write rights the default withholds,
    such as deletes) and sometimes a role's relationship changed."""
    policy = default_policy()
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 3]))):
        role = draw(st.sampled_from((Role.CLINICIAN, Role.NURSE, *ROLES)))
        rule = Rule(
            frozenset(draw(st.sets(st.sampled_from(TYPES), min_size=1))),
            frozenset(
                draw(
                    st.sets(
                        st.sampled_from(
                            [
                                Interaction.READ,
                                Interaction.UPDATE,
                                Interaction.DELETE,
                                Interaction.DELETE,
                                Interaction.CREATE,
                            ]
                        ),
                        min_size=1,
                    )
                )
            ),
            frozenset(ElementGroup),
        )
        changes: dict[str, Any] = {}
        if draw(st.integers(0, 3)) == 0:
            changes["relationship"] = draw(st.sampled_from(list(Relationship)))
        policy = with_rule(policy, role, rule, **changes)
    return policy


@dataclass(frozen=True)
class Drawn:
    roles: frozenset[Role]
    who: str | None
    scope: str
    purposes: list[str] | None
    target: str
    write: str
    subject: str
    version: str


callers_and_writes = st.builds(
    Drawn,
    roles=st.frozensets(
        st.sampled_from((Role.CLINICIAN, Role.SERVICE, *ROLES)), min_size=1, max_size=2
    ),
    who=st.sampled_from(WHO),
    scope=st.sampled_from(SCOPES),
    purposes=st.sampled_from(PURPOSES),
    target=st.sampled_from(
        ["o-p1", "o-p2", "o-p3", "p1", "p2", "p3", "claim-p2", "org", "gone-p3"]
    ),
    write=st.sampled_from(WRITES),
    subject=st.sampled_from(["p1", "p2", "p3"]),
    version=st.sampled_from(["1", "2", "3"]),
)


def fhir_user(clinic: Clinic, who: str | None) -> str | None:
    if who is None:
        return None
    if who.startswith("dr"):
        return f"Practitioner/{clinic.doctors[who]}"
    return f"Patient/{clinic.patients[who]}"


def context(clinic: Clinic, drawn: Drawn) -> AccessContext:
    user = fhir_user(clinic, drawn.who)
    own = user.removeprefix("Patient/") if user and user.startswith("Patient/") else None
    return AccessContext(
        subject="prop-caller",
        tenant=TENANT,
        roles=drawn.roles,
        scopes=parse_scopes(f"openid fhirUser {drawn.scope}")[0],
        purposes=tuple(drawn.purposes or ()),
        fhir_user=user,
        patient_context=own,
    )


def unseen(
    policy: Policy, clinic: Clinic, ctx: AccessContext, target: Target, write: Interaction
) -> bool:
    """The caller may neither read ``target`` nor make ``write`` to it (decided here)."""
    facts = RelationshipFacts(
        TENANT,
        clinic.patient_id(target.patient),
        care_relationship=clinic.cares(ctx.fhir_user, target.patient),
    )
    compiled = compile_policy(policy)
    return not any(
        decide(compiled, ctx, target.resource_type, i, facts, now=1_800_000_000.0).allowed
        for i in (Interaction.READ, write)
    )


def request(
    clinic: Clinic, drawn: Drawn, target: Target, headers: dict[str, str]
) -> tuple[str, str, dict[str, str], Any]:
    """(method, url, headers, body) of the drawn write naming ``target``."""
    kind, the_id = target.resource_type, target.id
    url = f"{kind}/{the_id}"
    resource = body_for(clinic, kind, the_id, drawn.subject)
    if_match = {"If-Match": f'W/"{drawn.version}"'}
    if drawn.write == "put":
        return "PUT", f"/fhir/{url}", headers, resource
    if drawn.write == "put-if-match":
        return "PUT", f"/fhir/{url}", {**headers, **if_match}, resource
    if drawn.write == "delete":
        return "DELETE", f"/fhir/{url}", headers, None
    if drawn.write == "delete-outcome":
        return "DELETE", f"/fhir/{url}", {**headers, "Prefer": "return=OperationOutcome"}, None
    bundle_type, _, entry_kind = drawn.write.partition("-")
    entry: dict[str, Any]
    if entry_kind == "delete":
        entry = {"request": {"method": "DELETE", "url": url}}
    else:
        entry = {"resource": resource, "request": {"method": "PUT", "url": url}}
        if entry_kind == "put-if-match":
            entry["request"]["ifMatch"] = if_match["If-Match"]
    return (
        "POST",
        "/fhir",
        headers,
        {"resourceType": "Bundle", "type": bundle_type, "entry": [entry]},
    )


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(policy=policies(), drawn=callers_and_writes)
def test_a_write_to_an_unseen_resource_answers_as_to_an_unused_id(
    world: World, policy: Policy, drawn: Drawn
) -> None:
    fhir, clinic = world.fhir, world.clinic
    target = clinic.targets[drawn.target]
    write = Interaction.DELETE if drawn.write.endswith("delete") else Interaction.UPDATE
    if drawn.write == "delete-outcome":
        write = Interaction.DELETE
    ctx = context(clinic, drawn)
    assume(unseen(policy, clinic, ctx, target, write))
    fhir.use_policy(policy)
    token = fhir.token(
        sub=ctx.subject,
        roles=sorted(r.value for r in drawn.roles),
        scope=f"openid fhirUser {drawn.scope}",
        fhirUser=ctx.fhir_user,
        purpose_of_use=drawn.purposes,
        amr=["pwd", "otp"],
    )
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    method, url, headers, body = request(clinic, drawn, target, headers)
    rows = fhir.row_count()

    async def send(the_id: str) -> Any:
        before = len(fhir.sink.events)
        content = None if body is None else json.dumps(body).replace(target.id, the_id)
        response = await fhir.client.request(
            method, url.replace(target.id, the_id), content=content, headers=headers
        )
        assert len(fhir.sink.events) > before, "the attempt is not in the ledger"
        return response

    hidden = world.loop.run_until_complete(send(target.id))
    unused = world.loop.run_until_complete(send(UNUSED))
    event(f"{drawn.write}: {hidden.status_code}")
    assert hidden.status_code != 401, hidden.text
    assert answer(hidden, target.id) == answer(unused, UNUSED), (hidden.text, unused.text)
    assert fhir.row_count() == rows, "a write to an unseen or unused id changed the store"


@settings(max_examples=300, deadline=None)
@given(policy=policies(), drawn=callers_and_writes, resource_type=st.sampled_from(TYPES))
def test_whoever_may_create_by_put_sees_every_resource_of_the_type(
    policy: Policy, drawn: Drawn, resource_type: str
) -> None:
    """Update-as-create is safe where it is honoured: a caller whose scope covers the tenant
    for a type may read or update every resource of it, whoever's, cared for or not."""
    compiled = compile_policy(policy)
    patients = {"p1": "id-p1", "p2": "id-p2", "p3": "id-p3"}
    clinic = Clinic(patients, {"dr1": "id-dr1", "dr2": "id-dr2"}, {})
    ctx = context(clinic, drawn)
    covers = any(
        _covers_tenant(search_scope(compiled, ctx, resource_type, i, now=1_800_000_000.0))
        for i in (Interaction.READ, Interaction.UPDATE)
    )
    event(f"covers: {covers}")
    if not covers:
        return
    # A type with no patient search parameter (Organization, Practitioner...) is sealed under
    # the directory: no stored resource of it belongs to a patient (records.search_params.
    # patient_of), so only patient-free facts can occur for it.
    in_compartments = resource_type == "Patient" or "patient" in search_params(resource_type)
    patient_ids = (None, "id-p1", "id-p2", "id-p3", "someone-else") if in_compartments else (None,)
    for patient_id in patient_ids:
        for care in (False, True):
            facts = RelationshipFacts(TENANT, patient_id, care_relationship=care)
            assert any(
                decide(compiled, ctx, resource_type, i, facts, now=1_800_000_000.0).allowed
                for i in (Interaction.READ, Interaction.UPDATE)
            ), (resource_type, patient_id, care)
