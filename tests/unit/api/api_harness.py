"""An app built the way production builds it, with a fake issuer, clock and audit sink."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel

from phivault.api import (
    AuditCtx,
    Conflict,
    CurrentPrincipal,
    Forbidden,
    MountedRouter,
    NotFound,
    PreconditionFailed,
    SteppedUp,
    Unprocessable,
    create_app,
)
from phivault.identity.testing import FakeIssuer
from phivault.ledger.events import Action, EventKind
from phivault.ledger.testing import InMemoryAuditSink
from phivault.privacy.scrub import taint
from phivault.settings import ApiSettings, IdentitySettings, Settings

START = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t


class Note(BaseModel):
    code: str
    count: int


def test_router() -> APIRouter:
    """What a records service would mount: routes using the front door's dependencies."""
    router = APIRouter()

    @router.get("/records/{record_id}")
    async def read_record(
        record_id: str, principal: CurrentPrincipal, audit: AuditCtx
    ) -> dict[str, Any]:
        # Record first, then disclose (invariant 1); taint what is disclosed (invariant 4).
        await audit.record(
            audit.event(
                kind=EventKind.REST,
                subtype="read",
                action=Action.READ,
                patient=f"Patient/{record_id}",
            )
        )
        taint("Zebulon Quackenbush")
        return {"id": record_id, "name": "Zebulon Quackenbush", "reader": principal.subject}

    @router.post("/records")
    async def create_record(note: Note, principal: CurrentPrincipal) -> dict[str, Any]:
        return {"code": note.code, "count": note.count}

    @router.get("/sensitive")
    async def sensitive(principal: SteppedUp) -> dict[str, str]:
        return {"ok": principal.subject}

    @router.get("/fail/{status}")
    async def fail(status: int, principal: CurrentPrincipal) -> None:
        problems = {
            403: Forbidden,
            404: NotFound,
            409: Conflict,
            412: PreconditionFailed,
            422: Unprocessable,
        }
        if status in problems:
            raise problems[status]()
        raise RuntimeError("boom: Zebulon Quackenbush 123-45-6789")

    @router.get("/leaky")
    async def leaky(principal: CurrentPrincipal) -> None:
        taint("Quackenbush")
        raise Conflict("conflict on Quackenbush, ssn 123-45-6789")

    @router.get("/tainted-words")
    async def tainted_words(principal: CurrentPrincipal) -> None:
        # Values that spell the outcome's own structure (found by schemathesis).
        for word in ("OperationOutcome", "conflict", "error", "issue"):
            taint(word)
        raise Conflict("conflict on OperationOutcome")

    return router


@dataclass
class Harness:
    app: FastAPI
    client: httpx.AsyncClient
    issuer: FakeIssuer
    sink: InMemoryAuditSink
    clock: Clock
    logs: io.StringIO
    settings: Settings = field(default_factory=Settings)

    def token(self, **claims: Any) -> str:
        return self.issuer.token(now=self.clock.t, **claims)

    def auth(self, **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**claims)}"}

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines() if line.strip()]


def build(
    settings: Settings | None = None,
    *,
    routers: Sequence[MountedRouter] = (),
    sink: InMemoryAuditSink | None = None,
    **kwargs: Any,
) -> Harness:
    settings = settings or Settings(
        identity=IdentitySettings(mfa_acr_values=["urn:mfa"]),
        api=ApiSettings(
            rate_limit_per_address="1000/minute",
            rate_limit_per_principal="1000/minute",
            max_body_bytes=2048,
        ),
    )
    issuer = FakeIssuer()
    sink = sink or InMemoryAuditSink()
    clock = Clock()
    logs = io.StringIO()
    app = create_app(
        settings,
        audit_sink=sink,
        key_sources={issuer.issuer: issuer.key_source()},
        routers=[MountedRouter(test_router(), prefix="/t"), *routers],
        clock=clock,
        log_stream=logs,
        **kwargs,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
    return Harness(app, client, issuer, sink, clock, logs, settings)
