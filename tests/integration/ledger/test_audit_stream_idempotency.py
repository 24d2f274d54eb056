"""The ambient idempotency key (``phivault.ledger.idempotency``) is the ``Nats-Msg-Id`` of what
the stream sink publishes inside its block: a caller that records the same event again (a
committed write's outcome after a lost acknowledgement) gets one copy in the stream."""

from __future__ import annotations

import asyncio

import pytest
from stream_support import NATS_URL, AuditStream, stream_fixture  # noqa: F401

from phivault.ledger.idempotency import current_idempotency_key, idempotency_key
from phivault.ledger.stream import JetStreamAuditSink
from phivault.ledger.testing import sample_event

pytestmark = pytest.mark.integration


async def test_records_in_an_idempotency_block_are_stored_once(audit_stream: AuditStream) -> None:
    async with await JetStreamAuditSink.connect(
        [NATS_URL], name="idem-test", stream=audit_stream.name, subject=audit_stream.subject
    ) as sink:
        with idempotency_key("outcome-1"):
            first = await sink.record(sample_event(1))
        with idempotency_key("outcome-1"):
            again = await sink.record(sample_event(1))
        plain = await sink.record(sample_event(1))  # outside a block: a new message
        explicit = await sink.record(sample_event(2), msg_id="other")  # an explicit id wins
        with idempotency_key("outcome-1"):
            assert await sink.record(sample_event(3), msg_id="third") == explicit + 1
    assert first == again == 1 and plain == 2 and explicit == 3
    stored = await audit_stream.js.get_msg(audit_stream.name, 1)
    assert stored.headers is not None and stored.headers["Nats-Msg-Id"] == "outcome-1"
    assert (await audit_stream.js.stream_info(audit_stream.name)).state.messages == 4


async def test_the_key_belongs_to_its_block_and_task() -> None:
    assert current_idempotency_key() is None
    seen: list[str | None] = []

    async def elsewhere() -> None:
        seen.append(current_idempotency_key())

    task = asyncio.ensure_future(elsewhere())  # made outside the block: no key
    with idempotency_key("k"):
        assert current_idempotency_key() == "k"
        await task
    assert current_idempotency_key() is None and seen == [None]
