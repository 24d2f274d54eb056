"""The audit-stream side of the fault tests: a publishing load through the real
:class:`~phivault.ledger.stream.JetStreamAuditSink` that keeps a tally of every acknowledged
event (by its message id), and a reader of everything the stream holds.

Each publish passes its own message id, so that afterwards every acknowledged event can be
found in the stream (and in the ledger) exactly once, and a failed publish is known by id too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from phivault.ledger.errors import LedgerUnavailable
from phivault.ledger.stream import JetStreamAuditSink, audit_subject, ensure_audit_stream
from phivault.ledger.testing import sample_event

__all__ = [
    "Publication",
    "PublishTally",
    "StreamMessage",
    "admin_client",
    "publish_load",
    "read_stream",
    "stream_name",
]


def stream_name(prefix: str = "FAULT") -> str:
    return f"{prefix}_{secrets.token_hex(4).upper()}"


async def admin_client(urls: Sequence[str]) -> NatsClient:
    """A plain client for setting up and reading streams (not the one under test)."""

    async def quiet(exc: Exception) -> None:
        return None  # refused connections while nodes are down are the point, not news

    client: NatsClient = await nats.connect(
        servers=list(urls),
        name="fault-admin",
        error_cb=quiet,
        connect_timeout=2,
        reconnect_time_wait=0.25,
        max_reconnect_attempts=-1,
    )
    return client


async def create_stream(js: JetStreamContext, name: str, replicas: int) -> None:
    await ensure_audit_stream(js, name=name, subject=audit_subject(name), replicas=replicas)


@dataclass(frozen=True)
class Publication:
    msg_id: str
    started: float
    finished: float
    seq: int | None  # None: it failed
    error: str | None = None


@dataclass
class PublishTally:
    """Every publish the load made, acknowledged or not."""

    done: list[Publication] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def acked(self) -> dict[str, int]:
        return {p.msg_id: p.seq for p in self.done if p.seq is not None}

    def failures(self, since: float = 0.0) -> list[Publication]:
        return [p for p in self.done if p.seq is None and p.started >= since]

    def successes(self, since: float = 0.0) -> list[Publication]:
        return [p for p in self.done if p.seq is not None and p.started >= since]

    def started_since(self, since: float) -> list[Publication]:
        return [p for p in self.done if p.started >= since]

    @property
    def last_success(self) -> float:
        times = [p.finished for p in self.done if p.seq is not None]
        return max(times, default=0.0)


_numbers = itertools.count()


async def publish_load(
    sink: JetStreamAuditSink,
    tally: PublishTally,
    stop: asyncio.Event,
    *,
    publishers: int = 4,
    pause_s: float = 0.005,
    keyed: bool = True,
) -> None:
    """``publishers`` tasks publish events through ``sink`` until ``stop`` is set; every
    outcome goes to ``tally`` (a LedgerUnavailable is an expected failure, anything else is
    noted as unexpected).

    ``keyed``: each event has its own idempotency key (as write outcomes do: the sink groups
    keyed events with one another, a lone one going as a single-event message with its key as
    message id); otherwise events without a key (as disclosures), grouped by the sink into
    batch messages. Either way the tally names each event by its request id (``req-<n>``)."""
    run = secrets.token_hex(3)

    async def publisher(lane: int) -> None:
        while not stop.is_set():
            n = next(_numbers)
            msg_id = f"req-{n}"  # the event's request id: how the checks find it
            started = time.monotonic()
            try:
                key = f"fault-{run}-{lane}-{n}" if keyed else None
                seq = await sink.record(sample_event(n), msg_id=key)
            except LedgerUnavailable as exc:
                tally.done.append(Publication(msg_id, started, time.monotonic(), None, str(exc)))
                await asyncio.sleep(0.05)
                continue
            except Exception as exc:
                tally.unexpected.append(f"{type(exc).__name__}: {exc}")
                tally.done.append(Publication(msg_id, started, time.monotonic(), None, repr(exc)))
                await asyncio.sleep(0.05)
                continue
            tally.done.append(Publication(msg_id, started, time.monotonic(), seq))
            await asyncio.sleep(pause_s)

    await asyncio.gather(*(publisher(lane) for lane in range(publishers)))


@dataclass(frozen=True)
class StreamMessage:
    seq: int
    msg_id: str | None
    data: bytes


async def read_stream(
    js: JetStreamContext, name: str, *, at_least: int = 0, timeout: float = 20.0
) -> list[StreamMessage]:
    """Every message the stream holds, in stream order, read through a consumer until none
    is left and the sequence ``at_least`` (say, the highest acknowledged) has been read.

    Right after a fault the cluster may still be electing its meta leader, without which no
    consumer can be made: the set-up is retried until ``timeout``. If the stream ends before
    ``at_least``, :class:`AssertionError` says so: acknowledged events were lost."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sub = await js.pull_subscribe(audit_subject(name), stream=name)
            break
        except (nats.errors.TimeoutError, TimeoutError, nats.js.errors.ServiceUnavailableError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)
    out: list[StreamMessage] = []
    try:
        while True:
            try:
                batch = await sub.fetch(256, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either
                batch = []
            for msg in batch:
                headers = msg.headers or {}
                seq = msg.metadata.sequence.stream
                out.append(StreamMessage(seq, headers.get("Nats-Msg-Id"), msg.data))
                await msg.ack()
            last = out[-1].seq if out else 0
            if not batch and last >= at_least:
                break
            if time.monotonic() > deadline:
                info = await js.stream_info(name)
                raise AssertionError(
                    f"the stream {name} ends at {last} (its info says {info.state.last_seq}, "
                    f"{info.state.messages} messages) but events were acknowledged up to "
                    f"{at_least}"
                )
    finally:
        await sub.unsubscribe()
    return out


def exactly_once(acked: dict[str, int], messages: list[StreamMessage]) -> None:
    """Keyed events (each with its own message id, grouped by the sink with one another): no
    message is stored twice (a retry resends its message under the same id, and the stream
    drops the copy), and every acknowledged event is in the stream exactly once, in the
    message its acknowledgement named (:func:`exactly_once_grouped`)."""
    ids = Counter(m.msg_id for m in messages)
    doubled = [i for i, n in ids.items() if n > 1]
    assert not doubled, f"message ids stored more than once: {doubled[:5]}"
    exactly_once_grouped(acked, messages)


def exactly_once_grouped(acked: dict[str, int], messages: list[StreamMessage]) -> None:
    """Events published without message ids (grouped by the sink into batch messages): every
    acknowledged event (by request id) is in the stream exactly once, in the message its
    acknowledgement named; no event appears twice at all (a retried batch is never regrouped)."""
    at: dict[str, list[int]] = {}
    for message in messages:
        for part in message.data.split(b"\n"):  # canonical JSON holds no raw newline
            at.setdefault(str(json.loads(part).get("request_id")), []).append(message.seq)
    doubled = [(i, seqs) for i, seqs in at.items() if len(seqs) > 1]
    assert not doubled, f"events stored more than once: {doubled[:5]}"
    missing = sorted((s, i) for i, s in acked.items() if i not in at)
    assert not missing, f"{len(missing)} acknowledged events are not in the stream: {missing[:5]}"
    moved = [(i, s, at[i]) for i, s in acked.items() if at[i] != [s]]
    assert not moved, f"acknowledged in one message, stored in another: {moved[:5]}"
