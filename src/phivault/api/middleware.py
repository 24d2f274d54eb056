"""The front door: the fixed order every request passes through, as plain ASGI layers.

On the way in::

    request id -> body guard (size limit, media type) -> rate limit -> authentication
               -> audit context -> [error mapping -> routes]

On the way out the response passes error mapping (exceptions become OperationOutcomes) and
then **response scrubbing**, the last step before the request id layer stamps the response
and logs it. Physically the scrubbing layer sits just inside the request id layer, so it also
sees the errors answered by the body guard, the rate limit and authentication themselves
(413, 415, 429, 401), and it is the last catch-all: an exception that escapes everything
becomes a bare 500 OperationOutcome, never a stack trace.

The layers are plain ASGI callables (not ``BaseHTTPMiddleware``) so that each costs a
function call, and all of them share one :class:`FrontDoor` holding the components that
``create_app`` built from settings.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final

from pydantic import TypeAdapter, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from phivault.api._ids import random_hex
from phivault.api.context import STATE_KEY, AuditContext, RequestState
from phivault.api.observability import Metrics
from phivault.api.problems import (
    FHIR_JSON,
    AuditUnavailable,
    BadRequest,
    PayloadTooLarge,
    Problem,
    TooManyRequests,
    UnsupportedMediaType,
    operation_outcome,
    problem_for,
)
from phivault.api.ratelimit import Limited, RateLimiter, credential_fingerprint
from phivault.errors import PhivaultError, StoreUnavailable
from phivault.identity.authenticator import Authenticator
from phivault.identity.errors import (
    AuthenticationError,
    DPoPError,
    InsufficientAuthentication,
    MissingCredentials,
)
from phivault.identity.sessions import GateRefused, SessionGate
from phivault.ledger.events import (
    Action,
    Agent,
    AuditEvent,
    EventKind,
    OpaqueId,
    Outcome,
    Source,
)
from phivault.ledger.ports import AuditSink
from phivault.privacy.patterns import looks_like_phi
from phivault.privacy.scrub import (
    Screened,
    Scrubber,
    close_tainted_scope,
    open_tainted_scope,
)

__all__ = [
    "AuditContextLayer",
    "AuthenticationLayer",
    "BodyGuardLayer",
    "ErrorMappingLayer",
    "FrontDoor",
    "KnownCredentials",
    "RateLimitLayer",
    "RequestIdLayer",
    "ResponseScrubLayer",
    "challenge_for",
    "route_template",
    "send_problem",
]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{7,63}$")
_OPAQUE_ID: TypeAdapter[str] = TypeAdapter(OpaqueId)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_JSON_TYPES = frozenset({"application/json", "application/fhir+json"})
# FHIR's POST [type]/_search sends its parameters as a form: accepted there and nowhere else.
_FORM_TYPE = "application/x-www-form-urlencoded"
# Reasons that suggest an attack rather than an honest mistake: recorded as security alerts.
_ALERT_REASONS = frozenset(
    {
        "bad-signature",
        "algorithm-refused",
        "wrong-type",
        "unsupported-header",
        "dpop-replay",
        "dpop-wrong-key",
        "dpop-bad-signature",
        "dpop-missing",
        "wrong-issuer",
        "unknown-kid",
    }
)


class KnownCredentials:
    """Fingerprints of ``Authorization`` values this worker has authenticated (unbound
    tokens only), bounded, oldest forgotten first.

    For these the rate limit layer defers its counters to the authentication layer, which
    takes them in the session touch's Redis round trip (one trip instead of two). A cache
    of this process only: a credential missing here is simply counted the usual way.
    """

    __slots__ = ("_max", "_seen")

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self._seen: dict[str, None] = {}
        self._max = max_entries

    def __contains__(self, credential: object) -> bool:
        return credential in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, credential: str) -> None:
        if credential in self._seen:
            return
        if len(self._seen) >= self._max:
            del self._seen[next(iter(self._seen))]
        self._seen[credential] = None

    def discard(self, credential: str) -> None:
        self._seen.pop(credential, None)


# Scope keys the rate limit layer leaves for the authentication layer (adjacent layers).
_CREDENTIAL: Final = "phivault.credential"  # the credential's fingerprint, once computed
_DEFERRED: Final = "phivault.limit_deferred"  # True: the counters are not taken yet


@dataclass(slots=True)
class FrontDoor:
    """The components the layers share (built once by ``create_app``).

    ``known_credentials``: set only where the counters and the session touch share one
    Redis, to join them in one round trip (``docs/decisions/api-rate-limit-keys.md``)."""

    authenticator: Authenticator
    limiter: RateLimiter
    metrics: Metrics
    log: Any
    scrubber: Scrubber
    audit_sink: AuditSink
    observer: str
    clock: Callable[[], float]
    public_paths: frozenset[str]
    unlimited_paths: frozenset[str]
    max_body_bytes: int
    public_url: str | None
    dpop_algorithms: tuple[str, ...]
    default_tenant: str
    error_map: Mapping[type[BaseException], int]
    known_credentials: KnownCredentials | None = None


def _state(scope: Scope) -> RequestState:
    state: RequestState = scope["state"][STATE_KEY]
    return state


def _header(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


async def send_problem(send: Send, problem: Problem) -> None:
    headers = [
        (b"content-type", FHIR_JSON.encode() + b"; charset=utf-8"),
        (b"content-length", str(len(problem.body)).encode()),
    ]
    headers += [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in problem.headers.items()
    ]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": problem.body})


def challenge_for(exc: AuthenticationError, *, dpop: bool, dpop_algorithms: tuple[str, ...]) -> str:
    """The ``WWW-Authenticate`` value (RFC 6750 §3, RFC 9449 §7.1, RFC 9470 §3)."""
    use_dpop = dpop or isinstance(exc, DPoPError)
    parts = ['DPoP realm="phivault"' if use_dpop else 'Bearer realm="phivault"']
    if exc.error:
        parts.append(f'error="{exc.error}"')
        parts.append('error_description="' + exc.message.replace('"', "'") + '"')
    if isinstance(exc, InsufficientAuthentication):
        if exc.acr_values:
            parts.append(f'acr_values="{exc.acr_values}"')
        if exc.max_age is not None:
            parts.append(f'max_age="{exc.max_age}"')
    if use_dpop:
        parts.append('algs="' + " ".join(dpop_algorithms) + '"')
    return ", ".join(parts)


def _acceptable_request_id(value: str) -> bool:
    # A caller's request id is echoed in headers, logs and audit events: keep it only if it
    # is a plain id that cannot carry PHI (an SSN or a phone number fits the id grammar).
    if not _REQUEST_ID.match(value) or looks_like_phi(value):
        return False
    try:
        _OPAQUE_ID.validate_python(value)
    except ValidationError:
        return False
    return True


def route_template(scope: Scope) -> str:
    """The matched route's template (``/fhir/Patient/{id}``), never the raw path."""
    route_path = getattr(scope.get("route"), "path", None)
    if not isinstance(route_path, str):
        return "unmatched"
    # Routers included with a prefix report their path without it; the prefix is the leading
    # literal segments of the request path (a router's prefix, not caller data).
    extra = scope["path"].count("/") - route_path.count("/")
    if extra <= 0 or ":path}" in route_path:
        return route_path
    prefix = "/".join(scope["path"].split("/")[: extra + 1])
    return prefix + route_path


class _Layer:
    def __init__(self, app: ASGIApp, door: FrontDoor) -> None:
        self.app = app
        self.door = door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class RequestIdLayer(_Layer):
    """Gives each request an id (or keeps a well-formed incoming one), a tainted-value scope,
    and, once answered, one scrubbed log line and its metrics."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming[0] if len(incoming) == 1 else ""
        if not _acceptable_request_id(request_id):
            request_id = random_hex(8)
        request_id = Screened(request_id)  # checked above or made here: no need to rescan
        client = scope.get("client")
        state = RequestState(request_id=request_id, client_address=client[0] if client else None)
        scope.setdefault("state", {})[STATE_KEY] = state
        status = 500
        started = time.perf_counter()

        async def stamped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.append((b"cache-control", b"no-store"))
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        taint_token = open_tainted_scope()
        try:
            await self.app(scope, receive, stamped)
        finally:
            try:
                self._record(scope, state, status, time.perf_counter() - started)
            finally:
                close_tainted_scope(taint_token)

    def _record(self, scope: Scope, state: RequestState, status: int, elapsed: float) -> None:
        # Inside the tainted scope: the log line is scrubbed against this request's values.
        route = route_template(scope)
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"  # bounded labels
        counter, histogram = self.door.metrics.children(method, route, status)
        counter.inc()
        histogram.observe(elapsed)
        principal = state.principal
        self.door.log.info(
            "http.request",
            request_id=state.request_id,
            method=method,
            route=route,
            status=status,
            duration_ms=round(elapsed * 1000, 2),
            subject=principal.subject if principal else None,
            tenant=principal.tenant if principal else None,
        )


class ResponseScrubLayer(_Layer):
    """Scrubs every error body (tainted values, PHI patterns) and catches what escaped."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: MutableMapping[str, Any] | None = None
        chunks: list[bytes] = []
        started = False

        async def scrubbing(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    held = message
                    return
                started = True
                await send(message)
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = self._scrub(held["status"], b"".join(chunks))
                    headers = [
                        (k, v)
                        for k, v in held.get("headers", [])
                        if k not in (b"content-length", b"content-type")
                    ]
                    headers.append((b"content-type", FHIR_JSON.encode() + b"; charset=utf-8"))
                    headers.append((b"content-length", str(len(body)).encode()))
                    started = True
                    await send({**held, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
            else:
                await send(message)

        try:
            await self.app(scope, receive, scrubbing)
        except Exception as exc:  # the last net: no exception reaches the server's logger
            self.door.log.error("http.unhandled", error=type(exc).__name__)
            if not started:
                await send_problem(send, problem_for(exc))

    def _scrub(self, status: int, body: bytes) -> bytes:
        try:
            doc = json.loads(body)
        except ValueError:
            return operation_outcome(status)
        if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
            return operation_outcome(status)
        scrubbed = self.door.scrubber.scrub(doc)
        # The structure is the server's own words from fixed vocabularies, never a value:
        # a tainted value that happens to spell "OperationOutcome" or "invalid" must not
        # turn the outcome into something a client cannot read.
        scrubbed["resourceType"] = "OperationOutcome"
        issues = doc.get("issue") or []
        for original, issue in zip(issues, scrubbed.get("issue") or [], strict=True):
            if isinstance(original, dict) and isinstance(issue, dict):
                for field, vocabulary in _ISSUE_VOCABULARY.items():
                    if original.get(field) in vocabulary:
                        issue[field] = original[field]
        return json.dumps(scrubbed, separators=(",", ":")).encode()


# FHIR R4 IssueSeverity and IssueType codes (the only values restored after scrubbing).
_ISSUE_VOCABULARY: Final = {
    "severity": frozenset({"fatal", "error", "warning", "information"}),
    "code": frozenset(
        {
            "invalid", "structure", "required", "value", "invariant", "security", "login",
            "unknown", "expired", "forbidden", "suppressed", "processing", "not-supported",
            "duplicate", "multiple-matches", "not-found", "deleted", "too-long",
            "code-invalid", "extension", "too-costly", "business-rule", "conflict",
            "transient", "lock-error", "no-store", "exception", "timeout", "incomplete",
            "throttled", "informational",
        }
    ),
}  # fmt: skip


class BodyGuardLayer(_Layer):
    """Refuses oversized bodies (413) and non-JSON bodies (415, except the form of a FHIR
    ``_search``) before anyone reads them."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.door.max_body_bytes
        lengths = _header(scope, b"content-length")
        declared = 0
        if lengths:
            if len(lengths) != 1 or not lengths[0].strip().isdigit():
                await send_problem(send, problem_for(_bad_request("invalid Content-Length")))
                return
            declared = int(lengths[0])
            if declared > limit:
                await send_problem(send, problem_for(PayloadTooLarge()))
                return
        chunked = bool(_header(scope, b"transfer-encoding"))
        if scope["method"] in _BODY_METHODS and (declared > 0 or chunked):
            types = _header(scope, b"content-type")
            media = types[0].split(";", 1)[0].strip().lower() if len(types) == 1 else ""
            form_search = media == _FORM_TYPE and scope["path"].endswith("/_search")
            if media not in _JSON_TYPES and not form_search:
                await send_problem(send, problem_for(UnsupportedMediaType()))
                return
        if declared == 0 and not chunked:
            await self.app(scope, receive, send)
            return
        # Read the body here, counting, so an oversized one is refused before any route
        # (or FastAPI's own body parser, which would turn the refusal into a 400) sees it.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await send_problem(send, problem_for(PayloadTooLarge()))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _bad_request(text: str) -> PhivaultError:
    return BadRequest(text)


async def _count(door: FrontDoor, state: RequestState, credential: str | None, send: Send) -> bool:
    """Take the request's rate limit counters; True if it was answered (429, or 503)."""
    try:
        limited = await door.limiter.check(
            address=state.client_address or "unknown", credential=credential
        )
    except StoreUnavailable as exc:
        await send_problem(send, problem_for(exc))
        return True
    if limited is not None:
        await _too_many(door, limited, send)
        return True
    return False


async def _too_many(door: FrontDoor, limited: Limited, send: Send) -> None:
    door.metrics.rate_limited.labels(limited.limit).inc()
    await send_problem(send, problem_for(TooManyRequests(limited.retry_after_s)))


class RateLimitLayer(_Layer):
    """Per client address and per presented credential; 429 with ``Retry-After``.

    For a credential this worker has authenticated before (:class:`KnownCredentials`), on a
    path that authenticates, the counters are left to the authentication layer, which takes
    them in the session touch's round trip (before the touch, and before it records or
    refuses anything: ``docs/decisions/api-rate-limit-keys.md``). Every other request, a
    forged or unseen token above all, is counted here, before any signature check."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        door = self.door
        if scope["type"] != "http" or scope["path"] in door.unlimited_paths:
            await self.app(scope, receive, send)
            return
        state = _state(scope)
        authorization = _header(scope, b"authorization")
        credential = credential_fingerprint(authorization[0]) if authorization else None
        known = door.known_credentials
        if known is not None and credential is not None:
            scope[_CREDENTIAL] = credential
            if (
                credential in known
                and len(authorization) == 1
                and scope["path"] not in door.public_paths
                and not door.limiter.falling_back
            ):
                scope[_DEFERRED] = True
                await self.app(scope, receive, send)
                return
        if await _count(door, state, credential, send):
            return
        await self.app(scope, receive, send)


class AuthenticationLayer(_Layer):
    """Every path not in the public list needs a valid token (and DPoP proof if bound)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.door.public_paths:
            await self.app(scope, receive, send)
            return
        state = _state(scope)
        authorization = _header(scope, b"authorization")
        door = self.door
        credential: str | None = scope.get(_CREDENTIAL)
        gate: SessionGate | None = None
        if scope.get(_DEFERRED):
            scope[_DEFERRED] = False
            address = state.client_address or "unknown"
            gate = door.limiter.session_gate(address=address, credential=credential)
            if gate is None and await _count(door, state, credential, send):
                return  # the counters left Redis meanwhile: counted here, as before
        now = door.clock()
        try:
            if len(authorization) > 1:
                raise MissingCredentials()
            proofs = _header(scope, b"dpop")
            result = await door.authenticator.authenticate(
                method=scope["method"],
                url=self._url(scope) if proofs else "",  # only a DPoP proof is checked against it
                authorization=authorization[0] if authorization else None,
                dpop_proofs=proofs,
                now=now,
                gate=gate,
            )
        except GateRefused as refused:
            address = state.client_address or "unknown"
            limited = await door.limiter.refusal(
                refused.code, address=address, credential=credential
            )
            await _too_many(door, limited, send)
            return
        except (AuthenticationError, StoreUnavailable) as exc:
            known = door.known_credentials
            if isinstance(exc, AuthenticationError) and known is not None and credential:
                known.discard(credential)  # its next request is counted up front again
            # Refused before the gate ran: count the request first, as the rate limit layer
            # would have, so that a refusal is never recorded past the limit.
            if gate is not None and not gate.passed and await _count(door, state, credential, send):
                return
            await self._refused(exc, state, authorization, send, now)
            return
        state.principal = result.principal
        known = door.known_credentials
        # A bound token is never deferred: its proof is a signature check and a Redis write.
        if known is not None and credential and gate is None and result.principal.dpop_jkt is None:
            known.add(credential)
        if result.new_session:
            audit = _audit_context(door, state)
            event = audit.event(
                kind=EventKind.LOGIN, subtype="session-start", action=Action.EXECUTE
            )
            try:
                await audit.record(event)
            except AuditUnavailable as exc:
                await send_problem(send, problem_for(exc))
                return
        await self.app(scope, receive, send)

    async def _refused(
        self,
        exc: AuthenticationError | StoreUnavailable,
        state: RequestState,
        authorization: list[str],
        send: Send,
        now: float,
    ) -> None:
        door = self.door
        if isinstance(exc, AuthenticationError):
            door.metrics.auth_failures.labels(exc.reason).inc()
            door.log.warning("auth.refused", request_id=state.request_id, reason=exc.reason)
            if not isinstance(exc, MissingCredentials):
                try:
                    await door.audit_sink.record(self._failure_event(state, exc, now))
                except Exception as record_exc:  # fail closed: an unrecorded refusal is a 503
                    failure = AuditUnavailable("failed authentication not recorded")
                    door.log.error("audit.unavailable", error=type(record_exc).__name__)
                    await send_problem(send, problem_for(failure))
                    return
            dpop = bool(authorization) and authorization[0].lstrip()[:5].lower() == "dpop "
            challenge = challenge_for(exc, dpop=dpop, dpop_algorithms=door.dpop_algorithms)
            await send_problem(send, problem_for(exc, challenge=challenge))
            return
        door.log.error("auth.unavailable", error=type(exc).__name__)
        await send_problem(send, problem_for(exc))

    def _url(self, scope: Scope) -> str:
        # The URL the client addressed (DPoP htu): the configured public URL, else Host.
        path: str = scope.get("root_path", "") + scope["path"]
        if self.door.public_url:
            return self.door.public_url.rstrip("/") + path
        host = _header(scope, b"host")
        server = scope.get("server")
        authority = host[0] if host else (f"{server[0]}:{server[1]}" if server else "localhost")
        scheme: str = scope.get("scheme", "http")
        return f"{scheme}://{authority}{path}"

    def _failure_event(
        self, state: RequestState, exc: AuthenticationError, now: float
    ) -> AuditEvent:
        alert = exc.reason in _ALERT_REASONS
        return AuditEvent(
            kind=EventKind.SECURITY_ALERT if alert else EventKind.LOGIN,
            subtype="authentication",
            action=Action.EXECUTE,
            recorded=datetime.fromtimestamp(now, UTC),
            outcome=Outcome.SERIOUS_FAILURE if alert else Outcome.MINOR_FAILURE,
            outcome_reason=exc.reason,
            tenant=self.door.default_tenant,
            agents=(Agent(who="anonymous", network_address=_ip_or_none(state.client_address)),),
            source=Source(observer=self.door.observer),
            request_id=state.request_id,
        )


@lru_cache(maxsize=4096)
def _ip_or_none(address: str | None) -> str | None:
    if address is None:
        return None
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def _audit_context(door: FrontDoor, state: RequestState) -> AuditContext:
    if state.audit is None:
        if state.principal is None:
            raise MissingCredentials()
        state.audit = AuditContext(
            principal=state.principal,
            request_id=state.request_id,
            network_address=_ip_or_none(state.client_address),
            observer=door.observer,
            sink=door.audit_sink,
            clock=door.clock,
        )
    return state.audit


class AuditContextLayer(_Layer):
    """Prepares the audit context (who, where, which request) for the routes."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            state = _state(scope)
            if state.principal is not None:
                _audit_context(self.door, state)
        await self.app(scope, receive, send)


class ErrorMappingLayer(_Layer):
    """Turns any exception a route raises into its OperationOutcome (4xx/5xx, no traces)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            door = self.door
            challenge = None
            if isinstance(exc, AuthenticationError):
                door.metrics.auth_failures.labels(exc.reason).inc()
                challenge = challenge_for(exc, dpop=False, dpop_algorithms=door.dpop_algorithms)
                audit = _state(scope).audit
                if audit is not None and not started:
                    # A refused step-up is a failed authentication too: record it, or fail.
                    event = audit.event(
                        kind=EventKind.LOGIN,
                        subtype="step-up",
                        action=Action.EXECUTE,
                        outcome=Outcome.MINOR_FAILURE,
                        outcome_reason=exc.reason,
                    )
                    try:
                        await audit.record(event)
                    except AuditUnavailable as audit_exc:
                        exc = audit_exc
            problem = problem_for(exc, challenge=challenge, extra=door.error_map)
            if problem.status >= 500:
                door.log.error(
                    "http.error",
                    request_id=_state(scope).request_id,
                    error=type(exc).__name__,
                    status=problem.status,
                )
            if started:
                return  # too late to answer; the server closes the connection
            await send_problem(send, problem)
