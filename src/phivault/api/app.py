"""``create_app(settings, audit_sink=...)``: the one way to build phivault's ASGI application.

Everything is built here from settings, nothing at import time: the token validator with one
key source per trusted issuer (a JWKS cache, or the dev provider's key in a ``--dev`` data
directory), the DPoP replay cache, session store and rate limiter (memory, or Redis when
``shape.shared_state = "redis"``), the scrubbing logger, the metrics registry with the
circuit breakers (:mod:`phivault.resilience`), and the front
door layers in their documented order (:mod:`phivault.api.middleware`). Missing or unsafe
configuration fails here, before a single request is served: no trusted issuer, a symmetric
algorithm in the allow-list, or the dev identity provider under production settings.

While Redis is unreachable, rate limits fall back to this worker's memory until it is back;
the DPoP replay cache and the session store fail closed (503), and ``/readyz`` says not
ready (``docs/decisions/resilience.md``). Circuit breakers spare each request the attempt.

The records service mounts its routers with ``routers=[MountedRouter(router, "/fhir")]``
(see :mod:`phivault.api.context` for the dependencies its routes receive).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TextIO

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.telemetry import TelemetryConfig
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from phivault.api.context import MountedRouter
from phivault.api.middleware import (
    AuditContextLayer,
    AuthenticationLayer,
    BodyGuardLayer,
    ErrorMappingLayer,
    FrontDoor,
    KnownCredentials,
    RateLimitLayer,
    RequestIdLayer,
    ResponseScrubLayer,
)
from phivault.api.observability import Metrics, make_logger
from phivault.api.problems import FHIR_JSON, operation_outcome
from phivault.api.ratelimit import RateLimiter, RateLimitUnavailable
from phivault.api.routes import DEV_PATHS, PUBLIC_PATHS, UNLIMITED_PATHS, dev_router, system_router
from phivault.datadir import DataDir
from phivault.errors import ConfigurationError
from phivault.identity.authenticator import Authenticator
from phivault.identity.dpop import DPoPVerifier, MemoryReplayCache, RedisReplayCache, ReplayCache
from phivault.identity.errors import IdentityUnavailable
from phivault.identity.jwks import JwksCache, KeySource
from phivault.identity.principal import Role
from phivault.identity.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionPolicy,
    SessionStore,
)
from phivault.identity.tokens import TokenValidator, TrustedIssuerKeys
from phivault.ledger.ports import AuditSink
from phivault.privacy.scrub import Scrubber
from phivault.resilience import Breaker, Breakers
from phivault.settings import Settings, SharedStateKind

__all__ = ["REDIS_PROBE_S", "REDIS_TIMEOUT_S", "create_app", "mount_flat", "session_policy"]

REDIS_TIMEOUT_S = 0.5  # one Redis round trip; a slower Redis counts as down
REDIS_PROBE_S = 5.0  # how often an open Redis breaker lets one request try again

ReadinessCheck = Callable[[], Awaitable[None]]

_NO_FASTAPI_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def _redis_breaker(name: str) -> Breaker:
    # Three straight failures open it; then one request in REDIS_PROBE_S tries Redis again.
    return Breaker(
        name,
        failure_threshold=3,
        reset_timeout_s=REDIS_PROBE_S,
        call_timeout_s=2 * REDIS_TIMEOUT_S,
    )


def session_policy(settings: Settings) -> SessionPolicy:
    """The session rules of ``settings.identity`` (unknown role names are a config error)."""
    ident = settings.identity
    try:
        idle = {Role(name): value for name, value in ident.idle_timeout_s.items()}
        mfa_roles = frozenset(Role(name) for name in ident.mfa_roles)
    except ValueError as exc:
        raise ConfigurationError("identity settings name an unknown role") from exc
    return SessionPolicy(
        max_token_age_s=ident.max_token_age_s,
        max_session_age_s=ident.max_session_age_s,
        idle_timeout_s=idle,
        default_idle_timeout_s=900,
        mfa_roles=mfa_roles,
        mfa_acr_values=frozenset(ident.mfa_acr_values),
        step_up_window_s=ident.step_up_window_s,
        skew_s=ident.clock_skew_s,
    )


def create_app(
    settings: Settings,
    *,
    audit_sink: AuditSink,
    data_dir: DataDir | None = None,
    routers: Sequence[MountedRouter] = (),
    key_sources: Mapping[str, KeySource] | None = None,
    http_client: httpx.AsyncClient | None = None,
    redis: Redis | None = None,
    clock: Callable[[], float] = time.time,
    log_stream: TextIO | None = None,
    error_map: Mapping[type[BaseException], int] | None = None,
    readiness_checks: Sequence[ReadinessCheck] = (),
    state: Mapping[str, object] | None = None,
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
    breakers: Breakers | None = None,
) -> FastAPI:
    """Build the application.

    ``key_sources`` (issuer -> keys) adds issuers, mainly for tests. ``state`` puts objects the
    mounted routers need (a unit of work factory, a repository) on ``app.state``;
    ``on_shutdown`` callbacks run when the server stops; ``readiness_checks`` join ``/readyz``.
    ``breakers``: the process's circuit breakers (the key ring's among them), exported at
    ``/metrics`` with the app's own (``app.state.breakers``).
    """
    ident = settings.identity
    api = settings.api
    client = http_client or httpx.AsyncClient(follow_redirects=False)
    owns_client = http_client is None

    # Trusted issuers: configured ones (JWKS over HTTPS), the dev provider, explicit sources.
    trusted: dict[str, KeySource] = {}
    jwks_caches: list[JwksCache] = []
    for issuer in ident.issuers:
        where = issuer.jwks_url or issuer.issuer
        if settings.is_production and not where.startswith("https://"):
            raise ConfigurationError("production fetches signing keys over HTTPS only")
        cache = JwksCache(
            issuer=issuer.issuer,
            jwks_url=issuer.jwks_url,
            client=client,
            clock=time.monotonic,
            ttl_s=ident.jwks_cache_ttl_s,
            min_refresh_s=ident.jwks_min_refresh_s,
        )
        trusted[issuer.issuer] = cache
        jwks_caches.append(cache)
    dev_provider = None
    if data_dir is not None and data_dir.dev:
        from phivault.identity.dev_provider import DevIdentityProvider  # dev only, named import

        dev_provider = DevIdentityProvider.open(data_dir, settings)  # refuses production
        trusted[dev_provider.issuer] = dev_provider.key_source()
    trusted.update(key_sources or {})
    validator = TokenValidator(
        [TrustedIssuerKeys(name, source) for name, source in trusted.items()],
        audience=ident.audience,
        algorithms=ident.algorithms,
        skew_s=ident.clock_skew_s,
    )

    scrubber = Scrubber()
    metrics = Metrics()
    log = make_logger(scrubber, log_stream)
    breakers = breakers if breakers is not None else Breakers()
    metrics.registry.register(breakers)

    # Shared state: per process (embedded) or in Redis (several workers).
    owns_redis = False
    replay: ReplayCache
    sessions: SessionStore
    if settings.shape.shared_state is SharedStateKind.REDIS:
        if redis is None:
            redis = Redis.from_url(  # connects lazily, on first use
                api.redis_url,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                socket_timeout=REDIS_TIMEOUT_S,
                # No silent retries (redis-py retries ten times by default): a session touch
                # or a replay-cache SET NX retried after a lost reply would see its own write
                # (a new session taken for an active one, a fresh proof for a replay).
                retry=None,
            )
            owns_redis = True
        replay = RedisReplayCache(
            redis,
            prefix=api.redis_key_prefix,
            breaker=breakers.add(_redis_breaker("redis.dpop")),
        )
        sessions = RedisSessionStore(
            redis,
            prefix=api.redis_key_prefix,
            breaker=breakers.add(_redis_breaker("redis.sessions")),
        )
        limiter = RateLimiter.redis(
            api.redis_url,
            prefix=api.redis_key_prefix,
            per_address=api.rate_limit_per_address,
            per_principal=api.rate_limit_per_principal,
            breakers=breakers,
            log=log,
            timeout_s=REDIS_TIMEOUT_S,
            probe_every_s=REDIS_PROBE_S,
        )
    else:
        replay = MemoryReplayCache()
        sessions = MemorySessionStore()
        limiter = RateLimiter.in_memory(
            per_address=api.rate_limit_per_address, per_principal=api.rate_limit_per_principal
        )
    policy = session_policy(settings)
    authenticator = Authenticator(
        validator,
        DPoPVerifier(
            replay,
            algorithms=ident.dpop_algorithms,
            max_age_s=ident.dpop_proof_max_age_s,
            skew_s=min(ident.clock_skew_s, 10),
        ),
        policy,
        sessions,
        default_tenant=ident.default_tenant,
    )

    public_paths = PUBLIC_PATHS | (DEV_PATHS if dev_provider is not None else frozenset())
    if settings.is_production:
        public_paths = public_paths - {"/docs", "/docs/oauth2-redirect"}
    door = FrontDoor(
        authenticator=authenticator,
        limiter=limiter,
        metrics=metrics,
        log=log,
        scrubber=scrubber,
        audit_sink=audit_sink,
        observer=data_dir.node_id if data_dir is not None else "phivault",
        clock=clock,
        public_paths=public_paths,
        unlimited_paths=UNLIMITED_PATHS,
        max_body_bytes=api.max_body_bytes,
        public_url=api.public_url,
        dpop_algorithms=tuple(ident.dpop_algorithms),
        default_tenant=ident.default_tenant or "unknown",
        error_map=dict(error_map or {}),
        # The counters and the session touch in one round trip, where both are in the Redis
        # this app connected to itself (an injected client may be another server).
        known_credentials=KnownCredentials() if owns_redis else None,
    )

    async def ready() -> None:
        for cache in jwks_caches:
            await cache.ready()
        if not await limiter.ping():
            raise RateLimitUnavailable("the rate limit store is unavailable")
        if redis is not None:
            try:
                await redis.ping()
            except Exception as exc:
                raise IdentityUnavailable("the shared state store is unavailable") from exc
        for check in readiness_checks:
            await check()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for callback in on_shutdown:
                await callback()
            if owns_client:
                await client.aclose()
            if owns_redis and redis is not None:
                await redis.aclose()

    # Outermost first: the documented order (see phivault.api.middleware).
    layers = [
        RequestIdLayer,
        ResponseScrubLayer,
        BodyGuardLayer,
        RateLimitLayer,
        AuthenticationLayer,
        AuditContextLayer,
        ErrorMappingLayer,
    ]
    app = FastAPI(
        title="phivault",
        version="0.1.0",
        middleware=[Middleware(layer, door=door) for layer in layers],
        lifespan=lifespan,
        docs_url=None if settings.is_production else "/docs",
        redoc_url=None,
        redirect_slashes=False,
        # FastAPI's own OpenTelemetry spans, metrics and logs stay off: their attributes hold
        # the raw path and query (a patient id, a searched name), which invariant 4 keeps out
        # of traces; and checking for a configured provider cost every request a dozen calls.
        telemetry=_NO_FASTAPI_TELEMETRY,
    )
    for name, value in (state or {}).items():
        setattr(app.state, name, value)
    app.state.front_door = door
    app.state.breakers = breakers
    app.state.rate_limiter = limiter
    app.state.session_policy = policy
    app.state.clock = clock
    app.state.ready = ready
    app.state.dev_provider = dev_provider
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Every route goes into the app's own table (an included router costs a second round
    # of matching on every request). Routes are tried in order: the mounted routers' first
    # (nearly every request is a FHIR one), the front door's own after them (no path of one
    # matches a path of the other, so the order changes no match and no 405's Allow).
    if dev_provider is not None:
        mount_flat(app, dev_router(dev_provider))
    for mounted in routers:
        mount_flat(app, mounted.router, prefix=mounted.prefix)
    system = system_router().routes
    for route in system:
        path = getattr(route, "path", "")
        for mounted_route in app.routes:
            regex = getattr(mounted_route, "path_regex", None)
            if regex is not None and regex.match(path):
                raise ConfigurationError(f"a mounted route would take the front door's {path}")
    app.router.routes.extend(system)
    return app


def mount_flat(app: FastAPI, router: APIRouter, *, prefix: str = "") -> None:
    """Add ``router``'s routes to the app's own route table, with ``prefix``, in order.

    What ``app.include_router(router, prefix=prefix)`` serves, matched without FastAPI's
    included-router wrappers: those match every request twice over and cost about a sixth of
    a FHIR read's Python calls (``bench/_read_cpu.py --flat-routes``). Each route is rebuilt
    as ``include_router`` describes it (the router's settings are already folded into its
    routes by ``APIRouter.add_api_route``), so paths, methods, names, tags, responses and
    operation ids, and so the OpenAPI document, are the same, and the routes keep their
    order, which decides the match and a 405's ``Allow``. A router with anything a route does
    not carry (startup or shutdown handlers, a lifespan, form limits, frontend or other
    non-API routes) is included as FastAPI does it instead.
    """
    if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
        raise ConfigurationError("a router prefix starts with '/' and does not end with one")
    flat = (
        not router.on_startup
        and not router.on_shutdown
        and type(router.lifespan_context).__name__ == "_DefaultLifespan"
        and not getattr(router, "form_limits", None)
        and not getattr(router, "_low_priority_routes", None)
        and all(isinstance(route, APIRoute) for route in router.routes)
    )
    if not flat:
        app.include_router(router, prefix=prefix)
        return
    for route in router.routes:
        if not isinstance(route, APIRoute):  # checked above; narrows the type
            raise TypeError("not an APIRoute")
        path = prefix + route.path
        if not path:
            raise ConfigurationError(f"a route has an empty path: {route.name}")
        options: dict[str, Any] = {}
        if getattr(route, "form_limits", None):
            options["form_limits"] = route.form_limits
        app.router.add_api_route(
            path,
            route.endpoint,
            response_model=route.response_model,
            status_code=route.status_code,
            tags=list(route.tags),
            dependencies=list(route.dependencies),
            summary=route.summary,
            description=route.description,
            response_description=route.response_description,
            responses=dict(route.responses),
            deprecated=route.deprecated,
            methods=route.methods,
            operation_id=route.operation_id,
            response_model_include=route.response_model_include,
            response_model_exclude=route.response_model_exclude,
            response_model_by_alias=route.response_model_by_alias,
            response_model_exclude_unset=route.response_model_exclude_unset,
            response_model_exclude_defaults=route.response_model_exclude_defaults,
            response_model_exclude_none=route.response_model_exclude_none,
            include_in_schema=route.include_in_schema,
            response_class=route.response_class,
            name=route.name,
            route_class_override=type(route),
            callbacks=list(route.callbacks or []),
            openapi_extra=route.openapi_extra,
            generate_unique_id_function=route.generate_unique_id_function,
            strict_content_type=route.strict_content_type,
            max_body_size=route.max_body_size,
            **options,
        )


def _outcome(
    status: int, diagnostics: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        operation_outcome(status, diagnostics),
        status_code=status,
        media_type=FHIR_JSON,
        headers=headers,
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own 404/405: the detail is its fixed text, never a caller's input.
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    headers = dict(exc.headers or {}) if isinstance(exc, StarletteHTTPException) else None
    return _outcome(status, None, headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    errors: list[Any] = list(exc.errors()) if isinstance(exc, RequestValidationError) else []
    if any(error.get("type") == "json_invalid" for error in errors):
        return _outcome(400, "the request body is not valid JSON")
    # Locations and error types only: pydantic's messages and inputs may echo PHI.
    where = "; ".join(
        ".".join(str(part) for part in error.get("loc", ())) + f": {error.get('type', 'invalid')}"
        for error in errors[:20]
    )
    status = 400 if all(error.get("loc", ("body",))[0] != "body" for error in errors) else 422
    return _outcome(status, where or None)
