"""The audit event model: what the ledger records, aligned with FHIR AuditEvent and IHE BALP.

An :class:`AuditEvent` says who did what, when, where, with which outcome, why (purpose of
use), and to which patient. It carries **no PHI values**: only opaque ids, codes, references
and keyed tokens. Every free-form field is constrained to a code or id grammar so that a name,
a note or an SSN cannot be smuggled in as a "code"; :mod:`phivault.ledger.fhir` additionally
screens incoming FHIR AuditEvents for PHI-looking values before mapping them here.

The ledger adds its own fields when it appends (see :class:`LedgerEntry`): the entry's index,
the hash of the previous leaf, and the back-link to the previous event of the same patient.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from functools import lru_cache
from typing import Annotated, Any, Final

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

__all__ = [
    "Action",
    "Agent",
    "AuditEvent",
    "Code",
    "Entity",
    "EntityRole",
    "EntityType",
    "EventKind",
    "Outcome",
    "Reference",
    "Source",
    "format_instant",
    "unversioned",
]

# The grammars below admit no spaces, so no sentence, full name or street address fits. Some
# PHI does fit an id grammar, so values are also refused when they have the shape of an SSN,
# a phone number or an e-mail address anywhere in them, or are a calendar date as a whole.
_SSN_SHAPE: Final = re.compile(r"(?<![0-9])[0-9]{3}-[0-9]{2}-[0-9]{4}(?![0-9])")
_PHONE_SHAPE: Final = re.compile(r"(?<![0-9])[0-9]{3}[-.][0-9]{3}[-.][0-9]{4}(?![0-9])")
_EMAIL_SHAPE: Final = re.compile(r"[^@]@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$")
_DATE_SHAPE: Final = re.compile(
    r"[0-9]{4}[-/.][0-9]{1,2}[-/.][0-9]{1,2}|[0-9]{1,2}[-/.][0-9]{1,2}[-/.][0-9]{2,4}"
)


def _not_phi_shaped(value: str) -> str:
    _check_shape(value)
    return value


# Every event repeats the same codes, tenant, observer and subject: the verdict on a value is
# remembered (a refusal is not, so it is raised again each time). Pure and bounded.
@lru_cache(maxsize=16_384)
def _check_shape(value: str) -> None:
    if _SSN_SHAPE.search(value):
        raise ValueError("has the shape of a social security number")
    if _PHONE_SHAPE.search(value):
        raise ValueError("has the shape of a phone number")
    if _EMAIL_SHAPE.search(value):
        raise ValueError("has the shape of an e-mail address")
    if _DATE_SHAPE.fullmatch(value):
        raise ValueError("has the shape of a date")


def _reference_not_phi_shaped(value: str) -> str:
    # "Patient/<id>": the type is a name from FHIR, only the id can carry a value.
    _not_phi_shaped(value.split("/")[1])
    return value


# A code: letters, digits, dots, hyphens and underscores (FHIR codes such as "read", "TREAT",
# "BTG" or "110122", role names, reasons such as "expired-token").
Code = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"),
    AfterValidator(_not_phi_shaped),
]
# An opaque id: a user id, client id, request id, node id, grant id, tenant id.
OpaqueId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,127}$"),
    AfterValidator(_not_phi_shaped),
]
# A FHIR relative reference, optionally versioned: "Patient/123", "Observation/9/_history/2".
Reference = Annotated[
    str,
    StringConstraints(
        pattern=r"^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?$"
    ),
    AfterValidator(_reference_not_phi_shaped),
]


def unversioned(reference: str) -> str:
    """``"Patient/1/_history/2"`` -> ``"Patient/1"``: the resource a reference is about."""
    return "/".join(reference.split("/")[:2])


def _patient_reference(value: str) -> str:
    if not value.startswith("Patient/") or value != unversioned(value):
        raise ValueError('must be an unversioned Patient reference ("Patient/<id>")')
    return value


PatientReference = Annotated[Reference, AfterValidator(_patient_reference)]
# A keyed token (HMAC of an identifier or a query), base64url without padding.
KeyedToken = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]{16,128}$")]


@lru_cache(maxsize=4096)
def _network_address(value: str) -> str:
    # An IP address, normalized. Host names are refused: they can carry anything. (Clients
    # come back: the normalized form is remembered; a refusal is raised again each time.)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ValueError("must be an IPv4 or IPv6 address") from exc


NetworkAddress = Annotated[str, AfterValidator(_network_address)]


def _no_number_instant(value: object) -> object:
    # Pydantic would read a number as seconds since the epoch; a leaf says what it means.
    if isinstance(value, int | float):
        raise ValueError("must be a date-time with a time zone, not a number")
    return value


def _utc_instant(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("must carry a time zone")
    # Millisecond precision: FHIR instants and the canonical encoding agree on it.
    try:
        value = value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("is out of range in UTC") from exc
    return value.replace(microsecond=(value.microsecond // 1000) * 1000)


Instant = Annotated[datetime, BeforeValidator(_no_number_instant), AfterValidator(_utc_instant)]


def format_instant(value: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and ``Z``: the one textual form of time in leaves."""
    # isoformat, not strftime: it always pads years to four digits, and it is fast (this runs
    # on every append). Milliseconds are truncated, as the model's validator does.
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


class EventKind(StrEnum):
    """What kind of event (AuditEvent.type). The FHIR mapping names each one's coding."""

    REST = "rest"  # a FHIR RESTful interaction (subtype: read, vread, search, ...)
    LOGIN = "login"
    LOGOUT = "logout"
    BREAK_GLASS = "break-glass"  # subtype: grant, revoke, review, expire
    KEY_OPERATION = "key-operation"  # subtype: create, rotate, unseal, seal, shred, hold, ...
    EXPORT = "export"  # bulk export, evidence packs, patient access reports
    SECURITY_ALERT = "security-alert"  # failed authentication, replayed token, tampering seen
    ADMINISTRATION = "administration"  # policy, users, configuration changes
    LEDGER = "ledger"  # the ledger's own life: opened, torn tail cut, checkpoint issued


class Action(StrEnum):
    """AuditEvent.action: create, read, update, delete, execute."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(IntEnum):
    """AuditEvent.outcome: 0 success, 4 minor failure, 8 serious failure, 12 major failure."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class EntityType(StrEnum):
    """AuditEvent.entity.type (http://terminology.hl7.org/CodeSystem/audit-entity-type)."""

    PERSON = "1"
    SYSTEM_OBJECT = "2"
    ORGANIZATION = "3"
    OTHER = "4"


class EntityRole(StrEnum):
    """AuditEvent.entity.role (http://terminology.hl7.org/CodeSystem/object-role), as BALP uses."""

    PATIENT = "1"
    LOCATION = "2"
    REPORT = "3"
    DOMAIN_RESOURCE = "4"
    MASTER_FILE = "5"
    USER = "6"
    LIST = "7"
    DATA_REPOSITORY = "17"  # "9" is Subscriber in object-role
    SECURITY_RESOURCE = "13"
    QUERY = "24"
    JOB = "20"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


class Agent(_Model):
    """A participant: the user or system that acted (``requestor``), or one that took part."""

    who: OpaqueId | Reference  # "Practitioner/123", "user:alice", "client:loader"
    requestor: bool = True
    roles: tuple[Code, ...] = ()
    client_id: OpaqueId | None = None
    network_address: NetworkAddress | None = None
    purpose_of_use: tuple[Code, ...] = ()

    def _document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"who": self.who, "requestor": self.requestor}
        if self.roles:
            doc["roles"] = list(self.roles)
        if self.client_id is not None:
            doc["client_id"] = self.client_id
        if self.network_address is not None:
            doc["network_address"] = self.network_address
        if self.purpose_of_use:
            doc["purpose_of_use"] = list(self.purpose_of_use)
        return doc


class Source(_Model):
    """The phivault node that observed and recorded the event."""

    observer: OpaqueId
    site: OpaqueId | None = None

    def _document(self) -> dict[str, Any]:
        if self.site is None:
            return {"observer": self.observer}
        return {"observer": self.observer, "site": self.site}


class Entity(_Model):
    """What the event touched: a resource (with version), the patient, or a query by hash."""

    what: Reference | None = None
    type: EntityType = EntityType.SYSTEM_OBJECT
    role: EntityRole = EntityRole.DOMAIN_RESOURCE
    query_hash: KeyedToken | None = None  # keyed HMAC of the normalized query, never the query
    security_labels: tuple[Code, ...] = ()  # e.g. "REDACTED", "BTG"

    def _document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.what is not None:
            doc["what"] = self.what
        doc["type"] = str(self.type)  # a StrEnum's value; .value is a Python call
        doc["role"] = str(self.role)
        if self.query_hash is not None:
            doc["query_hash"] = self.query_hash
        if self.security_labels:
            doc["security_labels"] = list(self.security_labels)
        return doc

    @model_validator(mode="after")
    def _says_something(self) -> Entity:
        if self.what is None and self.query_hash is None:
            raise ValueError("an entity needs what it is (what) or the query's hash (query_hash)")
        if self.role is EntityRole.PATIENT and (
            self.what is None or not self.what.startswith("Patient/")
        ):
            raise ValueError("an entity in the patient role must reference a Patient")
        return self


class AuditEvent(_Model):
    """One audited event. Immutable; the ledger appends it as one leaf.

    ``patient`` is the patient the event concerns (``Patient/<id>``), if any: the ledger links
    every event of a patient to the previous one, so a patient's history is a chain.

    ``patient`` and the entities agree, as IHE BALP wants them to. When an event is built:

    * an entity in the patient role must reference ``patient`` (any version of it); one that
      references another patient is refused;
    * if ``patient`` is set and no entity has the patient role, the patient entity
      (``what=patient``, type Person, role Patient) is added;
    * if ``patient`` is not set, it is taken from the entities in the patient role, or else
      from the one Patient that entities reference; several patients leave it unset.
    """

    kind: EventKind
    subtype: Code
    action: Action
    recorded: Instant
    outcome: Outcome = Outcome.SUCCESS
    outcome_reason: Code | None = None
    tenant: OpaqueId
    patient: PatientReference | None = None
    agents: tuple[Agent, ...] = Field(min_length=1)
    source: Source
    entities: tuple[Entity, ...] = ()
    purpose_of_use: tuple[Code, ...] = ()
    request_id: OpaqueId | None = None
    break_glass_grant: OpaqueId | None = None

    @model_validator(mode="before")
    @classmethod
    def _patient_entity(cls, data: Any) -> Any:
        return _with_patient_entity(data)

    @classmethod
    def checked(
        cls,
        *,
        kind: EventKind,
        subtype: str,
        action: Action,
        recorded: datetime,
        outcome: Outcome = Outcome.SUCCESS,
        outcome_reason: str | None = None,
        tenant: str,
        patient: str | None = None,
        agents: tuple[Agent, ...],
        source: Source,
        entities: tuple[Entity, ...] = (),
        purpose_of_use: tuple[str, ...] = (),
        request_id: str | None = None,
        break_glass_grant: str | None = None,
    ) -> AuditEvent:
        """The event ``AuditEvent(...)`` builds from the same values, or the error it raises,
        built several times faster for the events the server assembles on every request.

        Every value is checked against the same grammars, the same PHI shapes and the same
        patient rules; the verdict on a value that repeats (a code, a tenant, a patient) is
        remembered, as the shape check already remembers it (a refusal is not). Agents,
        source and entities must already be models (validated when they were built). Any
        value this path does not take as it is, or that fails a check, goes through the
        model's own validation, which gives the same event or raises what it raises. A test
        holds the two to the same result on valid and invalid values."""
        values: dict[str, Any] = {
            "kind": kind,
            "subtype": subtype,
            "action": action,
            "recorded": recorded,
            "outcome": outcome,
            "outcome_reason": outcome_reason,
            "tenant": tenant,
            "patient": patient,
            "agents": agents,
            "source": source,
            "entities": entities,
            "purpose_of_use": purpose_of_use,
            "request_id": request_id,
            "break_glass_grant": break_glass_grant,
        }
        try:
            fields = _checked_fields(values)
        except ValueError:  # refused here: the model's validation says how
            fields = None
        if fields is None:
            return cls(**values)
        # What ``model_construct`` does for a model of this kind (no defaults left to fill,
        # no extra fields, no private attributes), without its per-field loop, which cost
        # as much as the checks above.
        event = cls.__new__(cls)
        _set = object.__setattr__  # the model is frozen
        _set(event, "__dict__", fields)
        _set(event, "__pydantic_fields_set__", set(fields))
        _set(event, "__pydantic_extra__", None)
        _set(event, "__pydantic_private__", None)
        return event

    def to_document(self) -> dict[str, Any]:
        """The JSON document the leaf encodes: no ``None``s, no floats, times as strings.

        Empty lists and absent values are left out, so that two events that mean the same
        thing encode to the same bytes. Built by hand rather than by ``model_dump``: it runs on
        every append, and this is several times faster (a test holds the two to the same
        output for any event).
        """
        doc: dict[str, Any] = {
            "kind": str(self.kind),  # StrEnums: str() is their value, in C
            "subtype": self.subtype,
            "action": str(self.action),
            "recorded": format_instant(self.recorded),
            "outcome": int(self.outcome),
        }
        if self.outcome_reason is not None:
            doc["outcome_reason"] = self.outcome_reason
        doc["tenant"] = self.tenant
        if self.patient is not None:
            doc["patient"] = self.patient
        doc["agents"] = [agent._document() for agent in self.agents]
        doc["source"] = self.source._document()
        if self.entities:
            doc["entities"] = [entity._document() for entity in self.entities]
        if self.purpose_of_use:
            doc["purpose_of_use"] = list(self.purpose_of_use)
        if self.request_id is not None:
            doc["request_id"] = self.request_id
        if self.break_glass_grant is not None:
            doc["break_glass_grant"] = self.break_glass_grant
        return doc

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> AuditEvent:
        """Parse a document produced by :meth:`to_document` (ledger fields must be removed)."""
        return cls.model_validate(doc)


@lru_cache(maxsize=4096)
def _patient_entity(patient: str) -> Entity:
    # Entities are immutable, and a patient's events repeat the same one.
    return Entity(what=patient, type=EntityType.PERSON, role=EntityRole.PATIENT)


def _with_patient_entity(data: Any) -> Any:
    """The patient and its entity filled in from each other (see :class:`AuditEvent`).
    Anything malformed is left for field validation to report."""
    if not isinstance(data, dict):
        return data
    raw_entities = data.get("entities", ())
    if not isinstance(raw_entities, list | tuple):
        return data
    entities: list[Entity] = []
    for raw in raw_entities:
        if isinstance(raw, Entity):
            entities.append(raw)
        elif isinstance(raw, dict):
            try:
                entities.append(Entity.model_validate(raw))
            except ValueError:
                return data
        else:
            return data
    patient = data.get("patient")
    in_role = {unversioned(e.what) for e in entities if e.what and e.role is EntityRole.PATIENT}
    if patient is None:
        referenced = {
            unversioned(e.what) for e in entities if e.what and e.what.startswith("Patient/")
        }
        candidates = in_role or referenced
        if len(candidates) != 1:
            return data  # no patient, or several: a search across patients
        patient = next(iter(candidates))
        data = {**data, "patient": patient}
    if not isinstance(patient, str):
        return data
    if in_role - {patient}:
        raise ValueError("an entity in the patient role references another patient")
    if not in_role:
        data = {**data, "entities": (*entities, _patient_entity(patient))}
    return data


def _remembered_check(annotation: Any) -> Callable[[str], bool]:
    """A check of a string against ``annotation``, its verdict on a value remembered: true
    when the value passes unchanged; a refusal raises (and is not remembered)."""
    adapter: TypeAdapter[str] = TypeAdapter(annotation)

    @lru_cache(maxsize=16_384)
    def passes(value: str) -> bool:
        return adapter.validate_python(value) == value

    return passes


_CODE_PASSES: Final = _remembered_check(Code)
_ID_PASSES: Final = _remembered_check(OpaqueId)
_PATIENT_PASSES: Final = _remembered_check(PatientReference)
_REQUEST_ID: Final[TypeAdapter[str]] = TypeAdapter(OpaqueId)  # one per request: not remembered


def _code(value: object) -> bool:
    return type(value) is str and _CODE_PASSES(value)


@lru_cache(maxsize=4096)
def _codes_pass(codes: tuple[object, ...]) -> bool:
    return all(map(_code, codes))


def _optional(passes: Callable[[str], bool], value: object) -> bool:
    return value is None or (type(value) is str and passes(value))


def _checked_fields(values: dict[str, Any]) -> dict[str, Any] | None:
    """``values`` as :class:`AuditEvent` would hold them, or None where only the model's
    own validation can tell (a value of another type, a model not yet built). Raises
    ValueError on a value the model refuses."""
    agents, entities, purposes = values["agents"], values["entities"], values["purpose_of_use"]
    recorded, request_id = values["recorded"], values["request_id"]
    if not (
        type(values["kind"]) is EventKind
        and type(values["action"]) is Action
        and type(values["outcome"]) is Outcome
        and type(recorded) is datetime
        and type(agents) is tuple
        and agents
        and all(type(agent) is Agent for agent in agents)
        and type(values["source"]) is Source
        and type(entities) is tuple
        and all(type(entity) is Entity for entity in entities)
        and type(purposes) is tuple
        and _codes_pass(purposes)
        and _code(values["subtype"])
        and _optional(_CODE_PASSES, values["outcome_reason"])
        and type(values["tenant"]) is str
        and _ID_PASSES(values["tenant"])
        and _optional(_ID_PASSES, values["break_glass_grant"])
        and (request_id is None or type(request_id) is str)
    ):
        return None
    if request_id is not None and _REQUEST_ID.validate_python(request_id) != request_id:
        return None
    patient = values["patient"]
    if patient is not None and all(entity.role is not EntityRole.PATIENT for entity in entities):
        # the usual case (a read, a search of one patient): the patient's entity is added
        if not (type(patient) is str and _PATIENT_PASSES(patient)):
            return None
        fields = {**values, "entities": (*entities, _patient_entity(patient))}
    else:
        fields = _with_patient_entity(values)
        if not _optional(_PATIENT_PASSES, fields["patient"]):
            return None
    if not (recorded.tzinfo is UTC and recorded.microsecond % 1000 == 0):  # else as it is
        fields["recorded"] = _utc_instant(recorded)
    return fields


LEDGER_FIELDS: Final = ("seq", "chain", "patient_prev")
