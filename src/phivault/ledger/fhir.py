"""Audit events in and out as FHIR R4 AuditEvent resources, shaped as IHE BALP shapes them.

Why a strict reader: the ledger keeps what it is given forever, and it must never keep PHI
(invariant 4). A FHIR AuditEvent has many places for free text (``agent.name``,
``entity.description``, ``entity.detail``, ``outcomeDesc``, the narrative) and one for a raw
query, which is often a search by name or birth date. :func:`audit_event_from_fhir` therefore
maps only what the closed model of :mod:`phivault.ledger.events` can hold, and refuses
everything else by path: unknown or unmapped elements, every free-text element (saying so when
its value looks like PHI, never repeating the value), raw queries, codes and ids outside the
model's grammar. Every refusal is an :class:`~phivault.errors.InvalidInput` with ``path`` set.

:func:`audit_event_to_fhir` writes what the ledger holds back out (``phivault ledger export
--format fhir``), with the ledger index as the resource id and the patient back-link as an
extension, so that reading it back gives the same event. The codings chosen for each event
kind, and what is refused, are explained in ``docs/decisions/audit-event-model.md``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final, NoReturn, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from phivault.errors import InvalidInput
from phivault.ledger.events import (
    Action,
    Agent,
    AuditEvent,
    Code,
    Entity,
    EntityRole,
    EntityType,
    EventKind,
    KeyedToken,
    NetworkAddress,
    OpaqueId,
    Outcome,
    Reference,
    Source,
    format_instant,
    unversioned,
)
from phivault.privacy.patterns import find_phi

__all__ = [
    "AUDIT_EVENT_TYPE",
    "DICOM",
    "EVENT_KIND_SYSTEM",
    "EVENT_SUBTYPE_SYSTEM",
    "EXTENSION_BASE",
    "NODE_SYSTEM",
    "PRINCIPAL_SYSTEM",
    "RESTFUL_INTERACTION",
    "ROLE_SYSTEM",
    "SECURITY_LABEL_SYSTEM",
    "TENANT_SYSTEM",
    "audit_event_from_fhir",
    "audit_event_to_fhir",
    "to_fhir_ndjson_line",
]

# --- systems and extensions ------------------------------------------------------------------

AUDIT_EVENT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION: Final = "http://hl7.org/fhir/restful-interaction"
DICOM: Final = "http://dicom.nema.org/resources/ontology/DCM"
ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"
EXTRA_SECURITY_ROLE: Final = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"

_PHIVAULT: Final = "https://phivault.dev/fhir"
EVENT_KIND_SYSTEM: Final = f"{_PHIVAULT}/CodeSystem/event-kind"
EVENT_SUBTYPE_SYSTEM: Final = f"{_PHIVAULT}/CodeSystem/event-subtype"
TENANT_SYSTEM: Final = f"{_PHIVAULT}/CodeSystem/tenant"
ROLE_SYSTEM: Final = f"{_PHIVAULT}/CodeSystem/role"
SECURITY_LABEL_SYSTEM: Final = f"{_PHIVAULT}/CodeSystem/security-label"
PRINCIPAL_SYSTEM: Final = f"{_PHIVAULT}/NamingSystem/principal"
NODE_SYSTEM: Final = f"{_PHIVAULT}/NamingSystem/node"
EXTENSION_BASE: Final = f"{_PHIVAULT}/StructureDefinition/"

_EXT_REQUEST_ID: Final = EXTENSION_BASE + "request-id"
_EXT_BREAK_GLASS_GRANT: Final = EXTENSION_BASE + "break-glass-grant"
_EXT_OUTCOME_REASON: Final = EXTENSION_BASE + "outcome-reason"
_EXT_PATIENT_PREV: Final = EXTENSION_BASE + "patient-prev"
_EXT_CLIENT_ID: Final = EXTENSION_BASE + "client-id"
_EXT_QUERY_HASH: Final = EXTENSION_BASE + "query-hash"

# --- vocabularies ----------------------------------------------------------------------------

_Coding = tuple[str, str]  # (system, code)

# AuditEvent.type for each kind. LOGIN and LOGOUT share DICOM 110114 and differ by subtype.
_KIND_TYPE: Final[Mapping[EventKind, _Coding]] = {
    EventKind.REST: (AUDIT_EVENT_TYPE, "rest"),
    EventKind.LOGIN: (DICOM, "110114"),
    EventKind.LOGOUT: (DICOM, "110114"),
    EventKind.EXPORT: (DICOM, "110106"),
    EventKind.SECURITY_ALERT: (DICOM, "110113"),
    EventKind.BREAK_GLASS: (EVENT_KIND_SYSTEM, "break-glass"),
    EventKind.KEY_OPERATION: (EVENT_KIND_SYSTEM, "key-operation"),
    EventKind.ADMINISTRATION: (EVENT_KIND_SYSTEM, "administration"),
    EventKind.LEDGER: (EVENT_KIND_SYSTEM, "ledger"),
}
_LOGIN: Final = (DICOM, "110122")
_LOGOUT: Final = (DICOM, "110123")
_USER_AUTHENTICATION: Final = (DICOM, "110114")
# The model's subtype when a FHIR event carries only the standard coding.
_DEFAULT_SUBTYPE: Final[Mapping[EventKind, str]] = {
    EventKind.LOGIN: "login",
    EventKind.LOGOUT: "logout",
    EventKind.EXPORT: "export",
    EventKind.SECURITY_ALERT: "security-alert",
}
# R4 restful-interaction codes (their displays are the codes themselves).
_RESTFUL_CODES: Final = frozenset(
    [
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history",
        "history-instance",
        "history-type",
        "history-system",
        "create",
        "search",
        "search-type",
        "search-system",
        "capabilities",
        "transaction",
        "batch",
        "operation",
    ]
)

# The one display phivault writes, and accepts, for each coding that has one. A display that is
# not in this table is free text, and refused.
_DISPLAYS: Final[Mapping[_Coding, str]] = {
    (AUDIT_EVENT_TYPE, "rest"): "RESTful Operation",
    (DICOM, "110114"): "User Authentication",
    (DICOM, "110122"): "Login",
    (DICOM, "110123"): "Logout",
    (DICOM, "110106"): "Export",
    (DICOM, "110113"): "Security Alert",
    (EVENT_KIND_SYSTEM, "break-glass"): "Break-glass access",
    (EVENT_KIND_SYSTEM, "key-operation"): "Key operation",
    (EVENT_KIND_SYSTEM, "administration"): "Administration",
    (EVENT_KIND_SYSTEM, "ledger"): "Audit ledger operation",
    **{(RESTFUL_INTERACTION, code): code for code in _RESTFUL_CODES},
    (ENTITY_TYPE, "1"): "Person",
    (ENTITY_TYPE, "2"): "System Object",
    (ENTITY_TYPE, "3"): "Organization",
    (ENTITY_TYPE, "4"): "Other",
    (OBJECT_ROLE, "1"): "Patient",
    (OBJECT_ROLE, "2"): "Location",
    (OBJECT_ROLE, "3"): "Report",
    (OBJECT_ROLE, "4"): "Domain Resource",
    (OBJECT_ROLE, "5"): "Master file",
    (OBJECT_ROLE, "6"): "User",
    (OBJECT_ROLE, "7"): "List",
    (OBJECT_ROLE, "13"): "Security Resource",
    (OBJECT_ROLE, "17"): "Data Repository",
    (OBJECT_ROLE, "20"): "Job",
    (OBJECT_ROLE, "24"): "Query",
    (SOURCE_TYPE, "1"): "User Device",
    (SOURCE_TYPE, "2"): "Data Interface",
    (SOURCE_TYPE, "3"): "Web Server",
    (SOURCE_TYPE, "4"): "Application Server",
    (SOURCE_TYPE, "5"): "Database Server",
    (SOURCE_TYPE, "6"): "Security Server",
    (SOURCE_TYPE, "7"): "Network Device",
    (SOURCE_TYPE, "8"): "Network Router",
    (SOURCE_TYPE, "9"): "Other",
    (DICOM, "110150"): "Application",
    (DICOM, "110151"): "Application Launcher",
    (DICOM, "110152"): "Destination Role ID",
    (DICOM, "110153"): "Source Role ID",
    (DICOM, "110154"): "Destination Media",
    (DICOM, "110155"): "Source Media",
}
# agent.type codings that are accepted on input (BALP sets them) but not kept: the model says
# who took part and in which roles, and these codes add no more than that.
_AGENT_TYPES: Final = frozenset(
    {
        *((DICOM, code) for code in ("110150", "110151", "110152", "110153", "110154", "110155")),
        *((EXTRA_SECURITY_ROLE, code) for code in ("humanuser", "dataprocessor", "datacollector")),
    }
)
# Security label codings accepted on input; phivault writes its own system (the code is kept).
_SECURITY_LABEL_SYSTEMS: Final = frozenset(
    {
        SECURITY_LABEL_SYSTEM,
        "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
        ACT_REASON,
    }
)
_OUTCOMES: Final = {str(int(o)): o for o in Outcome}
_NETWORK_TYPE_IP: Final = "2"

# --- grammars --------------------------------------------------------------------------------

_CODE: Final[TypeAdapter[str]] = TypeAdapter(Code)
_OPAQUE_ID: Final[TypeAdapter[str]] = TypeAdapter(OpaqueId)
_REFERENCE: Final[TypeAdapter[str]] = TypeAdapter(Reference)
_KEYED_TOKEN: Final[TypeAdapter[str]] = TypeAdapter(KeyedToken)
_NETWORK_ADDRESS: Final[TypeAdapter[str]] = TypeAdapter(NetworkAddress)
_FHIR_ID: Final = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_URI: Final = re.compile(r"[^\s]{1,4096}")
_INSTANT: Final = re.compile(
    r"(?P<base>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,9}))?"
    r"(?P<zone>Z|[+\-]\d{2}:\d{2})"
)

# --- reading helpers -------------------------------------------------------------------------

_M = TypeVar("_M", bound=BaseModel)


def _fail(path: str, message: str) -> NoReturn:
    raise InvalidInput(message, path=path)


def _obj(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        _fail(path, "must be a JSON object")
    return value


def _list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(path, "must be a JSON array")
    if not value:
        _fail(path, "must not be empty (FHIR leaves out empty arrays)")
    return value


def _str(value: object, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, "must be a string")
    if not value:
        _fail(path, "must not be empty")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, "must be true or false")
    return value


def _strings_in(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v)]
    return []


def _phi_note(value: object) -> str:
    """`` and this value looks like PHI (kind)`` when it does; never the value itself."""
    for text in _strings_in(value):
        found = find_phi(text)
        if found:
            return f" and this value looks like PHI ({found[0].kind.value})"
    return ""


def _free_text(path: str, value: object) -> NoReturn:
    _fail(path, "free text is not accepted" + _phi_note(value))


def _check_keys(
    obj: Mapping[str, Any],
    path: str,
    allowed: frozenset[str],
    free_text: frozenset[str] = frozenset(),
) -> None:
    for key, value in obj.items():
        if key in allowed:
            continue
        sub = f"{path}.{key}" if path else key
        if key in free_text:
            _free_text(sub, value)
        _fail(sub, "is not an element phivault maps from a FHIR R4 AuditEvent (not accepted)")


def _valid(adapter: TypeAdapter[str], value: object, path: str, what: str) -> str:
    text = _str(value, path)
    try:
        return adapter.validate_python(text)
    except ValidationError as exc:
        # Pydantic's own text repeats the input; keep only its reason.
        reason = exc.errors(include_url=False, include_input=False)[0]["msg"]
        _fail(path, f"is not a valid {what} ({reason}){_phi_note(text)}")


def _model(cls: type[_M], path: str, fields: Mapping[str, str], **values: Any) -> _M:
    """Build ``cls``; a validation error names the FHIR path (from ``fields``), not the value."""
    try:
        return cls(**values)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False, include_context=False)[0]
        loc = error["loc"]
        sub = fields.get(str(loc[0]), "") if loc else ""
        _fail(f"{path}.{sub}" if sub else path, str(error["msg"]))


def _coding(value: object, path: str) -> _Coding:
    """A Coding's (system, code); a display is accepted only as phivault writes it."""
    obj = _obj(value, path)
    _check_keys(obj, path, frozenset({"system", "code", "display"}))
    if "system" not in obj:
        _fail(f"{path}.system", "is required")
    if "code" not in obj:
        _fail(f"{path}.code", "is required")
    system = _str(obj["system"], f"{path}.system")
    if not _URI.fullmatch(system):
        _fail(f"{path}.system", "must be a URI")
    code = _str(obj["code"], f"{path}.code")
    if "display" in obj and obj["display"] != _DISPLAYS.get((system, code)):
        _free_text(f"{path}.display", obj["display"])
    return system, code


def _concept(value: object, path: str) -> list[tuple[_Coding, str]]:
    """The codings of one CodeableConcept, each with its path (``text`` is refused)."""
    cc = _obj(value, path)
    _check_keys(cc, path, frozenset({"coding"}), free_text=frozenset({"text"}))
    if "coding" not in cc:
        _fail(f"{path}.coding", "is required")
    return [
        (_coding(coding, f"{path}.coding[{j}]"), f"{path}.coding[{j}]")
        for j, coding in enumerate(_list(cc["coding"], f"{path}.coding"))
    ]


def _concepts(value: object, path: str) -> list[tuple[_Coding, str]]:
    """The codings of a list of CodeableConcepts, each with its path."""
    return [c for i, item in enumerate(_list(value, path)) for c in _concept(item, f"{path}[{i}]")]


def _codes_in(value: object, path: str, systems: frozenset[str], what: str) -> tuple[str, ...]:
    codes: list[str] = []
    for (system, code), c_path in _concepts(value, path):
        if system not in systems:
            _fail(f"{c_path}.system", f"is not a code system phivault accepts for {what}")
        codes.append(_valid(_CODE, code, f"{c_path}.code", "code"))
    return tuple(codes)


def _extensions(value: object, path: str, expected: Mapping[str, str]) -> dict[str, Any]:
    """``{url: value}`` for the extensions at ``path``; ``expected`` maps url -> value[x] key."""
    found: dict[str, Any] = {}
    for i, item in enumerate(_list(value, path)):
        e_path = f"{path}[{i}]"
        ext = _obj(item, e_path)
        url = _str(ext.get("url"), f"{e_path}.url")
        if url not in expected:
            _fail(f"{e_path}.url", "is not an extension phivault accepts here")
        if url in found:
            _fail(f"{e_path}.url", "is repeated")
        key = expected[url]
        _check_keys(ext, e_path, frozenset({"url", key}))
        if key not in ext:
            _fail(f"{e_path}.{key}", "is required")
        found[url] = ext[key]
    return found


# --- reading ---------------------------------------------------------------------------------


def _kind_and_subtype(resource: Mapping[str, Any]) -> tuple[EventKind, str]:
    if "type" not in resource:
        _fail("type", "is required")
    type_coding = _coding(resource["type"], "type")
    subtypes: list[tuple[_Coding, str]] = []
    if "subtype" in resource:
        for i, item in enumerate(_list(resource["subtype"], "subtype")):
            subtypes.append((_coding(item, f"subtype[{i}]"), f"subtype[{i}]"))

    def ours(allow_none: bool) -> str | None:
        codes = [(c, p) for (s, c), p in subtypes if s == EVENT_SUBTYPE_SYSTEM]
        if len(codes) > 1:
            _fail(codes[1][1], "only one phivault subtype is accepted")
        if not codes:
            if not allow_none:
                _fail("subtype", f"needs one coding in {EVENT_SUBTYPE_SYSTEM}")
            return None
        return _valid(_CODE, codes[0][0], f"{codes[0][1]}.code", "subtype code")

    def only(systems: frozenset[str]) -> None:
        for (system, _code), s_path in subtypes:
            if system not in systems:
                _fail(f"{s_path}.system", "is not a subtype phivault accepts for this type")

    if type_coding == _KIND_TYPE[EventKind.REST]:
        only(frozenset({RESTFUL_INTERACTION, EVENT_SUBTYPE_SYSTEM}))
        if len(subtypes) != 1:
            _fail("subtype", "a RESTful event needs exactly one subtype")
        (system, code), s_path = subtypes[0]
        if system == RESTFUL_INTERACTION and code not in _RESTFUL_CODES:
            _fail(f"{s_path}.code", "is not an R4 restful-interaction code")
        return EventKind.REST, _valid(_CODE, code, f"{s_path}.code", "subtype code")
    if type_coding == _USER_AUTHENTICATION:
        only(frozenset({DICOM, EVENT_SUBTYPE_SYSTEM}))
        dicom = [(c, p) for c, p in subtypes if c[0] == DICOM]
        if len(dicom) != 1 or dicom[0][0] not in (_LOGIN, _LOGOUT):
            _fail("subtype", "user authentication needs one DICOM subtype: 110122 or 110123")
        kind = EventKind.LOGIN if dicom[0][0] == _LOGIN else EventKind.LOGOUT
        return kind, ours(allow_none=True) or _DEFAULT_SUBTYPE[kind]
    for kind in (EventKind.EXPORT, EventKind.SECURITY_ALERT):
        if type_coding == _KIND_TYPE[kind]:
            only(frozenset({EVENT_SUBTYPE_SYSTEM}))
            return kind, ours(allow_none=True) or _DEFAULT_SUBTYPE[kind]
    for kind, coding in _KIND_TYPE.items():
        if coding[0] == EVENT_KIND_SYSTEM and type_coding == coding:
            only(frozenset({EVENT_SUBTYPE_SYSTEM}))
            subtype = ours(allow_none=False)
            if subtype is None:  # pragma: no cover - ours() fails first
                _fail("subtype", "is required")
            return kind, subtype
    _fail("type", "is not an event type phivault maps (see docs/decisions/audit-event-model.md)")


def _recorded(value: object) -> datetime:
    text = _str(value, "recorded")
    m = _INSTANT.fullmatch(text)
    if m is None:
        _fail("recorded", "must be a FHIR instant with a time zone (2024-01-31T09:30:00.000Z)")
    frac = (m["frac"] or "0")[:6]
    zone = "+00:00" if m["zone"] == "Z" else m["zone"]
    try:
        return datetime.fromisoformat(f"{m['base']}.{frac:0<6}{zone}")
    except ValueError:
        _fail("recorded", "is not a valid date and time")


def _tenant(resource: Mapping[str, Any], tenant: str | None) -> str:
    tagged: str | None = None
    if "meta" in resource:
        meta = _obj(resource["meta"], "meta")
        _check_keys(meta, "meta", frozenset({"profile", "tag", "versionId", "lastUpdated"}))
        if "profile" in meta:
            for i, profile in enumerate(_list(meta["profile"], "meta.profile")):
                if not _URI.fullmatch(_str(profile, f"meta.profile[{i}]")):
                    _fail(f"meta.profile[{i}]", "must be a URI")
        if "versionId" in meta and not _FHIR_ID.fullmatch(
            _str(meta["versionId"], "meta.versionId")
        ):
            _fail("meta.versionId", "must be a FHIR id")
        if "lastUpdated" in meta and not _INSTANT.fullmatch(
            _str(meta["lastUpdated"], "meta.lastUpdated")
        ):
            _fail("meta.lastUpdated", "must be a FHIR instant")
        if "tag" in meta:
            for i, item in enumerate(_list(meta["tag"], "meta.tag")):
                system, code = _coding(item, f"meta.tag[{i}]")
                if system != TENANT_SYSTEM:
                    _fail(f"meta.tag[{i}].system", f"only the tenant tag ({TENANT_SYSTEM}) is kept")
                if tagged is not None:
                    _fail(f"meta.tag[{i}]", "names a second tenant")
                tagged = _valid(_OPAQUE_ID, code, f"meta.tag[{i}].code", "tenant id")
    if tagged is not None:
        if tenant is not None and tenant != tagged:
            _fail("meta.tag", "names a different tenant than the one this event is recorded for")
        return tagged
    if tenant is None:
        _fail("meta.tag", f"no tenant: tag the event with {TENANT_SYSTEM} or pass the tenant")
    return _valid(_OPAQUE_ID, tenant, "tenant", "tenant id")


_AGENT_FIELDS: Final = {
    "who": "who",
    "requestor": "requestor",
    "roles": "role",
    "client_id": "extension",
    "network_address": "network.address",
    "purpose_of_use": "purposeOfUse",
}


def _agent(value: object, path: str) -> Agent:
    obj = _obj(value, path)
    _check_keys(
        obj,
        path,
        frozenset({"who", "requestor", "role", "network", "purposeOfUse", "extension", "type"}),
        free_text=frozenset({"name"}),
    )
    if "type" in obj:
        for (system, code), c_path in _concept(obj["type"], f"{path}.type"):
            if (system, code) not in _AGENT_TYPES:
                _fail(c_path, "is not an agent type phivault accepts")
    if "who" not in obj:
        _fail(f"{path}.who", "is required")
    who_path = f"{path}.who"
    who_obj = _obj(obj["who"], who_path)
    _check_keys(who_obj, who_path, frozenset({"reference", "identifier"}), frozenset({"display"}))
    if ("reference" in who_obj) == ("identifier" in who_obj):
        _fail(who_path, "needs exactly one of reference or identifier")
    if "reference" in who_obj:
        who = _valid(_REFERENCE, who_obj["reference"], f"{who_path}.reference", "reference")
    else:
        id_path = f"{who_path}.identifier"
        ident = _obj(who_obj["identifier"], id_path)
        _check_keys(ident, id_path, frozenset({"system", "value"}))
        if ident.get("system") != PRINCIPAL_SYSTEM:
            _fail(f"{id_path}.system", f"must be {PRINCIPAL_SYSTEM}")
        who = _valid(_OPAQUE_ID, ident.get("value"), f"{id_path}.value", "principal id")
    if "requestor" not in obj:
        _fail(f"{path}.requestor", "is required")
    requestor = _bool(obj["requestor"], f"{path}.requestor")
    roles = (
        _codes_in(obj["role"], f"{path}.role", frozenset({ROLE_SYSTEM}), "roles")
        if "role" in obj
        else ()
    )
    purposes = (
        _codes_in(
            obj["purposeOfUse"], f"{path}.purposeOfUse", frozenset({ACT_REASON}), "purpose of use"
        )
        if "purposeOfUse" in obj
        else ()
    )
    network_address = None
    if "network" in obj:
        n_path = f"{path}.network"
        network = _obj(obj["network"], n_path)
        _check_keys(network, n_path, frozenset({"address", "type"}))
        if network.get("type") != _NETWORK_TYPE_IP:
            _fail(f"{n_path}.type", 'must be "2" (an IP address): names and numbers can carry PHI')
        network_address = _valid(
            _NETWORK_ADDRESS, network.get("address"), f"{n_path}.address", "IP address"
        )
    client_id = None
    if "extension" in obj:
        ext = _extensions(obj["extension"], f"{path}.extension", {_EXT_CLIENT_ID: "valueString"})
        if _EXT_CLIENT_ID in ext:
            client_id = _valid(_OPAQUE_ID, ext[_EXT_CLIENT_ID], f"{path}.extension", "client id")
    return _model(
        Agent,
        path,
        _AGENT_FIELDS,
        who=who,
        requestor=requestor,
        roles=roles,
        client_id=client_id,
        network_address=network_address,
        purpose_of_use=purposes,
    )


def _source(value: object) -> Source:
    obj = _obj(value, "source")
    _check_keys(obj, "source", frozenset({"observer", "site", "type"}))
    if "type" in obj:
        for i, item in enumerate(_list(obj["type"], "source.type")):
            system, code = _coding(item, f"source.type[{i}]")
            if (system, code) not in _DISPLAYS or system != SOURCE_TYPE:
                _fail(f"source.type[{i}]", "is not a security-source-type code")
    if "observer" not in obj:
        _fail("source.observer", "is required")
    observer = _obj(obj["observer"], "source.observer")
    _check_keys(observer, "source.observer", frozenset({"identifier"}), frozenset({"display"}))
    if "identifier" not in observer:
        _fail("source.observer.identifier", f"is required (system {NODE_SYSTEM})")
    ident = _obj(observer["identifier"], "source.observer.identifier")
    _check_keys(ident, "source.observer.identifier", frozenset({"system", "value"}))
    if ident.get("system") != NODE_SYSTEM:
        _fail("source.observer.identifier.system", f"must be {NODE_SYSTEM}")
    node = _valid(_OPAQUE_ID, ident.get("value"), "source.observer.identifier.value", "node id")
    site = _valid(_OPAQUE_ID, obj["site"], "source.site", "site id") if "site" in obj else None
    return _model(
        Source, "source", {"observer": "observer", "site": "site"}, observer=node, site=site
    )


_ENTITY_FIELDS: Final = {
    "what": "what",
    "type": "type",
    "role": "role",
    "query_hash": "extension",
    "security_labels": "securityLabel",
}


def _entity_detail(value: object, path: str) -> NoReturn:
    # Every detail is free text (or free bytes); say whether it looks like PHI, decoded or not.
    texts: list[object] = [value]
    for item in value if isinstance(value, list) else []:
        if isinstance(item, Mapping) and isinstance(item.get("valueBase64Binary"), str):
            try:
                texts.append(base64.b64decode(item["valueBase64Binary"]).decode("utf-8"))
            except (binascii.Error, UnicodeDecodeError, ValueError):
                continue
    _fail(path, "free text is not accepted" + _phi_note(texts))


def _entity(value: object, path: str) -> Entity:
    obj = _obj(value, path)
    if "query" in obj:
        _fail(
            f"{path}.query",
            "a raw query is not accepted (it may contain PHI); send its keyed hash in the "
            f"extension {_EXT_QUERY_HASH}" + _phi_note(_decoded(obj["query"])),
        )
    if "detail" in obj:
        _entity_detail(obj["detail"], f"{path}.detail")
    _check_keys(
        obj,
        path,
        frozenset({"what", "type", "role", "securityLabel", "extension"}),
        free_text=frozenset({"name", "description"}),
    )
    what = None
    if "what" in obj:
        w_path = f"{path}.what"
        what_obj = _obj(obj["what"], w_path)
        if "identifier" in what_obj:
            _fail(
                f"{w_path}.identifier",
                "identifiers are not accepted (an MRN or SSN is PHI); use a reference"
                + _phi_note(what_obj["identifier"]),
            )
        _check_keys(what_obj, w_path, frozenset({"reference", "type"}), frozenset({"display"}))
        if "reference" not in what_obj:
            _fail(f"{w_path}.reference", "is required")
        what = _valid(_REFERENCE, what_obj["reference"], f"{w_path}.reference", "reference")
        if "type" in what_obj and what_obj["type"] != what.split("/")[0]:
            _fail(f"{w_path}.type", "does not match the reference")
    entity_type = EntityType.SYSTEM_OBJECT
    if "type" in obj:
        system, code = _coding(obj["type"], f"{path}.type")
        if system != ENTITY_TYPE or code not in {t.value for t in EntityType}:
            _fail(f"{path}.type", f"must be a code from {ENTITY_TYPE}")
        entity_type = EntityType(code)
    role = EntityRole.DOMAIN_RESOURCE
    if "role" in obj:
        system, code = _coding(obj["role"], f"{path}.role")
        if system != OBJECT_ROLE or code not in {r.value for r in EntityRole}:
            _fail(f"{path}.role", f"must be one of the {OBJECT_ROLE} codes phivault maps")
        role = EntityRole(code)
    labels: list[str] = []
    if "securityLabel" in obj:
        for i, item in enumerate(_list(obj["securityLabel"], f"{path}.securityLabel")):
            l_path = f"{path}.securityLabel[{i}]"
            system, code = _coding(item, l_path)
            if system not in _SECURITY_LABEL_SYSTEMS:
                _fail(f"{l_path}.system", "is not a security label system phivault accepts")
            labels.append(_valid(_CODE, code, f"{l_path}.code", "security label"))
    query_hash = None
    if "extension" in obj:
        ext = _extensions(obj["extension"], f"{path}.extension", {_EXT_QUERY_HASH: "valueString"})
        if _EXT_QUERY_HASH in ext:
            query_hash = _valid(
                _KEYED_TOKEN, ext[_EXT_QUERY_HASH], f"{path}.extension", "keyed query token"
            )
    return _model(
        Entity,
        path,
        _ENTITY_FIELDS,
        what=what,
        type=entity_type,
        role=role,
        query_hash=query_hash,
        security_labels=tuple(labels),
    )


def _decoded(value: object) -> object:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return value
    return value


def _patient_roles(entities: list[Entity]) -> list[Entity]:
    """BALP: the patient is the entity in the Patient role, or else the one Patient referenced.

    Entities found by the second rule take the patient role; entities in the patient role
    must all reference the same patient.
    """
    in_role = [i for i, e in enumerate(entities) if e.role is EntityRole.PATIENT]
    patients = {unversioned(entities[i].what or "") for i in in_role}
    if len(patients) > 1:
        _fail(f"entity[{in_role[-1]}].what", "the patient entities reference different patients")
    if in_role:
        return entities
    referenced = {unversioned(e.what) for e in entities if e.what and e.what.startswith("Patient/")}
    if len(referenced) != 1:
        return entities  # no patient, or a search across several
    return [
        e.model_copy(update={"role": EntityRole.PATIENT})
        if e.what and e.what.startswith("Patient/")
        else e
        for e in entities
    ]


_EVENT_FIELDS: Final = {
    "kind": "type",
    "subtype": "subtype",
    "action": "action",
    "recorded": "recorded",
    "outcome": "outcome",
    "outcome_reason": "extension",
    "tenant": "meta.tag",
    "patient": "entity",
    "agents": "agent",
    "source": "source",
    "entities": "entity",
    "purpose_of_use": "purposeOfEvent",
    "request_id": "extension",
    "break_glass_grant": "extension",
}


def audit_event_from_fhir(resource: Mapping[str, Any], *, tenant: str | None = None) -> AuditEvent:
    """Validate a FHIR R4 AuditEvent (IHE BALP shape) and map it to an :class:`AuditEvent`.

    ``tenant`` is used when the resource carries no tenant tag (system :data:`TENANT_SYSTEM`
    in ``meta.tag``); if it carries one, the two must agree. Raises
    :class:`~phivault.errors.InvalidInput` with ``path`` naming the offending element; the
    message never contains the element's value.
    """
    root = _obj(resource, "AuditEvent")
    if root.get("resourceType") != "AuditEvent":
        _fail("resourceType", 'must be "AuditEvent"')
    _check_keys(
        root,
        "",
        frozenset(
            {
                "resourceType",
                "id",
                "meta",
                "extension",
                "type",
                "subtype",
                "action",
                "recorded",
                "outcome",
                "purposeOfEvent",
                "agent",
                "source",
                "entity",
            }
        ),
        free_text=frozenset({"text", "outcomeDesc"}),
    )
    if "id" in root and not _FHIR_ID.fullmatch(_str(root["id"], "id")):
        _fail("id", "must be a FHIR id")
    event_tenant = _tenant(root, tenant)
    kind, subtype = _kind_and_subtype(root)
    if "action" not in root:
        _fail("action", "is required")
    action_code = _str(root["action"], "action")
    if action_code not in {a.value for a in Action}:
        _fail("action", "must be one of C, R, U, D, E")
    if "recorded" not in root:
        _fail("recorded", "is required")
    recorded = _recorded(root["recorded"])
    outcome = Outcome.SUCCESS
    if "outcome" in root:
        outcome_code = _str(root["outcome"], "outcome")
        if outcome_code not in _OUTCOMES:
            _fail("outcome", "must be one of 0, 4, 8, 12")
        outcome = _OUTCOMES[outcome_code]
    purposes = (
        _codes_in(root["purposeOfEvent"], "purposeOfEvent", frozenset({ACT_REASON}), "purpose")
        if "purposeOfEvent" in root
        else ()
    )
    ext: dict[str, Any] = {}
    if "extension" in root:
        ext = _extensions(
            root["extension"],
            "extension",
            {
                _EXT_REQUEST_ID: "valueString",
                _EXT_BREAK_GLASS_GRANT: "valueString",
                _EXT_OUTCOME_REASON: "valueCode",
                _EXT_PATIENT_PREV: "valueUnsignedInt",
            },
        )
    prev = ext.get(_EXT_PATIENT_PREV)
    if prev is not None and (not isinstance(prev, int) or isinstance(prev, bool) or prev < 0):
        _fail("extension", "patient-prev must be a non-negative integer")
    request_id = (
        _valid(_OPAQUE_ID, ext[_EXT_REQUEST_ID], "extension", "request id")
        if _EXT_REQUEST_ID in ext
        else None
    )
    grant = (
        _valid(_OPAQUE_ID, ext[_EXT_BREAK_GLASS_GRANT], "extension", "break-glass grant id")
        if _EXT_BREAK_GLASS_GRANT in ext
        else None
    )
    reason = (
        _valid(_CODE, ext[_EXT_OUTCOME_REASON], "extension", "outcome reason code")
        if _EXT_OUTCOME_REASON in ext
        else None
    )
    if "agent" not in root:
        _fail("agent", "is required")
    agents = tuple(_agent(a, f"agent[{i}]") for i, a in enumerate(_list(root["agent"], "agent")))
    if "source" not in root:
        _fail("source", "is required")
    source = _source(root["source"])
    entities: list[Entity] = []
    if "entity" in root:
        entities = [
            _entity(e, f"entity[{i}]") for i, e in enumerate(_list(root["entity"], "entity"))
        ]
    return _model(
        AuditEvent,
        "AuditEvent",
        _EVENT_FIELDS,
        kind=kind,
        subtype=subtype,
        action=Action(action_code),
        recorded=recorded,
        outcome=outcome,
        outcome_reason=reason,
        tenant=event_tenant,
        agents=agents,
        source=source,
        entities=tuple(_patient_roles(entities)),
        purpose_of_use=purposes,
        request_id=request_id,
        break_glass_grant=grant,
    )


# --- writing ---------------------------------------------------------------------------------


def _out_coding(coding: _Coding) -> dict[str, str]:
    system, code = coding
    out = {"system": system, "code": code}
    display = _DISPLAYS.get(coding)
    if display is not None:
        out["display"] = display
    return out


def _out_concepts(system: str, codes: Sequence[str]) -> list[dict[str, Any]]:
    return [{"coding": [{"system": system, "code": code}]} for code in codes]


def _out_subtypes(event: AuditEvent) -> list[dict[str, str]]:
    ours = (EVENT_SUBTYPE_SYSTEM, event.subtype)
    if event.kind is EventKind.REST:
        if event.subtype in _RESTFUL_CODES:
            return [_out_coding((RESTFUL_INTERACTION, event.subtype))]
        return [_out_coding(ours)]
    if event.kind in (EventKind.LOGIN, EventKind.LOGOUT):
        dicom = _LOGIN if event.kind is EventKind.LOGIN else _LOGOUT
        if event.subtype == _DEFAULT_SUBTYPE[event.kind]:
            return [_out_coding(dicom)]
        return [_out_coding(dicom), _out_coding(ours)]
    return [_out_coding(ours)]


def _out_agent(agent: Agent) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if agent.client_id is not None:
        out["extension"] = [{"url": _EXT_CLIENT_ID, "valueString": agent.client_id}]
    if agent.roles:
        out["role"] = _out_concepts(ROLE_SYSTEM, agent.roles)
    if "/" in agent.who:
        out["who"] = {"reference": agent.who}
    else:
        out["who"] = {"identifier": {"system": PRINCIPAL_SYSTEM, "value": agent.who}}
    out["requestor"] = agent.requestor
    if agent.network_address is not None:
        out["network"] = {"address": agent.network_address, "type": _NETWORK_TYPE_IP}
    if agent.purpose_of_use:
        out["purposeOfUse"] = _out_concepts(ACT_REASON, agent.purpose_of_use)
    return out


def _out_entity(entity: Entity) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if entity.query_hash is not None:
        out["extension"] = [{"url": _EXT_QUERY_HASH, "valueString": entity.query_hash}]
    if entity.what is not None:
        out["what"] = {"reference": entity.what}
    out["type"] = _out_coding((ENTITY_TYPE, entity.type.value))
    out["role"] = _out_coding((OBJECT_ROLE, entity.role.value))
    if entity.security_labels:
        out["securityLabel"] = [
            {"system": SECURITY_LABEL_SYSTEM, "code": label} for label in entity.security_labels
        ]
    return out


def audit_event_to_fhir(
    event: AuditEvent, *, index: int, patient_prev: int | None = None
) -> dict[str, Any]:
    """``event`` as a FHIR R4 AuditEvent with ``id`` ``ledger-<index>``.

    ``patient_prev`` is the ledger index of the previous event of the same patient (the
    ledger's back-link), written as an extension. :func:`audit_event_from_fhir` reads the
    result back to an equal event.
    """
    if index < 0:
        raise ValueError("a ledger index is not negative")
    if patient_prev is not None and not 0 <= patient_prev < index:
        raise ValueError("the back-link must point to an earlier ledger index")
    extensions: list[dict[str, Any]] = []
    if event.request_id is not None:
        extensions.append({"url": _EXT_REQUEST_ID, "valueString": event.request_id})
    if event.break_glass_grant is not None:
        extensions.append({"url": _EXT_BREAK_GLASS_GRANT, "valueString": event.break_glass_grant})
    if event.outcome_reason is not None:
        extensions.append({"url": _EXT_OUTCOME_REASON, "valueCode": event.outcome_reason})
    if patient_prev is not None:
        extensions.append({"url": _EXT_PATIENT_PREV, "valueUnsignedInt": patient_prev})
    out: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"ledger-{index}",
        "meta": {"tag": [{"system": TENANT_SYSTEM, "code": event.tenant}]},
    }
    if extensions:
        out["extension"] = extensions
    out["type"] = _out_coding(_KIND_TYPE[event.kind])
    out["subtype"] = _out_subtypes(event)
    out["action"] = event.action.value
    out["recorded"] = format_instant(event.recorded)
    out["outcome"] = str(int(event.outcome))
    if event.purpose_of_use:
        out["purposeOfEvent"] = _out_concepts(ACT_REASON, event.purpose_of_use)
    out["agent"] = [_out_agent(agent) for agent in event.agents]
    source: dict[str, Any] = {}
    if event.source.site is not None:
        source["site"] = event.source.site
    source["observer"] = {"identifier": {"system": NODE_SYSTEM, "value": event.source.observer}}
    source["type"] = [_out_coding((SOURCE_TYPE, "4"))]
    out["source"] = source
    if event.entities:
        out["entity"] = [_out_entity(entity) for entity in event.entities]
    return out


def to_fhir_ndjson_line(event: AuditEvent, *, index: int, patient_prev: int | None = None) -> str:
    """One NDJSON line (compact JSON and ``"\\n"``) of :func:`audit_event_to_fhir`."""
    resource = audit_event_to_fhir(event, index=index, patient_prev=patient_prev)
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":")) + "\n"
