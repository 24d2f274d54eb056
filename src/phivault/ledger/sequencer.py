"""The ledger sequencer: the one writer that moves audit events from the stream to the ledger.

API workers publish events to the JetStream audit stream (:mod:`phivault.ledger.stream`). The
sequencer reads that stream in order and appends each event of each message (one for a
single-event message, several for a ``batch`` one: :func:`_decode_message`), as one leaf, to
the ledger
stored in PostgreSQL through the ordinary :class:`~phivault.ledger.service.Ledger` (which
computes the chain and patient back-links, group-commits and signs checkpoints within
``checkpoint_interval_s``). Several sequencers may run; one is active.

**Who writes.** The writable :class:`~phivault.ledger.postgres_store.PostgresLedgerStore`
holds a PostgreSQL advisory lock on the connection that appends. A standby retries every
``lock_retry_s`` and gets :class:`~phivault.ledger.errors.LedgerLocked` until the active one's
session ends (it stopped, crashed, or was SIGKILLed: the server drops the session and its
lock); then it opens the ledger and becomes active. An old active one that lost its session
can no longer append: the lock and the appends share the connection.

**Where to resume (no gap, no duplicate).** Stream messages, event by event, and ledger entries
correspond one to one and in the same order: the sequencer appends message after message,
whole, and never skips one (a takeover that finds the ledger ending inside a message, after a
crash in the middle of a group commit, appends the rest of that message first). So the ledger
itself says how many events are in it; what it cannot say is which stream sequence number the
first of them had, because a leaf holds the event and not its message. The sequencer therefore
keeps an append-only cursor table beside the leaves (``<schema>.stream_cursor``: *the first
``ledger_size`` entries are the stream's messages up to ``stream_seq``*), written after appends
are durable, at most every ``cursor_interval_s``. The cursor may lag behind the ledger (a
crash, even ``kill -9``, between an append and the next cursor row), never run ahead of it. On
taking over, with the ledger holding ``S`` entries and the last cursor row saying ``(S_c,
Q_c)``:

1. check the anchor: the stream reaches ``Q_c`` and its message ``Q_c`` (unless aged out) is
   entry ``S_c - 1``, so that a stream recreated under the same name is refused rather than
   its first ``Q_c`` messages skipped;
2. read the stream from ``Q_c + 1``: its first ``S - S_c`` messages are, in order, the ledger
   entries ``S_c .. S - 1``; each is compared with its entry (the event document without the
   ledger's own fields) and any difference stops the sequencer (the ledger and the stream
   disagree: an operator must look);
3. append from the next message on.

Stream sequence numbers must be contiguous: the stream is created with deletes and purges
denied and duplicates dropped without taking a number, so a message missing from the sequence
means an event was lost from the stream before it reached the ledger, and the sequencer stops
(:class:`StreamGap`). A message the ledger cannot take (not canonical JSON, setting a ledger
field, an event of the wrong shape: see :func:`_decode`) also stops it
(:class:`InvalidStreamMessage`): nothing is dropped silently, and every sequencer stops at the
same message until an operator decides. See ``docs/decisions/audit-stream.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, Protocol

import nats.errors
import nats.js.errors
import orjson
import psycopg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg import sql

from phivault.errors import ConfigurationError, InvalidInput
from phivault.ledger.canonical import canonical_json
from phivault.ledger.errors import LedgerError, LedgerLocked, LedgerUnavailable
from phivault.ledger.events import LEDGER_FIELDS, AuditEvent
from phivault.ledger.note import NoteSigner
from phivault.ledger.postgres_store import DEFAULT_SCHEMA, PostgresLedgerStore
from phivault.ledger.service import Ledger, open_ledger_on
from phivault.ledger.stream import (
    BATCH_HEADER,
    BATCH_SEPARATOR,
    ENCODING_BATCH,
    ENCODING_DOCUMENT,
    ENCODING_EVENT,
    ENCODING_HEADER,
    MAX_EVENT_BYTES,
    audit_subject,
    connect_nats,
)
from phivault.settings import LedgerSettings

__all__ = [
    "CURSOR_TABLE",
    "InvalidStreamMessage",
    "LedgerStreamMismatch",
    "Sequencer",
    "SequencerCollector",
    "SequencerError",
    "SequencerLog",
    "SequencerProgress",
    "StreamGap",
    "create_cursor_table",
]

CURSOR_TABLE: Final = "stream_cursor"
_NATS_ERRORS: Final = (nats.errors.Error, OSError, TimeoutError)
# The pull request the stream reader keeps open: messages, bytes, and how long it lingers
# (nanoseconds in the request). A request the server should have ended this long ago is
# taken as lost and replaced.
_PULL_BATCH: Final = 512
_PULL_MAX_BYTES: Final = 16 * 1024 * 1024
_PULL_EXPIRES_S: Final = 1.0
_PULL_GRACE_S: Final = 1.0
_PULL_REQUEST: Final = orjson.dumps(
    {"batch": _PULL_BATCH, "max_bytes": _PULL_MAX_BYTES, "expires": int(_PULL_EXPIRES_S * 1e9)}
)
_HEARTBEAT: Final = "100"
_CONFLICT: Final = "409"
# Quiet this long: check that the stream is quiet too, not that the consumer was lost.
_STALL_CHECK_S: Final = 2.0


class SequencerError(LedgerError):
    """The sequencer stopped on something an operator must look at (it will not go on)."""


class InvalidStreamMessage(SequencerError):
    """A stream message is not an event the ledger can take. Names its sequence, not its data."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(
            f"stream message {seq} is not a valid audit event ({reason}); the sequencer stops "
            "here rather than drop it"
        )
        self.seq = seq
        self.reason = reason


class StreamGap(SequencerError):
    """Stream messages are missing before they reached the ledger (deleted or aged out)."""

    def __init__(self, expected: int, found: int) -> None:
        super().__init__(
            f"the audit stream skips from message {expected - 1} to {found}: messages "
            f"{expected}..{found - 1} are gone from the stream but not in the ledger"
        )
        self.expected = expected
        self.found = found


class LedgerStreamMismatch(SequencerError):
    """The ledger's tail is not the stream's messages at the cursor: they disagree."""


# -- the cursor table ----------------------------------------------------------------------

_CURSOR_DDL: Final = """
CREATE TABLE IF NOT EXISTS {schema}.{table} (
    ledger_size bigint PRIMARY KEY CHECK (ledger_size >= 0),
    stream_seq bigint NOT NULL CHECK (stream_seq >= 0),
    stream text NOT NULL,
    recorded timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE TRIGGER {append_only}
    BEFORE UPDATE OR DELETE OR TRUNCATE ON {schema}.{table}
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_history_change();
ALTER TABLE {schema}.{table} ENABLE ALWAYS TRIGGER {append_only};
REVOKE ALL ON {schema}.{table} FROM PUBLIC
"""


def create_cursor_table(
    conninfo: str, *, schema: str = DEFAULT_SCHEMA, app_role: str | None = None
) -> None:
    """Create the sequencer's append-only cursor table in the ledger's schema (idempotent).

    Run it at deploy time as the schema's owner, after
    :func:`~phivault.ledger.postgres_store.create_ledger_schema` (it reuses that schema's
    refusal trigger). ``app_role`` (the role the sequencer connects as) gets ``SELECT`` and
    ``INSERT`` on it and nothing else.
    """
    names = {
        "schema": sql.Identifier(schema),
        "table": sql.Identifier(CURSOR_TABLE),
        "append_only": sql.Identifier(f"{CURSOR_TABLE}_append_only"),
    }
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn, conn.transaction():
            conn.execute(sql.SQL(_CURSOR_DDL).format(**names))
            if app_role is not None:
                role = sql.Identifier(app_role)
                conn.execute(
                    sql.SQL("REVOKE ALL ON {schema}.{table} FROM {role}").format(role=role, **names)
                )
                conn.execute(
                    sql.SQL("GRANT SELECT, INSERT ON {schema}.{table} TO {role}").format(
                        role=role, **names
                    )
                )
    except psycopg.Error as exc:
        raise LedgerUnavailable(
            f"cannot set up the sequencer's cursor table in schema {schema}: "
            f"{type(exc).__name__} [{exc.sqlstate}]"
        ) from exc


class _Cursor:
    """The cursor table, on its own connection (hints only: see the module docstring)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], schema: str, stream: str) -> None:
        self._conn = conn
        self._stream = stream
        names = {"schema": sql.Identifier(schema), "table": sql.Identifier(CURSOR_TABLE)}
        self._latest = sql.SQL(
            "SELECT ledger_size, stream_seq, stream FROM {schema}.{table} "
            "ORDER BY ledger_size DESC LIMIT 1"
        ).format(**names)
        self._insert = sql.SQL(
            "INSERT INTO {schema}.{table} (ledger_size, stream_seq, stream) VALUES (%s, %s, %s) "
            "ON CONFLICT (ledger_size) DO NOTHING"
        ).format(**names)
        self.written_size = -1

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, conninfo: str, schema: str, stream: str) -> AsyncIterator[_Cursor]:
        try:
            conn = await psycopg.AsyncConnection.connect(
                conninfo, autocommit=True, connect_timeout=5, application_name="phivault-sequencer"
            )
        except psycopg.Error as exc:
            raise LedgerUnavailable(
                f"cannot connect to PostgreSQL for the sequencer's cursor: {type(exc).__name__}"
            ) from exc
        try:
            # A lost cursor row only means re-reading a little more of the stream at the next
            # takeover (the ledger is the truth), so its commits need not wait for the disk.
            await conn.execute("SET synchronous_commit = off")
            yield cls(conn, schema, stream)
        finally:
            await conn.close()

    async def latest(self) -> tuple[int, int]:
        """(ledger_size, stream_seq) of the last row, or (0, 0) before the first batch."""
        try:
            row = await (await self._conn.execute(self._latest)).fetchone()
        except psycopg.errors.UndefinedTable as exc:
            raise ConfigurationError(
                f"the sequencer's cursor table is missing from the ledger schema; create it as "
                f"the schema's owner (create_cursor_table, or `phivault sequencer "
                f"--create-schema`): {type(exc).__name__}"
            ) from exc
        except psycopg.Error as exc:
            raise LedgerUnavailable(
                f"cannot read the sequencer's cursor: {type(exc).__name__} [{exc.sqlstate}]"
            ) from exc
        if row is None:
            return 0, 0
        size, seq, stream = int(row[0]), int(row[1]), str(row[2])
        if stream != self._stream:
            raise LedgerStreamMismatch(
                f"this ledger was fed from the stream {stream}, not {self._stream}; refusing "
                "to append another stream's events to it"
            )
        self.written_size = size
        return size, seq

    async def write(self, ledger_size: int, stream_seq: int) -> None:
        if ledger_size <= self.written_size:
            return
        try:
            await self._conn.execute(self._insert, (ledger_size, stream_seq, self._stream))
        except psycopg.Error as exc:
            raise LedgerUnavailable(
                f"cannot write the sequencer's cursor: {type(exc).__name__} [{exc.sqlstate}]"
            ) from exc
        self.written_size = ledger_size


# -- reading the stream ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Incoming:
    """One decoded event of a stream message, checked as the ledger needs it.

    ``plain``: it passed :func:`_plainly_canonical`, so
    :func:`~phivault.ledger.canonical.canonical_json_of_plain_document` gives the JCS bytes of
    it with the ledger's fields added (the ledger skips the exact encoder's Python scan).
    """

    seq: int
    document: dict[str, Any]
    plain: bool = False


# What every document from AuditEvent.to_document has, and all it may have (the model's fields).
_EVENT_REQUIRED: Final = frozenset(
    {"kind", "subtype", "action", "recorded", "outcome", "tenant", "agents", "source"}
)
_EVENT_FIELDS: Final = frozenset(AuditEvent.model_fields)
# The patient reference grammar of AuditEvent.patient (an unversioned Patient reference): the
# ledger keys its back-links on this string, and finds it again in the leaf bytes on reopening.
_PATIENT_REFERENCE: Final = re.compile(r"Patient/[A-Za-z0-9\-.]{1,64}")


def _decode(seq: int, headers: dict[str, str] | None, data: bytes) -> _Incoming:
    """Check a message as the ledger needs it; raise :class:`InvalidStreamMessage` if not.

    The sequencer does not re-run the event model's validation: the publishing worker built
    the :class:`AuditEvent` (every grammar and PHI screen ran there), and the ledger, like the
    embedded one, appends what its trusted writer hands it. What it does check is what the
    ledger itself relies on (``docs/decisions/audit-stream.md``): a known encoding, the size,
    a JSON object in exactly its RFC 8785 canonical bytes (so the leaf is those bytes plus the
    ledger's fields, and nothing the stream acknowledged is altered), none of the ledger's own
    fields, and for events the top-level shape and the patient reference the back-links use.
    """
    encoding = (headers or {}).get(ENCODING_HEADER)
    if encoding not in (ENCODING_EVENT, ENCODING_DOCUMENT):
        raise InvalidStreamMessage(seq, f"no or unknown {ENCODING_HEADER} header")
    return _decode_one(seq, encoding, data)


def _decode_message(seq: int, headers: dict[str, str] | None, data: bytes) -> list[_Incoming]:
    """The events of one stream message, in order: one for a single-event message (``event``
    or ``document``, as every worker before grouping sent), several for a ``batch`` one.

    A batch message lists its events' encodings in :data:`BATCH_HEADER` and carries their
    canonical JSON joined by :data:`BATCH_SEPARATOR` (no canonical JSON holds that byte). Each
    event is checked exactly as a single-event message is; any fault refuses the whole message
    (:class:`InvalidStreamMessage`): a message is appended entirely or not at all.
    """
    encoding = (headers or {}).get(ENCODING_HEADER)
    if encoding != ENCODING_BATCH:
        return [_decode(seq, headers, data)]
    listed = (headers or {}).get(BATCH_HEADER)
    if not listed:
        raise InvalidStreamMessage(seq, f"a batch without its {BATCH_HEADER} header")
    encodings = listed.split(",")
    parts = data.split(BATCH_SEPARATOR)
    if len(parts) != len(encodings):
        raise InvalidStreamMessage(
            seq, f"{len(parts)} events, but {BATCH_HEADER} lists {len(encodings)}"
        )
    out = []
    for part, part_encoding in zip(parts, encodings, strict=True):
        if part_encoding not in (ENCODING_EVENT, ENCODING_DOCUMENT):
            raise InvalidStreamMessage(seq, f"an unknown encoding in {BATCH_HEADER}")
        out.append(_decode_one(seq, part_encoding, part))
    return out


def _decode_one(seq: int, encoding: str, data: bytes) -> _Incoming:
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidStreamMessage(seq, f"{len(data)} bytes, over {MAX_EVENT_BYTES}")
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidStreamMessage(seq, "not JSON") from None
    if not isinstance(document, dict):
        raise InvalidStreamMessage(seq, "not a JSON object")
    if any(field in document for field in LEDGER_FIELDS):
        raise InvalidStreamMessage(seq, "it sets a field the ledger adds")
    if encoding == ENCODING_EVENT:
        _check_event_shape(seq, document)
    if _plainly_canonical(document, data):
        return _Incoming(seq, document, plain=True)
    try:
        canonical = canonical_json(document)
    except InvalidInput:
        raise InvalidStreamMessage(seq, "not canonicalizable") from None
    # Publishers send canonical bytes; anything else was not written by a sink (and a parse
    # that lost something, such as a duplicate key or a huge integer, shows up here).
    if canonical != data:
        raise InvalidStreamMessage(seq, "not in canonical form")
    return _Incoming(seq, document)


_ORJSON_CANONICAL: Final = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
_NON_ZERO_DIGITS: Final = bytes.maketrans(b"123456789", b"000000000")


def _plainly_canonical(document: dict[str, Any], data: bytes) -> bool:
    """True only if ``data`` is certainly ``canonical_json(document)``, found in C (a third of
    the exact check's cost, whose Python scan of every value was most of the sequencer's work
    per event); False leaves the verdict, and its reason, to the exact check.

    It is when orjson writes ``document`` back (keys sorted, integers within 2**53 - 1) as
    exactly ``data``, ``data`` is ASCII without a backslash (so every key sorts alike in
    UTF-16 and code points, and splitting at quotes finds the strings), and nothing outside
    the strings is a digit followed by ``.``, ``e`` or ``E`` (no float: orjson writes each
    with one of them). For such a document :func:`canonical_json` answers with orjson's bytes
    too. Then, as the ledger adds only ASCII keys, safe integers and a base64 string, orjson
    also writes the leaf's canonical bytes: the entry is ``plain``.
    """
    if not data.isascii() or b"\\" in data:
        return False
    try:
        if orjson.dumps(document, option=_ORJSON_CANONICAL) != data:
            return False
    except orjson.JSONEncodeError:  # an integer beyond 2**53 - 1, or nested too deeply
        return False
    outside_strings = b"".join(data.split(b'"')[::2]).translate(_NON_ZERO_DIGITS)
    return (
        b"0." not in outside_strings
        and b"0e" not in outside_strings
        and (b"0E" not in outside_strings)
    )


def _check_event_shape(seq: int, document: dict[str, Any]) -> None:
    keys = document.keys()
    if not (_EVENT_REQUIRED <= keys <= _EVENT_FIELDS):  # the sets are built only to say which
        wrong = sorted((_EVENT_REQUIRED - keys) | (keys - _EVENT_FIELDS))
        raise InvalidStreamMessage(seq, f"invalid event fields: {', '.join(wrong)}")
    patient = document.get("patient")
    if patient is not None and not (
        isinstance(patient, str) and _PATIENT_REFERENCE.fullmatch(patient)
    ):
        raise InvalidStreamMessage(seq, "invalid event fields: patient")
    if not isinstance(document["agents"], list) or not document["agents"]:
        raise InvalidStreamMessage(seq, "invalid event fields: agents")


class _StreamReader:
    """The stream from a given sequence number on, contiguous, through an ephemeral consumer.

    The consumer acknowledges nothing (where to resume is the ledger's business, not the
    consumer's); when it or the connection fails it is recreated from the next number.

    It keeps one pull request open at all times (up to :data:`_PULL_BATCH` messages, lingering
    up to :data:`_PULL_EXPIRES_S`), answered on an inbox of its own: messages flow in while the
    sequencer appends the previous batch, and :meth:`take` hands out what has arrived. That is
    a request every few hundred messages rather than two per batch, and no per-message
    ``wait_for`` (nats-py's ``fetch`` makes a task for each message it waits for).
    """

    def __init__(
        self, js: JetStreamContext, client: NatsClient, stream: str, start: int, log: SequencerLog
    ) -> None:
        self._js = js
        self._client = client
        self._stream = stream
        self.next_seq = start  # the number the next message must have
        # Each message's events together: they are handed out whole (see take).
        self._buffer: deque[list[_Incoming] | SequencerError] = deque()
        self._sub: Subscription | None = None
        self._next_subject = ""  # where pull requests go (the consumer's MSG.NEXT)
        self._inbox = ""
        self._arrived: list[Msg] = []  # delivered, not yet decoded
        self._woken = asyncio.Event()
        self._request = 0  # the number of the open pull request (its reply is inbox.<n>)
        self._request_open = False
        self._request_left = 0  # messages the open request may still deliver
        self._request_until = 0.0  # when the server will have ended it (monotonic)
        self._consumer_lost = False
        self._log = log
        self.pending = 0  # messages after the last one fetched, as the stream last said
        self._quiet_since = time.monotonic()

    async def take(self, limit: int, wait_s: float) -> list[_Incoming]:
        """The events of the next messages, whole messages only: up to ``limit`` events, or
        the first message's even if it has more (none if nothing came within ``wait_s``).

        Never part of a message: the cursor names messages, so an append ends on a message's
        last event (a takeover that finds a partly appended message completes it).
        """
        if not self._buffer:
            await self._fetch(wait_s)
        out: list[_Incoming] = []
        while self._buffer:
            item = self._buffer[0]
            if isinstance(item, SequencerError):
                if out:
                    break  # hand over the good ones first; the error comes next time
                raise item
            if out and len(out) + len(item) > limit:
                break
            out.extend(item)
            self._buffer.popleft()
        return out

    async def last_stream_seq(self) -> int:
        info = await self._js.stream_info(self._stream)
        return int(info.state.last_seq)

    async def _fetch(self, wait_s: float) -> None:
        """Decode what has arrived, waiting up to ``wait_s`` for the first message."""
        try:
            if self._consumer_lost:
                raise nats.js.errors.NotFoundError
            if self._sub is None:
                await self._subscribe()
            await self._keep_a_request_open()
            if not self._arrived:
                self._woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), wait_s)
                if self._consumer_lost:
                    raise nats.js.errors.NotFoundError
                await self._keep_a_request_open()
        except _NATS_ERRORS as exc:
            self._log.warning(
                "sequencer.stream-read-failed", error=type(exc).__name__, next_seq=self.next_seq
            )
            await self.close()
            await asyncio.sleep(min(wait_s, 0.5))
            return
        if not self._arrived:
            await self._check_quiet()
            return  # nothing new
        self._quiet_since = time.monotonic()
        msgs, self._arrived = self._arrived, []
        for msg in msgs:
            metadata = msg.metadata
            seq = int(metadata.sequence.stream)
            if seq < self.next_seq:
                continue  # delivered twice: already taken
            if seq > self.next_seq:
                self._buffer.append(StreamGap(self.next_seq, seq))
                await self.close()
                return
            try:
                self._buffer.append(_decode_message(seq, msg.headers, msg.data))
            except InvalidStreamMessage as exc:
                self._buffer.append(exc)
                await self.close()
                return
            self.next_seq = seq + 1
            self.pending = int(metadata.num_pending)

    async def _keep_a_request_open(self) -> None:
        # A request the server should have ended a while ago is taken as lost (the server
        # holding the consumer restarted, say): another one costs nothing if it was not.
        if self._request_open and time.monotonic() > self._request_until + _PULL_GRACE_S:
            self._request_open = False
        if self._request_open:
            return
        self._request += 1
        self._request_open = True
        self._request_left = _PULL_BATCH
        self._request_until = time.monotonic() + _PULL_EXPIRES_S
        await self._client.publish(
            self._next_subject,
            _PULL_REQUEST,
            reply=f"{self._inbox}.{self._request}",
        )

    async def _on_message(self, msg: Msg) -> None:
        """Every message on the inbox, in order: stream messages, and the statuses that end
        a pull request (404 or 408: no more for now; 409: the server ended it early)."""
        headers = msg.headers
        status = headers.get(api.Header.STATUS) if headers and not msg.data else None
        if status is None:
            self._arrived.append(msg)
            self._request_left -= 1
            if self._request_left <= 0:
                self._request_open = False  # fulfilled: the server sends no status for it
        elif status != _HEARTBEAT and msg.subject == f"{self._inbox}.{self._request}":
            self._request_open = False
            description = (headers or {}).get(api.Header.DESCRIPTION) or ""
            if status == _CONFLICT and "deleted" in description.lower():
                self._consumer_lost = True  # the consumer is gone: recreate it
        self._woken.set()

    async def _check_quiet(self) -> None:
        """Recreate the consumer if the stream has messages it does not deliver.

        An ephemeral consumer lives on one server: if that server went away, or the connection
        was re-established, pull requests merely go unanswered. The stream (replicated) still
        answers.
        """
        if time.monotonic() - self._quiet_since < _STALL_CHECK_S:
            return
        self._quiet_since = time.monotonic()
        try:
            last = await self.last_stream_seq()
        except _NATS_ERRORS as exc:
            self._log.warning("sequencer.stream-unavailable", error=type(exc).__name__)
            await self.close()
            return
        if last >= self.next_seq:
            self._log.warning(
                "sequencer.consumer-stalled", next_seq=self.next_seq, stream_last_seq=last
            )
            await self.close()

    async def _subscribe(self) -> None:
        # No subject filter: every message of the audit stream is an audit event, and a filter
        # would make the messages of any other subject of the stream look like a gap.
        name = f"phivault-seq-{uuid.uuid4().hex}"
        config = api.ConsumerConfig(
            name=name,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=30.0,  # the server removes it if this process dies
            mem_storage=True,
            num_replicas=1,
        )
        await self._js.add_consumer(self._stream, config=config)
        self._next_subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self._stream}.{name}"
        self._inbox = self._client.new_inbox()
        self._arrived = []
        self._request_open = False
        self._consumer_lost = False
        self._sub = await self._client.subscribe(f"{self._inbox}.*", cb=self._on_message)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        self._request_open = False
        self._consumer_lost = False
        # Delivered but not decoded: a new consumer starts again from next_seq.
        self._arrived = []
        if sub is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await sub.unsubscribe()


# -- the sequencer ---------------------------------------------------------------------------


class SequencerLog(Protocol):
    """Where the sequencer logs (a structlog logger fits). Fields carry no PHI."""

    def info(self, event: str, **fields: Any) -> Any: ...

    def warning(self, event: str, **fields: Any) -> Any: ...


class _StdlibLog:
    def __init__(self) -> None:
        self._log = logging.getLogger("phivault.sequencer")

    def info(self, event: str, **fields: Any) -> None:
        self._log.info("%s %s", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log.warning("%s %s", event, fields)


Role = Literal["starting", "standby", "active", "stopped"]


@dataclass
class SequencerProgress:
    """What the sequencer has done, for metrics and logs."""

    role: Role = "starting"
    last_applied_seq: int = 0  # stream sequence of the last message in the ledger
    ledger_size: int = 0
    lag: int = 0  # stream messages not yet in the ledger, as of the last read
    appended: int = 0  # entries this process appended
    batches: int = 0  # group commits this process made
    takeovers: int = 0  # times this process became the active sequencer

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SequencerCollector(Collector):
    """The sequencer's progress as Prometheus metrics (register it on the process's registry)."""

    def __init__(self, progress: SequencerProgress) -> None:
        self._progress = progress

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        p = self._progress
        gauges = (
            (
                "phivault_sequencer_active",
                "1 while this sequencer is the active one.",
                int(p.role == "active"),
            ),
            (
                "phivault_sequencer_last_applied_seq",
                "Stream sequence of the last message in the ledger.",
                p.last_applied_seq,
            ),
            ("phivault_sequencer_ledger_size", "Entries in the ledger.", p.ledger_size),
            ("phivault_sequencer_lag", "Stream messages not yet in the ledger.", p.lag),
        )
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        counters = (
            ("phivault_sequencer_appended", "Entries this process appended.", p.appended),
            ("phivault_sequencer_batches", "Group commits this process made.", p.batches),
            ("phivault_sequencer_takeovers", "Times this process became active.", p.takeovers),
        )
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            yield counter


class Sequencer:
    """Moves audit events from the stream to the PostgreSQL ledger; see the module docstring.

    ``await run(stop)`` runs until ``stop`` is set, standing by while another sequencer is
    active. It returns after a clean stop (the last batch appended, the cursor written, a final
    checkpoint signed). Losing PostgreSQL or NATS is waited out; it raises
    :class:`SequencerError` for what an operator must decide (an invalid message, a gap, a
    ledger that disagrees with the stream).

    It reads every message of ``stream``, whatever its subject; ``subject`` is where the
    workers publish (``phivault sequencer`` makes sure the stream has it).
    """

    def __init__(
        self,
        *,
        nats_urls: Sequence[str],
        stream: str,
        ledger_conninfo: str,
        signer: NoteSigner,
        origin: str,
        ledger_schema: str = DEFAULT_SCHEMA,
        subject: str | None = None,
        settings: LedgerSettings | None = None,
        batch_max: int = 500,
        lock_retry_s: float = 0.5,
        fetch_wait_s: float = 0.25,
        gather_s: float = 0.03,
        cursor_interval_s: float = 1.0,
        progress_interval_s: float = 10.0,
        client_name: str = "phivault-sequencer",
        strict_role: bool = False,
        log: SequencerLog | None = None,
    ) -> None:
        if batch_max < 1:
            raise ConfigurationError("the sequencer's batch size must be at least 1")
        self.nats_urls = list(nats_urls)
        self.stream = stream
        self.subject = subject or audit_subject(stream)
        self.ledger_conninfo = ledger_conninfo
        self.ledger_schema = ledger_schema
        self._signer = signer
        self._origin = origin
        self._settings = settings or LedgerSettings()
        self.batch_max = batch_max
        self.lock_retry_s = lock_retry_s
        self.fetch_wait_s = fetch_wait_s
        self.gather_s = gather_s
        self.cursor_interval_s = cursor_interval_s
        self.progress_interval_s = progress_interval_s
        self._client_name = client_name
        self.strict_role = strict_role
        self._log: SequencerLog = log or _StdlibLog()
        self._nats: NatsClient | None = None
        self.progress = SequencerProgress()

    # -- the outer loop: standby until the writer lock is ours ------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                opened = open_ledger_on(
                    self._open_store, self._signer, self._origin, self._settings
                )
                try:
                    ledger = await opened.__aenter__()
                except LedgerLocked:
                    self._set_role("standby")
                    await _wait(stop, self.lock_retry_s)
                    continue
                except LedgerUnavailable as exc:
                    self._set_role("standby")
                    self._log.warning("sequencer.ledger-unavailable", error=str(exc))
                    await _wait(stop, self.lock_retry_s)
                    continue
                lost = False
                try:
                    await self._lead(ledger, stop)
                except LedgerUnavailable as exc:
                    # PostgreSQL, the cursor or the stream went away: close, and compete for
                    # the lock again (after a pause: reopening reads the whole ledger).
                    self._log.warning("sequencer.lost-ledger", error=str(exc))
                    lost = True
                finally:
                    try:
                        await opened.__aexit__(None, None, None)
                    except LedgerError as exc:
                        self._log.warning("sequencer.close-failed", error=str(exc))
                    self.progress.role = "standby"
                if lost:
                    await _wait(stop, self.lock_retry_s)
        finally:
            self._set_role("stopped")
            if self._nats is not None and not self._nats.is_closed:
                with contextlib.suppress(*_NATS_ERRORS):
                    await self._nats.close()

    def _open_store(self) -> PostgresLedgerStore:
        return PostgresLedgerStore(
            self.ledger_conninfo,
            schema=self.ledger_schema,
            writable=True,
            strict_role=self.strict_role,
        )

    def _set_role(self, role: Role) -> None:
        if self.progress.role != role:
            self.progress.role = role
            self._log.info("sequencer.role", **self.progress.as_dict())

    # -- active --------------------------------------------------------------------------

    async def _lead(self, ledger: Ledger, stop: asyncio.Event) -> None:
        self.progress.takeovers += 1
        self._set_role("active")
        async with _Cursor.open(self.ledger_conninfo, self.ledger_schema, self.stream) as cursor:
            cursor_size, cursor_seq = await cursor.latest()
            size = ledger.size
            if cursor_size > size:
                raise LedgerStreamMismatch(
                    f"the cursor says {cursor_size} entries came from the stream but the ledger "
                    f"holds {size}"
                )
            js = await self._jetstream(stop)
            if js is None:
                return
            while not await self._check_anchor(js, ledger, cursor_size, cursor_seq):
                if await _wait(stop, self.lock_retry_s):
                    return
            assert self._nats is not None  # connected by _jetstream
            reader = _StreamReader(js, self._nats, self.stream, cursor_seq + 1, self._log)
            try:
                matched = await self._match_tail(ledger, reader, cursor_size, cursor_seq, stop)
                if matched is None:
                    return
                last_seq, rest = matched
                self.progress.ledger_size = ledger.size
                self.progress.last_applied_seq = last_seq
                if rest:
                    self._log.info(
                        "sequencer.completing-message", seq=rest[0].seq, events=len(rest)
                    )
                    await self._append(ledger, rest)
                await cursor.write(ledger.size, self.progress.last_applied_seq)
                self._log.info("sequencer.resumed", **self.progress.as_dict())
                await self._sequence(ledger, reader, cursor, stop)
            finally:
                await reader.close()

    async def _check_anchor(
        self, js: JetStreamContext, ledger: Ledger, cursor_size: int, cursor_seq: int
    ) -> bool:
        """Check the stream is the one the cursor speaks of; False if it cannot be read now.

        The cursor says entry ``cursor_size - 1`` is message ``cursor_seq``. A stream that was
        recreated (numbered from 1 again) would otherwise have its first ``cursor_seq``
        messages skipped without a trace.
        """
        try:
            state = (await js.stream_info(self.stream)).state
        except _NATS_ERRORS as exc:
            self._log.warning("sequencer.stream-unavailable", error=type(exc).__name__)
            return False
        if int(state.last_seq) < cursor_seq:
            raise LedgerStreamMismatch(
                f"the stream {self.stream} ends at message {state.last_seq} but the ledger "
                f"already holds its messages up to {cursor_seq} (was the stream recreated?)"
            )
        if cursor_size == 0 or int(state.first_seq) > cursor_seq:
            return True  # nothing to compare, or aged out of the stream (kept in the ledger)
        try:
            raw = await js.get_msg(self.stream, cursor_seq)
        except _NATS_ERRORS as exc:
            self._log.warning("sequencer.stream-unavailable", error=type(exc).__name__)
            return False
        # The message's events (several for a batch message) are the entries ending there.
        events = _decode_message(cursor_seq, raw.headers, raw.data or b"")
        if len(events) > cursor_size:
            raise LedgerStreamMismatch(
                f"stream message {cursor_seq} has {len(events)} events but the cursor says the "
                f"ledger's first {cursor_size} entries end with it"
            )
        entries = await asyncio.to_thread(ledger.read_range, cursor_size - len(events), cursor_size)
        for entry, incoming in zip(entries, events, strict=True):
            stored = {k: v for k, v in entry.document.items() if k not in LEDGER_FIELDS}
            if stored != incoming.document:
                raise LedgerStreamMismatch(
                    f"ledger entry {entry.index} is not stream message {cursor_seq} (or one of "
                    f"its events) as the cursor says (was the stream {self.stream} recreated?)"
                )
        return True

    async def _match_tail(
        self,
        ledger: Ledger,
        reader: _StreamReader,
        cursor_size: int,
        cursor_seq: int,
        stop: asyncio.Event,
    ) -> tuple[int, list[_Incoming]] | None:
        """Check the entries after the cursor against the stream.

        Returns the stream sequence of the last message wholly in the ledger, and the events
        of a message the ledger holds only the first events of (a crash in the middle of its
        append: they are to be appended now, before anything else); ``None`` if asked to stop
        first.
        """
        index, last_seq = cursor_size, cursor_seq
        size = ledger.size
        while index < size:
            if stop.is_set():
                return None
            batch = await reader.take(min(self.batch_max, size - index), self.fetch_wait_s)
            if not batch:
                if await _nats_call(reader.last_stream_seq()) < reader.next_seq:
                    raise LedgerStreamMismatch(
                        f"the ledger holds {size - index} entries after its cursor (stream "
                        f"message {cursor_seq}) that the stream does not have"
                    )
                continue
            matched = min(len(batch), size - index)
            entries = await asyncio.to_thread(ledger.read_range, index, index + matched)
            for entry, incoming in zip(entries, batch[:matched], strict=True):
                stored = {k: v for k, v in entry.document.items() if k not in LEDGER_FIELDS}
                if stored != incoming.document:
                    raise LedgerStreamMismatch(
                        f"ledger entry {entry.index} is not stream message {incoming.seq}, "
                        "which should be there; the ledger and the stream disagree"
                    )
            index += matched
            if matched < len(batch):
                # The ledger ends inside a message (take hands out whole messages, so the rest
                # belongs to the last one): its other events follow now, once each.
                rest = batch[matched:]
                if any(item.seq != rest[0].seq for item in rest):
                    raise LedgerStreamMismatch("the ledger ends inside more than one message")
                return rest[0].seq - 1, rest
            last_seq = batch[-1].seq
        return last_seq, []

    async def _sequence(
        self, ledger: Ledger, reader: _StreamReader, cursor: _Cursor, stop: asyncio.Event
    ) -> None:
        progress = self.progress
        cursor_due = time.monotonic() + self.cursor_interval_s
        log_due = time.monotonic() + self.progress_interval_s
        try:
            while not stop.is_set():
                batch = await reader.take(self.batch_max, self.fetch_wait_s)
                if batch:
                    await self._append(ledger, batch)
                    progress.lag = reader.pending
                    if len(batch) < self.batch_max and self.gather_s > 0:
                        # The stream had no more: let a few milliseconds of events gather
                        # into the next batch (each batch costs fetches, an INSERT and a
                        # gather, whatever its size). Workers never wait for the ledger.
                        await asyncio.sleep(self.gather_s)
                now = time.monotonic()
                if now >= cursor_due:
                    await cursor.write(progress.ledger_size, progress.last_applied_seq)
                    cursor_due = now + self.cursor_interval_s
                if now >= log_due:
                    self._log.info("sequencer.progress", **progress.as_dict())
                    log_due = now + self.progress_interval_s
        except SequencerError:
            # What was appended before the bad message is durable: let the cursor say so.
            await cursor.write(progress.ledger_size, progress.last_applied_seq)
            raise
        await cursor.write(progress.ledger_size, progress.last_applied_seq)

    async def _append(self, ledger: Ledger, batch: list[_Incoming]) -> None:
        first = ledger.size
        # One group commit, in order. Every message is appended as the document it carries:
        # for an event that is the leaf Ledger.record would have made (its document is plain,
        # so both encoders agree).
        try:
            index = await ledger.record_documents([(item.document, item.plain) for item in batch])
        except LedgerUnavailable:
            # Some of the batch may be durable: only a fresh open knows what the ledger
            # holds, so give up the writer role and take it again from the start.
            raise
        except Exception as exc:
            raise LedgerUnavailable(
                f"an append failed ({type(exc).__name__}); reopening the ledger"
            ) from exc
        if index != first or ledger.size != first + len(batch):
            raise LedgerUnavailable("the ledger assigned unexpected indexes; reopening it")
        self.progress.ledger_size = ledger.size
        self.progress.last_applied_seq = batch[-1].seq
        self.progress.appended += len(batch)
        self.progress.batches += 1

    async def _jetstream(self, stop: asyncio.Event) -> JetStreamContext | None:
        """The JetStream context, connecting (and retrying) if needed; None if stopped."""
        while self._nats is None or self._nats.is_closed:
            try:
                self._nats = await connect_nats(self.nats_urls, name=self._client_name)
            except LedgerUnavailable as exc:
                self._log.warning("sequencer.nats-unavailable", error=str(exc))
                if await _wait(stop, self.lock_retry_s):
                    return None
        return self._nats.jetstream()


async def _nats_call(call: Awaitable[int]) -> int:
    try:
        return await call
    except _NATS_ERRORS as exc:
        raise LedgerUnavailable(f"cannot read the audit stream: {type(exc).__name__}") from exc


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True if ``stop`` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
