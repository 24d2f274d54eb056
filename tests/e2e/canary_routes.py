"""Routes standing in for the records service in e2e tests: read (audited, tainted), write, fail."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from phivault.api import AuditCtx, Conflict, CurrentPrincipal, PreconditionFailed
from phivault.ledger.events import Action, EventKind
from phivault.privacy.scrub import taint


class Demographics(BaseModel):
    name: str
    ssn: str
    phone: str
    address: str


def canary_router() -> APIRouter:
    router = APIRouter()

    @router.get("/patients/{patient_id}")
    async def read(patient_id: str, principal: CurrentPrincipal, audit: AuditCtx) -> dict[str, Any]:
        if not patient_id.isalnum():
            raise PreconditionFailed("unknown patient id")
        await audit.record(
            audit.event(
                kind=EventKind.REST,
                subtype="read",
                action=Action.READ,
                patient=f"Patient/{patient_id}",
            )
        )
        return {"id": patient_id}

    @router.post("/patients")
    async def create(
        body: Demographics, principal: CurrentPrincipal, audit: AuditCtx
    ) -> dict[str, str]:
        # What the records layer will do on decrypt/encrypt of PHI-classified elements.
        taint(body.name, body.ssn, body.phone, body.address)
        # A careless message: the lower-cased name fits no PHI pattern, only the tainted-value net.
        raise Conflict(f"duplicate of {body.name.lower()} at {body.address}")

    return router
