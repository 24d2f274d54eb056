"""Idempotency keys for audit events: a retried event is the *same* event.

Why an ambient key (like ``records.store.routing.caller_session``): the records repository
records through the request's audit trail (``AuditTrail.record(event)``), which knows nothing
of message ids, and the scaled shape's sink (:class:`~phivault.ledger.stream.JetStreamAuditSink`)
is several layers below. A caller that may record an event again after a failure (the outcome
of a committed write, :meth:`RecordsRepository._record_later`) records every attempt inside
``with idempotency_key(key)`` with one key; the stream sink publishes it as the
``Nats-Msg-Id``, so the stream's duplicate window keeps one copy even when an earlier attempt
did reach the stream but its acknowledgement was lost. Sinks without such a window (the
embedded ledger, whose ``record`` raises only when nothing was appended) ignore it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final

__all__ = ["current_idempotency_key", "idempotency_key"]

_KEY: Final[ContextVar[str | None]] = ContextVar("phivault_audit_idempotency_key", default=None)


@contextmanager
def idempotency_key(key: str) -> Iterator[None]:
    """Events recorded in this block (by this task) carry ``key`` as their idempotency key:
    record exactly one event per block."""
    token = _KEY.set(key)
    try:
        yield
    finally:
        _KEY.reset(token)


def current_idempotency_key() -> str | None:
    """The key of the block being recorded in, if any."""
    return _KEY.get()
