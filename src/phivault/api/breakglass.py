"""Break-glass over HTTP: the FHIR operation, revocation, and the privacy officers' queue.

Two routers, both behind the front door (authenticated, rate-limited, audited):

* :func:`break_glass_router` (mount at ``""``, *before* the FHIR router):
  ``POST /fhir/Patient/{id}/$break-glass`` takes a FHIR ``Parameters`` resource with
  ``reason`` (``valueCoding`` from :data:`~phivault.access.breakglass.REASON_SYSTEM`, or
  ``valueCode``) and ``justification`` (``valueString``); it needs a recent MFA (step-up,
  RFC 9470 challenge otherwise) and a role whose policy says ``break_glass = true``, and
  answers a ``Parameters`` resource describing the grant and its expiry.
  ``POST /fhir/Patient/{id}/$break-glass/{grant}/$revoke`` ends a grant: the grantee's own,
  or any grant of the tenant for a privacy officer.
* :func:`break_glass_admin_router` (mount at ``/admin/break-glass``): ``GET ?status=
  unreviewed|overdue|reviewed|all`` (the queue, no free text), ``GET /{id}`` (one grant with
  its opened justification), ``POST /{id}/review`` (``{"outcome": "appropriate" |
  "inappropriate", "note": "..."}``): privacy officers only
  (``Operation.BREAK_GLASS_REVIEW``), every look and review a ledger event first.

The service is ``app.state.break_glass`` (a :class:`BreakGlassService`).
:func:`break_glass_grants` is what the FHIR router's caller construction awaits to put the
caller's grants in its access context. Every error is an OperationOutcome; none echoes input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, TextIO

import httpx
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from sqlalchemy import Engine

from phivault.access.alerts import AlertFanout, AlertSink, LogAlertSink, WebhookAlertSink
from phivault.access.breakglass import (
    REASON_SYSTEM,
    BreakGlassService,
    GrantConflict,
    GrantNotFound,
    GrantRecord,
    GrantView,
    NotPermitted,
    PatientCiphers,
    PatientNotFound,
    ReviewOutcome,
    SelfReview,
    parse_reason,
)
from phivault.access.decision import (
    AccessContext,
    BreakGlassGrant,
    CompiledPolicy,
    allows_operation,
)
from phivault.access.grant_store import SqlGrantStore
from phivault.access.vocabulary import Operation
from phivault.api.context import AuditCtx, CurrentPrincipal, MountedRouter, SteppedUp
from phivault.api.problems import (
    FHIR_JSON,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from phivault.crypto.errors import KeyUnavailable, PatientShredded, Sealed
from phivault.errors import InvalidInput
from phivault.identity.principal import Principal
from phivault.resilience import Breaker
from phivault.settings import Settings

__all__ = [
    "BreakGlassWiring",
    "access_context_with_grants",
    "break_glass_admin_router",
    "break_glass_grants",
    "break_glass_router",
    "break_glass_service",
    "wire_break_glass",
]

_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_MAX_BODY: Final = 64 * 1024
_JSON_TYPES: Final = ("application/fhir+json", "application/json")


class _Route(APIRoute):
    """Break-glass errors become the FHIR answer (404, 409); the rest go to the front door."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except (GrantNotFound, PatientNotFound) as exc:
                raise NotFound(str(exc)) from exc
            except GrantConflict as exc:
                raise Conflict(str(exc)) from exc
            except (SelfReview, NotPermitted) as exc:
                raise Forbidden(str(exc)) from exc
            except PatientShredded as exc:
                raise Gone("the patient's data was destroyed") from exc
            except (Sealed, KeyUnavailable) as exc:
                raise ServiceUnavailable("the patient's keys are unavailable") from exc

        return route


async def break_glass_service(request: Request) -> BreakGlassService:
    """The service on ``app.state.break_glass`` (FastAPI dependency)."""
    service = getattr(request.app.state, "break_glass", None)
    if not isinstance(service, BreakGlassService):
        raise ServiceUnavailable("break-glass is not configured")
    return service


Service = Annotated[BreakGlassService, Depends(break_glass_service)]


async def break_glass_grants(request: Request, principal: Principal) -> tuple[BreakGlassGrant, ...]:
    """The caller's grants for its access context (none when break-glass is not configured
    or no role of the caller may use grants): ``AccessContext.from_principal(principal,
    grants=await break_glass_grants(request, principal))``."""
    service = getattr(request.app.state, "break_glass", None)
    if not isinstance(service, BreakGlassService):
        return ()
    return await service.active_grants(principal.tenant, principal.subject, roles=principal.roles)


async def access_context_with_grants(request: Request, principal: Principal) -> AccessContext:
    """The caller's access context with its break-glass grants (what the FHIR router's caller
    construction uses)."""
    grants = await break_glass_grants(request, principal)
    return AccessContext.from_principal(principal, grants=grants)


@dataclass(frozen=True, slots=True)
class BreakGlassWiring:
    """What the composition root adds: the service (``state={"break_glass": service}``),
    the routers to mount, and the callbacks to run on shutdown (the webhook's drain)."""

    service: BreakGlassService
    routers: tuple[MountedRouter, ...]
    on_shutdown: tuple[Callable[[], Awaitable[None]], ...]
    breakers: tuple[Breaker, ...] = ()  # the webhook's, to export with the others


def wire_break_glass(
    settings: Settings,
    *,
    engine: Engine,
    ciphers: PatientCiphers,
    policy: CompiledPolicy,
    clock: Callable[[], float],
    webhook_url: str | None = None,
    http_client: httpx.AsyncClient | None = None,
    log_stream: TextIO | None = None,
    extra_sinks: Sequence[AlertSink] = (),
) -> BreakGlassWiring:
    """Build break-glass from ``settings.access`` on the records database's ``engine`` (the
    records migrations created its table): grants in SQL, alerts to the log (``log_stream``,
    standard error by default) and, given ``webhook_url``, a background webhook."""
    sinks: list[AlertSink] = [LogAlertSink(log_stream), *extra_sinks]
    shutdown: list[Callable[[], Awaitable[None]]] = []
    breakers: list[Breaker] = []
    if webhook_url is not None:
        webhook = WebhookAlertSink(webhook_url, client=http_client)
        sinks.append(webhook)
        shutdown.append(webhook.aclose)
        breakers.append(webhook.breaker)
    access = settings.access
    service = BreakGlassService(
        SqlGrantStore(engine),
        ciphers,
        policy,
        clock=clock,
        duration_s=access.break_glass_minutes * 60.0,
        overdue_s=access.break_glass_overdue_hours * 3600.0,
        alerts=AlertFanout(sinks),
    )
    routers = (
        MountedRouter(break_glass_router()),
        MountedRouter(break_glass_admin_router(), prefix="/admin/break-glass"),
    )
    return BreakGlassWiring(service, routers, tuple(shutdown), tuple(breakers))


# --- parsing ---------------------------------------------------------------------------


def _check_id(value: str, what: str) -> str:
    if not _ID_RE.match(value):
        raise InvalidInput(f"not a valid {what} id", path=what)
    return value


async def _json_body(request: Request) -> Any:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in _JSON_TYPES:
        raise UnsupportedMediaType()
    body = await request.body()
    if len(body) > _MAX_BODY:
        raise BadRequest("the request body is too large for this operation")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None


def _parameters(doc: Any) -> tuple[str, str]:
    """``(reason code, justification)`` from a Parameters resource; errors name the
    parameter, never its value."""
    if not isinstance(doc, dict) or doc.get("resourceType") != "Parameters":
        raise InvalidInput("the body must be a FHIR Parameters resource", path="resourceType")
    params = doc.get("parameter")
    if not isinstance(params, list):
        raise InvalidInput("Parameters.parameter is missing", path="Parameters.parameter")
    reason: str | None = None
    justification: str | None = None
    for param in params:
        if not isinstance(param, dict):
            raise InvalidInput("a parameter is not an object", path="Parameters.parameter")
        name = param.get("name")
        if name == "reason":
            coding = param.get("valueCoding")
            if isinstance(coding, dict):
                system = coding.get("system")
                if system is not None and system != REASON_SYSTEM:
                    raise InvalidInput(
                        f"reason.valueCoding.system must be {REASON_SYSTEM}",
                        path="Parameters.parameter.reason",
                    )
                code = coding.get("code")
            else:
                code = param.get("valueCode")
            if not isinstance(code, str):
                raise InvalidInput(
                    "reason needs a valueCoding or valueCode", path="Parameters.parameter.reason"
                )
            reason = code
        elif name == "justification":
            text = param.get("valueString")
            if not isinstance(text, str):
                raise InvalidInput(
                    "justification needs a valueString",
                    path="Parameters.parameter.justification",
                )
            justification = text
        else:
            raise InvalidInput(
                "unknown parameter (expected reason and justification)",
                path="Parameters.parameter.name",
            )
    if reason is None or justification is None:
        raise InvalidInput(
            "both reason and justification are required", path="Parameters.parameter"
        )
    return reason, justification


# --- answers ---------------------------------------------------------------------------


def _instant(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds") + "Z"


def _grant_parameters(record: GrantRecord, state: str) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "grant", "valueId": record.grant_id},
        {"name": "patient", "valueReference": {"reference": f"Patient/{record.patient}"}},
        {"name": "reason", "valueCoding": {"system": REASON_SYSTEM, "code": record.reason.value}},
        {"name": "start", "valueInstant": _instant(record.starts_at)},
        {"name": "expires", "valueInstant": _instant(record.expires_at)},
        {"name": "status", "valueCode": state},
    ]
    if record.revoked_at is not None:
        params.append({"name": "revoked", "valueInstant": _instant(record.revoked_at)})
    return {"resourceType": "Parameters", "parameter": params}


def _fhir(doc: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(doc, separators=(",", ":")), status, media_type=FHIR_JSON)


def _view_document(view: GrantView, *, opened: bool) -> dict[str, Any]:
    record = view.record
    doc: dict[str, Any] = {
        "grant": record.grant_id,
        "tenant": record.tenant,
        "user": record.subject,
        "patient": f"Patient/{record.patient}",
        "reason": record.reason.value,
        "created": _instant(record.created_at),
        "starts": _instant(record.starts_at),
        "expires": _instant(record.expires_at),
        "state": view.state,
        "review_status": view.status.value,
    }
    if record.revoked_at is not None:
        doc["revoked"] = _instant(record.revoked_at)
        doc["revoked_by"] = record.revoked_by
    if record.reviewed_at is not None:
        doc["reviewed"] = _instant(record.reviewed_at)
        doc["reviewed_by"] = record.reviewed_by
        doc["review_outcome"] = None if record.review_outcome is None else record.review_outcome
    if opened:
        doc["justification"] = view.justification
        doc["review_note"] = view.review_note
        if view.unreadable:
            doc["justification_unreadable"] = True
    return doc


def _json(doc: Any) -> Response:
    # no-store: the queue names patients and users; no shared cache may keep it.
    return JSONResponse(doc, headers={"Cache-Control": "no-store"})


def _is_reviewer(service: BreakGlassService, principal: Principal) -> bool:
    ctx = AccessContext.from_principal(principal)
    return allows_operation(service.policy, ctx, Operation.BREAK_GLASS_REVIEW)


# --- routers ---------------------------------------------------------------------------


def break_glass_router() -> APIRouter:
    """``$break-glass`` and ``$revoke`` on ``/fhir/Patient/{id}``: mount at prefix ``""``."""
    router = APIRouter(route_class=_Route)

    @router.post("/fhir/Patient/{patient_id}/$break-glass")
    async def request_grant(
        patient_id: str,
        request: Request,
        principal: SteppedUp,
        audit: AuditCtx,
        service: Service,
    ) -> Response:
        _check_id(patient_id, "patient")
        reason_code, justification = _parameters(await _json_body(request))
        reason = parse_reason(reason_code)
        record = await service.request(
            audit,
            tenant=principal.tenant,
            subject=principal.subject,
            roles=principal.roles,
            patient=patient_id,
            reason=reason,
            justification=justification,
        )
        return _fhir(_grant_parameters(record, "active"))

    @router.post("/fhir/Patient/{patient_id}/$break-glass/{grant_id}/$revoke")
    async def revoke_grant(
        patient_id: str,
        grant_id: str,
        principal: CurrentPrincipal,
        audit: AuditCtx,
        service: Service,
    ) -> Response:
        _check_id(patient_id, "patient")
        _check_id(grant_id, "grant")
        record = await service.revoke(
            audit,
            tenant=principal.tenant,
            grant_id=grant_id,
            by=principal.subject,
            patient=patient_id,
            any_subject=_is_reviewer(service, principal),
        )
        return _fhir(_grant_parameters(record, "revoked"))

    return router


def break_glass_admin_router() -> APIRouter:
    """The review queue: mount at prefix ``/admin/break-glass``."""
    router = APIRouter(route_class=_Route)

    async def reviewer(
        principal: CurrentPrincipal, audit: AuditCtx, service: Service, subtype: str
    ) -> None:
        if not _is_reviewer(service, principal):
            await service.refuse(audit, subtype=subtype, reason="not-privacy-officer")
            raise Forbidden("only privacy officers review break-glass grants")

    @router.get("")
    async def queue(
        principal: CurrentPrincipal,
        audit: AuditCtx,
        service: Service,
        status: Annotated[str, Query(max_length=16)] = "unreviewed",
    ) -> Response:
        await reviewer(principal, audit, service, "queue")
        views = await service.queue(audit, tenant=principal.tenant, status=status)
        return _json(
            {
                "status": status,
                "overdue_after_hours": service.overdue_s / 3600,
                "grants": [_view_document(view, opened=False) for view in views],
            }
        )

    @router.get("/{grant_id}")
    async def detail(
        grant_id: str, principal: CurrentPrincipal, audit: AuditCtx, service: Service
    ) -> Response:
        await reviewer(principal, audit, service, "read")
        _check_id(grant_id, "grant")
        view = await service.detail(audit, tenant=principal.tenant, grant_id=grant_id)
        return _json(_view_document(view, opened=True))

    @router.post("/{grant_id}/review")
    async def review(
        grant_id: str,
        request: Request,
        principal: CurrentPrincipal,
        audit: AuditCtx,
        service: Service,
    ) -> Response:
        await reviewer(principal, audit, service, "review")
        _check_id(grant_id, "grant")
        doc = await _json_body(request)
        if not isinstance(doc, dict):
            raise InvalidInput("the body must be a JSON object", path="body")
        try:
            outcome = ReviewOutcome(str(doc.get("outcome")))
        except ValueError:
            raise InvalidInput(
                "outcome must be appropriate or inappropriate", path="outcome"
            ) from None
        note = doc.get("note")
        if note is not None and not isinstance(note, str):
            raise InvalidInput("note must be a string", path="note")
        view = await service.review(
            audit,
            tenant=principal.tenant,
            grant_id=grant_id,
            by=principal.subject,
            outcome=outcome,
            note=note,
        )
        return _json(_view_document(view, opened=True))

    return router
