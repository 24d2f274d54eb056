"""Search parameters and index entries: blind where the classification says identifier."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from records_support import indexer, resolved_resources

from phivault.errors import InvalidInput
from phivault.records.classification import ElementGroup, default_classification
from phivault.records.search_params import (
    BlindEntry,
    DateEntry,
    DateRange,
    ParamType,
    ReferenceEntry,
    StringEntry,
    TokenEntry,
    UnknownSearchParameter,
    blind_lookup,
    date_range,
    index_entries,
    parse_reference,
    search_param,
    search_params,
)
from phivault.records.split import GroupContent, split

ISSUE_PARAMS = {"_id", "_lastUpdated"}
UUIDISH = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-")


@pytest.fixture(scope="session")
def resolved(synthea_bundles: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for b in synthea_bundles.values() for r in resolved_resources(b)]


def test_every_classified_type_has_the_issue_parameters() -> None:
    for resource_type in default_classification().resource_types - {"Coverage", "ServiceRequest"}:
        params = search_params(resource_type)
        assert set(params) >= ISSUE_PARAMS
    assert {"identifier", "name", "family", "given", "birthdate", "gender"} <= set(
        search_params("Patient")
    )
    obs = search_params("Observation")
    assert {"patient", "subject", "code", "date", "status", "category", "encounter"} <= set(obs)


def test_a_parameter_is_blind_exactly_when_its_elements_are_direct_identifiers() -> None:
    table = default_classification()
    for resource_type in table.resource_types - {"Coverage", "ServiceRequest"}:
        for param in search_params(resource_type).values():
            groups = {table.group_of_path(resource_type, p) for p in param.paths}
            assert param.blind == (ElementGroup.DIRECT_IDENTIFIERS in groups), param
    for name in ("identifier", "name", "family", "given", "birthdate", "telecom", "phone"):
        assert search_param("Patient", name).blind
        assert search_param("Practitioner", name).blind
    assert not search_param("Patient", "gender").blind  # see records-search-index.md
    assert not search_param("Organization", "identifier").blind


def _strings(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_strings(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_strings(v) for v in node)) if node else set()
    return {node} if isinstance(node, str) else set()


def _clear_values(entries: list[Any]) -> set[str]:
    out: set[str] = set()
    for entry in entries:
        if isinstance(entry, TokenEntry):
            out |= {entry.code, entry.system or ""}
        elif isinstance(entry, StringEntry):
            out.add(entry.value)
        elif isinstance(entry, ReferenceEntry):
            out.add(entry.target_id)
    return out


def test_no_direct_identifier_reaches_a_clear_entry(resolved: list[dict[str, Any]]) -> None:
    tokens = indexer().tokens
    for resource in resolved:
        entries = index_entries(resource, tokens)
        direct = split(resource).groups.get(ElementGroup.DIRECT_IDENTIFIERS)
        if direct is None:
            continue
        content = GroupContent.decode(direct)
        secrets = _strings([dict(content.elements), [v for _, v in content.fragments]])
        # Synthea reuses resource ids as identifier values; ids are server-assigned on load
        secrets = {s for s in secrets if len(s) >= 4 and not UUIDISH.search(s)}
        secrets = {s.casefold() for s in secrets if not s.startswith(("http", "urn:"))}
        leaked = {v.casefold() for v in _clear_values(entries)} & secrets
        assert not leaked, (resource["resourceType"], sorted(leaked)[:3])


def test_every_fixture_resource_indexes(resolved: list[dict[str, Any]]) -> None:
    tokens = indexer().tokens
    kinds: set[type] = set()
    for resource in resolved:
        entries = index_entries(resource, tokens)
        # searched on the head row (rec_resources), never on index rows
        assert not {e.param for e in entries} & {"_id", "_lastUpdated"}
        kinds |= {type(e) for e in entries}
        assert len(entries) == len(set(entries))
    assert kinds == {TokenEntry, DateEntry, ReferenceEntry, BlindEntry, StringEntry}


def _patient(resolved: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in resolved if r["resourceType"] == "Patient" and "Alvin56" in str(r))


def _hits(entries: list[Any], param: str, value: str, modifier: str | None = None) -> bool:
    field, normalized = blind_lookup(search_param("Patient", param), value, modifier=modifier)
    wanted = set(indexer().tokens(field, normalized))
    return any(isinstance(e, BlindEntry) and e.token in wanted for e in entries)


def test_patient_blind_search_semantics(resolved: list[dict[str, Any]]) -> None:
    patient = _patient(resolved)
    entries = index_entries(patient, indexer().tokens)
    family = patient["name"][0]["family"]  # "Jerde200"
    assert _hits(entries, "family", family)
    assert _hits(entries, "family", family[:3].upper())  # starts-with, case-insensitive
    assert _hits(entries, "name", "Alv")
    assert _hits(entries, "given", "ALVIN56", "exact")
    assert not _hits(entries, "given", "Alvin", "exact")
    assert not _hits(entries, "family", "erde")  # not a prefix
    assert not _hits(entries, "given", family)  # fields are separate
    ssn = next(i["value"] for i in patient["identifier"] if i["system"].endswith("us-ssn"))
    assert _hits(entries, "identifier", f"http://hl7.org/fhir/sid/us-ssn|{ssn}")
    assert _hits(entries, "identifier", ssn.replace("-", ""))  # any system, normalized
    assert not _hits(entries, "identifier", f"|{ssn}")  # it has a system
    born = patient["birthDate"]
    assert _hits(entries, "birthdate", born)
    assert _hits(entries, "birthdate", born[:7])
    assert _hits(entries, "birthdate", born[:4])
    assert not _hits(entries, "birthdate", "1900")
    phone = patient["telecom"][0]["value"]
    assert _hits(entries, "phone", phone) and _hits(entries, "telecom", f"phone|{phone}")
    assert _hits(entries, "address-city", patient["address"][0]["city"].upper())
    assert TokenEntry("gender", None, patient["gender"]) in entries
    # versions: every live key version gets a token (rotation keeps search working)
    versions = {e.token.version for e in entries if isinstance(e, BlindEntry)}
    assert versions == {1, 2}


def test_blind_lookup_refusals() -> None:
    with pytest.raises(InvalidInput, match="at least"):
        blind_lookup(search_param("Patient", "name"), "a")
    with pytest.raises(InvalidInput):
        blind_lookup(search_param("Patient", "name"), "abc", modifier="contains")
    with pytest.raises(InvalidInput):
        blind_lookup(search_param("Patient", "birthdate"), "1980", modifier="missing")
    with pytest.raises(InvalidInput):
        blind_lookup(search_param("Patient", "gender"), "male")
    with pytest.raises(UnknownSearchParameter):
        search_param("Patient", "shoe-size")


def test_observation_clear_entries(resolved: list[dict[str, Any]]) -> None:
    obs = next(
        r for r in resolved if r["resourceType"] == "Observation" and "effectiveDateTime" in r
    )
    entries = index_entries(obs, indexer().tokens)
    coding = obs["code"]["coding"][0]
    assert TokenEntry("code", coding["system"], coding["code"]) in entries
    assert TokenEntry("status", None, obs["status"]) in entries
    _, patient_id = obs["subject"]["reference"].split("/")
    assert ReferenceEntry("patient", "Patient", patient_id) in entries
    assert ReferenceEntry("subject", "Patient", patient_id) in entries
    assert any(isinstance(e, ReferenceEntry) and e.param == "encounter" for e in entries)
    (date,) = [e for e in entries if isinstance(e, DateEntry) and e.param == "date"]
    assert date.range == date_range(obs["effectiveDateTime"])
    assert not any(isinstance(e, BlindEntry) for e in entries)


def test_period_and_open_ends() -> None:
    encounter = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "in-progress",
        "period": {"start": "2020-01-01T10:00:00Z"},
    }
    (entry,) = [e for e in index_entries(encounter, indexer().tokens) if isinstance(e, DateEntry)]
    assert entry.range == DateRange(datetime(2020, 1, 1, 10, tzinfo=UTC), None)


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2015", datetime(2015, 1, 1, tzinfo=UTC), datetime(2016, 1, 1, tzinfo=UTC)),
        ("2015-12", datetime(2015, 12, 1, tzinfo=UTC), datetime(2016, 1, 1, tzinfo=UTC)),
        ("2015-02-28", datetime(2015, 2, 28, tzinfo=UTC), datetime(2015, 3, 1, tzinfo=UTC)),
        (
            "2015-11-13T14:25:45+05:30",
            datetime(2015, 11, 13, 8, 55, 45, tzinfo=UTC),
            datetime(2015, 11, 13, 8, 55, 46, tzinfo=UTC),
        ),
        (
            "2015-11-13T14:25:45.077+05:30",
            datetime(2015, 11, 13, 8, 55, 45, 77000, tzinfo=UTC),
            datetime(2015, 11, 13, 8, 55, 45, 78000, tzinfo=UTC),
        ),
        (
            "2015-11-13T14:25Z",
            datetime(2015, 11, 13, 14, 25, tzinfo=UTC),
            datetime(2015, 11, 13, 14, 26, tzinfo=UTC),
        ),
    ],
)
def test_date_ranges(value: str, low: datetime, high: datetime) -> None:
    assert date_range(value) == DateRange(low, high)


@pytest.mark.parametrize(
    "value", ["", "15", "2015-13", "2015-02-30", "2015-1-1", "soon", "2015-01-01T25:00Z"]
)
def test_bad_dates_name_the_path_only(value: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        date_range(value, path="Observation.effectiveDateTime")
    assert caught.value.path == "Observation.effectiveDateTime"
    assert value not in str(caught.value) or not value


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9998, 12, 30)))
def test_every_precision_of_an_instant_covers_it(moment: datetime) -> None:
    instant = moment.replace(tzinfo=UTC)
    text = f"{instant.year:04d}" + instant.strftime("-%m-%dT%H:%M:%S.%f") + "Z"
    for cut in (4, 7, 10):
        got = date_range(text[:cut])
        assert got.low is not None and got.high is not None
        assert got.low <= instant < got.high
    exact = date_range(text)
    assert exact.low == instant and exact.high == instant + timedelta(microseconds=1)


def test_references() -> None:
    assert parse_reference("Patient/abc") == ("Patient", "abc")
    assert parse_reference("https://x.org/fhir/Patient/abc/_history/2") == ("Patient", "abc")
    assert parse_reference("#coverage") is None
    for bad in ("urn:uuid:1234", "Practitioner?identifier=x|y", "patient/abc", "Patient"):
        with pytest.raises(InvalidInput):
            parse_reference(bad)


def test_param_types_are_consistent() -> None:
    assert search_param("Observation", "date").type is ParamType.DATE
    assert search_param("Observation", "patient").targets == frozenset({"Patient"})
    assert search_param("Organization", "name").type is ParamType.STRING


def test_values_with_nothing_to_search_are_skipped_and_bad_birth_dates_named() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"family": "-", "given": ["."]}],
        "identifier": [{"system": "s", "value": "--"}],
    }
    entries = index_entries(patient, indexer().tokens)
    assert not any(isinstance(e, BlindEntry) for e in entries)
    org = {"resourceType": "Organization", "id": "o1", "name": "!!!"}
    assert not any(isinstance(e, StringEntry) for e in index_entries(org, indexer().tokens))
    with pytest.raises(InvalidInput) as caught:
        index_entries({"resourceType": "Patient", "birthDate": "1980-02-30"}, indexer().tokens)
    assert caught.value.path == "Patient.birthDate"


_NAMES = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzÄÉñøß' -.ABCXYZ0123"),
    min_size=1,
    max_size=14,
)


@given(family=_NAMES, query=_NAMES)
def test_name_search_is_starts_with_on_normalized_parts(family: str, query: str) -> None:
    from phivault.crypto.blind_index import Normalization, normalize

    try:
        part = normalize(Normalization.NAME, family)
        wanted = normalize(Normalization.NAME, query)
    except InvalidInput:
        return  # nothing searchable in one of them
    patient = {"resourceType": "Patient", "id": "p", "name": [{"family": family}]}
    entries = index_entries(patient, indexer().tokens)
    param = search_param("Patient", "family")
    if len(wanted) < 2:
        with pytest.raises(InvalidInput):
            blind_lookup(param, query)
        return
    field, value = blind_lookup(param, query)
    tokens = set(indexer().tokens(field, value))
    hit = any(isinstance(e, BlindEntry) and e.token in tokens for e in entries)
    assert hit == part.startswith(wanted)
    field, value = blind_lookup(param, query, modifier="exact")
    tokens = set(indexer().tokens(field, value))
    assert any(isinstance(e, BlindEntry) and e.token in tokens for e in entries) == (part == wanted)


def test_index_entries_match_the_walk_by_parameter_and_path(
    resolved: list[dict[str, Any]],
) -> None:
    """The inlined walk of ``index_entries`` gives exactly what walking every parameter's
    paths with ``_values`` and ``_entries`` gives, in the same order, for every fixture."""
    from phivault.records.search_params import _entries, _values

    tokens = indexer().tokens
    for resource in resolved:
        kind = resource["resourceType"]
        expected: list[Any] = []
        for param in search_params(kind).values():
            for path in param.paths:
                for value in _values(resource, path.split(".")):
                    expected.extend(_entries(param, value, f"{kind}.{path}", tokens))
        assert index_entries(resource, tokens) == list(dict.fromkeys(expected))


def test_date_range_answers_the_same_when_remembered_and_names_each_callers_path() -> None:
    """date_range remembers its answers (bundles repeat their dates): a repeated value gives
    the same range, and a repeated bad value is refused again, naming this caller's path."""
    first = date_range("2015-11-13T14:25:45+05:30")
    assert date_range("2015-11-13T14:25:45+05:30") == first
    for path in ("a.date", "b.period.start"):
        with pytest.raises(InvalidInput) as refused:
            date_range("2015-02-30", path=path)
        assert refused.value.path == path
    # a long string is not remembered, and is refused all the same
    with pytest.raises(InvalidInput):
        date_range("2015" + " " * 100 + "x")


def test_index_entries_drop_repeats_within_a_parameter_across_its_paths() -> None:
    """Repeats are removed per parameter (entries of two parameters always differ): two
    codings of one code, a name repeated as an alias, the same target twice."""
    tokens = indexer().tokens
    organization = {
        "resourceType": "Organization",
        "name": "Clinic",
        "alias": ["Clinic", "Other"],
        "type": [{"coding": [{"system": "s", "code": "c"}, {"system": "s", "code": "c"}]}],
        "partOf": {"reference": "Organization/p"},
    }
    assert index_entries(organization, tokens) == [
        StringEntry("name", "clinic"),
        StringEntry("name", "other"),
        TokenEntry("type", "s", "c"),
        ReferenceEntry("partof", "Organization", "p"),
    ]
    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": "Observation/1"}, {"reference": "Observation/1"}],
    }
    assert index_entries(provenance, tokens) == [ReferenceEntry("target", "Observation", "1")]
