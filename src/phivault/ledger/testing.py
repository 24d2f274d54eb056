"""Fakes of the ledger's ports, for other parts' unit tests (STYLE.md: a fake for each port)."""

from __future__ import annotations

from phivault.ledger.errors import LedgerUnavailable
from phivault.ledger.events import AuditEvent

__all__ = ["InMemoryAuditSink"]


class InMemoryAuditSink:
    """An :class:`~phivault.ledger.ports.AuditSink` that keeps events in a list.

    Set ``failing = True`` to simulate a ledger that cannot take events (fail-closed tests).
    """

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.failing = False

    async def record(self, event: AuditEvent) -> int:
        if self.failing:
            raise LedgerUnavailable("audit sink is failing (simulated)")
        self.events.append(event)
        return len(self.events) - 1
