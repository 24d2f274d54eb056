"""The scaled shape's audit stream: API workers publish events to NATS JetStream.

In the scaled shape the ledger has one writer, the sequencer (:mod:`phivault.ledger.sequencer`),
and the API workers are many. A worker's :class:`JetStreamAuditSink` publishes each event to a
JetStream stream and returns only once the stream has acknowledged it: the acknowledgement is
given after the stream stored the message (on a quorum of its replicas), so invariant 1 holds
with the stream as the durable record until the sequencer appends the event to the ledger.

What a message carries (and what the sequencer relies on):

* the payload is the RFC 8785 canonical JSON of the event document, exactly the bytes the
  embedded ledger encodes before adding its own fields;
* the header :data:`ENCODING_HEADER` says how the embedded ledger would have taken it:
  ``event`` for :meth:`~JetStreamAuditSink.record` (an :class:`AuditEvent`'s document: the
  sequencer checks its top-level shape and patient reference), ``document`` for
  :meth:`~JetStreamAuditSink.record_document`; either way the sequencer appends exactly the
  canonical bytes it received plus the ledger's fields, so the ledger ends up with the same
  leaves as the embedded ledger for the same calls;
* ``Nats-Msg-Id`` is a fresh unique id per call, reused by every retry of that call: the
  stream's duplicate window drops a retried message that had in fact been stored, so a retry
  after a lost acknowledgement never records an event twice. A caller that records the same
  event again itself (after :class:`LedgerUnavailable`) passes one key to every attempt:
  ``msg_id``, or through the audit trail the ambient key of
  :func:`phivault.ledger.idempotency.idempotency_key`.

**Grouped messages.** Events (reads, searches, write intents and outcomes) are not
published one by one: the events of a worker that arrive
in the same event-loop turn (``group_window_s`` = 0) or within ``group_window_s`` go out as ONE
message with one acknowledgement, and each caller is released only once that message is
acknowledged (a failed message fails every caller in it). A message of two or more events has
``Phivault-Audit-Encoding: batch``, a header :data:`BATCH_HEADER` listing each event's encoding
(``event`` or ``document``, comma-separated, in order), and as payload the events' canonical
JSON joined by a newline (canonical JSON never contains a raw newline byte). A group of one is
sent as a single-event message, exactly as before, so the sequencer reads both forms, and a
stream holding messages of older workers stays readable. A grouped message has a fresh
``Nats-Msg-Id``, reused by every retry of that publish with the identical bytes: events are
never regrouped on a retry. Events with an idempotency key (write outcomes) are grouped with
one another only, and the sink remembers each key's message for the stream's duplicate window:
a caller's later retry of that key, perhaps after the first attempt was in fact stored, sends
that very message again under its id, and the duplicate window drops it (a keyed event alone
is sent under its key, as before). All events of a message share its stream sequence number:
:meth:`JetStreamAuditSink.record` returns it.

No nats exception crosses the port: every failure to get an acknowledgement becomes
:class:`~phivault.ledger.errors.LedgerUnavailable` (callers serving PHI answer 503).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

from phivault.errors import ConfigurationError, InvalidInput
from phivault.ledger.canonical import canonical_json, canonical_json_of_plain_document
from phivault.ledger.errors import LedgerError, LedgerUnavailable
from phivault.ledger.events import LEDGER_FIELDS, AuditEvent
from phivault.ledger.file_store import MAX_LEAF_BYTES
from phivault.ledger.idempotency import current_idempotency_key
from phivault.resilience import retrying

if TYPE_CHECKING:
    from phivault.resilience import Breaker

__all__ = [
    "BATCH_HEADER",
    "BATCH_SEPARATOR",
    "ENCODING_BATCH",
    "ENCODING_DOCUMENT",
    "ENCODING_EVENT",
    "ENCODING_HEADER",
    "MAX_EVENT_BYTES",
    "JetStreamAuditSink",
    "audit_subject",
    "connect_nats",
    "ensure_audit_stream",
]

ENCODING_HEADER: Final = "Phivault-Audit-Encoding"
ENCODING_EVENT: Final = "event"
ENCODING_DOCUMENT: Final = "document"
ENCODING_BATCH: Final = "batch"
# A batch message's per-event encodings, comma-separated, in payload order.
BATCH_HEADER: Final = "Phivault-Audit-Batch"
# What separates the events of a batch payload (never a byte of canonical JSON).
BATCH_SEPARATOR: Final = b"\n"
# Bounds of one grouped message: events, and payload bytes (below NATS' 1 MiB default).
GROUP_MAX_EVENTS: Final = 64
GROUP_MAX_BYTES: Final = 256 * 1024
# Grouped messages awaiting their acknowledgement at once; events arriving meanwhile wait for
# the next message (the busier the worker, the more events per message).
GROUP_IN_FLIGHT: Final = 2
# The longest an event waits for one of those to be answered before it is sent regardless.
GROUP_MAX_WAIT_S: Final = 0.05
# Room left in a leaf for the fields the ledger adds (seq, chain, patient_prev).
_LEDGER_FIELDS_ROOM: Final = 256
MAX_EVENT_BYTES: Final = MAX_LEAF_BYTES - _LEDGER_FIELDS_ROOM
_MSG_ID: Final = "Nats-Msg-Id"
#: The stream's duplicate window (``ensure_audit_stream``), and how long the sink remembers a
#: key it published in a grouped message.
DUPLICATE_WINDOW_S: Final = 120.0
_EXPECTED_STREAM: Final = api.Header.EXPECTED_STREAM.value


def audit_subject(stream: str) -> str:
    """The subject the audit events of ``stream`` are published on (one subject: one order)."""
    return f"phivault.audit.{stream}"


# -- the stream -----------------------------------------------------------------------------


async def ensure_audit_stream(
    js: JetStreamContext,
    *,
    name: str,
    subject: str,
    replicas: int,
    duplicate_window_s: float = DUPLICATE_WINDOW_S,
) -> None:
    """Create the audit stream, or bring an existing one to this configuration.

    * File storage: an acknowledged event must survive a restart of the NATS servers.
    * Limits retention with no limits: nothing is removed when the sequencer has read it
      (work-queue or interest retention would do that), so a standby sequencer can always
      re-read from where the ledger ends, and the stream holds a second copy of the history.
    * Discard policy ``new``, and message deletion and purging denied: the stream never drops
      an acknowledged event to make room. If an operator adds a size limit and the stream
      fills, publishing fails and PHI interactions answer 503 (fail closed) rather than losing
      events the sequencer may not have appended yet.
    * ``duplicate_window_s``: the window in which a retried publish with the same
      ``Nats-Msg-Id`` is dropped; it must outlast any publisher's retries (seconds).

    An existing stream with another storage or retention cannot be changed in place and is
    refused with :class:`~phivault.errors.ConfigurationError`; the duplicate window, discard
    and deny flags are updated, and replicas raised (never lowered). NATS failures raise
    :class:`LedgerUnavailable`.
    """
    if replicas < 1:
        raise ConfigurationError("the audit stream needs at least one replica")
    if duplicate_window_s <= 0:
        raise ConfigurationError("the audit stream's duplicate window must be positive")
    wanted = api.StreamConfig(
        name=name,
        subjects=[subject],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.NEW,
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        num_replicas=replicas,
        duplicate_window=duplicate_window_s,
        deny_delete=True,
        deny_purge=True,
    )
    try:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(wanted)
            return
        current = info.config
        if current.storage != api.StorageType.FILE:
            raise ConfigurationError(
                f"the audit stream {name} exists with {current.storage} storage; it must use "
                "file storage (recreate it: storage cannot change in place)"
            )
        if current.retention != api.RetentionPolicy.LIMITS:
            raise ConfigurationError(
                f"the audit stream {name} exists with {current.retention} retention; it must "
                "keep messages after they are read (limits retention)"
            )
        subjects = list(current.subjects or [])
        if subject not in subjects:
            subjects.append(subject)
        # Never fewer copies than the stream has: a process started without the production
        # setting (a sequencer, a worker) must not quietly drop a 3-replica stream to one.
        replicas = max(replicas, current.num_replicas or 1)
        wanted.num_replicas = replicas
        if (
            subjects != list(current.subjects or [])
            or current.num_replicas != replicas
            or current.duplicate_window != duplicate_window_s
            or current.discard != api.DiscardPolicy.NEW
            or not current.deny_delete
            or not current.deny_purge
        ):
            wanted.subjects = subjects
            # Limits an operator set on purpose are kept; everything else is ours.
            wanted.max_msgs = current.max_msgs
            wanted.max_bytes = current.max_bytes
            wanted.max_age = current.max_age
            await js.update_stream(wanted)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise LedgerUnavailable(f"cannot set up the audit stream {name}: {_describe(exc)}") from exc


# -- connecting -------------------------------------------------------------------------------


_NATS_SCHEMES: Final = frozenset({"nats", "tls", "ws", "wss"})


def _shown(url: str) -> str:
    """A server URL for messages: never its user name or password."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}"


def _check_nats_url(url: str) -> None:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in _NATS_SCHEMES or not parts.hostname or port == -1:
        raise ConfigurationError(
            "a NATS server URL must look like nats://HOST:PORT (or tls://, ws://, wss://); "
            f"got {_shown(url) if parts.scheme else 'a URL without a scheme'}"
        )


async def connect_nats(
    urls: Sequence[str], *, name: str, connect_timeout_s: float = 5.0
) -> NatsClient:
    """Connect to NATS; reconnect by itself forever afterwards.

    Raises :class:`LedgerUnavailable` if no server answers within ``connect_timeout_s``, and
    :class:`~phivault.errors.ConfigurationError` for no URL or a malformed one. Messages name
    servers without their credentials.
    """
    if not urls:
        raise ConfigurationError("no NATS server URL is configured for the audit stream")
    for url in urls:
        _check_nats_url(url)

    async def quiet(exc: Exception) -> None:
        # nats-py logs a traceback per failed attempt otherwise; failures surface as
        # LedgerUnavailable on publish, and reconnects happen by themselves.
        return None

    try:
        client: NatsClient = await asyncio.wait_for(
            nats.connect(
                servers=list(urls),
                name=name,
                connect_timeout=min(2.0, connect_timeout_s),
                reconnect_time_wait=0.25,
                max_reconnect_attempts=-1,  # a worker outlives any NATS outage
                error_cb=quiet,
            ),
            connect_timeout_s,
        )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise LedgerUnavailable(
            f"cannot connect to NATS at {', '.join(_shown(u) for u in urls)} within "
            f"{connect_timeout_s} s: {type(exc).__name__}"
        ) from exc
    return client


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Worth another try with the same message id: the stream (or its leader) may answer in a moment.
_TRANSIENT: Final[tuple[type[BaseException], ...]] = (
    nats.errors.TimeoutError,
    TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)
# What a stream without a leader answers (NATS: "no responders"; JetStream: 503). A stream
# that does not exist answers "no responders" too: JetStream's stream info tells them apart.
_LEADERLESS: Final[tuple[type[BaseException], ...]] = (
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
_STREAM_NOT_FOUND: Final = 10059  # JetStream's error code for "stream not found"
# How long one answer to "does the stream exist?" is trusted, so that an election under load
# costs one stream info request per interval, not one per waiting publish.
_STREAM_CHECK_INTERVAL_S: Final = 0.5
# JetStream answers STREAM.INFO in about a millisecond, but on a loaded machine a short bound
# can pass unanswered; no answer only means "not known yet": the next check asks again.
_STREAM_INFO_TIMEOUT_S: Final = 1.0


@dataclass(slots=True)
class _Waiting:
    """An event waiting for its grouped message: resolved with the message's stream sequence
    once acknowledged, or with :class:`LedgerUnavailable` if it fails. ``key``: its
    idempotency key (None: an event recorded once, grouped with others like it)."""

    payload: bytes
    encoding: str
    done: asyncio.Future[int]
    key: str | None = None
    # Callers that recorded the same key while this event still waited (settled with it).
    joined: list[asyncio.Future[int]] = dataclasses.field(default_factory=list)

    def acknowledged(self, seq: int) -> None:
        for future in (self.done, *self.joined):
            if not future.done():  # (else its caller left)
                future.set_result(seq)

    def failed(self, failure: BaseException) -> None:
        for future in (self.done, *self.joined):
            if not future.done():
                future.set_exception(failure)


@dataclass(slots=True)
class _Message:
    """A message as published: every retry of it sends these very bytes under this id.
    ``keys``: the idempotency keys of its events (keyed events only)."""

    payload: bytes
    headers: dict[str, str]
    keys: tuple[str, ...] = ()


@dataclass(slots=True)
class _Remembered:
    """What the sink knows of a message of keyed events, for each of its keys, until
    ``until`` (the stream's duplicate window from its first try): the stream sequence it was
    acknowledged with, or, while it has not been, the message itself, to be sent again
    unchanged when one of its keys is recorded again."""

    until: float
    seq: int | None
    message: _Message


class JetStreamAuditSink:
    """An :class:`~phivault.ledger.ports.AuditSink` that publishes to the audit stream.

    ``await record(event)`` returns the event's stream sequence number once the stream has
    acknowledged it (the ledger index is assigned later by the sequencer, in that order).
    It raises :class:`LedgerUnavailable` if no acknowledgement comes within
    ``publish_timeout_s``: a timeout, no stream, no responders, a closed or reconnecting
    connection, or any other NATS error. Retries inside that time reuse the message id, so
    they never duplicate.

    One case waits longer: NATS is connected and the stream exists, but it has no leader.
    JetStream elects a new leader 4 to 9 s after the leader's node dies, so losing that one
    node of a 3-node cluster would otherwise fail every publish of those seconds. Such a
    publish keeps trying for up to ``leader_election_wait_s`` (in all) and succeeds once the
    new leader takes it; with every node down the connection is lost instead, and publishes
    fail within ``publish_timeout_s`` as before. A stream that does not exist fails at once.

    Build it with :meth:`connect` (owns and closes its connection) or around an existing
    client; close it with :meth:`aclose` or ``async with``. Optionally a
    :class:`~phivault.resilience.Breaker` wraps each publish (with its retries): while it is
    open, callers fail at once.
    """

    def __init__(
        self,
        client: NatsClient,
        *,
        stream: str,
        subject: str | None = None,
        publish_timeout_s: float = 2.0,
        leader_election_wait_s: float = 10.0,
        breaker: Breaker | None = None,
        owns_client: bool = False,
        group_max: int = GROUP_MAX_EVENTS,
        group_window_s: float = 0.0,
        group_in_flight: int = GROUP_IN_FLIGHT,
        duplicate_window_s: float = DUPLICATE_WINDOW_S,
    ) -> None:
        if group_in_flight < 1:
            raise ConfigurationError("at least one audit message must be allowed in flight")
        if group_max < 1:
            raise ConfigurationError("an audit message must be allowed at least one event")
        if not 0 <= group_window_s <= 0.05:
            raise ConfigurationError("the audit grouping window must be 0 to 50 ms")
        if publish_timeout_s <= 0:
            raise ConfigurationError("the audit stream's publish timeout must be positive")
        if leader_election_wait_s < 0:
            raise ConfigurationError("the wait for a stream leader must not be negative")
        if duplicate_window_s <= 0:
            raise ConfigurationError("the audit stream's duplicate window must be positive")
        self._client = client
        self._js = client.jetstream()
        self.stream = stream
        self.subject = subject or audit_subject(stream)
        self.publish_timeout_s = publish_timeout_s
        self.leader_election_wait_s = leader_election_wait_s
        self._breaker = breaker
        self._stream_gone = False
        self._stream_checked_until = 0.0
        self._owns_client = owns_client
        self._closed = False
        self.group_max = group_max
        self.group_window_s = group_window_s
        self.group_in_flight = group_in_flight
        # Events waiting for the next grouped message, and whether its flush is scheduled.
        self._waiting: list[_Waiting] = []
        self._flush_scheduled = False
        self._overdue: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        # Idempotency keys published in grouped messages, oldest first (see _Remembered).
        self.duplicate_window_s = duplicate_window_s
        self._remembered: dict[str, _Remembered] = {}
        # Keyed events waiting for a message, by key, until the message remembers them.
        self._queued_keys: dict[str, _Waiting] = {}

    @classmethod
    async def connect(
        cls,
        urls: Sequence[str],
        *,
        name: str,
        stream: str,
        subject: str | None = None,
        publish_timeout_s: float = 2.0,
        leader_election_wait_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        breaker: Breaker | None = None,
        group_max: int = GROUP_MAX_EVENTS,
        group_window_s: float = 0.0,
        group_in_flight: int = GROUP_IN_FLIGHT,
    ) -> JetStreamAuditSink:
        """Connect to NATS (``urls``, client ``name``) and publish to ``stream``."""
        client = await connect_nats(urls, name=name, connect_timeout_s=connect_timeout_s)
        return cls(
            client,
            stream=stream,
            subject=subject,
            publish_timeout_s=publish_timeout_s,
            leader_election_wait_s=leader_election_wait_s,
            breaker=breaker,
            owns_client=True,
            group_max=group_max,
            group_window_s=group_window_s,
            group_in_flight=group_in_flight,
        )

    # -- the AuditSink port ---------------------------------------------------------------

    async def record(self, event: AuditEvent, *, msg_id: str | None = None) -> int:
        """Publish ``event``; return its stream sequence number once acknowledged.

        ``msg_id`` (default: the ambient :func:`~phivault.ledger.idempotency.idempotency_key`,
        else a fresh one) is the idempotency key: a caller that retries the same event itself
        passes the same key, and the stream keeps one copy.
        """
        # The same fast encoding the embedded ledger uses for events (plain documents).
        payload = canonical_json_of_plain_document(event.to_document())
        return await self._publish(payload, ENCODING_EVENT, msg_id)

    async def record_document(self, document: dict[str, Any], *, msg_id: str | None = None) -> int:
        """Publish an event document from elsewhere, checked as ``Ledger.record_document``
        checks it (no ledger fields; canonical JSON or :class:`InvalidInput`)."""
        for field in LEDGER_FIELDS:
            if field in document:
                raise LedgerError(f"an event document may not set the ledger field {field!r}")
        return await self._publish(canonical_json(document), ENCODING_DOCUMENT, msg_id)

    # -- closing --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop publishing; flush and close the connection if this sink owns it.

        Events already waiting for a grouped message are still sent, and their callers
        answered, before the connection closes."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._owns_client and not self._client.is_closed:
            try:
                await self._client.drain()
            except (nats.errors.Error, OSError, TimeoutError):
                await self._client.close()

    async def __aenter__(self) -> JetStreamAuditSink:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- publishing -----------------------------------------------------------------------

    async def _publish(self, payload: bytes, encoding: str, msg_id: str | None) -> int:
        if len(payload) > MAX_EVENT_BYTES:
            raise InvalidInput(
                f"an audit event of {len(payload)} bytes exceeds the limit of {MAX_EVENT_BYTES}"
            )
        if self._closed:
            raise LedgerUnavailable("the audit stream sink is closed")
        if msg_id is None:
            msg_id = current_idempotency_key()
        elif not msg_id or len(msg_id) > 128:
            raise InvalidInput("an audit message id must have 1 to 128 characters")
        if self.group_max > 1:
            if msg_id is None:
                return await self._grouped(payload, encoding, None)
            return await self._keyed(payload, encoding, msg_id)
        msg_id = msg_id or uuid.uuid4().hex
        headers = {_MSG_ID: msg_id, ENCODING_HEADER: encoding, _EXPECTED_STREAM: self.stream}
        return await self._send(payload, headers)

    # -- grouping -------------------------------------------------------------------------

    async def _keyed(self, payload: bytes, encoding: str, key: str) -> int:
        """An event with an idempotency key. Grouped with other keyed events only (never with
        events recorded once: a retry of a keyed event resends its whole message, which must
        not hold events whose callers were told they failed for good). The first time, it
        waits for the next keyed message; a key of a message this sink sent is answered from
        what it remembers: the sequence the stream gave that message, or, if it failed, the
        same message again under the same message id, so the stream's duplicate window drops
        it if an earlier try was in fact stored (docs/decisions/audit-stream.md, keyed events)."""
        self._forget(time.monotonic())
        known = self._remembered.get(key)
        if known is None:
            queued = self._queued_keys.get(key)
            if queued is not None:
                # Its first copy still waits for a message: the same event, so it goes once
                # (two copies in two messages would both be stored, under different ids).
                joined: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                queued.joined.append(joined)
                return await joined
            return await self._grouped(payload, encoding, key)
        if known.seq is not None:
            return known.seq
        seq = await self._send(known.message.payload, known.message.headers)
        known.seq = seq  # every key of that message shares this record
        return seq

    def _remember(self, message: _Message) -> _Remembered | None:
        """Remember each key of ``message`` as it is first sent, until the stream's duplicate
        window since then has nearly passed: one record for all of them, its ``seq`` set once
        the stream acknowledges the message. A key recorded again meanwhile (a retry after a
        failure, or while it is in flight) sends this very message again."""
        if not message.keys:
            return None
        until = time.monotonic() + self.duplicate_window_s - self.publish_timeout_s
        known = _Remembered(until, None, message)
        for key in message.keys:
            self._remembered.pop(key, None)  # (re-inserted last: the dict stays in expiry order)
            self._remembered[key] = known
        return known

    def _forget(self, now: float) -> None:
        """Drop the keys whose window has passed (remembered in order of expiry)."""
        remembered = self._remembered
        while remembered:
            key = next(iter(remembered))
            if remembered[key].until > now:
                return
            del remembered[key]

    def _grouped(self, payload: bytes, encoding: str, key: str | None) -> asyncio.Future[int]:
        """Queue an event for the next grouped message; the future is its acknowledgement."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(payload, encoding, loop.create_future(), key)
        self._waiting.append(waiting)
        if key is not None:
            self._queued_keys[key] = waiting
        if len(self._sending) < self.group_in_flight:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                if self.group_window_s > 0:
                    loop.call_later(self.group_window_s, self._flush)
                else:
                    # After the callbacks already ready in this turn of the loop: the events
                    # of requests that became ready together go out together.
                    loop.call_soon(self._flush)
        elif self._overdue is None:
            # group_in_flight messages await their acks: this event goes in the next message,
            # sent as soon as one of them is answered (_sent), or after GROUP_MAX_WAIT_S
            # whatever they do (a stalled message does not hold later events back longer).
            self._overdue = loop.call_later(GROUP_MAX_WAIT_S, self._flush, True)
        return waiting.done

    def _flush(self, overdue: bool = False) -> None:
        """Send the waiting events, in order, as messages of at most ``group_max`` events and
        GROUP_MAX_BYTES of payload, while fewer than ``group_in_flight`` messages await their
        acknowledgement (all of them when ``overdue`` or once the sink is closing). Events
        with an idempotency key and events without go in messages of their own."""
        if overdue:
            self._overdue = None
        else:
            self._flush_scheduled = False
        waiting = self._waiting
        while waiting and (len(self._sending) < self.group_in_flight or overdue or self._closed):
            keyed = waiting[0].key is not None
            group: list[_Waiting] = []
            left: list[_Waiting] = []
            size = -1
            for w in waiting:
                if (w.key is not None) is keyed and len(group) < self.group_max:
                    size += 1 + len(w.payload)
                    if not group or size <= GROUP_MAX_BYTES:
                        group.append(w)
                        continue
                    size = GROUP_MAX_BYTES + 1  # full: the rest of this kind waits
                left.append(w)
            waiting[:] = left
            task = asyncio.ensure_future(self._send_group(group))
            self._sending.add(task)
            task.add_done_callback(self._sent)
        if not waiting and self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._waiting and not self._flush_scheduled:
            self._flush()

    def _message(self, group: list[_Waiting]) -> _Message:
        """The message of ``group``, built once: every retry sends these very bytes."""
        if len(group) == 1:
            # A lone event: an ordinary single-event message, its key (if any) the message id.
            lone = group[0]
            return _Message(
                lone.payload,
                {
                    _MSG_ID: lone.key or uuid.uuid4().hex,
                    ENCODING_HEADER: lone.encoding,
                    _EXPECTED_STREAM: self.stream,
                },
                () if lone.key is None else (lone.key,),
            )
        headers = {
            _MSG_ID: uuid.uuid4().hex,
            ENCODING_HEADER: ENCODING_BATCH,
            BATCH_HEADER: ",".join(w.encoding for w in group),
            _EXPECTED_STREAM: self.stream,
        }
        keys = tuple(w.key for w in group if w.key is not None)
        return _Message(BATCH_SEPARATOR.join(w.payload for w in group), headers, keys)

    async def _send_group(self, group: list[_Waiting]) -> None:
        message = self._message(group)
        known = self._remember(message)
        for key in message.keys:  # remembered from here on (no step between the two)
            self._queued_keys.pop(key, None)
        try:
            seq = await self._send(message.payload, message.headers)
        except BaseException as exc:
            failure = (
                exc
                if isinstance(exc, LedgerUnavailable)
                else LedgerUnavailable(
                    f"cannot publish to the audit stream {self.stream}: {_describe(exc)}"
                )
            )
            for w in group:
                w.failed(failure)
            if not isinstance(exc, Exception):
                raise
            return
        if known is not None:
            known.seq = seq
        for w in group:
            w.acknowledged(seq)

    async def _send(self, payload: bytes, headers: dict[str, str]) -> int:
        if self._breaker is None:
            return await self._publish_with_retries(payload, headers)
        try:
            return await self._breaker.call(lambda: self._publish_with_retries(payload, headers))
        except LedgerUnavailable:
            raise
        except (ConfigurationError, InvalidInput, LedgerError):
            raise
        except Exception as exc:
            # CircuitOpen and CallTimedOut: the stream is known (or just found) to be down.
            raise LedgerUnavailable(
                f"the audit stream {self.stream} is unavailable: {exc}"
            ) from exc

    async def _publish_with_retries(self, payload: bytes, headers: dict[str, str]) -> int:
        """Publish one message (``headers``: what JetStreamContext.publish(..., stream=...)
        sends, built once for every try) and return its stream sequence once acknowledged."""
        started = time.monotonic()
        deadline = started + self.publish_timeout_s
        # Leave room for a second try within the deadline after a lost acknowledgement.
        attempt_timeout = max(0.05, self.publish_timeout_s / 2)
        leaderless = False  # has any try been told that the stream has no leader?

        async def attempt() -> int:
            nonlocal leaderless
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise nats.errors.TimeoutError
            # A plain request rather than JetStreamContext.publish: the same message, and the
            # same errors (below), without its PubAck object and second JSON parser per event.
            try:
                reply = await self._client.request(
                    self.subject,
                    payload,
                    timeout=min(attempt_timeout, remaining),
                    headers=headers,
                )
                return self._acknowledged(reply.data)
            except nats.errors.NoRespondersError:
                leaderless = True
                raise nats.js.errors.NoStreamResponseError from None
            except nats.js.errors.ServiceUnavailableError:
                leaderless = True
                raise

        try:
            try:
                # The first try runs bare: building a retry loop per event costs more than
                # the publish itself, and it is almost always the only try.
                return await attempt()
            except _TRANSIENT:
                pass
            # Until the deadline, not a fixed count: while a stream elects a new leader,
            # NATS answers "no responders" at once, and the election takes seconds.
            try:
                async for retry in retrying(
                    attempts=1_000,
                    initial_backoff_s=0.02,
                    max_backoff_s=0.1,
                    deadline_s=max(0.0, deadline - time.monotonic()),
                    retry_on=_TRANSIENT,
                ):
                    with retry:
                        return await attempt()
            except _TRANSIENT:
                # The try in flight when the leader died times out; later ones hear "no
                # responders": either way, an election may be under way.
                if not (leaderless and await self._awaiting_a_leader()):
                    raise
            # An election under way: wait for the new leader up to the longer bound (the
            # tries read ``deadline`` when they run), as long as NATS stays connected: with
            # every node down the connection is lost, and the publish fails at once.
            deadline = started + self.leader_election_wait_s
            async for retry in retrying(
                attempts=10_000,
                initial_backoff_s=0.05,
                max_backoff_s=0.25,
                deadline_s=max(0.0, deadline - time.monotonic()),
                retry_on=_TRANSIENT,
            ):
                if not self._client.is_connected:
                    raise LedgerUnavailable(
                        f"the connection to NATS was lost while the audit stream {self.stream}"
                        " had no leader"
                    )
                # Asked again while waiting (at most every _STREAM_CHECK_INTERVAL_S): a slow
                # first answer, or a stream deleted meanwhile, must not cost the whole wait.
                if not await self._awaiting_a_leader():
                    raise LedgerUnavailable(
                        f"the audit stream {self.stream} did not answer: it does not exist"
                    )
                with retry:
                    return await attempt()
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise LedgerUnavailable(self._failure(exc)) from exc
        raise LedgerUnavailable(f"the audit stream {self.stream} did not acknowledge")

    async def _awaiting_a_leader(self) -> bool:
        """Whether "no leader" means an election under way, worth the longer wait: NATS is
        connected, and JetStream does not say that the stream is gone."""
        if self.leader_election_wait_s <= self.publish_timeout_s or not self._client.is_connected:
            return False
        now = time.monotonic()
        if now >= self._stream_checked_until:
            self._stream_checked_until = now + _STREAM_CHECK_INTERVAL_S
            self._stream_gone = await self._stream_is_gone()
        return not self._stream_gone

    async def _stream_is_gone(self) -> bool:
        """True only if JetStream answers that the stream does not exist. No answer at all
        (its metadata leader may be electing too) is not proof of that."""
        try:
            reply = await self._client.request(
                f"{api.DEFAULT_PREFIX}.STREAM.INFO.{self.stream}",
                b"",
                timeout=_STREAM_INFO_TIMEOUT_S,
            )
            answer = orjson.loads(reply.data)
        except (nats.errors.Error, OSError, TimeoutError, orjson.JSONDecodeError):
            return False
        error = answer.get("error") if isinstance(answer, dict) else None
        return isinstance(error, dict) and error.get("err_code") == _STREAM_NOT_FOUND

    def _acknowledged(self, data: bytes) -> int:
        """The stream sequence of an acknowledgement; its error as nats' own exception."""
        try:
            ack = orjson.loads(data)
        except orjson.JSONDecodeError:
            ack = None
        if isinstance(ack, dict) and isinstance(ack.get("error"), dict):
            # As JetStreamContext.publish does: a 503 (no leader yet) is ServiceUnavailableError.
            raise nats.js.errors.APIError.from_error(ack["error"])
        seq = ack.get("seq") if isinstance(ack, dict) else None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise LedgerUnavailable(f"the audit stream {self.stream} sent no valid acknowledgement")
        return seq

    def _failure(self, exc: BaseException) -> str:
        where = f"the audit stream {self.stream}"
        if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
            if self._stream_gone:
                return f"{where} did not answer: it does not exist"
            return f"{where} did not answer (it does not exist, or has no leader)"
        if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
            return f"{where} did not acknowledge within {self.publish_timeout_s} s"
        if isinstance(exc, nats.errors.ConnectionClosedError):
            return f"the connection to NATS is closed; {where} cannot be reached"
        if isinstance(exc, nats.errors.ConnectionReconnectingError):
            return f"the connection to NATS is reconnecting; {where} cannot be reached"
        return f"cannot publish to {where}: {_describe(exc)}"
