"""``/admin/care-assignments``: administrators assign a practitioner to a patient (a covering
physician, a consult), which establishes a care relationship like a CareTeam does.

The change is the records repository's (decided by the ``users`` operation, recorded in the
ledger before it happens); this router only reads the URL. An administrator sees no PHI here:
ids in, a status out.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from phivault.access.decision import AccessContext
from phivault.api.context import AuditCtx, CurrentPrincipal
from phivault.api.fhir import FhirRoute
from phivault.api.problems import ServiceUnavailable
from phivault.records.repository import RecordsRepository
from phivault.records.results import Caller

__all__ = ["care_assignments_router"]


def care_assignments_router() -> APIRouter:
    """Mount at ``/admin/care-assignments``."""
    router = APIRouter(route_class=FhirRoute, tags=["administration"])

    async def change(
        *,
        request: Request,
        principal: CurrentPrincipal,
        audit: AuditCtx,
        patient_id: str,
        practitioner_type: str,
        practitioner_id: str,
        assigned: bool,
    ) -> Response:
        repo = getattr(request.app.state, "records", None)
        if not isinstance(repo, RecordsRepository):
            raise ServiceUnavailable("the records service is not configured")
        caller = Caller(AccessContext.from_principal(principal), audit)
        changed = await repo.assign_care(
            caller, f"{practitioner_type}/{practitioner_id}", patient_id, assigned=assigned
        )
        return Response(status_code=201 if changed and assigned else 204)

    @router.put("/{patient_id}/{practitioner_type}/{practitioner_id}")
    async def assign(
        *,
        patient_id: str,
        practitioner_type: str,
        practitioner_id: str,
        request: Request,
        principal: CurrentPrincipal,
        audit: AuditCtx,
    ) -> Response:
        """Assign (201; 204 if it existed)."""
        return await change(
            request=request, principal=principal, audit=audit, patient_id=patient_id,
            practitioner_type=practitioner_type, practitioner_id=practitioner_id, assigned=True,
        )  # fmt: skip

    @router.delete("/{patient_id}/{practitioner_type}/{practitioner_id}")
    async def unassign(
        *,
        patient_id: str,
        practitioner_type: str,
        practitioner_id: str,
        request: Request,
        principal: CurrentPrincipal,
        audit: AuditCtx,
    ) -> Response:
        """Remove an assignment (204 either way)."""
        return await change(
            request=request, principal=principal, audit=audit, patient_id=patient_id,
            practitioner_type=practitioner_type, practitioner_id=practitioner_id, assigned=False,
        )  # fmt: skip

    return router
