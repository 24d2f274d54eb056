"""Compile a parsed FHIR search into SQL over the current-version index tables.

Why a compiler of our own (DESIGN.md: "scoping searches in SQL is ours to compile"): the
access policy must be part of the *same* query as the search, so that results, totals and
paging never count what the caller may not see. :func:`compile_search` returns the WHERE
clause over ``rec_resources`` (current versions), tenant first; the caller's
:class:`~phivault.records.store.ports.Scope` predicates are ANDed in, and the page query and
the ``_total`` COUNT share that one clause.

Each criterion becomes ``resource_id IN (SELECT resource_id FROM <index table> WHERE tenant,
type, param, value...)``: the subquery walks the index table's primary key (tenant, type,
param, value, id), and an AND of criteria is an intersection. Values of one criterion are ORed.

Dates are ranges ``[low, high)`` in microseconds with open ends at the 64-bit extremes; FHIR
prefixes compare the resource's range ``r`` with the search value's range ``s``:
``eq`` r inside s; ``ne`` not inside; ``gt`` r.high > s.high; ``lt`` r.low < s.low;
``ge`` r.high > s.low; ``le`` r.low < s.high; ``sa`` r.low >= s.high; ``eb`` r.high <= s.low;
``ap`` r overlaps s (no widening). ``_lastUpdated`` uses the current version's instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Select,
    and_,
    exists,
    false,
    func,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.sql.elements import UnaryExpression

from phivault.crypto.blind_index import BlindToken, Normalization, normalize
from phivault.errors import InvalidInput
from phivault.records.care import VOID_STATUSES
from phivault.records.query import (
    Criterion,
    DateValue,
    Prefix,
    ReferenceValue,
    SearchQuery,
    StringValue,
    TokenValue,
)
from phivault.records.search_params import DateRange, ParamType
from phivault.records.store.ports import BlindTerms, Scope
from phivault.records.store.schema import (
    DATE_MAX,
    DATE_MIN,
    care_assignments,
    idx_blind,
    idx_date,
    idx_reference,
    idx_string,
    idx_token,
    resources,
    versions,
)

__all__ = [
    "CARE_LINKS",
    "CareRelationshipScope",
    "SubjectScope",
    "compile_search",
    "from_micros",
    "linked_patients",
    "order_by",
    "page_select",
    "to_micros",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final = timedelta(microseconds=1)


def to_micros(instant: datetime | None, *, default: int = DATE_MIN) -> int:
    """Integer microseconds since the epoch (UTC); ``default`` for an open bound."""
    if instant is None:
        return default
    if instant.tzinfo is None:
        raise InvalidInput("an instant must carry a time zone")
    return (instant - _EPOCH) // _MICRO


def from_micros(value: int) -> datetime:
    return _EPOCH + value * _MICRO


def _range(rng: DateRange) -> tuple[int, int]:
    return to_micros(rng.low, default=DATE_MIN), to_micros(rng.high, default=DATE_MAX)


def _date_condition(
    low: ColumnElement[int], high: ColumnElement[int], value: DateValue
) -> ColumnElement[bool]:
    s_low, s_high = _range(value.range)
    inside = and_(low >= s_low, high <= s_high)
    match value.prefix:
        case Prefix.EQ:
            return inside
        case Prefix.NE:
            return not_(inside)
        case Prefix.GT:
            return high > s_high
        case Prefix.LT:
            return low < s_low
        case Prefix.GE:
            return high > s_low
        case Prefix.LE:
            return low < s_high
        case Prefix.SA:
            return low >= s_high
        case Prefix.EB:
            return high <= s_low
        case Prefix.AP:
            return and_(low < s_high, high > s_low)
    raise InvalidInput("unknown date prefix", path="date")  # pragma: no cover


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _in_index(
    tenant: str, resource_type: str, criterion: Criterion, tokens: Sequence[BlindToken] | None
) -> ColumnElement[bool]:
    """The criterion as a predicate on ``rec_resources.resource_id``."""
    param = criterion.param
    h = resources.c
    if param.name == "_id":
        ids = [v.code for v in criterion.values if isinstance(v, TokenValue)]
        return h.resource_id.in_(ids)
    if param.name == "_lastUpdated":
        dates = [v for v in criterion.values if isinstance(v, DateValue)]
        return or_(
            false(), *(_date_condition(h.last_updated, h.last_updated + 1, v) for v in dates)
        )
    if param.blind:
        if tokens is None:
            raise InvalidInput("blind criterion was not tokenized", path=param.name)
        by_field: dict[str, list[str]] = {}
        for token in tokens:
            by_field.setdefault(token.field, []).append(token.token)
        b = idx_blind.c
        values = [and_(b.field == f, b.token.in_(ts)) for f, ts in sorted(by_field.items())]
        table, where = idx_blind, [or_(false(), *values)]
    elif param.type in (ParamType.TOKEN, ParamType.TELECOM):
        t = idx_token.c
        conds: list[ColumnElement[bool]] = []
        for v in criterion.values:
            if not isinstance(v, TokenValue):
                continue
            if v.system is None:
                conds.append(t.code == v.code)
            else:
                conds.append(and_(t.code == v.code, t.system == v.system))
        table, where = idx_token, [or_(false(), *conds)]
    elif param.type is ParamType.STRING:
        s = idx_string.c
        conds = []
        for v in criterion.values:
            if not isinstance(v, StringValue):
                continue
            text = normalize(Normalization.NAME, v.value)
            if criterion.modifier == "exact":
                conds.append(s.value == text)
            elif criterion.modifier == "contains":
                conds.append(s.value.like(f"%{_escape_like(text)}%", escape="\\"))
            else:
                conds.append(s.value.like(f"{_escape_like(text)}%", escape="\\"))
        table, where = idx_string, [or_(false(), *conds)]
    elif param.type is ParamType.REFERENCE:
        r = idx_reference.c
        conds = []
        for v in criterion.values:
            if not isinstance(v, ReferenceValue):
                continue
            if v.target_type is None:
                conds.append(r.target_id == v.target_id)
            else:
                conds.append(and_(r.target_id == v.target_id, r.target_type == v.target_type))
        table, where = idx_reference, [or_(false(), *conds)]
    elif param.type is ParamType.DATE:
        d = idx_date.c
        dates = [v for v in criterion.values if isinstance(v, DateValue)]
        table, where = idx_date, [or_(false(), *(_date_condition(d.low, d.high, v) for v in dates))]
    else:  # pragma: no cover
        raise InvalidInput("unsupported parameter type", path=param.name)
    c = table.c
    sub = select(c.resource_id).where(
        c.tenant == tenant,
        c.resource_type == resource_type,
        c.param == param.name,
        *where,
    )
    if criterion.modifier == "not":
        return h.resource_id.not_in(sub)
    return h.resource_id.in_(sub)


def compile_search(
    tenant: str,
    query: SearchQuery,
    *,
    blind: BlindTerms | None = None,
    scopes: Sequence[Scope] = (),
) -> ColumnElement[bool]:
    """The WHERE clause over ``rec_resources`` for ``query`` in ``tenant``: current versions,
    not deleted, every criterion, every scope. Raises :class:`InvalidInput` naming a blind
    parameter whose tokens are missing."""
    h = resources.c
    clauses: list[ColumnElement[bool]] = [
        h.tenant == tenant,
        h.resource_type == query.resource_type,
        h.deleted == false(),
    ]
    for criterion in query.criteria:
        tokens = None if blind is None else blind.get(criterion)
        clauses.append(_in_index(tenant, query.resource_type, criterion, tokens))
    for scope in scopes:
        clauses.append(scope.predicate(resources))
    return and_(true(), *clauses)


def order_by(query: SearchQuery) -> list[UnaryExpression[object] | ColumnElement[object]]:
    """A deterministic order: the ``_sort`` keys, then the resource id.

    ``date`` sorts by the lower bound of the earliest ``date`` entry ascending, of the latest
    descending; resources without one come last either way.
    """
    h = resources.c
    keys: list[UnaryExpression[object] | ColumnElement[object]] = []
    for key in query.sort:
        if key.param == "_lastUpdated":
            column: ColumnElement[object] = h.last_updated
        else:
            d = idx_date.c
            pick = func.max if key.descending else func.min
            column = (
                select(pick(d.low))
                .where(
                    d.tenant == h.tenant,
                    d.resource_type == h.resource_type,
                    d.resource_id == h.resource_id,
                    d.param == key.param,
                )
                .scalar_subquery()
            )
        keys.append(column.desc().nulls_last() if key.descending else column.asc().nulls_last())
    keys.append(h.resource_id.asc())
    return keys


def page_select(where: ColumnElement[bool]) -> Select[Any]:
    """The current version rows of the matches, in one statement (one snapshot); the caller
    adds the order and the window."""
    h, v = resources.c, versions.c
    joined = resources.join(
        versions,
        and_(
            v.tenant == h.tenant,
            v.resource_type == h.resource_type,
            v.resource_id == h.resource_id,
            v.version == h.version,
        ),
    )
    return select(versions).select_from(joined).where(where)


@dataclass(frozen=True, slots=True)
class SubjectScope:
    """Only resources sealed under one of ``subjects`` (patient compartments): what a
    patient-facing token (``patient/*.read``) or a care relationship may see."""

    subjects: frozenset[str]

    def predicate(self, resources: FromClause) -> ColumnElement[bool]:
        return resources.c.key_subject.in_(sorted(self.subjects))


#: Where a care relationship is read from, as (resource type, reference parameter to the
#: practitioner, reference parameter to the patient); a Patient names its own practitioners.
CARE_LINKS: Final = (
    ("CareTeam", "participant", "patient"),
    ("Encounter", "participant", "patient"),
)


def _has_status(record: FromClause, statuses: frozenset[str]) -> ColumnElement[bool]:
    """The record (a row of the reference index) has one of ``statuses`` as its status."""
    status = idx_token.alias("care_status")
    return exists().where(
        status.c.tenant == record.c.tenant,
        status.c.resource_type == record.c.resource_type,
        status.c.resource_id == record.c.resource_id,
        status.c.param == "status",
        status.c.code.in_(sorted(statuses)),
    )


def linked_patients(
    tenant: ColumnElement[str] | str, practitioner_type: str, practitioner_id: str
) -> list[Select[Any]]:
    """Queries of the patient ids ``practitioner_type/practitioner_id`` has a care
    relationship with in ``tenant`` (a column to correlate on, or a value): as a participant
    of a CareTeam or an Encounter that is not voided, as a general practitioner, or by an
    explicit assignment (``acc_care_assignments``)."""
    via = idx_reference.alias("care_via")
    to = idx_reference.alias("care_patient")
    linked: list[Select[Any]] = [
        select(to.c.target_id)
        .select_from(
            via.join(
                to,
                and_(
                    to.c.tenant == via.c.tenant,
                    to.c.resource_type == via.c.resource_type,
                    to.c.resource_id == via.c.resource_id,
                ),
            )
        )
        .where(
            via.c.tenant == tenant,
            via.c.resource_type == kind,
            via.c.param == through,
            via.c.target_type == practitioner_type,
            via.c.target_id == practitioner_id,
            to.c.param == patient,
            to.c.target_type == "Patient",
            ~_has_status(via, VOID_STATUSES[kind]),
        )
        for kind, through, patient in CARE_LINKS
    ]
    assigned = care_assignments.c
    linked.append(
        select(assigned.patient_id).where(
            assigned.tenant == tenant,
            assigned.practitioner_type == practitioner_type,
            assigned.practitioner_id == practitioner_id,
        )
    )
    gp = idx_reference.alias("care_gp")
    linked.append(
        select(gp.c.resource_id).where(
            gp.c.tenant == tenant,
            gp.c.resource_type == "Patient",
            gp.c.param == "general-practitioner",
            gp.c.target_type == practitioner_type,
            gp.c.target_id == practitioner_id,
        )
    )
    return linked


@dataclass(frozen=True, slots=True)
class CareRelationshipScope:
    """Only resources of patients the caller (``Practitioner/<id>``, ``PractitionerRole``...)
    has a care relationship with: a participant of one of their CareTeams or Encounters, or
    their general practitioner. Read from the current versions' reference index, in the same
    query (correlated on the searched tenant), so totals and paging count only those. Voided
    records establish nothing (``phivault.records.care.VOID_STATUSES``, shared with the
    access policy's Python check)."""

    practitioner_type: str
    practitioner_id: str

    def predicate(self, resources: FromClause) -> ColumnElement[bool]:
        linked = linked_patients(resources.c.tenant, self.practitioner_type, self.practitioner_id)
        return or_(false(), *(resources.c.key_subject.in_(q) for q in linked))
