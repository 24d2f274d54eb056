"""How create_app wires the routers and FastAPI: the routers are mounted flat (their routes in
the app's own table) and must serve and document exactly what FastAPI's ``include_router``
would, the included app being the oracle; FastAPI's own telemetry stays off."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import api_harness
import pytest
from api_harness import Harness, build
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from phivault.api import MountedRouter
from phivault.api.app import mount_flat
from phivault.api.breakglass import break_glass_admin_router, break_glass_router
from phivault.api.care_assignments import care_assignments_router
from phivault.api.fhir import FHIR_PREFIX, fhir_router
from phivault.api.keys import keys_router

_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")


def _service_routers() -> list[MountedRouter]:
    """The routers ``open_service`` mounts, in its order (FHIR first)."""
    return [
        MountedRouter(fhir_router(), prefix=FHIR_PREFIX),
        MountedRouter(keys_router(), prefix="/admin/keys"),
        MountedRouter(care_assignments_router(), prefix="/admin/care-assignments"),
        MountedRouter(break_glass_router()),
        MountedRouter(break_glass_admin_router(), prefix="/admin/break-glass"),
    ]


def _flat_and_included() -> tuple[Harness, Harness]:
    flat = build(routers=_service_routers())
    included = build()
    for mounted in _service_routers():
        included.app.include_router(mounted.router, prefix=mounted.prefix)
    return flat, included


def _probe_paths(app: FastAPI) -> list[str]:
    """Each route's path with sample values, and near misses (an extra or missing segment)."""
    paths: set[str] = set()
    for route in app.routes:
        template = getattr(route, "path", None)
        if not isinstance(template, str):
            continue
        for value in ("Observation", "AuditEvent", "_history", "_search", "x1"):
            path = re.sub(r"\{[^}]+\}", value, template)
            paths.update({path, path + "/extra", path.rsplit("/", 1)[0] or "/"})
    return sorted(paths)


def test_flat_routes_are_in_the_apps_own_table() -> None:
    flat, included = _flat_and_included()
    # No included-router wrapper is left: every route is a plain route of the app.
    assert all(type(route).__name__ != "_IncludedRouter" for route in flat.app.router.routes)
    assert any(type(route).__name__ == "_IncludedRouter" for route in included.app.router.routes)
    fhir = [r for r in flat.app.routes if getattr(r, "path", "").startswith("/fhir/")]
    fhir = [r for r in fhir if "$break-glass" not in getattr(r, "path", "")]
    assert fhir and all(type(r).__name__ == "FhirRoute" for r in fhir)


def test_flat_openapi_document_matches_include_router() -> None:
    flat, included = _flat_and_included()
    assert flat.app.openapi() == included.app.openapi()


def _table(app: FastAPI) -> list[tuple[str, tuple[str, ...], str]]:
    rows: list[tuple[str, tuple[str, ...], str]] = []
    for route in app.routes:
        if isinstance(route, APIRoute):
            rows.append((route.path, tuple(sorted(route.methods)), route.name))
    return rows


def test_flat_route_order_matches_include_router() -> None:
    flat, included = _flat_and_included()
    from fastapi.routing import iter_route_contexts

    expected = [
        (str(c.path_format), tuple(sorted(c.methods or ())), str(c.name))
        for c in iter_route_contexts(included.app.router.routes)
        if isinstance(c.original_route, APIRoute)
    ]
    # The front door's own routes come after the mounted ones (no path of one matches the
    # other's); within the mounted routers the order is include_router's.
    system = {"/healthz", "/readyz", "/metrics", "/whoami"}
    assert [row for row in _table(flat.app) if row[0] not in system] == [
        row for row in expected if row[0] not in system
    ]
    assert [row[0] for row in _table(flat.app)][-4:] == [
        "/healthz",
        "/readyz",
        "/metrics",
        "/whoami",
    ]


def test_a_mounted_route_that_would_take_a_front_door_path_is_refused() -> None:
    from phivault.errors import ConfigurationError

    router = APIRouter()

    @router.get("/{anything}")
    async def anything(anything: str) -> dict[str, str]:
        return {}

    with pytest.raises(ConfigurationError, match="/healthz"):
        build(routers=[MountedRouter(router)])


async def test_flat_routes_answer_as_included_ones() -> None:
    """Every route's path (and near misses) by every method: the same status and ``Allow``
    (a 405 names the methods of the first route whose path matches, so order matters)."""
    flat, included = _flat_and_included()
    async with flat.client, included.client:
        for path in _probe_paths(included.app):
            for method in _METHODS:
                answers = []
                for harness in (flat, included):
                    response = await harness.client.request(
                        method, path, headers=harness.auth(), content=b""
                    )
                    answers.append((response.status_code, response.headers.get("allow")))
                assert answers[0] == answers[1], (method, path, answers)


async def test_fhir_405_names_the_first_matching_routes_methods() -> None:
    flat, _ = _flat_and_included()
    async with flat.client:
        response = await flat.client.patch("/fhir/Observation/o1", headers=flat.auth())
        assert response.status_code == 405
        assert response.headers["allow"] == "GET"
        response = await flat.client.delete("/fhir/metadata", headers=flat.auth())
        assert response.status_code == 405
        assert response.headers["allow"] == "GET"
        response = await flat.client.get("/admin/keys/unseal", headers=flat.auth())
        assert response.status_code == 405


def _router_with(setup: Callable[[APIRouter], Any]) -> APIRouter:
    router = APIRouter()

    @router.get("/ping")
    async def ping() -> dict[str, str]:
        return {"ok": "yes"}

    setup(router)
    return router


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(lambda r: r.add_event_handler("startup", lambda: None), id="startup"),
        pytest.param(lambda r: r.add_route("/plain", lambda request: None), id="starlette-route"),
    ],
)
def test_routers_flattening_cannot_express_are_included(
    setup: Callable[[APIRouter], Any],
) -> None:
    app = FastAPI()
    mount_flat(app, _router_with(setup), prefix="/x")
    assert any(type(route).__name__ == "_IncludedRouter" for route in app.router.routes)


def test_flat_mount_refuses_a_malformed_prefix() -> None:
    from phivault.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        mount_flat(FastAPI(), api_harness.test_router(), prefix="/t/")


async def test_fastapi_telemetry_never_traces_a_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI's native spans carry the raw path and query (PHI); they stay off even when an
    OpenTelemetry tracer provider is configured in the process."""
    from opentelemetry import trace

    started: list[str] = []

    class Recording(trace.NoOpTracer):
        def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
            started.append(name)
            return super().start_span(name, *args, **kwargs)

        def start_as_current_span(self, name: str, *args: Any, **kwargs: Any) -> Any:
            started.append(name)
            return super().start_as_current_span(name, *args, **kwargs)

    class Provider(trace.TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
            return Recording()

    monkeypatch.setattr(trace, "get_tracer_provider", Provider)
    harness = build()
    async with harness.client:
        response = await harness.client.get("/t/records/r1?name=Zebulon", headers=harness.auth())
        assert response.status_code == 200
    assert started == []
