"""The audit sink the configured shape records to: one composition for the API and the CLI.

* Embedded (``shape.ledger = local``): the data directory's ledger; ``record`` returns the
  event's ledger index once it is durable.
* Scaled (``shape.ledger = jetstream``): the JetStream audit stream; ``record`` returns the
  event's stream sequence once the stream acknowledged it (the sequencer assigns the ledger
  index later). The stream is created if it does not exist yet (idempotent: whoever starts
  first, a worker, the sequencer or a CLI command, creates it).

Either fails closed: it raises :class:`~phivault.ledger.errors.LedgerUnavailable` when the
ledger or the stream cannot be opened or cannot take an event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from phivault.datadir import DataDir
from phivault.settings import LedgerKind, Settings

if TYPE_CHECKING:
    from phivault.ledger.ports import AuditSink
    from phivault.ledger.service import Ledger
    from phivault.resilience import Breaker

__all__ = ["AuditPosition", "ShapeSink", "open_shape_sink", "position_of"]


class AuditPosition(StrEnum):
    """What the number ``AuditSink.record`` returns is, per shape."""

    LEDGER_INDEX = "ledger-index"  # the entry's index in the (embedded) ledger
    STREAM_SEQUENCE = "stream-sequence"  # the message's sequence in the audit stream


def position_of(settings: Settings) -> AuditPosition:
    """What the shape's sink returns for a recorded event."""
    if settings.shape.ledger is LedgerKind.LOCAL:
        return AuditPosition.LEDGER_INDEX
    return AuditPosition.STREAM_SEQUENCE


@dataclass(frozen=True, slots=True)
class ShapeSink:
    sink: AuditSink
    position: AuditPosition
    embedded: Ledger | None  # the local ledger (the sink itself), in the embedded shape
    where: str  # for messages: the ledger's folder or the stream's name (never credentials)


@asynccontextmanager
async def open_shape_sink(
    settings: Settings, data_dir: DataDir, *, client_name: str, breaker: Breaker | None = None
) -> AsyncIterator[ShapeSink]:
    """The shape's audit sink, closed on exit. ``client_name`` names the NATS connection
    (scaled shape); ``breaker`` wraps each publish to the stream (a server's workers)."""
    from phivault.ledger.service import open_ledger

    if settings.shape.ledger is LedgerKind.LOCAL:
        async with open_ledger(data_dir, settings.ledger) as ledger:
            yield ShapeSink(ledger, AuditPosition.LEDGER_INDEX, ledger, "the data directory ledger")
        return
    from phivault.ledger.stream import JetStreamAuditSink, connect_nats, ensure_audit_stream

    ledger_settings = settings.ledger
    client = await connect_nats(ledger_settings.nats_urls, name=client_name)
    sink = JetStreamAuditSink(
        client,
        stream=ledger_settings.stream,
        publish_timeout_s=ledger_settings.publish_timeout_s,
        leader_election_wait_s=ledger_settings.leader_election_wait_s,
        breaker=breaker,
        owns_client=True,
    )
    try:
        await ensure_audit_stream(
            client.jetstream(),
            name=ledger_settings.stream,
            subject=sink.subject,
            replicas=ledger_settings.stream_replicas,
        )
        yield ShapeSink(
            sink,
            AuditPosition.STREAM_SEQUENCE,
            None,
            f"the audit stream {ledger_settings.stream}",
        )
    finally:
        await sink.aclose()
