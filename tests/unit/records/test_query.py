"""Search query parsing: typed queries, precise errors that never echo a value."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phivault.errors import InvalidInput
from phivault.records.query import (
    MAX_COUNT,
    DateValue,
    Include,
    InvalidSearch,
    Prefix,
    ReferenceValue,
    SortKey,
    TokenValue,
    UnknownSearchParameter,
    UnsupportedSearch,
    parse_search,
)
from phivault.records.search_params import DateRange


def test_a_typical_observation_search() -> None:
    query = parse_search(
        "Observation",
        "patient=Patient/p1&code=http://loinc.org|8302-2,http://loinc.org|29463-7"
        "&date=ge2015-01-01&date=lt2016&status:not=cancelled&_count=20&_sort=-date"
        "&_include=Observation:patient&_total=accurate",
    )
    assert query.count == 20
    assert query.sort == (SortKey("date", descending=True),)
    assert query.includes == (Include("Observation", "patient", None),)
    assert query.total == "accurate"
    patient, code, since, until, status = query.criteria
    assert patient.values == (ReferenceValue("Patient", "p1"),)
    assert code.values == (
        TokenValue("http://loinc.org", "8302-2"),
        TokenValue("http://loinc.org", "29463-7"),
    )
    assert since.values == (
        DateValue(
            Prefix.GE,
            DateRange(datetime(2015, 1, 1, tzinfo=UTC), datetime(2015, 1, 2, tzinfo=UTC)),
            "2015-01-01",
        ),
    )
    assert until.values[0].prefix is Prefix.LT  # type: ignore[union-attr]
    assert status.modifier == "not" and status.values == (TokenValue(None, "cancelled"),)
    assert not any(c.blind for c in query.criteria)


def test_tokens_references_and_escapes() -> None:
    query = parse_search(
        "Condition",
        [("code", "|abc"), ("code", "a\\,b"), ("subject:Patient", "p1"), ("patient", "p2")],
    )
    assert query.criteria[0].values == (TokenValue("", "abc"),)
    assert query.criteria[1].values == (TokenValue(None, "a,b"),)
    assert query.criteria[2].values == (ReferenceValue("Patient", "p1"),)
    assert query.criteria[3].values == (ReferenceValue("Patient", "p2"),)  # patient: Patient
    absolute = parse_search("Encounter", "subject=https://x.org/fhir/Patient/p9")
    assert absolute.criteria[0].values == (ReferenceValue("Patient", "p9"),)


def test_blind_criteria_carry_their_lookups() -> None:
    query = parse_search(
        "Patient", "name=Smi&family:exact=O'Brien&birthdate=1980-05&identifier=sys|123"
    )
    assert all(c.blind for c in query.criteria)
    lookups = query.blind_lookups()
    fields = [pairs[0][0].name for _, pairs in lookups]
    assert fields == [
        "Patient.name.prefix",
        "Patient.family.exact",
        "Patient.birthdate",
        "Patient.identifier",
    ]
    assert [pairs[0][1] for _, pairs in lookups] == ["smi", "o brien", "1980-05", "sys|123"]
    gender = parse_search("Patient", "gender=female").criteria[0]
    assert not gender.blind and gender.values == (TokenValue(None, "female"),)


def test_count_is_capped_and_defaults() -> None:
    assert parse_search("Patient", f"_count={MAX_COUNT * 10}").count == MAX_COUNT
    assert parse_search("Patient", "_count=0").count == 0
    assert parse_search("Patient", "").count == 50


def test_lenient_ignores_unknown_parameters_only() -> None:
    query = parse_search("Patient", "shoe-size=9&_summary=true&family=Smith", lenient=True)
    assert query.ignored == 2 and len(query.criteria) == 1
    with pytest.raises(UnknownSearchParameter) as caught:
        parse_search("Patient", "shoe-size=9")
    assert caught.value.path == "(parameter)"  # an unknown name is never repeated
    with pytest.raises(InvalidSearch):  # malformed values are errors even when lenient
        parse_search("Patient", "birthdate=soon", lenient=True)


SECRET = "Jerde200"


@pytest.mark.parametrize(
    ("query", "error", "path"),
    [
        (f"birthdate=gt{SECRET}", InvalidSearch, "birthdate"),
        ("birthdate=gt1980", UnsupportedSearch, "birthdate"),  # blind: equality only
        (f"family:contains={SECRET}", UnsupportedSearch, "family:contains"),
        (f"name:missing={SECRET}", UnsupportedSearch, "name:missing"),
        ("name=J", InvalidSearch, "name"),  # too short for the prefix scheme
        (f"identifier=sys|{SECRET}\\", InvalidSearch, "identifier"),
        (f"identifier={SECRET},,x", InvalidSearch, "identifier"),
        (f"_id={SECRET}!", InvalidSearch, "_id"),
        ("_count=-1", InvalidSearch, "_count"),
        ("_count=ten", InvalidSearch, "_count"),
        ("_count=1&_count=2", InvalidSearch, "_count"),
        ("_sort=family", UnsupportedSearch, "_sort"),
        ("_include=Patient:organization", UnsupportedSearch, "_include"),
        ("_include=*", UnsupportedSearch, "_include"),
        ("_total=maybe", InvalidSearch, "_total"),
        (f"general-practitioner.name={SECRET}", UnsupportedSearch, "general-practitioner.name"),
        (
            f"_has:Observation:patient:code={SECRET}",
            UnsupportedSearch,
            "_has:Observation:patient:code",
        ),
        (f"{quote(SECRET + ' Alvin')}=1", UnknownSearchParameter, "(parameter)"),
        (f"organization=Practitioner/{SECRET}", InvalidSearch, "organization"),
        ("family=", InvalidSearch, "family"),
        ("a=1&&&=", InvalidSearch, "query"),
    ],
)
def test_errors_name_the_parameter_never_the_value(
    query: str, error: type[Exception], path: str
) -> None:
    with pytest.raises(error) as caught:
        parse_search("Patient", query)
    assert getattr(caught.value, "path", None) == path
    assert SECRET not in str(caught.value) or path.startswith(SECRET)


def test_date_modifiers_and_encounter_sort() -> None:
    with pytest.raises(UnsupportedSearch):
        parse_search("Encounter", "date:missing=true")
    assert parse_search("Encounter", "_sort=_lastUpdated,-date").sort == (
        SortKey("_lastUpdated", False),
        SortKey("date", True),
    )
    with pytest.raises(UnsupportedSearch):
        parse_search("Medication", "_sort=date")  # Medication has no date


@given(st.text(max_size=40))
def test_any_query_string_parses_or_fails_cleanly(text: str) -> None:
    try:
        parse_search("Observation", text)
    except InvalidInput as exc:
        assert exc.path is not None


_MARKED = st.text(alphabet="abcxyz0123456789-|,.:", min_size=1, max_size=20).map(lambda s: "Zq" + s)


@given(_MARKED)
def test_error_messages_never_contain_the_value(value: str) -> None:
    for name in ("birthdate", "identifier", "family", "_id", "general-practitioner", "_count"):
        for raw in (value, value + "\\", "gt" + value):
            try:
                parse_search("Patient", [(name, raw)])
            except InvalidInput as exc:
                assert "Zq" not in str(exc)


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "\\,|$" else c for c in text)


@given(
    system=st.text(alphabet="ab:/.|,$\\", max_size=8),
    code=st.text(alphabet="xy09|,$\\-", min_size=1, max_size=8),
)
def test_escaped_tokens_parse_back(system: str, code: str) -> None:
    raw = f"{_escape(system)}|{_escape(code)},{_escape(code)}"
    (criterion,) = parse_search("Observation", [("code", raw)]).criteria
    assert criterion.values == (TokenValue(system, code), TokenValue(None, code))
