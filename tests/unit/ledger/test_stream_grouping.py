"""Grouped publishing of the audit stream sink, against a fake NATS client whose answers the
test controls: concurrent events go out as one message, every caller is released only by
that message's acknowledgement, a retry resends the identical message under the same id, and
a failed message fails every caller in it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import orjson
import pytest

from phivault.errors import ConfigurationError
from phivault.ledger import stream as stream_module
from phivault.ledger.canonical import canonical_json_of_plain_document
from phivault.ledger.errors import LedgerUnavailable
from phivault.ledger.idempotency import idempotency_key
from phivault.ledger.stream import (
    BATCH_HEADER,
    ENCODING_BATCH,
    ENCODING_HEADER,
    JetStreamAuditSink,
)
from phivault.ledger.testing import sample_event


@dataclass
class _Reply:
    data: bytes


@dataclass
class _FakeClient:
    """Records each request; each one waits for the test to answer it (ack, error, timeout)."""

    requests: list[tuple[bytes, dict[str, str], asyncio.Future[bytes]]] = field(
        default_factory=list
    )
    is_connected: bool = True
    is_closed: bool = False

    def jetstream(self) -> Any:
        return object()

    async def request(
        self, subject: str, payload: bytes, *, timeout: float, headers: dict[str, str]
    ) -> _Reply:
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.requests.append((payload, dict(headers), answer))
        return _Reply(await asyncio.wait_for(answer, timeout))

    async def sent(self, count: int) -> None:
        for _ in range(2000):  # up to 10 s on a loaded machine
            if len(self.requests) >= count:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"expected {count} requests, saw {len(self.requests)}")


def _sink(client: _FakeClient, **options: Any) -> JetStreamAuditSink:
    options.setdefault("publish_timeout_s", 1.0)
    options.setdefault("leader_election_wait_s", 0.0)
    return JetStreamAuditSink(client, stream="S", subject="s", **options)  # type: ignore[arg-type]


def _ack(seq: int) -> bytes:
    return orjson.dumps({"stream": "S", "seq": seq})


async def test_concurrent_events_go_out_as_one_message_released_only_by_its_ack() -> None:
    client = _FakeClient()
    sink = _sink(client)
    events = [sample_event(i) for i in range(5)]
    calls = [asyncio.ensure_future(sink.record(e)) for e in events]
    await client.sent(1)
    await asyncio.sleep(0.02)
    assert len(client.requests) == 1
    payload, headers, answer = client.requests[0]
    assert headers[ENCODING_HEADER] == ENCODING_BATCH
    assert headers[BATCH_HEADER] == "event,event,event,event,event"
    assert payload == b"\n".join(canonical_json_of_plain_document(e.to_document()) for e in events)
    assert not any(c.done() for c in calls)  # nobody moves data before the ack
    answer.set_result(_ack(7))
    assert await asyncio.gather(*calls) == [7] * 5


async def test_a_lone_event_is_an_ordinary_single_event_message() -> None:
    client = _FakeClient()
    sink = _sink(client)
    call = asyncio.ensure_future(sink.record(sample_event(1)))
    await client.sent(1)
    payload, headers, answer = client.requests[0]
    assert headers[ENCODING_HEADER] == "event" and BATCH_HEADER not in headers
    assert payload == canonical_json_of_plain_document(sample_event(1).to_document())
    answer.set_result(_ack(1))
    assert await call == 1


async def test_a_retry_resends_the_identical_message_under_the_same_id() -> None:
    client = _FakeClient()
    sink = _sink(client, publish_timeout_s=2.0)
    calls = [asyncio.ensure_future(sink.record(sample_event(i))) for i in range(3)]
    await client.sent(1)
    first_payload, first_headers, first = client.requests[0]
    first.set_exception(nats.errors.TimeoutError())  # the ack was lost
    # Events recorded meanwhile wait for a message of their own: never added to the retry.
    later = asyncio.ensure_future(sink.record(sample_event(9)))
    await client.sent(2)
    payloads = [(p, h) for p, h, _ in client.requests]
    retry = next(i for i, (p, _) in enumerate(payloads) if i > 0 and p == first_payload)
    assert payloads[retry][1] == first_headers  # same Nats-Msg-Id, same encodings
    for payload, _headers, answer in client.requests[1:]:
        answer.set_result(_ack(1 if payload == first_payload else 2))
    await client.sent(3)
    for _payload, _headers, answer in client.requests[1:]:
        if not answer.done():
            answer.set_result(_ack(2))
    assert await asyncio.gather(*calls) == [1, 1, 1]
    assert await later == 2


async def test_a_failed_message_fails_every_caller_in_it() -> None:
    client = _FakeClient()
    sink = _sink(client, publish_timeout_s=0.2)
    calls = [asyncio.ensure_future(sink.record(sample_event(i))) for i in range(4)]
    await client.sent(1)
    client.requests[0][2].set_result(orjson.dumps({"error": {"code": 500, "description": "x"}}))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, LedgerUnavailable) for r in results), results
    assert len(client.requests) == 1


async def test_a_message_that_times_out_fails_every_caller_in_it() -> None:
    client = _FakeClient()
    sink = _sink(client, publish_timeout_s=0.2)
    calls = [asyncio.ensure_future(sink.record(sample_event(i))) for i in range(4)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, LedgerUnavailable) for r in results), results
    # Every try of that message was the same message.
    assert len({(p, tuple(sorted(h.items()))) for p, h, _ in client.requests}) == 1


async def test_events_with_an_idempotency_key_are_grouped_only_with_one_another() -> None:
    client = _FakeClient()
    sink = _sink(client)

    async def keyed(i: int) -> int:
        with idempotency_key(f"outcome-{i}"):
            return await sink.record(sample_event(i))

    calls = [asyncio.ensure_future(keyed(i)) for i in range(3)]
    calls.append(asyncio.ensure_future(sink.record(sample_event(5), msg_id="explicit")))
    plain = asyncio.ensure_future(sink.record(sample_event(6)))
    await client.sent(2)
    await asyncio.sleep(0.02)
    assert len(client.requests) == 2
    by_count = {h.get(BATCH_HEADER, "").count(",") + 1: (p, h, a) for p, h, a in client.requests}
    payload, headers, answer = by_count[4]  # the keyed events, in order, in one message
    assert headers[ENCODING_HEADER] == ENCODING_BATCH
    assert payload == b"\n".join(
        canonical_json_of_plain_document(sample_event(i).to_document()) for i in (0, 1, 2, 5)
    )
    assert headers["Nats-Msg-Id"] not in {"explicit", "outcome-0", "outcome-1", "outcome-2"}
    answer.set_result(_ack(1))
    lone_payload, _lone_headers, lone_answer = by_count[1]  # the plain event: its own message
    assert lone_payload == canonical_json_of_plain_document(sample_event(6).to_document())
    lone_answer.set_result(_ack(2))
    assert await asyncio.gather(*calls) == [1, 1, 1, 1] and await plain == 2
    # Recorded again (a caller's retry after a lost answer): the same position, nothing sent.
    assert await keyed(1) == 1 and len(client.requests) == 2


async def test_a_keyed_event_recorded_again_after_its_message_failed_resends_that_message() -> None:
    client = _FakeClient()
    sink = _sink(client, publish_timeout_s=0.2)

    async def keyed(i: int) -> int:
        with idempotency_key(f"outcome-{i}"):
            return await sink.record(sample_event(i))

    calls = [asyncio.ensure_future(keyed(i)) for i in range(3)]
    await client.sent(1)
    first_payload, first_headers, _ = client.requests[0]
    results = await asyncio.gather(*calls, return_exceptions=True)  # never acknowledged
    assert all(isinstance(r, LedgerUnavailable) for r in results), results
    tries = len(client.requests)
    # Each caller records its event again: the very message goes again, under the same id
    # (the stream drops it if a try was stored), and never with anything else in it.
    again = asyncio.ensure_future(keyed(2))
    await client.sent(tries + 1)
    payload, headers, answer = client.requests[tries]
    assert (payload, headers) == (first_payload, first_headers)
    answer.set_result(_ack(4))
    assert await again == 4
    assert await keyed(0) == 4 and await keyed(1) == 4  # answered from the acknowledgement
    assert len(client.requests) == tries + 1


async def test_a_key_recorded_again_while_its_first_copy_waits_goes_out_once() -> None:
    """Retries never duplicate an event: the same key recorded twice before its message is
    sent (say, a caller that left and tried again at once) is one event in one message, and
    both callers get its acknowledgement; so does a caller joining after the other left."""
    client = _FakeClient()
    sink = _sink(client)

    async def keyed(i: int) -> int:
        with idempotency_key("outcome-k"):
            return await sink.record(sample_event(i))

    first = asyncio.ensure_future(keyed(1))
    again = asyncio.ensure_future(keyed(1))  # same turn of the loop: both still queued
    left = asyncio.ensure_future(keyed(1))
    await asyncio.sleep(0)
    left.cancel()
    await client.sent(1)
    await asyncio.sleep(0.02)
    assert len(client.requests) == 1
    payload, headers, answer = client.requests[0]
    assert payload == canonical_json_of_plain_document(sample_event(1).to_document())
    assert headers["Nats-Msg-Id"] == "outcome-k"  # a lone keyed event: its key is the id
    answer.set_result(_ack(7))
    assert await first == 7 and await again == 7
    assert left.cancelled()
    assert await keyed(1) == 7 and len(client.requests) == 1  # remembered from now on


async def test_a_failed_message_fails_every_caller_that_joined_its_key() -> None:
    client = _FakeClient()
    sink = _sink(client, publish_timeout_s=0.2)

    async def keyed() -> int:
        with idempotency_key("outcome-f"):
            return await sink.record(sample_event(3))

    calls = [asyncio.ensure_future(keyed()) for _ in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)  # never acknowledged
    assert all(isinstance(r, LedgerUnavailable) for r in results), results
    assert len({(p, tuple(sorted(h.items()))) for p, h, _ in client.requests}) == 1


async def test_a_key_is_forgotten_after_the_duplicate_window() -> None:
    client = _FakeClient()
    sink = _sink(client, publish_timeout_s=0.05, duplicate_window_s=0.1)
    with idempotency_key("k"):
        first = asyncio.ensure_future(sink.record(sample_event(1)))
        await client.sent(1)
        client.requests[0][2].set_result(_ack(1))
        assert await first == 1
        assert await sink.record(sample_event(1)) == 1  # remembered
        await asyncio.sleep(0.1)
        later = asyncio.ensure_future(sink.record(sample_event(1)))  # forgotten: sent again
        await client.sent(2)
        client.requests[1][2].set_result(_ack(2))
        assert await later == 2
    assert client.requests[1][1]["Nats-Msg-Id"] == "k"  # a lone keyed event: its key is the id


async def test_while_messages_are_in_flight_later_events_gather_into_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream_module, "GROUP_MAX_WAIT_S", 60.0)  # not overdue in this test
    client = _FakeClient()
    sink = _sink(client, group_in_flight=1)
    first = asyncio.ensure_future(sink.record(sample_event(0)))
    await client.sent(1)
    rest = []
    for i in range(1, 6):  # each in its own turn of the loop
        rest.append(asyncio.ensure_future(sink.record(sample_event(i))))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert len(client.requests) == 1
    client.requests[0][2].set_result(_ack(1))
    assert await first == 1
    await client.sent(2)
    assert client.requests[1][1][BATCH_HEADER] == ",".join(["event"] * 5)
    client.requests[1][2].set_result(_ack(2))
    assert await asyncio.gather(*rest) == [2] * 5


async def test_an_event_behind_a_stalled_message_is_sent_after_the_bound_anyway() -> None:
    client = _FakeClient()
    sink = _sink(client, group_in_flight=1, publish_timeout_s=30.0)
    stalled = asyncio.ensure_future(sink.record(sample_event(0)))
    await client.sent(1)
    later = [asyncio.ensure_future(sink.record(sample_event(i))) for i in (1, 2)]
    # The first message is never answered: the others go out after GROUP_MAX_WAIT_S.
    await client.sent(2)
    assert client.requests[1][1][BATCH_HEADER] == "event,event"
    client.requests[1][2].set_result(_ack(2))
    assert await asyncio.gather(*later) == [2, 2]
    assert not stalled.done()
    client.requests[0][2].set_result(_ack(1))
    assert await stalled == 1


async def test_closing_sends_what_waits_and_then_refuses() -> None:
    client = _FakeClient()
    sink = _sink(client, group_in_flight=1)
    first = asyncio.ensure_future(sink.record(sample_event(0)))
    await client.sent(1)
    second = asyncio.ensure_future(sink.record(sample_event(1)))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(sink.aclose())
    await client.sent(2)
    for n, (_p, _h, answer) in enumerate(client.requests):
        answer.set_result(_ack(n + 1))
    await closing
    assert (await first, await second) == (1, 2)
    with pytest.raises(LedgerUnavailable, match="closed"):
        await sink.record(sample_event(2))


def test_grouping_options_are_checked() -> None:
    client = _FakeClient()
    with pytest.raises(ConfigurationError):
        _sink(client, group_max=0)
    with pytest.raises(ConfigurationError):
        _sink(client, group_in_flight=0)
    with pytest.raises(ConfigurationError):
        _sink(client, group_window_s=1.0)
    with pytest.raises(ConfigurationError):
        _sink(client, duplicate_window_s=0)
