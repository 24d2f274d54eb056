"""FHIR R4 REST at ``/fhir``: the HTTP face of the records repository.

Mount it behind the front door with the repository on ``app.state.records``::

    create_app(settings, audit_sink=ledger,
               routers=[MountedRouter(fhir_router(), prefix=FHIR_PREFIX)],
               state={"records": repository})

``/fhir/metadata`` is public (``phivault.api.routes.PUBLIC_PATHS``); every other route needs a
token, and every interaction goes through the repository with the caller's access context.
"""

from phivault.api.fhir._bundles import OFFSET_PARAM
from phivault.api.fhir._capability import FHIR_VERSION, capability_statement
from phivault.api.fhir._errors import translate
from phivault.api.fhir._routes import FHIR_PREFIX, FhirRoute, fhir_router

__all__ = [
    "FHIR_PREFIX",
    "FHIR_VERSION",
    "OFFSET_PARAM",
    "FhirRoute",
    "capability_statement",
    "fhir_router",
    "translate",
]
