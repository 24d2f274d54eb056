"""Every error is a FHIR OperationOutcome: one place maps exceptions to status and body.

Routes and the records service raise :class:`HttpProblem` subclasses (``NotFound``,
``Conflict``, ``PreconditionFailed``...) or phivault's own errors; :func:`problem_for` turns
any exception into a status, an OperationOutcome and headers. Diagnostics come only from
phivault's own messages (which by contract carry no PHI), never from a caller's input, a
driver's message or a stack trace; an unexpected exception becomes a bare 500.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from phivault.errors import ConfigurationError, InvalidInput, PhivaultError, StoreUnavailable
from phivault.identity.errors import AuthenticationError, IdentityUnavailable

__all__ = [
    "FHIR_JSON",
    "AuditUnavailable",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "Gone",
    "HttpProblem",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "Problem",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unprocessable",
    "UnsupportedMediaType",
    "operation_outcome",
    "operation_outcome_doc",
    "problem_for",
]

FHIR_JSON = "application/fhir+json"

# FHIR IssueType for each status (http://hl7.org/fhir/issue-type).
_ISSUE_CODE = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    500: "exception",
    503: "transient",
}
_DEFAULT_TEXT = {
    400: "the request is not valid",
    401: "authentication is required",
    403: "access to this resource is not allowed",
    404: "the resource or endpoint was not found",
    405: "the method is not allowed on this endpoint",
    406: "the requested format is not supported; use application/fhir+json",
    409: "the request conflicts with the current state",
    410: "the resource was deleted",
    412: "the resource version does not match If-Match",
    413: "the request body is too large",
    415: "the content type is not supported; use application/fhir+json",
    422: "the request is well formed but cannot be processed",
    429: "too many requests; retry later",
    500: "an internal error occurred",
    503: "the service is temporarily unavailable; retry later",
}


class HttpProblem(PhivaultError):
    """An error with an HTTP status. ``diagnostics`` must not contain PHI (ids and paths only);
    ``expression`` names the failing element (``Patient.birthDate``), never its value."""

    status: int = 400

    def __init__(
        self,
        diagnostics: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        expression: str | None = None,
    ) -> None:
        super().__init__(diagnostics or _DEFAULT_TEXT.get(self.status, "error"))
        self.diagnostics = diagnostics or _DEFAULT_TEXT.get(self.status, "error")
        self.headers = dict(headers or {})
        self.expression = expression


class BadRequest(HttpProblem):
    status = 400


class Forbidden(HttpProblem):
    status = 403


class NotFound(HttpProblem):
    status = 404


class MethodNotAllowed(HttpProblem):
    status = 405


class NotAcceptable(HttpProblem):
    status = 406


class Conflict(HttpProblem):
    status = 409


class Gone(HttpProblem):
    """410: the resource existed and was deleted (FHIR read of a tombstone)."""

    status = 410


class PreconditionFailed(HttpProblem):
    status = 412


class PayloadTooLarge(HttpProblem):
    status = 413


class UnsupportedMediaType(HttpProblem):
    status = 415


class Unprocessable(HttpProblem):
    status = 422


class TooManyRequests(HttpProblem):
    status = 429

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(headers={"Retry-After": str(max(1, retry_after_s))})


class ServiceUnavailable(HttpProblem):
    status = 503


class AuditUnavailable(StoreUnavailable):
    """An audit event could not be recorded: the request fails closed (503), nothing is served."""


@dataclass(frozen=True, slots=True)
class Problem:
    """What to send: status, OperationOutcome body, extra headers, and a log-safe reason code."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    reason: str = "error"


def operation_outcome_doc(
    status: int, diagnostics: str | None = None, *, expression: str | None = None
) -> dict[str, Any]:
    """The OperationOutcome for ``status`` as a document (batch responses embed it)."""
    issue: dict[str, Any] = {
        "severity": "error" if status < 500 else "fatal",
        "code": _ISSUE_CODE.get(status, "exception" if status >= 500 else "invalid"),
        "diagnostics": diagnostics or _DEFAULT_TEXT.get(status, "error"),
    }
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def operation_outcome(
    status: int, diagnostics: str | None = None, *, expression: str | None = None
) -> bytes:
    """The OperationOutcome JSON for ``status``."""
    doc = operation_outcome_doc(status, diagnostics, expression=expression)
    return json.dumps(doc, separators=(",", ":")).encode()


def _path_of(exc: BaseException) -> str | None:
    return exc.path if isinstance(exc, InvalidInput) else None


def problem_for(
    exc: BaseException,
    *,
    challenge: str | None = None,
    extra: Mapping[type[BaseException], int] | None = None,
) -> Problem:
    """Map any exception to the answer the caller gets. ``challenge``: the WWW-Authenticate."""
    if isinstance(exc, HttpProblem):
        body = operation_outcome(exc.status, exc.diagnostics, expression=exc.expression)
        return Problem(exc.status, body, exc.headers)
    if isinstance(exc, AuthenticationError):
        headers = {"WWW-Authenticate": challenge} if challenge else {}
        return Problem(401, operation_outcome(401, exc.message), headers, reason=exc.reason)
    if isinstance(exc, (AuditUnavailable, IdentityUnavailable, StoreUnavailable)):
        return Problem(503, operation_outcome(503), {"Retry-After": "5"}, reason="unavailable")
    for exc_type, status in (extra or {}).items():
        if isinstance(exc, exc_type):
            text = str(exc) if isinstance(exc, PhivaultError) else None
            body = operation_outcome(status, text, expression=_path_of(exc))
            return Problem(status, body, reason=exc_type.__name__)
    if isinstance(exc, InvalidInput):
        body = operation_outcome(400, str(exc), expression=exc.path)
        return Problem(400, body, reason="invalid-input")
    if isinstance(exc, ConfigurationError):
        return Problem(503, operation_outcome(503), {"Retry-After": "5"}, reason="configuration")
    return Problem(500, operation_outcome(500), reason="internal")
