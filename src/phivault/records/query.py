"""FHIR search queries: parsed into a typed query, or refused with a precise error.

Why: a search is authorized and compiled to index lookups by the storage layer; it must get a
query whose every part is known and valid, so that nothing the client sent is guessed at or
silently dropped (an ignored filter would return *more* PHI than asked for). Errors name the
parameter, never the value (a search value is often PHI: a name, an SSN, a birth date), and
a parameter name that does not look like one is not echoed either.

Supported (FHIR R4 semantics): the parameters of :mod:`phivault.records.search_params`;
comma-separated values (OR) with ``\\,`` ``\\|`` ``\\$`` ``\\\\`` escapes; repeated
parameters (AND); token ``system|code``, ``|code``, ``code`` and ``:not``; string
``:exact`` (and ``:contains`` on clear strings); reference ``Type/id``, ``id``, absolute URLs
and ``:Type``; date prefixes ``eq ne gt lt ge le sa eb ap``; ``_count`` (capped at
:data:`MAX_COUNT`), ``_sort`` on ``date``/``_lastUpdated`` (``-`` for descending),
``_include`` of ``patient``/``subject``, ``_total``. Unknown parameters raise
:class:`UnknownSearchParameter` unless ``lenient`` (``Prefer: handling=lenient``), which
ignores them and reports their count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal
from urllib.parse import parse_qsl

from phivault.crypto.blind_index import IndexField
from phivault.errors import InvalidInput
from phivault.records.search_params import (
    DateRange,
    ParamType,
    SearchParam,
    UnknownSearchParameter,
    blind_lookup,
    date_range,
    known_parameter_names,
    search_params,
)

__all__ = [
    "DEFAULT_COUNT",
    "MAX_COUNT",
    "Criterion",
    "DateValue",
    "Include",
    "InvalidSearch",
    "Prefix",
    "ReferenceValue",
    "SearchQuery",
    "SortKey",
    "StringValue",
    "TokenValue",
    "UnknownSearchParameter",
    "UnsupportedSearch",
    "parse_search",
]

DEFAULT_COUNT: Final = 50
MAX_COUNT: Final = 1000
MAX_VALUES: Final = 100
MAX_PARAMETERS: Final = 64
MAX_VALUE_LENGTH: Final = 2048

_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.:]{0,63}$")
_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE_RE: Final = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_TOTALS: Final[dict[str, Literal["none", "estimate", "accurate"]]] = {
    "none": "none",
    "estimate": "estimate",
    "accurate": "accurate",
}
#: Result and format parameters this parser takes (or lets the HTTP layer take).
_IGNORED_HTTP: Final = frozenset({"_format", "_pretty"})


class InvalidSearch(InvalidInput):
    """A search parameter's value is malformed. ``path`` is the parameter name."""


class UnsupportedSearch(InvalidInput):
    """A valid FHIR search feature phivault does not support (a modifier, chaining, ...)."""


class Prefix(StrEnum):
    EQ = "eq"
    NE = "ne"
    GT = "gt"
    LT = "lt"
    GE = "ge"
    LE = "le"
    SA = "sa"
    EB = "eb"
    AP = "ap"


@dataclass(frozen=True, slots=True)
class TokenValue:
    """``system|code`` (system given), ``|code`` (system ``""``: none) or ``code`` (None: any)."""

    system: str | None
    code: str


@dataclass(frozen=True, slots=True)
class StringValue:
    value: str


@dataclass(frozen=True, slots=True)
class DateValue:
    prefix: Prefix
    range: DateRange
    text: str  # the date as given, for blind lookups at its precision


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    target_type: str | None
    target_id: str


Value = TokenValue | StringValue | DateValue | ReferenceValue


@dataclass(frozen=True, slots=True)
class Criterion:
    """One parameter occurrence: any of ``values`` matches (OR). Criteria are ANDed."""

    param: SearchParam
    modifier: str | None
    values: tuple[Value, ...]

    @property
    def blind(self) -> bool:
        return self.param.blind


@dataclass(frozen=True, slots=True)
class SortKey:
    param: str
    descending: bool


@dataclass(frozen=True, slots=True)
class Include:
    """``_include=Type:param[:Target]``: add the resources ``param`` of each match refers to."""

    source_type: str
    param: str
    target_type: str | None


@dataclass(frozen=True, slots=True)
class SearchQuery:
    resource_type: str
    criteria: tuple[Criterion, ...]
    count: int = DEFAULT_COUNT
    sort: tuple[SortKey, ...] = ()
    includes: tuple[Include, ...] = ()
    total: Literal["none", "estimate", "accurate"] | None = None
    ignored: int = 0  # unknown parameters ignored under lenient handling

    def blind_lookups(self) -> list[tuple[Criterion, list[tuple[IndexField, str]]]]:
        """For blind criteria, the (field, normalized value) of each value, to tokenize."""
        out: list[tuple[Criterion, list[tuple[IndexField, str]]]] = []
        for criterion in self.criteria:
            if criterion.blind:
                pairs: list[tuple[IndexField, str]] = []
                for value in criterion.values:
                    pairs.append(_blind_pair(criterion, value))
                out.append((criterion, pairs))
        return out


def _blind_pair(criterion: Criterion, value: Value) -> tuple[IndexField, str]:
    param = criterion.param
    if isinstance(value, StringValue):
        text = value.value
    elif isinstance(value, DateValue):
        text = value.text
    elif isinstance(value, TokenValue):
        text = value.code if value.system is None else f"{value.system}|{value.code}"
    else:
        raise InvalidSearch("not a blind-indexed value", path=param.name)
    return blind_lookup(param, text, modifier=criterion.modifier)


def _label(name: str) -> str:
    """The parameter name for an error message, or a neutral word if it is not a name."""
    # Only a name FHIR defines is repeated: an unknown one could be anything the caller
    # typed (a patient's name as a parameter name), and errors never echo input.
    base = name.partition(":")[0].partition(".")[0]
    known = base.startswith("_") or base in known_parameter_names()
    return name if known and _NAME_RE.match(name) else "(parameter)"


def _split_values(raw: str, name: str) -> list[str]:
    """Split on unescaped commas; keep other escapes for the value parser."""
    values: list[str] = []
    current: list[str] = []
    chars = iter(raw)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise InvalidSearch("dangling escape in value", path=name)
            current.append(nxt if nxt == "," else "\\" + nxt)
        elif ch == ",":
            values.append("".join(current))
            current = []
        else:
            current.append(ch)
    values.append("".join(current))
    if any(v == "" for v in values):
        raise InvalidSearch("empty value", path=name)
    if len(values) > MAX_VALUES:
        raise InvalidSearch(f"more than {MAX_VALUES} values", path=name)
    return values


def _unescape(value: str, name: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, None)
            if nxt not in ("|", "$", "\\", ","):
                raise InvalidSearch("unknown escape in value", path=name)
            out.append(nxt)
        else:
            out.append(ch)
    return "".join(out)


def _split_pipe(value: str) -> tuple[str, str] | None:
    """Split ``system|code`` on the first unescaped ``|``."""
    index = 0
    while index < len(value):
        if value[index] == "\\":
            index += 2
            continue
        if value[index] == "|":
            return value[:index], value[index + 1 :]
        index += 1
    return None


def _token(value: str, name: str) -> TokenValue:
    parts = _split_pipe(value)
    if parts is None:
        return TokenValue(None, _unescape(value, name))
    system, code = (_unescape(p, name) for p in parts)
    if not code:
        raise InvalidSearch("a token needs a code after '|'", path=name)
    return TokenValue(system, code)


def _date(value: str, param: SearchParam, name: str) -> DateValue:
    prefix = Prefix.EQ
    if len(value) >= 2 and value[:2] in Prefix.__members__.values():
        prefix, value = Prefix(value[:2]), value[2:]
    try:
        rng = date_range(value, path=name)
    except InvalidInput as exc:
        raise InvalidSearch("not a FHIR date, dateTime or instant", path=name) from exc
    if param.blind and prefix is not Prefix.EQ:
        raise UnsupportedSearch("only equality is supported on this date", path=name)
    return DateValue(prefix, rng, value)


def _reference(value: str, modifier: str | None, param: SearchParam, name: str) -> ReferenceValue:
    value = _unescape(value, name)
    target_type = modifier
    if "/" in value:
        parts = value.rstrip("/").split("/")
        if len(parts) < 2 or not _TYPE_RE.match(parts[-2]):
            raise InvalidSearch("not a reference (Type/id, id or an absolute URL)", path=name)
        if target_type is not None and target_type != parts[-2]:
            raise InvalidSearch("reference type does not match the modifier", path=name)
        target_type, target_id = parts[-2], parts[-1]
    else:
        target_id = value
    if not _ID_RE.match(target_id):
        raise InvalidSearch("not a resource id", path=name)
    if param.targets and target_type is not None and target_type not in param.targets:
        raise InvalidSearch("reference type is not allowed for this parameter", path=name)
    if target_type is None and len(param.targets) == 1:
        (target_type,) = param.targets
    return ReferenceValue(target_type, target_id)


def _modifier(param: SearchParam, modifier: str | None, name: str) -> str | None:
    if modifier is None:
        return None
    kind = param.type
    allowed: set[str] = set()
    if kind is ParamType.STRING:
        allowed = {"exact"} if param.blind else {"exact", "contains"}
    elif kind is ParamType.TOKEN and not param.blind and param.name != "_id":
        allowed = {"not"}
    elif kind is ParamType.REFERENCE and _TYPE_RE.match(modifier):
        return modifier
    if modifier not in allowed:
        raise UnsupportedSearch("modifier is not supported on this parameter", path=name)
    return modifier


def _criterion(param: SearchParam, modifier: str | None, raw: str, name: str) -> Criterion:
    modifier = _modifier(param, modifier, name)
    values: list[Value] = []
    for value in _split_values(raw, name):
        if param.type in (ParamType.TOKEN, ParamType.TELECOM):
            token = _token(value, name)
            if param.name == "_id" and (token.system is not None or not _ID_RE.match(token.code)):
                raise InvalidSearch("not a resource id", path=name)
            values.append(token)
        elif param.type is ParamType.STRING:
            values.append(StringValue(_unescape(value, name)))
        elif param.type is ParamType.DATE:
            values.append(_date(value, param, name))
        else:
            values.append(_reference(value, modifier, param, name))
    criterion = Criterion(param, modifier, tuple(values))
    if param.blind:
        for item in criterion.values:
            try:
                _blind_pair(criterion, item)  # refuse now what a blind index cannot answer
            except InvalidSearch:
                raise
            except InvalidInput as exc:
                reason = str(exc).rsplit(": ", 1)[-1]
                raise InvalidSearch(reason, path=name) from None
    return criterion


def _count(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 9:
        raise InvalidSearch("must be a non-negative integer", path="_count")
    return min(int(raw), MAX_COUNT)


def _sort(raw: str, params: dict[str, SearchParam]) -> tuple[SortKey, ...]:
    keys = []
    for item in raw.split(","):
        descending = item.startswith("-")
        name = item[1:] if descending else item
        if name not in ("date", "_lastUpdated") or name not in params:
            raise UnsupportedSearch("sorting is supported on date and _lastUpdated", path="_sort")
        keys.append(SortKey(name, descending))
    return tuple(keys)


def _include(raw: str, resource_type: str, params: dict[str, SearchParam]) -> Include:
    parts = raw.split(":")
    if len(parts) not in (2, 3) or parts[0] != resource_type:
        raise UnsupportedSearch(
            "_include must be <searched type>:patient or :subject", path="_include"
        )
    name = parts[1]
    if name not in ("patient", "subject") or name not in params:
        raise UnsupportedSearch("_include is supported for patient and subject", path="_include")
    target = parts[2] if len(parts) == 3 else None
    if target is not None and not _TYPE_RE.match(target):
        raise InvalidSearch("not a resource type", path="_include")
    return Include(resource_type, name, target)


def parse_search(
    resource_type: str,
    query: str | Iterable[tuple[str, str]],
    *,
    lenient: bool = False,
) -> SearchQuery:
    """Parse a search (a query string, or name/value pairs from a ``_search`` form).

    Raises :class:`UnknownSearchParameter` (unless ``lenient``), :class:`UnsupportedSearch`
    and :class:`InvalidSearch`, each naming the parameter and never the value.
    """
    params = dict(search_params(resource_type))
    if isinstance(query, str):
        try:
            pairs: Sequence[tuple[str, str]] = parse_qsl(
                query.lstrip("?"), keep_blank_values=True, strict_parsing=bool(query.strip("?"))
            )
        except ValueError:
            raise InvalidSearch("malformed query string", path="query") from None
    else:
        pairs = list(query)
    if len(pairs) > MAX_PARAMETERS:
        raise InvalidSearch(f"more than {MAX_PARAMETERS} parameters", path="query")
    criteria: list[Criterion] = []
    count = DEFAULT_COUNT
    sort: tuple[SortKey, ...] = ()
    includes: list[Include] = []
    total: Literal["none", "estimate", "accurate"] | None = None
    ignored = 0
    seen_results: set[str] = set()
    for key, raw in pairs:
        label = _label(key)
        if len(raw) > MAX_VALUE_LENGTH:
            raise InvalidSearch("value too long", path=label)
        if key in ("_count", "_sort", "_total"):
            if key in seen_results:
                raise InvalidSearch("given more than once", path=key)
            seen_results.add(key)
        if key == "_count":
            count = _count(raw)
        elif key == "_sort":
            sort = _sort(raw, params)
        elif key == "_total":
            total = _TOTALS.get(raw)
            if total is None:
                raise InvalidSearch("must be none, estimate or accurate", path="_total")
        elif key == "_include":
            includes.append(_include(raw, resource_type, params))
        elif key in _IGNORED_HTTP:
            continue
        else:
            name, _, modifier = key.partition(":")
            if "." in name or name in ("_has", "_revinclude", "_contained", "_containedType"):
                raise UnsupportedSearch(
                    "chaining and reverse includes are not supported", path=label
                )
            param = params.get(name)
            if param is None or (name.startswith("_") and name not in ("_id", "_lastUpdated")):
                if lenient:
                    ignored += 1
                    continue
                raise UnknownSearchParameter("unknown search parameter", path=label)
            if raw == "":
                raise InvalidSearch("empty value", path=label)
            criteria.append(_criterion(param, modifier or None, raw, label))
    return SearchQuery(resource_type, tuple(criteria), count, sort, tuple(includes), total, ignored)
