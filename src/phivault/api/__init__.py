"""The ASGI application: the front door (identity, limits, errors, scrubbing) and its routes.

Build it with :func:`create_app`; mount routers behind it with :class:`MountedRouter`; routes
receive the caller through :data:`CurrentPrincipal` / :data:`SteppedUp` and record audit events
through :data:`AuditCtx` (see :mod:`phivault.api.context`). The FHIR R4 routes are in
:mod:`phivault.api.fhir` (imported on its own: it brings in the records layer).
"""

from phivault.api.app import create_app
from phivault.api.context import (
    AuditContext,
    AuditCtx,
    CurrentPrincipal,
    MountedRouter,
    SteppedUp,
    audit_context,
    current_principal,
    stepped_up_principal,
)
from phivault.api.problems import (
    AuditUnavailable,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    HttpProblem,
    MethodNotAllowed,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
    UnsupportedMediaType,
)

__all__ = [
    "AuditContext",
    "AuditCtx",
    "AuditUnavailable",
    "BadRequest",
    "Conflict",
    "CurrentPrincipal",
    "Forbidden",
    "Gone",
    "HttpProblem",
    "MethodNotAllowed",
    "MountedRouter",
    "NotAcceptable",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "ServiceUnavailable",
    "SteppedUp",
    "TooManyRequests",
    "Unprocessable",
    "UnsupportedMediaType",
    "audit_context",
    "create_app",
    "current_principal",
    "stepped_up_principal",
]
