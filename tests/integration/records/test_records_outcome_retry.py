"""A committed write's outcome event, retried after the audit stream seemed to refuse it, is
recorded once: every try publishes the same event under the same ``Nats-Msg-Id``, so the
stream's duplicate window drops a repeat whose first try had in fact been stored.

On the real NATS JetStream server (``PHIVAULT_TEST_NATS``, default 127.0.0.1:4222), in a
stream of the test's own, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from nats.js import JetStreamContext
from records_store_support import StoreFactory
from repository_support import loader, open_kit

from phivault.ledger.errors import LedgerUnavailable
from phivault.ledger.events import AuditEvent
from phivault.ledger.stream import JetStreamAuditSink, ensure_audit_stream

pytestmark = pytest.mark.integration

NATS_URL = os.environ.get("PHIVAULT_TEST_NATS", "nats://127.0.0.1:4222")


@dataclass(frozen=True)
class Stream:
    name: str
    subject: str
    js: JetStreamContext


@pytest_asyncio.fixture
async def stream() -> AsyncIterator[Stream]:
    suffix = secrets.token_hex(5)
    name, subject = f"PV_TEST_RETRY_{suffix}", f"phivault.test.retry.{suffix}"
    try:
        client = await asyncio.wait_for(
            nats.connect(servers=[NATS_URL], max_reconnect_attempts=1, connect_timeout=2), 5
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        pytest.fail(f"NATS with JetStream is not reachable at {NATS_URL}: {exc!r}", pytrace=False)
    js = client.jetstream()
    try:
        await ensure_audit_stream(js, name=name, subject=subject, replicas=1)
        yield Stream(name, subject, js)
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
        await client.close()


@dataclass
class LostAcknowledgement:
    """The stream sink, except that the first outcome event is stored by the stream and then
    reported as failed (its acknowledgement lost on the way back)."""

    sink: JetStreamAuditSink
    outcomes: list[tuple[AuditEvent, int]] = field(default_factory=list)

    async def record(self, event: AuditEvent) -> int:
        seq = await self.sink.record(event)
        if event.outcome_reason == "committed":
            self.outcomes.append((event, seq))
            if len(self.outcomes) == 1:
                raise LedgerUnavailable("the acknowledgement was lost (simulated)")
        return seq


async def stored(stream: Stream) -> list[dict[str, object]]:
    count = (await stream.js.stream_info(stream.name)).state.messages
    messages = [await stream.js.get_msg(stream.name, seq) for seq in range(1, count + 1)]
    return [json.loads(m.data or b"") for m in messages]


async def test_a_retried_outcome_event_is_the_same_event_and_stored_once(
    stores: StoreFactory, tmp_path: Path, stream: Stream
) -> None:
    async with (
        open_kit(stores, tmp_path) as kit,
        await JetStreamAuditSink.connect(
            [NATS_URL], name="retry-test", stream=stream.name, subject=stream.subject
        ) as sink,
    ):
        audit = LostAcknowledgement(sink)
        with pytest.raises(LedgerUnavailable):  # committed, but not known to be recorded: 503
            await kit.repo.create(loader(audit), {"resourceType": "Organization", "name": "A"})
        for _ in range(200):  # the repository retries in the background (first after 0.2 s)
            if len(audit.outcomes) >= 2 and not kit.repo._settling:
                break
            await asyncio.sleep(0.05)
        (first, first_seq), (again, again_seq) = audit.outcomes
        assert again.to_document() == first.to_document()  # the same event, not a new one
        assert again_seq == first_seq  # the stream recognised it: the same message id
        reasons = [doc.get("outcome_reason") for doc in await stored(stream)]
        assert reasons == ["intent", "committed"]
