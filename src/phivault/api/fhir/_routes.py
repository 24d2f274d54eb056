"""The FHIR R4 REST routes: every interaction goes to the records repository with a Caller.

Why the routes are thin: access decisions, audit events, encryption and versioning all
happen in :class:`~phivault.records.repository.RecordsRepository` (invariants 1-3); the
routes only check what the URL and body say about themselves (a known type, a well-formed id,
a body whose type and id agree with the URL), read the FHIR headers, call one repository
method and present its result. The repository's errors become OperationOutcomes through one
translation (:mod:`phivault.api.fhir._errors`), applied by the route class to every route.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any, Final
from urllib.parse import parse_qsl, urlencode

import fastapi.routing
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.convertors import StringConvertor
from starlette.types import ASGIApp, Receive, Scope, Send

from phivault.api.breakglass import access_context_with_grants
from phivault.api.context import AuditCtx, CurrentPrincipal, audit_context, current_principal
from phivault.api.fhir._bundles import (
    OFFSET_PARAM,
    history_bundle,
    searchset_bundle,
    transaction_response,
)
from phivault.api.fhir._capability import capability_statement
from phivault.api.fhir._checks import check_body, check_entry_ids, check_id, history_pairs
from phivault.api.fhir._errors import translate
from phivault.api.fhir._http import (
    FORMAT_PARAMS,
    Prefer,
    check_format,
    fhir_response,
    information_outcome,
    parse_count,
    parse_if_match,
    parse_offset,
    parse_prefer,
    query_pairs,
    read_json_object,
    version_headers,
)
from phivault.api.problems import (
    BadRequest,
    HttpProblem,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from phivault.errors import PhivaultError
from phivault.records.audit_events import AuditEventReader, parse_audit_query
from phivault.records.classification import Classification, default_classification
from phivault.records.query import MAX_COUNT, parse_search
from phivault.records.repository import RecordsRepository
from phivault.records.results import Caller, RecordVersion

__all__ = ["FHIR_PREFIX", "FhirRoute", "fhir_router"]

FHIR_PREFIX: Final = "/fhir"
_VERSION_RE: Final = re.compile(r"^[1-9][0-9]{0,17}$")
_FORM: Final = "application/x-www-form-urlencoded"


class FhirRoute(APIRoute):
    """A route whose records-layer errors become the FHIR answer (404, 410, 412...).

    The FHIR endpoints take only string path parameters, the request, the caller and the
    repository. For such an endpoint the handler calls it directly, resolving those four by
    hand, instead of through FastAPI's per-request dependency solving, which cost about a
    third of a millisecond of CPU per read (``bench/_read_cpu.py``); the signature (and so the
    OpenAPI document) is unchanged, and any other endpoint goes through FastAPI as before.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        self._direct_route: Callable[[Request], Coroutine[Any, Any, Response]] | None = None
        super().__init__(path, endpoint, **kwargs)
        handler = self._direct_route
        if handler is not None and self.max_body_size is None:
            # The route's ASGI app without FastAPI's request_response around it: its two
            # exit stacks serve dependencies with ``yield`` and its exception wrapper the
            # app's handlers, which the app's own ExceptionMiddleware applies as well (about
            # thirty calls per request). With overridden dependencies (tests), FastAPI's.
            self.app = _direct_app(handler, fallback=self.app)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        solved = super().get_route_handler()
        plan = _direct_plan(self)
        direct = None if plan is None else _direct(self.endpoint, plan)

        async def route(request: Request) -> Response:
            # Overridden dependencies (tests) need FastAPI's solving.
            handler = solved if direct is None or request.app.dependency_overrides else direct
            try:
                return await handler(request)
            except HttpProblem:
                raise
            except PhivaultError as exc:
                problem = translate(exc, if_match="if-match" in request.headers)
                if problem is None:
                    raise
                raise problem from exc

        self._direct_route = route if direct is not None else None
        return route


def _direct_app(
    route: Callable[[Request], Coroutine[Any, Any, Response]], *, fallback: ASGIApp
) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["app"].dependency_overrides:
            await fallback(scope, receive, send)
            return
        response = await route(Request(scope, receive, send))
        await response(scope, receive, send)

    return app


# How a directly called endpoint's parameter is resolved.
_PATH, _REQUEST, _CALLER, _REPO = range(4)


def _direct_plan(route: APIRoute) -> tuple[tuple[str, int], ...] | None:
    """``(name, kind)`` of each parameter of ``route``'s endpoint, or None when one is not a
    string path parameter, the request, :data:`FhirCaller` or :data:`Repo`."""
    endpoint = route.endpoint
    if not inspect.iscoroutinefunction(endpoint) or route.response_model is not None:
        return None
    if route.dependencies or _included_dependencies(route):
        return None  # dependencies of the router or its inclusion run through FastAPI
    try:
        hints = typing.get_type_hints(endpoint, include_extras=True)
    except (NameError, TypeError):
        return None
    strings = {
        name
        for name, convertor in route.param_convertors.items()
        if isinstance(convertor, StringConvertor)
    }
    plan: list[tuple[str, int]] = []
    for name in inspect.signature(endpoint).parameters:
        hint = hints.get(name)
        if hint is str and name in strings:
            plan.append((name, _PATH))
        elif hint is Request:
            plan.append((name, _REQUEST))
        elif hint is FhirCaller:
            plan.append((name, _CALLER))
        elif hint is Repo:
            plan.append((name, _REPO))
        else:
            return None
    return tuple(plan)


def _included_dependencies(route: APIRoute) -> bool:
    # FastAPI builds an included route's handler with the inclusion's context (its extra
    # dependencies) in a context variable; without that variable, assume the worst.
    context_var = getattr(fastapi.routing, "_effective_route_context_var", None)
    if context_var is None:
        return True
    context = context_var.get()
    return bool(
        context is not None
        and getattr(context, "original_route", None) is route
        and getattr(context, "dependencies", None)
    )


def _direct(
    endpoint: Callable[..., Coroutine[Any, Any, Response]], plan: tuple[tuple[str, int], ...]
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    async def handler(request: Request) -> Response:
        kwargs: dict[str, Any] = {}
        for name, kind in plan:
            if kind == _PATH:
                kwargs[name] = request.path_params[name]
            elif kind == _REQUEST:
                kwargs[name] = request
            elif kind == _CALLER:
                kwargs[name] = await _caller_of(request)
            else:
                kwargs[name] = await _repository(request)
        return await endpoint(**kwargs)

    return handler


async def _repository(request: Request) -> RecordsRepository:
    repo = getattr(request.app.state, "records", None)
    if not isinstance(repo, RecordsRepository):
        raise ServiceUnavailable("the records service is not configured")
    return repo


def _audit_events(request: Request) -> AuditEventReader:
    reader = getattr(request.app.state, "audit_events", None)
    if not isinstance(reader, AuditEventReader):
        raise ServiceUnavailable("the audit event service is not configured")
    return reader


async def _caller(request: Request, principal: CurrentPrincipal, audit: AuditCtx) -> Caller:
    # The caller's active break-glass grants join the access context (roles that cannot use
    # break-glass skip the lookup).
    return Caller(await access_context_with_grants(request, principal), audit)


async def _caller_of(request: Request) -> Caller:
    """:func:`_caller` with its dependencies resolved in the same order, for direct calls."""
    principal = await current_principal(request)
    audit = await audit_context(request)
    return await _caller(request, principal, audit)


Repo = Annotated[RecordsRepository, Depends(_repository)]
FhirCaller = Annotated[Caller, Depends(_caller)]


def _base(request: Request) -> str:
    """The FHIR base URL: the configured public URL, else the one the request addressed."""
    public: str | None = getattr(request.app.state.front_door, "public_url", None)
    if public:
        return public.rstrip("/") + FHIR_PREFIX
    # Starlette builds the base URL from these parts of the scope (its first Host header);
    # building it is a URL parse per request, and the answer repeats.
    scope = request.scope
    host = next((value for key, value in scope["headers"] if key == b"host"), None)
    root_path = scope.get("app_root_path", scope.get("root_path", ""))
    key = (scope.get("scheme"), scope.get("server"), root_path, host)
    base = _BASES.get(key)
    if base is None:
        base = str(request.base_url).rstrip("/") + FHIR_PREFIX
        if len(_BASES) < _MAX_BASES:  # Host is the caller's to choose: bounded
            _BASES[key] = base
    return base


_BASES: dict[tuple[object, ...], str] = {}
_MAX_BASES: Final = 256


def _now(request: Request) -> datetime:
    clock: Callable[[], float] = request.app.state.clock
    return datetime.fromtimestamp(clock(), UTC)


def _write_answer(
    request: Request,
    record: RecordVersion,
    *,
    status: int,
    location: bool,
    prefer: Prefer,
    pretty: bool,
) -> Response:
    headers = version_headers(record, _base(request), location=location)
    if prefer.return_ == "minimal":
        return fhir_response(None, status=status, headers=headers)
    if prefer.return_ == "OperationOutcome":
        text = "created" if status == 201 else "done"
        return fhir_response(
            information_outcome(text), status=status, headers=headers, pretty=pretty
        )
    return fhir_response(record.resource, status=status, headers=headers, pretty=pretty)


def _criteria(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(key, value) for key, value in pairs if key not in FORMAT_PARAMS]


def fhir_router(
    *,
    classification: Classification | None = None,
    default_count: int = 50,
    max_bundle_entries: int = 10_000,
    published: datetime | None = None,
    software_version: str = "0.1.0",
) -> APIRouter:
    """The FHIR routes, to mount at :data:`FHIR_PREFIX` behind the front door.

    ``app.state.records`` must hold the :class:`RecordsRepository`. ``default_count`` is the
    page size of searches and histories without ``_count``; a Bundle with more than
    ``max_bundle_entries`` entries is a 413 (as the repository's own limit); ``published`` dates the
    CapabilityStatement (default: when the router was built).
    """
    table = classification or default_classification()
    types = table.resource_types
    published_at = published or datetime.now(UTC)
    statements: dict[str, dict[str, Any]] = {}
    router = APIRouter(route_class=FhirRoute, tags=["FHIR R4"])

    def check_type(resource_type: str) -> None:
        if resource_type not in types:
            raise NotFound("the resource type is not supported")

    @router.get("/metadata")
    async def metadata(request: Request) -> Response:
        """The CapabilityStatement (public, PHI-free, no audit event: it answers when the
        ledger is down)."""
        pretty = check_format(request, query_pairs(request))
        base = _base(request)
        statement = statements.get(base)
        if statement is None:
            statement = capability_statement(
                table, base_url=base, published=published_at, software_version=software_version
            )
            if len(statements) < 16:  # a few public URLs at most; never unbounded
                statements[base] = statement
        return fhir_response(statement, pretty=pretty)

    # AuditEvent: read-only from the ledger, registered before the generic routes.
    @router.get("/AuditEvent")
    async def audit_event_search(request: Request, caller: FhirCaller) -> Response:
        pairs = query_pairs(request)
        pretty = check_format(request, pairs)
        query, before = parse_audit_query([(k, v) for k, v in pairs if k not in FORMAT_PARAMS])
        page = await _audit_events(request).search(caller, query, before=before)
        base = _base(request)
        links = [{"relation": "self", "url": f"{base}/AuditEvent"}]
        if page.next_before is not None:
            kept = [(k, v) for k, v in pairs if k not in ("_before", *FORMAT_PARAMS)]
            kept.append(("_before", str(page.next_before)))
            links.append({"relation": "next", "url": f"{base}/AuditEvent?{urlencode(kept)}"})
        doc = {
            "resourceType": "Bundle",
            "type": "searchset",
            "timestamp": _now(request).isoformat().replace("+00:00", "Z"),
            "link": links,
            "entry": [
                {
                    "fullUrl": f"{base}/AuditEvent/{event['id']}",
                    "resource": event,
                    "search": {"mode": "match"},
                }
                for event in page.events
            ],
        }
        return fhir_response(doc, pretty=pretty)

    @router.get("/AuditEvent/{event_id}")
    async def audit_event_read(event_id: str, request: Request, caller: FhirCaller) -> Response:
        pretty = check_format(request, query_pairs(request))
        event = await _audit_events(request).read(caller, event_id)
        return fhir_response(event, pretty=pretty)

    @router.get("/Patient/{patient_id}/$access-report")
    async def access_report(patient_id: str, request: Request, caller: FhirCaller) -> Response:
        """The patient's accounting of disclosures (who saw the record, when, why), with the
        proofs ``phivault ledger verify-report`` checks offline."""
        pairs = query_pairs(request)
        pretty = check_format(request, pairs)
        check_id("Patient", patient_id)
        window: dict[str, datetime | None] = {"start": None, "end": None}
        for key, value in pairs:
            if key in window:
                try:
                    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
                except ValueError:
                    raise BadRequest("not an ISO 8601 date or instant", expression=key) from None
                window[key] = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
            elif key not in FORMAT_PARAMS:
                raise BadRequest(
                    "$access-report takes start and end only", expression="(parameter)"
                )
        report = await _audit_events(request).access_report(
            caller, patient_id, start=window["start"], end=window["end"]
        )
        return fhir_response(report, pretty=pretty)

    @router.post("")
    async def batch_or_transaction(request: Request, caller: FhirCaller, repo: Repo) -> Response:
        pretty = check_format(request, query_pairs(request))
        prefer = parse_prefer(request)
        bundle = await read_json_object(request)
        if bundle.get("resourceType") != "Bundle":
            raise BadRequest("the system endpoint takes a Bundle", expression="resourceType")
        kind = bundle.get("type")
        entries = bundle.get("entry")
        if isinstance(entries, list) and len(entries) > max_bundle_entries:
            raise PayloadTooLarge(
                f"a Bundle takes at most {max_bundle_entries} entries", expression="Bundle.entry"
            )
        check_entry_ids(entries)
        if kind == "transaction":
            outcome = await repo.transaction(caller, bundle)
        elif kind == "batch":
            outcome = await repo.batch(caller, bundle)
        else:
            raise BadRequest("Bundle.type must be transaction or batch", expression="Bundle.type")
        scrubber = request.app.state.front_door.scrubber
        doc = transaction_response(
            outcome,
            bundle,
            base=_base(request),
            representation=prefer.return_ == "representation",
            now=_now(request),
            scrub=scrubber.scrub,
        )
        return fhir_response(doc, pretty=pretty)

    async def run_search(
        request: Request,
        resource_type: str,
        pairs: list[tuple[str, str]],
        caller: Caller,
        repo: RecordsRepository,
    ) -> Response:
        check_type(resource_type)
        pretty = check_format(request, pairs)
        prefer = parse_prefer(request)
        offset = parse_offset(pairs, OFFSET_PARAM)
        criteria = [(k, v) for k, v in _criteria(pairs) if k != OFFSET_PARAM]
        if not any(key == "_count" for key, _ in criteria):
            criteria.append(("_count", str(default_count)))
        query = parse_search(resource_type, criteria, lenient=prefer.lenient)
        result = await repo.search(caller, query, offset=offset)
        doc = searchset_bundle(
            result,
            base=_base(request),
            self_url=f"{_base(request)}/{resource_type}",
            pairs=[(k, v) for k, v in pairs if k not in FORMAT_PARAMS],
            now=_now(request),
        )
        return fhir_response(doc, pretty=pretty)

    @router.get("/{resource_type}")
    async def search(
        resource_type: str, request: Request, caller: FhirCaller, repo: Repo
    ) -> Response:
        return await run_search(request, resource_type, query_pairs(request), caller, repo)

    @router.post("/{resource_type}/_search")
    async def search_by_post(
        resource_type: str, request: Request, caller: FhirCaller, repo: Repo
    ) -> Response:
        """``POST _search``: the form body's parameters, then the URL's (FHIR R4 3.1.1.2)."""
        pairs: list[tuple[str, str]] = []
        body = await request.body()
        if body:
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != _FORM:
                raise BadRequest(f"_search takes a body of {_FORM}")
            try:
                pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                raise BadRequest("the form body is not UTF-8") from None
        return await run_search(request, resource_type, pairs + query_pairs(request), caller, repo)

    @router.post("/{resource_type}")
    async def create(
        resource_type: str, request: Request, caller: FhirCaller, repo: Repo
    ) -> Response:
        check_type(resource_type)
        pretty = check_format(request, query_pairs(request))
        prefer = parse_prefer(request)
        body = await read_json_object(request)
        check_body(body, resource_type, None, id_required=False)
        body.pop("id", None)  # FHIR: the server assigns the id of a created resource
        condition = request.headers.get("if-none-exist")
        if condition is not None:
            condition = condition.split("?", 1)[-1].strip()
            if not condition:
                raise BadRequest("If-None-Exist needs search criteria", expression="If-None-Exist")
        result = await repo.create(caller, body, if_none_exist=condition)
        return _write_answer(
            request,
            result.record,
            status=201 if result.created else 200,
            location=result.created,
            prefer=prefer,
            pretty=pretty,
        )

    @router.put("/{resource_type}")
    async def conditional_update(
        resource_type: str, request: Request, caller: FhirCaller, repo: Repo
    ) -> Response:
        check_type(resource_type)
        pairs = query_pairs(request)
        pretty = check_format(request, pairs)
        prefer = parse_prefer(request)
        criteria = _criteria(pairs)
        if not criteria:
            raise BadRequest("a conditional update needs search criteria", expression="query")
        body = await read_json_object(request)
        check_body(body, resource_type, None, id_required=False)
        result = await repo.conditional_update(caller, resource_type, urlencode(criteria), body)
        return _write_answer(
            request,
            result.record,
            status=201 if result.created else 200,
            location=True,
            prefer=prefer,
            pretty=pretty,
        )

    @router.get("/{resource_type}/_history")
    async def type_history(
        resource_type: str, request: Request, caller: FhirCaller, repo: Repo
    ) -> Response:
        check_type(resource_type)
        return await run_history(request, resource_type, None, caller, repo)

    async def run_history(
        request: Request,
        resource_type: str,
        resource_id: str | None,
        caller: Caller,
        repo: RecordsRepository,
    ) -> Response:
        prefer = parse_prefer(request)
        pairs = history_pairs(query_pairs(request), prefer)
        pretty = check_format(request, pairs)
        count = parse_count(pairs, default_count, MAX_COUNT)
        offset = parse_offset(pairs, OFFSET_PARAM)
        page = await repo.history(caller, resource_type, resource_id, count=count, offset=offset)
        path = resource_type if resource_id is None else f"{resource_type}/{resource_id}"
        doc = history_bundle(
            page,
            base=_base(request),
            self_url=f"{_base(request)}/{path}/_history",
            pairs=[(k, v) for k, v in pairs if k not in FORMAT_PARAMS],
            now=_now(request),
        )
        return fhir_response(doc, pretty=pretty)

    @router.get("/{resource_type}/{resource_id}")
    async def read(
        resource_type: str, resource_id: str, request: Request, caller: FhirCaller, repo: Repo
    ) -> Response:
        check_type(resource_type)
        check_id(resource_type, resource_id)
        pretty = check_format(request, query_pairs(request))
        record = await repo.read(caller, resource_type, resource_id)
        headers = version_headers(record, _base(request), location=False)
        return fhir_response(record.resource, headers=headers, pretty=pretty)

    @router.put("/{resource_type}/{resource_id}")
    async def update(
        resource_type: str, resource_id: str, request: Request, caller: FhirCaller, repo: Repo
    ) -> Response:
        check_type(resource_type)
        check_id(resource_type, resource_id)
        pretty = check_format(request, query_pairs(request))
        prefer = parse_prefer(request)
        if_match = parse_if_match(request)
        body = await read_json_object(request)
        check_body(body, resource_type, resource_id, id_required=True)
        result = await repo.update(caller, resource_type, resource_id, body, if_match=if_match)
        return _write_answer(
            request,
            result.record,
            status=201 if result.created else 200,
            location=True,
            prefer=prefer,
            pretty=pretty,
        )

    @router.delete("/{resource_type}/{resource_id}")
    async def delete(
        resource_type: str, resource_id: str, request: Request, caller: FhirCaller, repo: Repo
    ) -> Response:
        """A versioned tombstone; 204 whether or not the resource existed (FHIR allows both),
        200 with an OperationOutcome under ``Prefer: return=OperationOutcome``."""
        check_type(resource_type)
        check_id(resource_type, resource_id)
        pretty = check_format(request, query_pairs(request))
        prefer = parse_prefer(request)
        record = await repo.delete(caller, resource_type, resource_id)
        headers = {"ETag": record.etag} if record is not None else {}
        if prefer.return_ == "OperationOutcome":
            text = "deleted" if record is not None else "nothing to delete"
            return fhir_response(
                information_outcome(text), status=200, headers=headers, pretty=pretty
            )
        return fhir_response(None, status=204, headers=headers)

    @router.get("/{resource_type}/{resource_id}/_history")
    async def instance_history(
        resource_type: str, resource_id: str, request: Request, caller: FhirCaller, repo: Repo
    ) -> Response:
        check_type(resource_type)
        check_id(resource_type, resource_id)
        return await run_history(request, resource_type, resource_id, caller, repo)

    @router.get("/{resource_type}/{resource_id}/_history/{version_id}")
    async def vread(
        resource_type: str,
        resource_id: str,
        version_id: str,
        *,
        request: Request,
        caller: FhirCaller,
        repo: Repo,
    ) -> Response:
        check_type(resource_type)
        check_id(resource_type, resource_id)
        if not _VERSION_RE.match(version_id):
            raise NotFound("the resource version is not known")
        pretty = check_format(request, query_pairs(request))
        record = await repo.vread(caller, resource_type, resource_id, version_id)
        headers = version_headers(record, _base(request), location=False)
        return fhir_response(record.resource, headers=headers, pretty=pretty)

    _hot_routes_first(router)
    return router


# Routes are matched in order, twice per request (once to find the router, once to run it),
# so reads and writes of one resource are moved up, right after the routes that must be
# tried before them: the AuditEvent routes (specific types) and ``_search``/``_history``
# (literal segments the ``{resource_id}`` routes would take). The relative order within
# each group, which decides the 405's ``Allow`` for a path that only matches by method, is
# kept.
_FIRST: Final = ("/metadata", "/AuditEvent", "/AuditEvent/{event_id}")
_HOT: Final = (
    "/{resource_type}/_search",
    "/{resource_type}/_history",
    "/{resource_type}/{resource_id}",
)


def _hot_routes_first(router: APIRouter) -> None:
    def rank(route: Any) -> int:
        path = getattr(route, "path", "")
        return 0 if path in _FIRST else 1 if path in _HOT else 2

    router.routes.sort(key=rank)
