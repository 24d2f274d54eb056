"""Fakes of the ledger's ports, for other parts' unit tests (STYLE.md: a fake for each port)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from phivault.ledger.errors import LedgerUnavailable
from phivault.ledger.events import (
    Action,
    Agent,
    AuditEvent,
    Entity,
    EntityRole,
    EntityType,
    EventKind,
    Source,
)

__all__ = ["InMemoryAuditSink", "sample_event"]


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


def sample_event(
    number: int = 0,
    *,
    patient: str | None = "Patient/p-1",
    subtype: str = "read",
    tenant: str = "tenant-a",
    who: str = "Practitioner/pr-1",
    recorded: datetime | None = None,
) -> AuditEvent:
    """A realistic, PHI-free REST read event, numbered so that tests can tell events apart."""
    when = recorded or datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=number)
    resource = f"Observation/obs-{number}/_history/1"
    return AuditEvent(
        kind=EventKind.REST,
        subtype=subtype,
        action=Action.READ,
        recorded=when,
        tenant=tenant,
        patient=patient,
        agents=(
            Agent(
                who=who,
                roles=("clinician",),
                client_id="ehr-web",
                network_address="10.0.0.7",
                purpose_of_use=("TREAT",),
            ),
        ),
        source=Source(observer="node-test"),
        entities=(
            *(
                (Entity(what=patient, type=EntityType.PERSON, role=EntityRole.PATIENT),)
                if patient
                else ()
            ),
            Entity(what=resource),
        ),
        purpose_of_use=("TREAT",),
        request_id=f"req-{number}",
    )
