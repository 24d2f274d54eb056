"""The intent reconciler's byte filter (records.repository._may_settle) against the full parse:
it may let through a leaf that is no intent or outcome (the parse then decides), but it must
never skip one that is, whatever the event's other fields say and however the JSON is written.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from event_strategies import audit_events  # tests/unit/ledger/event_strategies.py
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from phivault.ledger.canonical import canonical_json
from phivault.ledger.events import Action, Agent, AuditEvent, Entity, EventKind, Source
from phivault.ledger.service import LedgerEntry
from phivault.records.repository import _INTENT, _OUTCOME_REASONS, _may_settle

_REASONS = (_INTENT, *sorted(_OUTCOME_REASONS))
_MARKERS = st.sampled_from([*_REASONS, "rest", "reconciled", "absent"])


def _wanted(event: AuditEvent) -> bool:
    """What the reconciler keeps after the full parse (RecordsRepository.reconcile)."""
    return event.kind is EventKind.REST and (
        event.outcome_reason == _INTENT or event.outcome_reason in _OUTCOME_REASONS
    )


def _leaf(event: AuditEvent, index: int = 7) -> bytes:
    """The leaf as the ledger writes it: the document plus its ledger fields, canonical."""
    doc: dict[str, Any] = dict(event.to_document())
    doc["seq"] = index
    doc["chain"] = base64.b64encode(bytes(range(32))).decode("ascii")
    if event.patient is not None:
        doc["patient_prev"] = index - 1
    return canonical_json(doc)


def _parsed(leaf: bytes) -> AuditEvent:
    return LedgerEntry(index=7, leaf=leaf, document=json.loads(leaf)).event


@st.composite
def marked_events(draw: st.DrawFn) -> AuditEvent:
    """Any event, of any kind, with the marker words in its reason and in its other fields."""
    event = draw(audit_events())
    update: dict[str, Any] = {}
    if draw(st.booleans()):
        update["kind"] = EventKind.REST
    if draw(st.booleans()):
        update["outcome_reason"] = draw(st.none() | _MARKERS)
    for name in ("subtype", "tenant", "request_id", "break_glass_grant"):
        if draw(st.booleans()):
            update[name] = draw(_MARKERS)
    if draw(st.booleans()):
        update["purpose_of_use"] = tuple(draw(st.lists(_MARKERS, max_size=2)))
    if draw(st.booleans()):
        update["source"] = Source(observer=draw(_MARKERS), site=draw(st.none() | _MARKERS))
    if draw(st.booleans()):
        agent = event.agents[0]
        update["agents"] = (
            agent.model_copy(
                update={"who": draw(_MARKERS), "roles": (draw(_MARKERS),)},
            ),
            *event.agents[1:],
        )
    # Validated again, as the ledger's reader will.
    return AuditEvent.model_validate(event.model_copy(update=update).to_document())


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(marked_events())
def test_the_byte_filter_never_skips_what_the_full_parse_keeps(event: AuditEvent) -> None:
    leaf = _leaf(event)
    parsed = _parsed(leaf)
    note(leaf.decode())
    assert parsed == event
    if _wanted(parsed):
        assert _may_settle(leaf)


@given(audit_events(), st.sampled_from(_REASONS))
def test_every_rest_intent_and_outcome_passes_the_filter(event: AuditEvent, reason: str) -> None:
    wanted = event.model_copy(update={"kind": EventKind.REST, "outcome_reason": reason})
    assert _may_settle(_leaf(AuditEvent.model_validate(wanted.to_document())))


def _read(reason: str | None = None, kind: EventKind = EventKind.REST) -> AuditEvent:
    return AuditEvent(
        kind=kind,
        subtype="read",
        action=Action.READ,
        recorded="2027-01-15T08:00:00.000Z",  # type: ignore[arg-type]
        outcome_reason=reason,
        tenant="t1",
        patient="Patient/p1",
        agents=(Agent(who="Practitioner/dr1", roles=("clinician",)),),
        source=Source(observer="node-1"),
        entities=(Entity(what="Observation/o1/_history/1"),),
        purpose_of_use=("TREAT",),
        request_id="req-1",
    )


def test_reads_and_other_kinds_are_not_parsed() -> None:
    assert not _may_settle(_leaf(_read()))
    assert not _may_settle(_leaf(_read("denied")))
    # A break-glass event may use the word: not a REST event, so never parsed.
    assert not _may_settle(_leaf(_read(_INTENT, kind=EventKind.BREAK_GLASS)))


def test_a_leaf_written_any_other_way_that_parses_to_an_intent_is_parsed() -> None:
    """A leaf that is not canonical (only a tampered ledger holds one; the reconciler is not
    the verifier) still reaches the full parse whenever the parse would give an intent."""
    intent = _read(_INTENT).model_copy(update={"subtype": "create", "action": Action.CREATE})
    document = json.loads(_leaf(intent))
    canonical = _leaf(intent)
    spaced = json.dumps(document, indent=2).encode()
    escaped = canonical.replace(b'"intent"', b'"\\u0069ntent"')
    kind_escaped = canonical.replace(b'"rest"', b'"r\\u0065st"')
    key_escaped = canonical.replace(b'"outcome_reason"', b'"outcome\\u005freason"')
    ascii_only = json.dumps(document, ensure_ascii=True).encode()
    with_bom = b"\xef\xbb\xbf" + canonical
    leaves = [canonical, spaced, escaped, kind_escaped, key_escaped, ascii_only, with_bom]
    leaves += [canonical.decode().encode(codec) for codec in ("utf-16", "utf-16-le", "utf-32")]
    leaves += [canonical.decode().encode("utf-32-be")]
    for leaf in leaves:
        assert _wanted(_parsed(leaf)), leaf  # the premise: each one reads back as the intent
        assert _may_settle(leaf), leaf
