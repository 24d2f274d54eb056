"""What the sequencer checks in each stream message before the ledger appends it.

It no longer re-runs the event model (the publishing worker built the event); it checks what
the ledger relies on: a known encoding, the size, a JSON object in exactly its canonical bytes,
none of the ledger's own fields, and for events the top-level shape and the patient reference.
Every refusal names the message and stops the sequencer (nothing is dropped silently).
"""

from __future__ import annotations

from typing import Any

import pytest

from phivault.ledger.canonical import canonical_json, canonical_json_of_plain_document
from phivault.ledger.sequencer import InvalidStreamMessage, _decode, _decode_message
from phivault.ledger.stream import (
    BATCH_HEADER,
    ENCODING_BATCH,
    ENCODING_HEADER,
    MAX_EVENT_BYTES,
)
from phivault.ledger.testing import sample_event

EVENT = {ENCODING_HEADER: "event"}
DOCUMENT = {ENCODING_HEADER: "document"}


def _event_doc(n: int = 1, **changes: Any) -> dict[str, Any]:
    doc = sample_event(n).to_document()
    doc.update(changes)
    return doc


def _refused(headers: dict[str, str] | None, data: bytes) -> str:
    with pytest.raises(InvalidStreamMessage) as raised:
        _decode(7, headers, data)
    assert raised.value.seq == 7
    return raised.value.reason


def test_what_a_sink_publishes_decodes_to_its_document() -> None:
    for n in range(50):
        event = sample_event(n, patient=None if n % 5 == 0 else f"Patient/p-{n % 3}")
        document = event.to_document()
        data = canonical_json_of_plain_document(document)  # what JetStreamAuditSink.record sends
        incoming = _decode(n + 1, EVENT, data)
        assert incoming.seq == n + 1 and incoming.document == document
        # The ledger's leaf for it is the one Ledger.record would have made.
        assert canonical_json(incoming.document) == data


def test_a_document_message_may_hold_any_canonical_json_object() -> None:
    document = {"kind": "ledger", "subtype": "note", "x": 0.25, "n": 3, "text": "é"}
    assert _decode(1, DOCUMENT, canonical_json(document)).document == document


@pytest.mark.parametrize("headers", [None, {}, {ENCODING_HEADER: "pickle"}])
def test_no_or_an_unknown_encoding_is_refused(headers: dict[str, str] | None) -> None:
    data = canonical_json(_event_doc())
    assert "header" in _refused(headers, data)


def test_an_oversized_message_is_refused_before_parsing() -> None:
    assert "bytes, over" in _refused(DOCUMENT, b"{" + b" " * MAX_EVENT_BYTES + b"}")


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"\xff\xfe", b'{"a":NaN}', b'{"a":"\\ud800"}', b'{"a":1e400}'],
)
def test_what_is_not_json_is_refused(data: bytes) -> None:
    assert _refused(DOCUMENT, data) == "not JSON"


@pytest.mark.parametrize("data", [b"[]", b'"event"', b"1", b"null"])
def test_what_is_not_an_object_is_refused(data: bytes) -> None:
    assert _refused(DOCUMENT, data) == "not a JSON object"


@pytest.mark.parametrize("field", ["seq", "chain", "patient_prev"])
@pytest.mark.parametrize("headers", [EVENT, DOCUMENT])
def test_a_message_setting_a_ledger_field_is_refused(field: str, headers: dict[str, str]) -> None:
    # A forged back-link or index would make the ledger lie about a patient's history.
    data = canonical_json(_event_doc(**{field: 0}))
    assert _refused(headers, data) == "it sets a field the ledger adds"


@pytest.mark.parametrize(
    "data",
    [
        b'{ "kind":"note"}',  # whitespace
        b'{"n":1,"kind":"note"}',  # key order
        b'{"kind":"note","x":1.0}',  # JCS writes 1
        b'{"kind":"note","x":1e16}',  # JCS writes 10000000000000000
        b'{"kind":"note","n":123456789012345678901234567890}',  # beyond 2**53: refused
        b'{"kind":"note","kind":"rest"}',  # a duplicate key (the parse keeps one)
        b'{"kind":"\\u006eote"}',  # an unneeded escape
    ],
)
def test_bytes_that_are_not_the_canonical_form_are_refused(data: bytes) -> None:
    assert _refused(DOCUMENT, data) in ("not in canonical form", "not canonicalizable")


def test_a_non_canonical_event_is_refused() -> None:
    data = canonical_json(_event_doc()).replace(b'"kind":', b'"kind": ')
    assert _refused(EVENT, data) == "not in canonical form"


def test_an_event_without_its_required_fields_is_refused() -> None:
    assert _refused(EVENT, b'{"kind":"rest"}').startswith("invalid event fields: action, agents")
    doc = _event_doc()
    del doc["recorded"]
    assert _refused(EVENT, canonical_json(doc)) == "invalid event fields: recorded"


def test_an_event_with_a_field_the_model_does_not_have_is_refused() -> None:
    data = canonical_json(_event_doc(note="x"))
    assert _refused(EVENT, data) == "invalid event fields: note"


@pytest.mark.parametrize(
    "patient",
    [
        7,
        ["Patient/p-1"],
        {"ref": "Patient/p-1"},
        "Practitioner/pr-1",
        "Patient/p-1/_history/2",
        'Patient/p"1',
        "Patient/",
        "Patient/" + "x" * 65,
    ],
)
def test_an_event_whose_patient_is_not_a_patient_reference_is_refused(patient: object) -> None:
    # The back-links are keyed on this string, and found again in the leaf bytes on reopening.
    data = canonical_json(_event_doc(patient=patient))
    assert _refused(EVENT, data) == "invalid event fields: patient"


@pytest.mark.parametrize("agents", [[], "Practitioner/pr-1", {"who": "x"}])
def test_an_event_without_a_list_of_agents_is_refused(agents: object) -> None:
    data = canonical_json(_event_doc(agents=agents))
    assert _refused(EVENT, data) == "invalid event fields: agents"


class _Metadata:
    def __init__(self, seq: int) -> None:
        self.sequence = type("Sequence", (), {"stream": seq})()
        self.num_pending = 0


class _Message:
    def __init__(self, seq: int) -> None:
        self.metadata = _Metadata(seq)
        self.headers = EVENT
        self.data = canonical_json_of_plain_document(sample_event(seq).to_document())


class _Subscription:
    """A pull subscription whose second fetch of a batch times out with asyncio's own
    TimeoutError (nats-py raises it when its deadline passes between its two requests)."""

    def __init__(self) -> None:
        self.fetches = 0

    async def fetch(self, batch: int, timeout: float) -> list[_Message]:
        self.fetches += 1
        if self.fetches % 2 == 0:
            raise TimeoutError  # asyncio.TimeoutError, not nats.errors.TimeoutError
        return [_Message(self.fetches // 2 + 1)]


async def test_a_batch_whose_second_fetch_times_out_keeps_its_message_and_its_consumer() -> None:
    """Regression: asyncio's TimeoutError from the "take what else is there" fetch used to
    count as a failed stream read: the message already fetched was dropped, the consumer
    recreated, and the sequencer slept half a second before reading it again."""

    from phivault.ledger.sequencer import _StdlibLog, _StreamReader

    subscription = _Subscription()
    reader = _StreamReader(None, "S", 1, _StdlibLog())  # type: ignore[arg-type]
    reader._sub = subscription  # type: ignore[assignment]
    first = await reader.take(500, 1.0)
    second = await reader.take(500, 1.0)
    assert [m.seq for m in first + second] == [1, 2]
    assert reader._sub is subscription  # never closed and recreated


# -- batch messages (several events, one message) -------------------------------------------


def _batch_refused(headers: dict[str, str], data: bytes) -> str:
    with pytest.raises(InvalidStreamMessage) as raised:
        _decode_message(9, headers, data)
    assert raised.value.seq == 9
    return raised.value.reason


def test_a_batch_message_decodes_to_its_events_in_order() -> None:
    docs = [_event_doc(n) for n in range(3)]
    plain = {"kind": "ledger", "n": 1}
    data = b"\n".join([canonical_json_of_plain_document(d) for d in docs] + [canonical_json(plain)])
    headers = {ENCODING_HEADER: ENCODING_BATCH, BATCH_HEADER: "event,event,event,document"}
    incoming = _decode_message(9, headers, data)
    assert [i.document for i in incoming] == [*docs, plain]
    assert {i.seq for i in incoming} == {9}
    # A single-event message (older workers) is a list of one.
    single = canonical_json_of_plain_document(docs[0])
    assert [i.document for i in _decode_message(3, EVENT, single)] == [docs[0]]


def test_a_batch_that_does_not_add_up_is_refused_whole() -> None:
    good = canonical_json_of_plain_document(_event_doc(1))
    batch = {ENCODING_HEADER: ENCODING_BATCH}
    assert BATCH_HEADER in _batch_refused(batch, good + b"\n" + good)
    assert "lists 3" in _batch_refused({**batch, BATCH_HEADER: "event,event,event"}, good)
    assert "unknown encoding" in _batch_refused(
        {**batch, BATCH_HEADER: "event,blob"}, good + b"\n" + good
    )
    # An empty part, a bad event, a pretty-printed one: the whole message stops the sequencer.
    assert _batch_refused({**batch, BATCH_HEADER: "event,event"}, good + b"\n")
    bad = canonical_json_of_plain_document(_event_doc(2, seq=4))
    assert "ledger adds" in _batch_refused(
        {**batch, BATCH_HEADER: "event,event"}, good + b"\n" + bad
    )
