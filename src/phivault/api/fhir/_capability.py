"""The CapabilityStatement at ``/fhir/metadata``: exactly what this server supports.

Why it is derived rather than written by hand: the resource types come from the element
classification (a type without one cannot be stored) and the search parameters from the
search parameter table, so the statement cannot drift from what the routes and the
repository actually do. A type without search parameters (nothing to search it by) lists
no ``search-type`` and no conditional create or update, which need a search.
``updateCreate`` is false because update-as-create depends on the caller (each type's
``documentation`` says when it is honoured).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from phivault.api.fhir._http import instant
from phivault.records.classification import Classification
from phivault.records.search_params import ParamType, UnknownSearchParameter, search_params

__all__ = ["FHIR_VERSION", "capability_statement"]

FHIR_VERSION: Final = "4.0.1"
_SEARCH_TYPE: Final = {
    ParamType.TOKEN: "token",
    ParamType.TELECOM: "token",
    ParamType.STRING: "string",
    ParamType.DATE: "date",
    ParamType.REFERENCE: "reference",
}
_INTERACTIONS: Final = (
    "read",
    "vread",
    "update",
    "delete",
    "history-instance",
    "history-type",
    "create",
)
_SMART: Final = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR",
        }
    ],
    "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
}
_SPEC_PARAMS: Final = {
    "_id": "http://hl7.org/fhir/SearchParameter/Resource-id",
    "_lastUpdated": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
}


def _params_of(resource_type: str) -> dict[str, Any]:
    try:
        return dict(search_params(resource_type))
    except UnknownSearchParameter:  # a type nothing can be searched by
        return {}


def _resource(resource_type: str) -> dict[str, Any]:
    params = _params_of(resource_type)
    searchable = bool(params)
    interactions = list(_INTERACTIONS) + (["search-type"] if searchable else [])
    entry: dict[str, Any] = {
        "type": resource_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
        "interaction": [{"code": code} for code in interactions],
        "versioning": "versioned-update",
        "readHistory": True,
        # Not for every caller (a PUT to an unused id must not answer differently from one
        # taken by a resource the caller may not see), so not promised; see the text.
        "updateCreate": False,
        "documentation": _UPDATE_CREATE.format(type=resource_type),
        "conditionalCreate": searchable,
        "conditionalRead": "not-supported",
        "conditionalUpdate": searchable,
        "conditionalDelete": "not-supported",
        "referencePolicy": ["literal", "local"],
    }
    includes = [f"{resource_type}:{name}" for name in ("patient", "subject") if name in params]
    if includes:
        entry["searchInclude"] = includes
    if params:
        rows = []
        for name, param in sorted(params.items()):
            row: dict[str, Any] = {"name": name, "type": _SEARCH_TYPE[param.type]}
            if name in _SPEC_PARAMS:
                row["definition"] = _SPEC_PARAMS[name]
            rows.append(row)
        entry["searchParam"] = rows
    if resource_type == "Patient":
        # Emergency access (break-glass): time-boxed, step-up, reviewed; see docs/api.md.
        entry["operation"] = [
            {"name": "break-glass", "definition": _OPERATION_BASE + "break-glass"},
            {"name": "revoke", "definition": _OPERATION_BASE + "break-glass-revoke"},
            {"name": "access-report", "definition": _OPERATION_BASE + "access-report"},
        ]
    return entry


_OPERATION_BASE: Final = "https://phivault.dev/fhir/OperationDefinition/"

# What ``updateCreate: false`` means here, exactly (docs/decisions/records-write-visibility.md).
_UPDATE_CREATE: Final = (
    "Update-as-create (PUT to an id with no current resource, deleted ones included) is "
    "honoured only for callers whose access policy and scopes let them read or update every "
    "{type} of the tenant; for any other caller such a PUT is a 404, exactly as for an id "
    "held by a {type} they may not see. Create with POST. A PUT or DELETE naming a {type} "
    "the caller may neither read nor so change answers as if it did not exist (PUT: 404, "
    "If-Match: 412, DELETE: 204)."
)


# AuditEvent: served read-only from the ledger (privacy officers; a patient, their own).
_AUDIT_EVENT: Final[dict[str, Any]] = {
    "type": "AuditEvent",
    "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
    "documentation": "Read-only, from the audit ledger (ids are ledger-<index>); newest first.",
    "interaction": [{"code": "read"}, {"code": "search-type"}],
    "versioning": "no-version",
    "readHistory": False,
    "updateCreate": False,
    "conditionalCreate": False,
    "conditionalUpdate": False,
    "conditionalDelete": "not-supported",
    "searchParam": [
        {"name": "patient", "type": "reference"},
        {"name": "agent", "type": "token"},
        {"name": "date", "type": "date"},
    ],
}


def capability_statement(
    classification: Classification, *, base_url: str, published: datetime, software_version: str
) -> dict[str, Any]:
    """The server's CapabilityStatement (``kind: instance``) for ``base_url``."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(published),
        "publisher": "phivault",
        "kind": "instance",
        "software": {"name": "phivault", "version": software_version},
        "implementation": {"description": "phivault FHIR R4 server", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Every interaction needs a bearer token (SMART on FHIR v2 scopes); "
                    "access is decided per request and recorded in the audit ledger first."
                ),
                "security": {"cors": False, "service": [_SMART]},
                "resource": sorted(
                    [_resource(name) for name in classification.resource_types] + [_AUDIT_EVENT],
                    key=lambda r: str(r["type"]),
                ),
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }
