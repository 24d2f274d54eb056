"""``AuditEvent.checked``, the fast construction the server uses for its own events, gives
exactly what the model's validation gives: the same event, or a refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from event_strategies import audit_events  # tests/unit/ledger/event_strategies.py
from hypothesis import given, settings
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

# Values a caller could smuggle in: PHI shapes, free text, references of the wrong kind.
_BAD_STRINGS = [
    "123-45-6789",
    "x123-45-6789",
    "555-123-4567",
    "someone@example.org",
    "2026-01-02",
    "has a space",
    "",
    "Patient/1/_history/2",
    "Observation/1",
    "Patient/555-123-4567",
    "Patient/2026-01-02",
    "a" * 200,
]
_GOOD = {
    "subtype": ["read", "vread", "search-type"],
    "outcome_reason": [None, "not-found", "expired-token"],
    "tenant": ["tenant-a", "default"],
    "patient": [None, "Patient/p1", "Patient/p2"],
    "request_id": [None, "req-0123456789abcdef", "01J5ZQ"],
    "break_glass_grant": [None, "grant-1"],
}
_AGENT = Agent(who="Patient/p1", roles=("patient",), network_address="127.0.0.1")
_OTHER_AGENT = Agent(who="user:alice", roles=("clinician",), purpose_of_use=("TREAT",))
_ENTITIES = [
    Entity(what="Observation/o1/_history/2"),
    Entity(what="Observation/o2/_history/1", security_labels=("REDACTED",)),
    Entity(what="Patient/p1", type=EntityType.PERSON, role=EntityRole.PATIENT),
    Entity(what="Patient/p2", type=EntityType.PERSON, role=EntityRole.PATIENT),
    Entity(what="Patient/p2/_history/3"),
    Entity(query_hash="q" * 22, role=EntityRole.QUERY),
]
_TIMES = [
    datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=-7))),
    datetime(2026, 1, 2, 3, 4, 5),  # naive: refused
    datetime(1, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=9))),  # out of range in UTC
    1_700_000_000,  # a number is not a time
]


def _outcome(build: Any, values: dict[str, Any]) -> AuditEvent | str:
    try:
        return build(**values)
    except ValidationError as exc:
        return "refused: " + ",".join(sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]}))


def _same(values: dict[str, Any]) -> None:
    slow = _outcome(AuditEvent, values)
    fast = _outcome(AuditEvent.checked, values)
    assert fast == slow
    if isinstance(slow, AuditEvent):
        assert isinstance(fast, AuditEvent)
        assert fast.to_document() == slow.to_document()
        assert fast.model_fields_set == slow.model_fields_set
        assert list(fast.__dict__) == list(slow.__dict__)
        assert hash(fast) == hash(slow)
        copied = fast.model_copy(update={"source": Source(observer="node-1", site="replica")})
        assert copied.source.site == "replica" and copied.request_id == fast.request_id


@st.composite
def _raw_values(draw: st.DrawFn) -> dict[str, Any]:
    values: dict[str, Any] = {
        field: draw(st.sampled_from(good + _BAD_STRINGS)) if draw(st.booleans()) else good[0]
        for field, good in _GOOD.items()
    }
    for field in ("subtype", "tenant"):
        if values[field] is None:
            values[field] = _GOOD[field][0]
    values.update(
        kind=draw(st.sampled_from([*EventKind, "rest"])),
        action=draw(st.sampled_from([*Action, "R"])),
        outcome=draw(st.sampled_from([*Outcome, 0])),
        recorded=draw(st.sampled_from(_TIMES)),
        agents=draw(
            st.sampled_from([(_AGENT,), (_AGENT, _OTHER_AGENT), (), [_AGENT], ({"who": "x"},)])
        ),
        source=draw(st.sampled_from([Source(observer="node-1"), {"observer": "node-1"}])),
        entities=draw(
            st.lists(st.sampled_from(_ENTITIES), max_size=3).map(tuple)
            | st.just([Entity(what="Observation/o1")])
            | st.just(({"what": "Patient/p1", "role": "1", "type": "1"},))
        ),
        purpose_of_use=draw(
            st.sampled_from([(), ("TREAT",), ("TREAT", "123-45-6789"), ["TREAT"], ("a b",)])
        ),
    )
    return values


@settings(max_examples=600, deadline=None)
@given(_raw_values())
def test_checked_gives_what_validation_gives_for_any_values(values: dict[str, Any]) -> None:
    _same(values)


@settings(max_examples=200, deadline=None)
@given(audit_events())
def test_checked_rebuilds_any_valid_event(event: AuditEvent) -> None:
    values = {name: getattr(event, name) for name in AuditEvent.model_fields}
    _same(values)
    assert AuditEvent.checked(**values) == event


@pytest.mark.parametrize("value", ["123-45-6789", "Patient/555-123-4567", "2026-01-02"])
def test_checked_refuses_a_phi_shaped_patient_every_time(value: str) -> None:
    for _ in range(2):  # a refusal is not remembered as a pass
        with pytest.raises(ValidationError):
            AuditEvent.checked(
                kind=EventKind.REST,
                subtype="read",
                action=Action.READ,
                recorded=_TIMES[0],
                tenant="tenant-a",
                patient=value,
                agents=(_AGENT,),
                source=Source(observer="node-1"),
            )
