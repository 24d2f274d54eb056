"""Hypothesis strategies for valid audit events, shared by the ledger's tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import reject
from hypothesis import strategies as st
from pydantic import ValidationError

from phivault.ledger.events import (
    Action,
    Agent,
    AuditEvent,
    Entity,
    EntityRole,
    EntityType,
    EventKind,
    Outcome,
    Source,
)

__all__ = ["audit_events"]

_codes = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,15}", fullmatch=True)
_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@\-]{0,24}", fullmatch=True)
_fhir_ids = st.from_regex(r"[A-Za-z0-9\-.]{1,16}", fullmatch=True)
_types = st.sampled_from(["Observation", "Encounter", "Practitioner", "Device", "Patient"])
_references = st.builds(
    lambda t, i, v: f"{t}/{i}" + ("" if v is None else f"/_history/{v}"),
    _types,
    _fhir_ids,
    st.none() | _fhir_ids,
)
_tokens = st.from_regex(r"[A-Za-z0-9_\-]{16,48}", fullmatch=True)
_ips = st.ip_addresses().map(str)
_times = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=9))]),
)


@st.composite
def _agents(draw: st.DrawFn) -> Agent:
    try:
        return Agent(
            who=draw(_ids | _references),
            requestor=draw(st.booleans()),
            roles=tuple(draw(st.lists(_codes, max_size=3))),
            client_id=draw(st.none() | _ids),
            network_address=draw(st.none() | _ips),
            purpose_of_use=tuple(draw(st.lists(_codes, max_size=2))),
        )
    except ValidationError:
        reject()


@st.composite
def _entities(draw: st.DrawFn) -> Entity:
    try:
        what = draw(st.none() | _references)
        role = draw(st.sampled_from(list(EntityRole)))
        if role is EntityRole.PATIENT and (what is None or not what.startswith("Patient/")):
            role = EntityRole.DOMAIN_RESOURCE
        return Entity(
            what=what,
            type=draw(st.sampled_from(list(EntityType))),
            role=role,
            query_hash=draw(_tokens) if what is None else draw(st.none() | _tokens),
            security_labels=tuple(draw(st.lists(_codes, max_size=2))),
        )
    except ValidationError:
        reject()


@st.composite
def audit_events(draw: st.DrawFn) -> AuditEvent:
    entities = draw(st.lists(_entities(), max_size=4))
    patient_ids = {
        e.what.split("/")[1] for e in entities if e.role is EntityRole.PATIENT and e.what
    }
    patient = None
    if len(patient_ids) == 1:
        patient = f"Patient/{patient_ids.pop()}"
    elif patient_ids:
        reject()
    elif draw(st.booleans()):
        patient = f"Patient/{draw(_fhir_ids)}"
    try:
        return AuditEvent(
            kind=draw(st.sampled_from(list(EventKind))),
            subtype=draw(_codes | st.sampled_from(["read", "search", "login", "logout"])),
            action=draw(st.sampled_from(list(Action))),
            recorded=draw(_times),
            outcome=draw(st.sampled_from(list(Outcome))),
            outcome_reason=draw(st.none() | _codes),
            tenant=draw(_ids),
            patient=patient,
            agents=tuple(draw(st.lists(_agents(), min_size=1, max_size=3))),
            source=Source(observer=draw(_ids), site=draw(st.none() | _ids)),
            entities=tuple(entities),
            purpose_of_use=tuple(draw(st.lists(_codes, max_size=2))),
            request_id=draw(st.none() | _ids),
            break_glass_grant=draw(st.none() | _ids),
        )
    except ValidationError:
        reject()
