"""Search parameters and the index entries a resource produces for them.

Why: the records store answers FHIR searches from index rows, never by decrypting to filter.
This module says, for every supported resource type, which search parameters exist (FHIR R4
names and semantics), and turns a resource into typed :class:`IndexEntry` values. Whether an
entry is clear or blind is not chosen per parameter by hand: a parameter is **blind** exactly
when one of its element paths is classified ``direct-identifiers``
(:mod:`phivault.records.classification`), so the index can never hold in clear what the
classification calls an identifier. Blind entries hold only tokens made by an injected
callable (``BlindIndexer.tokens`` of :mod:`phivault.crypto`), never values.

Blind schemes (docs/decisions/records-search-index.md):

* strings (names, address parts): the normalized part (``name`` normalization) gets an
  ``exact`` token and ``prefix`` tokens for each of its first 2..N characters, so FHIR's
  default starts-with search is an equality on tokens;
* identifiers: ``system|value`` and the value alone (``identifier`` normalization);
* telecom: phone normalization when the value is a phone number, else case-folded;
* birth dates: one token per precision (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``): equality at
  the precision asked, no ranges.

Clear entries: tokens (system, code), dates as UTC ranges ``[low, high)`` with the precision
of the value, references as (type, id), and strings of directory resources (an
organization's name).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from phivault.crypto.blind_index import BlindToken, IndexField, Normalization, normalize
from phivault.errors import InvalidInput
from phivault.records.classification import (
    Classification,
    ElementGroup,
    default_classification,
)

__all__ = [
    "MIN_PREFIX",
    "BlindEntry",
    "BlindTokens",
    "DateEntry",
    "DateRange",
    "IndexEntry",
    "ParamType",
    "ReferenceEntry",
    "SearchParam",
    "StringEntry",
    "TokenEntry",
    "UnknownSearchParameter",
    "blind_lookup",
    "date_range",
    "index_entries",
    "known_parameter_names",
    "parse_reference",
    "patient_of",
    "search_param",
    "search_params",
]

#: Shortest name prefix that is indexed and may be searched (one character is refused).
MIN_PREFIX: Final = 2

#: ``BlindIndexer.tokens``: tokens of a value under every live index-key version.
BlindTokens = Callable[[IndexField, str], Sequence[BlindToken]]


class ParamType(StrEnum):
    TOKEN = "token"  # noqa: S105 (a FHIR parameter type, not a secret)
    STRING = "string"
    DATE = "date"
    REFERENCE = "reference"
    TELECOM = "telecom"  # a token over ContactPoint, kept apart for its normalization


class UnknownSearchParameter(InvalidInput):
    """The resource type has no such search parameter."""


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One search parameter of one resource type.

    ``paths`` are element paths (``name.family``, ``effective[x]``); ``targets`` limit a
    reference parameter to some types (``patient`` -> Patient); ``blind`` is derived from the
    classification; ``only`` keeps ContactPoints of one ``system`` (``phone``, ``email``).
    """

    resource_type: str
    name: str
    type: ParamType
    paths: tuple[str, ...]
    blind: bool = False
    targets: frozenset[str] = frozenset()
    only: str | None = None

    def field(self, variant: str | None = None) -> IndexField:
        """The blind-index field of this parameter (``Patient.name.prefix``)."""
        name = f"{self.resource_type}.{self.name}" + (f".{variant}" if variant else "")
        normalization = {
            ParamType.STRING: Normalization.NAME,
            ParamType.DATE: Normalization.DATE,
            ParamType.TOKEN: Normalization.IDENTIFIER,
            ParamType.TELECOM: Normalization.EXACT,
            ParamType.REFERENCE: Normalization.EXACT,
        }[self.type]
        return IndexField(name, normalization)


# --- index entries ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DateRange:
    """A FHIR date, dateTime, instant or Period as UTC instants ``[low, high)``; None is open."""

    low: datetime | None
    high: datetime | None


@dataclass(frozen=True, slots=True)
class TokenEntry:
    param: str
    system: str | None
    code: str


@dataclass(frozen=True, slots=True)
class StringEntry:
    """A clear string (directory resources only), normalized like names for starts-with."""

    param: str
    value: str


@dataclass(frozen=True, slots=True)
class DateEntry:
    param: str
    range: DateRange


@dataclass(frozen=True, slots=True)
class ReferenceEntry:
    param: str
    target_type: str
    target_id: str


@dataclass(frozen=True, slots=True)
class BlindEntry:
    """A blind token for ``param``; ``token.field`` says which variant (exact, prefix...)."""

    param: str
    token: BlindToken


IndexEntry = TokenEntry | StringEntry | DateEntry | ReferenceEntry | BlindEntry


# --- the parameter table ------------------------------------------------------------------

_T, _S, _D, _R, _C = (
    ParamType.TOKEN,
    ParamType.STRING,
    ParamType.DATE,
    ParamType.REFERENCE,
    ParamType.TELECOM,
)
_HUMAN_NAME = ("name",)
_P = tuple[str, ParamType, tuple[str, ...], tuple[str, ...], str | None]


def _p(
    name: str, kind: ParamType, *paths: str, targets: tuple[str, ...] = (), only: str | None = None
) -> _P:
    return (name, kind, paths, targets, only)


_PERSON: Final = (
    _p("identifier", _T, "identifier"),
    _p("name", _S, "name"),
    _p("family", _S, "name.family"),
    _p("given", _S, "name.given"),
    _p("gender", _T, "gender"),
    _p("birthdate", _D, "birthDate"),
    _p("telecom", _C, "telecom"),
    _p("phone", _C, "telecom", only="phone"),
    _p("email", _C, "telecom", only="email"),
    _p("address-city", _S, "address.city"),
    _p("address-state", _S, "address.state"),
    _p("address-postalcode", _S, "address.postalCode"),
)


def _clinical(
    subject: str, *extra: _P, date: str | None = None, encounter: str | None = None
) -> tuple[_P, ...]:
    rows = [
        _p("identifier", _T, "identifier"),
        _p("patient", _R, subject, targets=("Patient",)),
    ]
    if subject == "subject":
        rows.append(_p("subject", _R, "subject"))
    if date:
        rows.append(_p("date", _D, date))
    if encounter:
        rows.append(_p("encounter", _R, encounter, targets=("Encounter",)))
    return (*rows, *extra)


_TABLE: Final[Mapping[str, tuple[_P, ...]]] = {
    "Patient": (
        *_PERSON,
        _p("general-practitioner", _R, "generalPractitioner"),
        _p("organization", _R, "managingOrganization", targets=("Organization",)),
        _p("active", _T, "active"),
    ),
    "Practitioner": (*_PERSON, _p("active", _T, "active")),
    "PractitionerRole": (
        _p("identifier", _T, "identifier"),
        _p("practitioner", _R, "practitioner", targets=("Practitioner",)),
        _p("organization", _R, "organization", targets=("Organization",)),
        _p("location", _R, "location", targets=("Location",)),
        _p("role", _T, "code"),
        _p("specialty", _T, "specialty"),
    ),
    "Organization": (
        _p("identifier", _T, "identifier"),
        _p("name", _S, "name", "alias"),
        _p("type", _T, "type"),
        _p("active", _T, "active"),
        _p("partof", _R, "partOf", targets=("Organization",)),
        _p("address-city", _S, "address.city"),
    ),
    "Location": (
        _p("identifier", _T, "identifier"),
        _p("name", _S, "name", "alias"),
        _p("status", _T, "status"),
        _p("type", _T, "type"),
        _p("organization", _R, "managingOrganization", targets=("Organization",)),
        _p("address-city", _S, "address.city"),
    ),
    "Encounter": _clinical(
        "subject",
        _p("status", _T, "status"),
        _p("class", _T, "class"),
        _p("type", _T, "type"),
        _p("participant", _R, "participant.individual"),
        _p("practitioner", _R, "participant.individual", targets=("Practitioner",)),
        _p("location", _R, "location.location", targets=("Location",)),
        _p("service-provider", _R, "serviceProvider", targets=("Organization",)),
        _p("reason-code", _T, "reasonCode"),
        date="period",
    ),
    "Observation": _clinical(
        "subject",
        _p("code", _T, "code"),
        _p("category", _T, "category"),
        _p("status", _T, "status"),
        _p("performer", _R, "performer"),
        _p("value-concept", _T, "valueCodeableConcept"),
        date="effective[x]",
        encounter="encounter",
    ),
    "Condition": _clinical(
        "subject",
        _p("code", _T, "code"),
        _p("category", _T, "category"),
        _p("clinical-status", _T, "clinicalStatus"),
        _p("verification-status", _T, "verificationStatus"),
        _p("onset-date", _D, "onset[x]"),
        _p("abatement-date", _D, "abatement[x]"),
        _p("recorded-date", _D, "recordedDate"),
        encounter="encounter",
    ),
    "Procedure": _clinical(
        "subject",
        _p("code", _T, "code"),
        _p("category", _T, "category"),
        _p("status", _T, "status"),
        _p("location", _R, "location", targets=("Location",)),
        _p("reason-code", _T, "reasonCode"),
        date="performed[x]",
        encounter="encounter",
    ),
    "DiagnosticReport": _clinical(
        "subject",
        _p("code", _T, "code"),
        _p("category", _T, "category"),
        _p("status", _T, "status"),
        _p("issued", _D, "issued"),
        _p("performer", _R, "performer"),
        _p("result", _R, "result", targets=("Observation",)),
        date="effective[x]",
        encounter="encounter",
    ),
    "DocumentReference": _clinical(
        "subject",
        _p("type", _T, "type"),
        _p("category", _T, "category"),
        _p("status", _T, "status"),
        _p("author", _R, "author"),
        _p("custodian", _R, "custodian", targets=("Organization",)),
        _p("period", _D, "context.period"),
        date="date",
        encounter="context.encounter",
    ),
    "MedicationRequest": _clinical(
        "subject",
        _p("code", _T, "medicationCodeableConcept"),
        _p("medication", _R, "medicationReference", targets=("Medication",)),
        _p("status", _T, "status"),
        _p("intent", _T, "intent"),
        _p("category", _T, "category"),
        _p("authoredon", _D, "authoredOn"),
        _p("requester", _R, "requester"),
        encounter="encounter",
    ),
    "MedicationAdministration": _clinical(
        "subject",
        _p("code", _T, "medicationCodeableConcept"),
        _p("medication", _R, "medicationReference", targets=("Medication",)),
        _p("status", _T, "status"),
        _p("effective-time", _D, "effective[x]"),
        _p("context", _R, "context"),
        encounter="context",
    ),
    "Medication": (
        _p("identifier", _T, "identifier"),
        _p("code", _T, "code"),
        _p("status", _T, "status"),
    ),
    "Immunization": _clinical(
        "patient",
        _p("vaccine-code", _T, "vaccineCode"),
        _p("status", _T, "status"),
        _p("location", _R, "location", targets=("Location",)),
        date="occurrence[x]",
        encounter="encounter",
    ),
    "AllergyIntolerance": _clinical(
        "patient",
        _p("code", _T, "code"),
        _p("category", _T, "category"),
        _p("clinical-status", _T, "clinicalStatus"),
        _p("verification-status", _T, "verificationStatus"),
        _p("criticality", _T, "criticality"),
        _p("type", _T, "type"),
        date="recordedDate",
        encounter="encounter",
    ),
    "CarePlan": _clinical(
        "subject",
        _p("category", _T, "category"),
        _p("status", _T, "status"),
        _p("intent", _T, "intent"),
        _p("care-team", _R, "careTeam", targets=("CareTeam",)),
        date="period",
        encounter="encounter",
    ),
    "CareTeam": _clinical(
        "subject",
        _p("category", _T, "category"),
        _p("status", _T, "status"),
        _p("participant", _R, "participant.member"),
        date="period",
        encounter="encounter",
    ),
    "Goal": _clinical(
        "subject",
        _p("lifecycle-status", _T, "lifecycleStatus"),
        _p("achievement-status", _T, "achievementStatus"),
        _p("category", _T, "category"),
    ),
    "Claim": _clinical(
        "patient",
        _p("status", _T, "status"),
        _p("use", _T, "use"),
        _p("created", _D, "created"),
        _p("provider", _R, "provider"),
        _p("facility", _R, "facility", targets=("Location",)),
        encounter="item.encounter",
    ),
    "ExplanationOfBenefit": _clinical(
        "patient",
        _p("status", _T, "status"),
        _p("created", _D, "created"),
        _p("claim", _R, "claim", targets=("Claim",)),
        _p("provider", _R, "provider"),
        _p("facility", _R, "facility", targets=("Location",)),
        encounter="item.encounter",
    ),
    "Device": _clinical(
        "patient",
        _p("status", _T, "status"),
        _p("type", _T, "type"),
    ),
    "ImagingStudy": _clinical(
        "subject",
        _p("status", _T, "status"),
        _p("started", _D, "started"),
        _p("modality", _T, "series.modality"),
        encounter="encounter",
    ),
    "SupplyDelivery": _clinical("patient", _p("status", _T, "status")),
    "Provenance": (
        _p("target", _R, "target"),
        _p("patient", _R, "target", targets=("Patient",)),
        _p("recorded", _D, "recorded"),
        _p("agent", _R, "agent.who"),
    ),
}

_COMMON: Final = (("_id", ParamType.TOKEN), ("_lastUpdated", ParamType.DATE))


def _is_blind(table: Classification, resource_type: str, paths: tuple[str, ...]) -> bool:
    return any(
        table.group_of_path(resource_type, path) is ElementGroup.DIRECT_IDENTIFIERS
        for path in paths
    )


@functools.cache
def _params() -> Mapping[str, Mapping[str, SearchParam]]:
    table = default_classification()
    out: dict[str, Mapping[str, SearchParam]] = {}
    for resource_type, rows in _TABLE.items():
        params = {name: SearchParam(resource_type, name, kind, ()) for name, kind in _COMMON}
        for name, kind, paths, targets, only in rows:
            params[name] = SearchParam(
                resource_type,
                name,
                kind,
                paths,
                blind=_is_blind(table, resource_type, paths),
                targets=frozenset(targets),
                only=only,
            )
        out[resource_type] = MappingProxyType(params)
    return MappingProxyType(out)


def search_params(resource_type: str) -> Mapping[str, SearchParam]:
    """Every search parameter of ``resource_type`` (including ``_id`` and ``_lastUpdated``)."""
    found = _params().get(resource_type)
    if found is None:
        raise UnknownSearchParameter("resource type has no search parameters", path=resource_type)
    return found


@functools.cache
def known_parameter_names() -> frozenset[str]:
    """Every search parameter name of every type (for messages that may name a parameter)."""
    return frozenset(name for table in _params().values() for name in table)


def search_param(resource_type: str, name: str) -> SearchParam:
    param = search_params(resource_type).get(name)
    if param is None:
        raise UnknownSearchParameter("unknown search parameter", path=name)
    return param


# --- value extraction ---------------------------------------------------------------------


def _values(node: Any, parts: Sequence[str]) -> Iterator[Any]:
    """Every value at ``parts`` under ``node``, through lists; ``x[x]`` matches choices."""
    if isinstance(node, list):
        for item in node:
            yield from _values(item, parts)
        return
    if not parts:
        if node is not None:
            yield node
        return
    if not isinstance(node, dict):
        return
    head = parts[0]
    if head.endswith("[x]"):
        base = head[:-3]
        for key, value in node.items():
            if key.startswith(base) and len(key) > len(base) and key[len(base)].isupper():
                yield from _values(value, parts[1:])
    elif head in node:
        yield from _values(node[head], parts[1:])


def _collect(node: Any, parts: tuple[str, ...], at: int, out: list[Any]) -> None:
    """:func:`_values` of ``parts[at:]`` appended to ``out`` (the same values, in the same
    order, without a generator per level)."""
    if isinstance(node, list):
        for item in node:
            _collect(item, parts, at, out)
        return
    if at == len(parts):
        if node is not None:
            out.append(node)
        return
    if not isinstance(node, dict):
        return
    head = parts[at]
    if head.endswith("[x]"):
        base = head[:-3]
        size = len(base)
        for key, value in node.items():
            if key.startswith(base) and len(key) > size and key[size].isupper():
                _collect(value, parts, at + 1, out)
    elif head in node:
        _collect(node[head], parts, at + 1, out)


def _tokens_of(value: Any) -> Iterator[tuple[str | None, str]]:
    """(system, code) pairs of a code, Coding, CodeableConcept, Identifier or boolean."""
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if "coding" in value:
            for coding in value.get("coding") or ():
                yield from _tokens_of(coding)
        elif isinstance(value.get("code"), str):
            yield value.get("system"), value["code"]
        elif isinstance(value.get("value"), str):  # Identifier
            yield value.get("system"), value["value"]


_NAME_PARTS: Final = ("text", "family", "given", "prefix", "suffix")


def _strings_of(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # HumanName (address parts are addressed by path)
        for part in _NAME_PARTS:
            item = value.get(part)
            for text in item if isinstance(item, list) else [item]:
                if isinstance(text, str):
                    yield text


_DATE_RE: Final = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def date_range(value: str, *, path: str = "date") -> DateRange:
    """The UTC range a FHIR date, dateTime or instant covers, at its precision.

    ``2015`` is all of 2015; ``2015-11-13T14:25:45+05:30`` is that second. Dates without a
    time zone (and dates alone) are taken as UTC. Raises :class:`InvalidInput` naming ``path``.
    """
    if not isinstance(value, str):
        raise InvalidInput("not a FHIR date, dateTime or instant", path=path)
    # Remembered (every entry of a bundle carries the same meta.lastUpdated, and clinical
    # dates repeat within a patient), but only for values of a date's size: a long string
    # in the cache would hold memory for nothing.
    found = _remembered_date_range(value) if len(value) <= 64 else _date_range(value)
    if isinstance(found, DateRange):
        return found
    raise InvalidInput(found, path=path)


def _date_range(value: str) -> DateRange | str:
    """:func:`date_range`'s answer, or why it has none."""
    match = _DATE_RE.match(value.strip())
    if match is None:
        return "not a FHIR date, dateTime or instant"
    g = match.groupdict()
    try:
        tz = UTC
        if g["tz"] and g["tz"] != "Z":
            sign = 1 if g["tz"][0] == "+" else -1
            hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
            tz_offset = timedelta(hours=hours, minutes=minutes) * sign
        else:
            tz_offset = timedelta(0)
        year = int(g["y"])
        if g["m"] is None:
            low = datetime(year, 1, 1, tzinfo=tz)
            return DateRange(low, datetime(year + 1, 1, 1, tzinfo=tz))
        month = int(g["m"])
        if g["d"] is None:
            low = datetime(year, month, 1, tzinfo=tz)
            high = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=tz)
            return DateRange(low, high)
        day = int(g["d"])
        if g["H"] is None:
            low = datetime(year, month, day, tzinfo=tz)
            return DateRange(low, low + timedelta(days=1))
        second = int(g["S"] or 0)
        fraction = g["f"] or ""
        micro = int((fraction + "000000")[:6]) if fraction else 0
        local = datetime(year, month, day, int(g["H"]), int(g["M"]), second, micro, tzinfo=tz)
        low = local - tz_offset
        if fraction:
            step = timedelta(microseconds=max(1, 10 ** (6 - min(len(fraction), 6))))
        elif g["S"] is not None:
            step = timedelta(seconds=1)
        else:
            step = timedelta(minutes=1)
        return DateRange(low, low + step)
    except (ValueError, OverflowError):
        return "not a valid calendar date or time"


_remembered_date_range: Final = functools.lru_cache(maxsize=4096)(_date_range)


def _dates_of(value: Any, path: str) -> Iterator[DateRange]:
    if isinstance(value, str):
        yield date_range(value, path=path)
    elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        start = date_range(value["start"], path=f"{path}.start") if "start" in value else None
        end = date_range(value["end"], path=f"{path}.end") if "end" in value else None
        yield DateRange(start.low if start else None, end.high if end else None)


_LITERAL_RE: Final = re.compile(
    r"^(?:.*/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$"
)


def parse_reference(reference: str, *, path: str = "reference") -> tuple[str, str] | None:
    """(type, id) of a literal reference, relative or absolute; None for a local ``#id``.

    ``urn:uuid:`` and conditional references (``Type?...``) must have been resolved by the
    transaction planner before indexing: they raise :class:`InvalidInput` naming ``path``.
    """
    if reference.startswith("#"):
        return None
    if reference.startswith(("urn:uuid:", "urn:oid:")) or "?" in reference:
        raise InvalidInput("reference is not resolved to a stored resource", path=path)
    match = _LITERAL_RE.match(reference)
    if match is None:
        raise InvalidInput("not a literal reference (Type/id)", path=path)
    return match.group("type"), match.group("id")


def _telecom_value(value: str) -> str:
    """Phone numbers in E.164 style when they parse as one; anything else case-folded."""
    try:
        return normalize(Normalization.PHONE, value)
    except InvalidInput:
        folded = unicodedata.normalize("NFKC", value).strip().casefold()
        if not folded:
            raise
        return folded


def _name_prefixes(value: str) -> tuple[str, set[str]]:
    exact = normalize(Normalization.NAME, value)
    prefixes = {exact[:k].rstrip() for k in range(MIN_PREFIX, len(exact) + 1)}
    prefixes = {p for p in prefixes if len(p) >= MIN_PREFIX}
    if len(exact) < MIN_PREFIX:
        prefixes.add(exact)
    return exact, prefixes


def _date_precisions(value: str) -> list[str]:
    normalized = normalize(Normalization.DATE, value)
    parts = normalized.split("-")
    return ["-".join(parts[: k + 1]) for k in range(len(parts))]


# --- entries -----------------------------------------------------------------------------


def _blind(param: SearchParam, value: str, tokens: BlindTokens) -> Iterator[BlindEntry]:
    if param.type is ParamType.STRING:
        exact, prefixes = _name_prefixes(value)
        for token in tokens(param.field("exact"), exact):
            yield BlindEntry(param.name, token)
        for prefix in sorted(prefixes):
            for token in tokens(param.field("prefix"), prefix):
                yield BlindEntry(param.name, token)
    elif param.type is ParamType.DATE:
        for precision in _date_precisions(value):
            for token in tokens(param.field(), precision):
                yield BlindEntry(param.name, token)
    elif param.type is ParamType.TELECOM:
        for token in tokens(param.field(), _telecom_value(value)):
            yield BlindEntry(param.name, token)
    else:
        raise InvalidInput("blind parameter of an unexpected type", path=param.name)


def _searchable(normalization: Normalization, text: str) -> bool:
    """Whether ``text`` has anything left to search for after normalization."""
    try:
        normalize(normalization, text)
    except InvalidInput:
        return False
    return True


def _blind_identifier(
    param: SearchParam, system: str | None, value: str, tokens: BlindTokens
) -> Iterator[BlindEntry]:
    for token in tokens(param.field(), f"{system or ''}|{value}"):
        yield BlindEntry(param.name, token)
    for token in tokens(param.field("value"), value):
        yield BlindEntry(param.name, token)


def index_entries(resource: Mapping[str, Any], blind_tokens: BlindTokens) -> list[IndexEntry]:
    """Every index entry ``resource`` produces, in parameter order, without duplicates.

    ``_id`` and ``_lastUpdated`` have none: every search of them runs on the resource's head
    row (``rec_resources``: ``resource_id``, ``last_updated``; ``store/search.py``), so rows
    for them were written on every write and never read (two of a create's eight).

    ``blind_tokens`` is ``BlindIndexer.tokens`` of the resource's tenant (or a test double).
    References must be resolved (no ``urn:uuid:``, no conditional reference). Raises
    :class:`InvalidInput` naming the element path for malformed values.
    """
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise InvalidInput("must be a string", path="resourceType")
    plan = _index_plan(resource_type)
    found: list[IndexEntry] = []
    values: list[Any] = []
    previous: SearchParam | None = None
    start = 0  # where the entries of ``previous`` begin in ``found``
    for param, parts, where, top in plan:
        if param is not previous:
            # Entries of different parameters differ (their ``param``), so repeats are looked
            # for within one parameter's entries, and only when it has several: most have
            # one, and a frozen dataclass hashes in Python.
            if len(found) - start > 1:
                found[start:] = dict.fromkeys(found[start:])
            previous, start = param, len(found)
        values.clear()
        if top is not None:  # a top-level element (no choice, no nesting): no walk
            value = resource.get(top)
            if value is None:
                continue
            if isinstance(value, list):
                _collect(value, parts, 1, values)
            else:
                values.append(value)
        else:
            _collect(resource, parts, 0, values)
        kind = param.type
        for value in values:
            # The two most common kinds inline (as _entries has them), the others there.
            if kind is ParamType.REFERENCE:
                if isinstance(value, dict):
                    reference = value.get("reference")
                    if isinstance(reference, str):
                        target = parse_reference(reference, path=f"{where}.reference")
                        if target is not None and (not param.targets or target[0] in param.targets):
                            found.append(ReferenceEntry(param.name, target[0], target[1]))
            elif kind is ParamType.TOKEN and not param.blind:
                for system, code in _tokens_of(value):
                    found.append(TokenEntry(param.name, system, code))
            else:
                found.extend(_entries(param, value, where, blind_tokens))
    if len(found) - start > 1:
        found[start:] = dict.fromkeys(found[start:])
    return found  # without repeats, in the order first found


@functools.cache
def _index_plan(
    resource_type: str,
) -> tuple[tuple[SearchParam, tuple[str, ...], str, str | None], ...]:
    """Each (parameter, element path split into parts, the path named in errors, the element
    name if the path is one top-level element without a choice) of a type, in parameter
    order (a parameter's paths next to each other): worked out once per type."""
    return tuple(
        (
            param,
            tuple(path.split(".")),
            f"{resource_type}.{path}",
            path if "." not in path and not path.endswith("[x]") else None,
        )
        for param in search_params(resource_type).values()
        for path in param.paths
    )


def _entries(
    param: SearchParam, value: Any, where: str, tokens: BlindTokens
) -> Iterator[IndexEntry]:
    kind = param.type
    if kind is ParamType.REFERENCE:
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            target = parse_reference(value["reference"], path=f"{where}.reference")
            if target is not None and (not param.targets or target[0] in param.targets):
                yield ReferenceEntry(param.name, *target)
    elif kind is ParamType.DATE:
        if param.blind:
            if isinstance(value, str):
                try:
                    entries = list(_blind(param, value, tokens))
                except InvalidInput:
                    raise InvalidInput("not a FHIR date", path=where) from None
                yield from entries
        else:
            for date in _dates_of(value, where):
                yield DateEntry(param.name, date)
    elif kind is ParamType.TELECOM:
        if (
            isinstance(value, dict)
            and isinstance(value.get("value"), str)
            and (param.only is None or value.get("system") == param.only)
            and value["value"].strip()
        ):
            yield from _blind(param, value["value"], tokens)
    elif kind is ParamType.STRING:
        for text in _strings_of(value):
            if not _searchable(Normalization.NAME, text):
                continue  # nothing to search for in "-" or "."
            if param.blind:
                yield from _blind(param, text, tokens)
            else:
                yield StringEntry(param.name, normalize(Normalization.NAME, text))
    else:
        for system, code in _tokens_of(value):
            if param.blind:
                if _searchable(Normalization.IDENTIFIER, code):
                    yield from _blind_identifier(param, system, code, tokens)
            else:
                yield TokenEntry(param.name, system, code)


def patient_of(resource: Mapping[str, Any]) -> str | None:
    """The id of the patient whose data key seals ``resource``: the Patient's own id, or the
    target of its ``patient`` search parameter; None for resources of no patient
    (Practitioner, Organization, Location, PractitionerRole, Medication).

    References must be resolved. Raises :class:`InvalidInput` if the resource names several
    patients (one resource, one data key) or is a Patient without an id.
    """
    resource_type = resource.get("resourceType")
    if resource_type == "Patient":
        the_id = resource.get("id")
        if not isinstance(the_id, str):
            raise InvalidInput("a Patient needs an id", path="Patient.id")
        return the_id
    if not isinstance(resource_type, str):
        raise InvalidInput("must be a string", path="resourceType")
    param = search_params(resource_type).get("patient")
    if param is None:
        return None
    found: set[str] = set()
    for path in param.paths:
        where = f"{resource_type}.{path}"
        for value in _values(resource, path.split(".")):
            if isinstance(value, dict) and isinstance(value.get("reference"), str):
                target = parse_reference(value["reference"], path=f"{where}.reference")
                if target is not None and target[0] == "Patient":
                    found.add(target[1])
    if len(found) > 1:
        raise InvalidInput("refers to more than one patient", path=f"{resource_type}.patient")
    return next(iter(found), None)


def blind_lookup(
    param: SearchParam, value: str, *, modifier: str | None = None
) -> tuple[IndexField, str]:
    """The (field, value) to hand to ``BlindIndexer.tokens`` to search ``param`` for ``value``.

    Strings: starts-with by default (the ``prefix`` field), ``:exact`` on the whole part.
    Tokens: ``system|value``, ``|value`` (no system) or ``value`` (any system). Dates: equality
    at the precision given. Raises :class:`InvalidInput` naming the parameter for values too
    short or not valid, and for modifiers a blind index cannot answer.
    """
    if not param.blind:
        raise InvalidInput("not a blind-indexed parameter", path=param.name)
    if param.type is ParamType.STRING:
        if modifier not in (None, "exact"):
            raise InvalidInput("modifier not supported on a blind-indexed string", path=param.name)
        normalized = normalize(Normalization.NAME, value)
        if modifier == "exact":
            return param.field("exact"), normalized
        if len(normalized) < MIN_PREFIX:
            raise InvalidInput(
                f"search value must have at least {MIN_PREFIX} characters", path=param.name
            )
        return param.field("prefix"), normalized
    if modifier is not None:
        raise InvalidInput("modifier not supported on a blind-indexed parameter", path=param.name)
    if param.type is ParamType.DATE:
        return param.field(), normalize(Normalization.DATE, value)
    if param.type is ParamType.TELECOM:
        return param.field(), _telecom_value(value.split("|", 1)[-1])
    if "|" in value:
        return param.field(), value
    return param.field("value"), value
