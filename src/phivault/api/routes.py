"""The front door's own endpoints: health, readiness, metrics, ``/whoami``, the dev JWKS.

None of them carries PHI or a patient id. ``/healthz`` says the process is up; ``/readyz``
says it can serve (identity provider keys fetched, shared state reachable); ``/metrics`` is
the Prometheus registry of this app. ``/whoami`` is the authenticated, PHI-free endpoint the
tests and the gateway benchmark use: it returns what the front door made of the caller's token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from phivault.api.context import CurrentPrincipal
from phivault.api.problems import FHIR_JSON, operation_outcome
from phivault.identity.principal import Principal
from phivault.identity.sessions import SessionPolicy

if TYPE_CHECKING:
    from phivault.identity.dev_provider import DevIdentityProvider

__all__ = [
    "DEV_PATHS",
    "PUBLIC_PATHS",
    "UNLIMITED_PATHS",
    "WhoAmI",
    "dev_router",
    "system_router",
    "whoami_document",
]

# /fhir/metadata (the CapabilityStatement) is public as FHIR asks: a client reads it before it
# has a token, to learn the security service. It carries no PHI and records no audit event, so
# it keeps answering when the ledger is down.
PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/fhir/metadata",
    }
)
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
DEV_PATHS = frozenset({"/.well-known/jwks.json", "/.well-known/openid-configuration"})


class Status(BaseModel):
    status: str


class WhoAmI(BaseModel):
    subject: str
    issuer: str
    tenant: str
    roles: list[str]
    scopes: list[str]
    fhirUser: str | None  # noqa: N815 - the SMART claim name
    purposeOfUse: list[str]  # noqa: N815 - FHIR style
    mfa: bool
    dpopBound: bool  # noqa: N815


def whoami_document(principal: Principal, policy: SessionPolicy) -> WhoAmI:
    return WhoAmI(
        subject=principal.subject,
        issuer=principal.issuer,
        tenant=principal.tenant,
        roles=sorted(role.value for role in principal.roles),
        scopes=[str(scope) for scope in principal.scopes] + sorted(principal.other_scopes),
        fhirUser=principal.fhir_user,
        purposeOfUse=list(principal.purpose_of_use),
        mfa=principal.auth.multi_factor(policy.mfa_acr_values),
        dpopBound=principal.dpop_jkt is not None,
    )


def system_router() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", response_model=Status, tags=["system"])
    async def healthz() -> Status:
        return Status(status="ok")

    @router.get("/readyz", response_model=Status, tags=["system"])
    async def readyz(request: Request) -> Response:
        try:
            await request.app.state.ready()
        except Exception:  # any dependency down means "not ready"; the reason goes to logs
            request.app.state.front_door.log.warning("readyz.not-ready")
            return Response(operation_outcome(503), status_code=503, media_type=FHIR_JSON)
        return JSONResponse({"status": "ready"})

    @router.get("/metrics", tags=["system"], response_class=Response)
    async def metrics(request: Request) -> Response:
        body = request.app.state.front_door.metrics.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @router.get("/whoami", response_model=WhoAmI, tags=["identity"])
    async def whoami(principal: CurrentPrincipal, request: Request) -> WhoAmI:
        return whoami_document(principal, request.app.state.session_policy)

    return router


def dev_router(provider: DevIdentityProvider) -> APIRouter:
    """The dev identity provider's public key and discovery document (``--dev`` only)."""
    router = APIRouter(tags=["dev identity provider"])

    @router.get("/.well-known/jwks.json")
    async def jwks() -> JSONResponse:
        return JSONResponse(provider.jwks())

    @router.get("/.well-known/openid-configuration")
    async def discovery(request: Request) -> JSONResponse:
        return JSONResponse(provider.discovery(str(request.base_url)))

    return router
