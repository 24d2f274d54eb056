"""What the sequencer checks in each stream message before the ledger appends it.

It no longer re-runs the event model (the publishing worker built the event); it checks what
the ledger relies on: a known encoding, the size, a JSON object in exactly its canonical bytes,
none of the ledger's own fields, and for events the top-level shape and the patient reference.
Every refusal names the message and stops the sequencer (nothing is dropped silently).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.aio.msg import Msg

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


class _Subscription:
    def __init__(self, client: _Client) -> None:
        self.client = client

    async def unsubscribe(self) -> None:
        self.client.callback = None


class _Client:
    """What the stream reader uses of a NATS client: an inbox, a subscription, publish."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, str]] = []
        self.callback: Any = None
        self.inboxes = 0

    def new_inbox(self) -> str:
        self.inboxes += 1
        return f"_INBOX.{self.inboxes}"

    async def subscribe(self, subject: str, cb: Any) -> _Subscription:
        assert subject == f"_INBOX.{self.inboxes}.*"
        self.callback = cb
        return _Subscription(self)

    async def publish(self, subject: str, payload: bytes, reply: str) -> None:
        self.requests.append((subject, payload, reply))

    async def deliver(self, seq: int, pending: int = 0) -> None:
        data = canonical_json_of_plain_document(sample_event(seq).to_document())
        reply = f"$JS.ACK.S.c.{seq}.{seq}.{seq}.1700000000000000000.{pending}"
        await self.callback(Msg(_client=None, subject="s", reply=reply, data=data, headers=EVENT))  # type: ignore[arg-type]

    async def status(self, code: str, description: str, request: int | None = None) -> None:
        number = len(self.requests) if request is None else request
        subject = f"_INBOX.{self.inboxes}.{number}"
        headers = {"Status": code, "Description": description}
        await self.callback(Msg(_client=None, subject=subject, headers=headers))  # type: ignore[arg-type]


class _JetStream:
    def __init__(self) -> None:
        self.consumers: list[int] = []  # each consumer's start sequence

    async def add_consumer(self, stream: str, config: Any) -> None:
        self.consumers.append(config.opt_start_seq)


def _reader(start: int = 1) -> tuple[Any, _Client, _JetStream]:
    from phivault.ledger.sequencer import _StdlibLog, _StreamReader

    client, js = _Client(), _JetStream()
    return _StreamReader(js, client, "S", start, _StdlibLog()), client, js  # type: ignore[arg-type]


async def test_the_reader_keeps_one_pull_request_open_across_takes() -> None:
    """Messages delivered while the sequencer appends are handed out by the next take, in
    order and whole, without a new request per batch (nats-py's fetch made two)."""
    reader, client, js = _reader()
    assert await reader.take(500, 0.01) == []
    assert len(client.requests) == 1 and js.consumers == [1]
    subject, payload, reply = client.requests[0]
    assert subject == "$JS.API.CONSUMER.MSG.NEXT.S." + subject.rsplit(".", 1)[1]
    assert json.loads(payload)["batch"] == 512 and reply == "_INBOX.1.1"
    seq = 1
    for _round in range(10):
        for _ in range(7):
            await client.deliver(seq, pending=3)
            seq += 1
        taken = await reader.take(500, 0.01)
        assert [i.seq for i in taken] == list(range(seq - 7, seq))
    assert len(client.requests) == 1 and reader.pending == 3 and reader.next_seq == 71


async def test_a_take_hands_out_whole_messages_up_to_its_limit() -> None:
    reader, client, _js = _reader()
    await reader.take(2, 0.01)
    for seq in (1, 2, 3):
        await client.deliver(seq)
    assert [i.seq for i in await reader.take(2, 0.01)] == [1, 2]
    assert [i.seq for i in await reader.take(2, 0.01)] == [3]


async def test_a_request_ended_by_the_server_is_replaced_and_an_older_ones_end_ignored() -> None:
    reader, client, _js = _reader()
    await reader.take(10, 0.01)
    await client.status("408", "Request Timeout")
    await reader.take(10, 0.01)
    assert [r[2] for r in client.requests] == ["_INBOX.1.1", "_INBOX.1.2"]
    await client.status("408", "Request Timeout", request=1)  # late, for the first request
    await reader.take(10, 0.01)
    assert len(client.requests) == 2
    # A request whose batch was delivered in full gets no status: it is replaced too.
    for seq in range(1, 513):
        await client.deliver(seq)
    assert len(await reader.take(1000, 0.01)) == 512
    await reader.take(10, 0.01)
    assert len(client.requests) == 3


async def test_a_deleted_consumer_is_recreated_from_the_next_message() -> None:
    reader, client, js = _reader(start=5)
    await reader.take(10, 0.01)
    await client.deliver(5)
    assert [i.seq for i in await reader.take(10, 0.01)] == [5]
    await client.status("409", "Consumer Deleted")
    assert await reader.take(10, 0.01) == []  # the failed read: closed, after a pause
    assert await reader.take(10, 0.01) == []
    assert js.consumers == [5, 6] and client.requests[-1][2].startswith("_INBOX.2.")
    await client.deliver(5)  # a second delivery of a message already taken is skipped
    await client.deliver(6)
    assert [i.seq for i in await reader.take(10, 0.01)] == [6]


async def test_a_gap_in_the_delivered_sequence_is_reported_after_the_good_messages() -> None:
    from phivault.ledger.sequencer import StreamGap

    reader, client, _js = _reader()
    await reader.take(10, 0.01)
    await client.deliver(1)
    await client.deliver(3)
    assert [i.seq for i in await reader.take(10, 0.01)] == [1]
    with pytest.raises(StreamGap):
        await reader.take(10, 0.01)


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
