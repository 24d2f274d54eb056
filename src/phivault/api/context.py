"""What a route gets from the front door, and how the records service mounts its routes.

Every request that passes authentication carries a :class:`RequestState` in the ASGI scope:
the request id, the client address, the :class:`~phivault.identity.Principal` and the
:class:`AuditContext`. Routes never read headers for identity; they declare what they need as
FastAPI dependencies:

* ``principal: CurrentPrincipal`` (``Depends(current_principal)``): the authenticated caller.
* ``audit: AuditCtx`` (``Depends(audit_context)``): builds audit events
  (:class:`~phivault.ledger.events.AuditEvent`) already filled with who/where/request id,
  and records them through the ledger's
  :class:`~phivault.ledger.ports.AuditSink`. ``await audit.record(event)`` raises
  :class:`~phivault.api.problems.AuditUnavailable` (mapped to 503) if the event is not durable,
  so a PHI route that records *before* it returns data fails closed by construction.
* ``principal: SteppedUp`` (``Depends(stepped_up_principal)``): the caller, who must have
  completed MFA within the step-up window; otherwise a 401 with the RFC 9470 challenge.

Mounting: pass ``routers=[MountedRouter(router, prefix="/fhir")]`` to
:func:`phivault.api.create_app` (or ``app.include_router`` later). Every path that is not in
the short public list (health, readiness, metrics, OpenAPI, the dev provider's JWKS) requires
authentication: new routes are protected by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from phivault.api.problems import AuditUnavailable
from phivault.errors import InvalidInput
from phivault.identity.errors import MissingCredentials
from phivault.identity.principal import Principal
from phivault.identity.sessions import SessionPolicy, require_step_up
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

__all__ = [
    "STATE_KEY",
    "AuditContext",
    "AuditCtx",
    "CurrentPrincipal",
    "MountedRouter",
    "RequestState",
    "SteppedUp",
    "audit_context",
    "current_principal",
    "request_state",
    "stepped_up_principal",
]

STATE_KEY = "phivault"


@dataclass(frozen=True, slots=True)
class AuditContext:
    """Who is acting, from where, in which request: everything an audit event needs but *what*."""

    principal: Principal
    request_id: str
    network_address: str | None
    observer: str
    sink: AuditSink
    clock: Callable[[], float]

    def agent(self) -> Agent:
        principal = self.principal
        return _agent(
            principal.subject,
            tuple(sorted(map(str, principal.roles))),  # StrEnum values
            principal.client_id,
            self.network_address,
            principal.purpose_of_use,
        )

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
        """An audit event for this request, with agent, source, tenant and request id filled.

        Raises :class:`~phivault.errors.InvalidInput` (a 400) when a value the caller supplied
        (a patient id, say) cannot be recorded: what cannot be audited is not served.
        """
        try:
            return self._event(
                kind=kind,
                subtype=subtype,
                action=action,
                outcome=outcome,
                outcome_reason=outcome_reason,
                patient=patient,
                entities=entities,
                purpose_of_use=purpose_of_use,
                break_glass_grant=break_glass_grant,
            )
        except ValidationError as exc:
            fields = sorted({str(err["loc"][0]) for err in exc.errors() if err.get("loc")})
            raise InvalidInput(
                "cannot be recorded in the audit ledger", path=",".join(fields)
            ) from exc

    def _event(
        self,
        *,
        kind: EventKind,
        subtype: str,
        action: Action,
        outcome: Outcome,
        outcome_reason: str | None,
        patient: str | None,
        entities: tuple[Entity, ...],
        purpose_of_use: tuple[str, ...] | None,
        break_glass_grant: str | None,
    ) -> AuditEvent:
        return AuditEvent.checked(
            kind=kind,
            subtype=subtype,
            action=action,
            recorded=_instant(self.clock()),
            outcome=outcome,
            outcome_reason=outcome_reason,
            tenant=self.principal.tenant,
            patient=patient,
            agents=(self.agent(),),
            source=_source(self.observer),
            entities=entities,
            purpose_of_use=(
                self.principal.purpose_of_use if purpose_of_use is None else purpose_of_use
            ),
            request_id=self.request_id,
            break_glass_grant=break_glass_grant,
        )

    async def record(self, event: AuditEvent) -> int:
        """Record ``event`` durably; raise :class:`AuditUnavailable` (503) if that fails."""
        try:
            return await self.sink.record(event)
        except Exception as exc:  # any failure of the sink fails the request closed
            raise AuditUnavailable("the audit event could not be recorded") from exc


# Agents and sources are immutable and validated when built; a caller's requests all carry the
# same one, so it is built (and its ids checked) once, not on every event. A value that fails
# validation raises every time (lru_cache keeps no exceptions).
@lru_cache(maxsize=4096)
def _agent(
    who: str,
    roles: tuple[str, ...],
    client_id: str | None,
    network_address: str | None,
    purpose_of_use: tuple[str, ...],
) -> Agent:
    return Agent(
        who=who,
        requestor=True,
        roles=roles,
        client_id=client_id,
        network_address=network_address,
        purpose_of_use=purpose_of_use,
    )


def _instant(timestamp: float) -> datetime:
    """``timestamp`` in UTC, cut to whole milliseconds as an event's validation cuts it
    (:meth:`AuditEvent.checked` then takes it as it is)."""
    instant = datetime.fromtimestamp(timestamp, UTC)
    return instant.replace(microsecond=instant.microsecond // 1000 * 1000)


@lru_cache(maxsize=64)
def _source(observer: str) -> Source:
    return Source(observer=observer)


@dataclass(slots=True)
class RequestState:
    """Per-request state the front door fills in, stage by stage."""

    request_id: str
    client_address: str | None
    principal: Principal | None = None
    audit: AuditContext | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MountedRouter:
    """A router to mount behind the front door (all its routes require authentication)."""

    router: APIRouter
    prefix: str = ""


# The dependencies are ``async`` on purpose: FastAPI runs plain functions in a thread pool,
# which would cost a thread hop per dependency per request.
def request_state(request: Request) -> RequestState:
    state = request.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(state, RequestState):
        raise RuntimeError("the front door did not run for this request")
    return state


async def current_principal(request: Request) -> Principal:
    """The authenticated caller (FastAPI dependency)."""
    principal = request_state(request).principal
    if principal is None:
        raise MissingCredentials()
    return principal


async def audit_context(request: Request) -> AuditContext:
    """The audit context of this request (FastAPI dependency)."""
    audit = request_state(request).audit
    if audit is None:
        raise MissingCredentials()
    return audit


async def stepped_up_principal(request: Request) -> Principal:
    """The caller, who must have done MFA within the step-up window (RFC 9470)."""
    principal = await current_principal(request)
    policy: SessionPolicy = request.app.state.session_policy
    clock: Callable[[], float] = request.app.state.clock
    require_step_up(principal, policy, now=clock())
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
AuditCtx = Annotated[AuditContext, Depends(audit_context)]
SteppedUp = Annotated[Principal, Depends(stepped_up_principal)]
