"""A fake of the records repository's :class:`~phivault.records.results.AuditTrail` port,
for tests that call the repository without the API's front door (STYLE.md: a fake for each
port). It builds events the way ``phivault.api.context.AuditContext`` does, for one fixed
caller, and records them in any :class:`~phivault.ledger.ports.AuditSink`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from phivault.ledger.events import (
    Action,
    Agent,
    AuditEvent,
    Entity,
    EventKind,
    Outcome,
    Source,
)
from phivault.ledger.ports import AuditSink

__all__ = ["FixedCallerTrail"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class FixedCallerTrail:
    """The audit trail of one caller (``who``) in one tenant and request.

    ``purposes`` stands in for the token's purpose of use when the repository names none;
    ``clock`` gives each event's ``recorded`` instant (a fixed one makes events
    reproducible)."""

    sink: AuditSink
    who: str
    tenant: str = "default"
    observer: str = "test"
    request_id: str | None = None
    purposes: tuple[str, ...] = ()
    clock: Callable[[], datetime] = field(default=_now)

    def event(
        self,
        *,
        kind: EventKind,
        subtype: str,
        action: Action,
        outcome: Outcome = Outcome.SUCCESS,
        outcome_reason: str | None = None,
        patient: str | None = None,
        entities: tuple[Entity, ...] = (),
        purpose_of_use: tuple[str, ...] | None = None,
        break_glass_grant: str | None = None,
    ) -> AuditEvent:
        return AuditEvent(
            kind=kind,
            subtype=subtype,
            action=action,
            recorded=self.clock(),
            outcome=outcome,
            outcome_reason=outcome_reason,
            tenant=self.tenant,
            patient=patient,
            agents=(Agent(who=self.who),),
            source=Source(observer=self.observer),
            entities=entities,
            purpose_of_use=purpose_of_use or self.purposes,
            request_id=self.request_id,
            break_glass_grant=break_glass_grant,
        )

    async def record(self, event: AuditEvent) -> int:
        return await self.sink.record(event)
