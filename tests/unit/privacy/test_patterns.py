"""PHI detectors: what they find (Synthea values included), what they leave alone, and why
they cannot be made to backtrack catastrophically."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.privacy import patterns
from phivault.privacy.patterns import PhiKind, PhiMatch, find_phi, looks_like_phi, redact

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import sre_constants
    import sre_parse


def _covered(text: str, value: str) -> bool:
    """Whether every character of ``value`` (where it occurs in ``text``) is in a match."""
    start = text.index(value)
    end = start + len(value)
    return any(m.start <= start and m.end >= end for m in find_phi(text))


def _kinds(text: str) -> list[tuple[PhiKind, str]]:
    return [(m.kind, text[m.start : m.end]) for m in find_phi(text)]


# --- what is found ----------------------------------------------------------------------------

POSITIVE = [
    # SSNs
    ("ssn", "123-45-6789", PhiKind.SSN),
    ("ssn", "123 45 6789", PhiKind.SSN),
    ("ssn", "123456789", PhiKind.SSN),
    ("ssn", "999-68-9353", PhiKind.SSN),
    # phones
    ("phone", "555-450-5873", PhiKind.PHONE),
    ("phone", "(555) 450-5873", PhiKind.PHONE),
    ("phone", "555.450.5873", PhiKind.PHONE),
    ("phone", "5554505873", PhiKind.PHONE),
    ("phone", "+1 555 450 5873", PhiKind.PHONE),
    ("phone", "+1 (555) 450-5873", PhiKind.PHONE),
    ("phone", "1-555-450-5873", PhiKind.PHONE),
    ("phone", "+15554505873", PhiKind.PHONE),
    ("phone", "+44 20 7946 0958", PhiKind.PHONE),
    ("phone", "+44 (0)20 7946 0958", PhiKind.PHONE),
    ("phone", "+4915112345678", PhiKind.PHONE),
    ("phone", "555-450-5873 ext. 12", PhiKind.PHONE),
    # e-mail
    ("email", "beatrice.aufderhar@example.com", PhiKind.EMAIL),
    ("email", "b+tag@mail.example.co.uk", PhiKind.EMAIL),
    # dates
    ("date", "2024-01-31", PhiKind.DATE),
    ("date", "2024-01-31T09:30:00Z", PhiKind.DATE),
    ("date", "2024-01-31T09:30:00.123+02:00", PhiKind.DATE),
    ("date", "01/31/2024", PhiKind.DATE),
    ("date", "1/31/24", PhiKind.DATE),
    ("date", "31.01.2024", PhiKind.DATE),
    ("date", "Jan 31, 2024", PhiKind.DATE),
    ("date", "January 31st 2024", PhiKind.DATE),
    ("date", "Jan. 31, 2024", PhiKind.DATE),
    ("date", "31 Jan 2024", PhiKind.DATE),
    ("date", "September 2024", PhiKind.DATE),
    # street addresses
    ("address", "123 Main St", PhiKind.STREET_ADDRESS),
    ("address", "123 main st", PhiKind.STREET_ADDRESS),
    ("address", "45 Elm Avenue Apt 3", PhiKind.STREET_ADDRESS),
    ("address", "12 5th Ave", PhiKind.STREET_ADDRESS),
    ("address", "1600 N Pennsylvania Avenue", PhiKind.STREET_ADDRESS),
    ("address", "884 White View Suite 44", PhiKind.STREET_ADDRESS),
    ("address", "690 Raynor Overpass", PhiKind.STREET_ADDRESS),
    ("address", "P.O. Box 1234", PhiKind.STREET_ADDRESS),
    ("address", "Cambridge, MA 02138", PhiKind.STREET_ADDRESS),
    ("address", "Massachusetts 01564-1234", PhiKind.STREET_ADDRESS),
    # medical record numbers
    ("mrn", "MRN 1234567", PhiKind.MRN),
    ("mrn", "MRN: A12345", PhiKind.MRN),
    ("mrn", "mrn#A12345", PhiKind.MRN),
    ("mrn", "Medical Record Number 77-1234", PhiKind.MRN),
    ("mrn", "1234567", PhiKind.MRN),
    ("mrn", "12345678901234", PhiKind.MRN),
    # person names
    ("name", "Beatrice Aufderhar", PhiKind.PERSON_NAME),
    ("name", "Alvin56 Jerde200", PhiKind.PERSON_NAME),
    ("name", "Ardath226 Maude482 Feeney44", PhiKind.PERSON_NAME),
    ("name", "Clarine O'Keefe", PhiKind.PERSON_NAME),
    ("name", "Daniel959 Hernán834 Villaseñor332", PhiKind.PERSON_NAME),
    ("name", "Mr. Smith", PhiKind.PERSON_NAME),
    ("name", "Mrs. Beatrice Aufderhar", PhiKind.PERSON_NAME),
    ("name", "Dr. Jane Q. Public", PhiKind.PERSON_NAME),
    ("name", "Ludwig van Beethoven", PhiKind.PERSON_NAME),
    ("name", "Mary-Jane McDermott", PhiKind.PERSON_NAME),
    ("name", "Aufderhar, Beatrice", PhiKind.PERSON_NAME),
]


@pytest.mark.parametrize(("label", "value", "kind"), POSITIVE, ids=[p[1] for p in POSITIVE])
def test_finds_value_in_a_sentence(label: str, value: str, kind: PhiKind) -> None:
    text = f"noted: the value {value} was given yesterday."
    found = _kinds(text)
    assert (kind, value) in found, found
    assert looks_like_phi(text)
    assert value not in redact(text)


@pytest.mark.parametrize(("label", "value", "kind"), POSITIVE, ids=[p[1] for p in POSITIVE])
def test_finds_value_alone_and_at_the_edges(label: str, value: str, kind: PhiKind) -> None:
    assert _kinds(value) == [(kind, value)]
    assert _kinds(f"({value})") == [(kind, value)]


NEGATIVE = [
    "",
    "GET /fhir/Patient/5451401c-ab1b-4adc-9df6-c02e856e492a 200 in 12 ms",
    "Internal Server Error",
    "request req-20240131093000 for tenant acme-health",
    "urn:oid:2.16.840.1.113883.4.3.25",
    "version 1.2.3 build 4567",
    "user:alice client:loader-01 node:ledger-2",
    "Patient/1234567/_history/3",
    "duration_ms=12.5 status=404 Not Found",
    "scope patient/Observation.rs purpose TREAT",
    "kek@3 rotated; checkpoint 42 of 1000",
    "the patient was seen",
    "5 patients",
]


@pytest.mark.parametrize("text", NEGATIVE)
def test_leaves_opaque_ids_and_log_phrases_alone(text: str) -> None:
    assert find_phi(text) == []
    assert not looks_like_phi(text)
    assert redact(text) == text


def test_several_values_are_redacted_separately() -> None:
    text = "Beatrice Aufderhar (SSN 999-68-9353) lives at 542 Friesen Parade; call 555-457-9233."
    assert redact(text, "<x>") == "<x> (SSN <x>) lives at <x>; call <x>."


def test_overlapping_detections_merge_into_the_most_specific_kind() -> None:
    # "Friesen Parade, Sterling" also reads as a name; the merged span is an address.
    text = "at 542 Friesen Parade, Sterling, Massachusetts 01564 today"
    [match] = find_phi(text)
    assert match.kind is PhiKind.STREET_ADDRESS
    assert text[match.start : match.end] == "542 Friesen Parade, Sterling, Massachusetts 01564"


def test_refused_name_does_not_hide_a_date_inside_it() -> None:
    assert _kinds("Internal Server Error Jan 31") == [(PhiKind.DATE, "Jan 31")]


def test_kind_values_are_stable() -> None:
    assert [k.value for k in PhiKind] == [
        "ssn",
        "phone",
        "email",
        "date",
        "street-address",
        "mrn",
        "person-name",
    ]


def test_match_is_a_frozen_value() -> None:
    m = PhiMatch(PhiKind.SSN, 1, 2)
    with pytest.raises(AttributeError):
        m.start = 3  # type: ignore[misc]


# --- Synthea: every real value is found --------------------------------------------------------


def _synthea_patients(fixtures_dir: Path) -> Iterator[dict[str, Any]]:
    for path in sorted((fixtures_dir / "synthea").glob("*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        for entry in bundle.get("entry", []):
            resource = entry.get("resource", {})
            if resource.get("resourceType") == "Patient":
                yield resource


def _synthea_values(fixtures_dir: Path) -> list[tuple[str, str]]:
    values: list[tuple[str, str]] = []
    for patient in _synthea_patients(fixtures_dir):
        for name in patient.get("name", []):
            given = " ".join(name.get("given", []))
            values.append(("name", f"{given} {name['family']}"))
            for prefix in name.get("prefix", []):
                values.append(("name", f"{prefix} {name['family']}"))
        for telecom in patient.get("telecom", []):
            if telecom.get("system") == "phone":
                values.append(("phone", telecom["value"]))
        for address in patient.get("address", []):
            for line in address.get("line", []):
                values.append(("address", line))
                if "postalCode" in address:
                    city, state, zip_code = address["city"], address["state"], address["postalCode"]
                    values.append(("address", f"{line}, {city}, {state} {zip_code}"))
        for identifier in patient.get("identifier", []):
            if identifier.get("system") == "http://hl7.org/fhir/sid/us-ssn":
                values.append(("ssn", identifier["value"]))
                values.append(("ssn", identifier["value"].replace("-", "")))
            codes = [c.get("code") for c in identifier.get("type", {}).get("coding", [])]
            if "MR" in codes:
                values.append(("mrn", f"MRN: {identifier['value']}"))
        if "birthDate" in patient:
            values.append(("date", patient["birthDate"]))
            year, month, day = patient["birthDate"].split("-")
            values.append(("date", f"{month}/{day}/{year}"))
    return values


SENTENCES = [
    "per the chart, {} was confirmed today.",
    "{}",
    "see: {}.",
    "value={}, status=ok",
]


def test_every_synthea_value_is_found_in_a_sentence(fixtures_dir: Path) -> None:
    values = _synthea_values(fixtures_dir)
    assert len(values) > 150
    kinds = {label for label, _ in values}
    assert kinds == {"name", "phone", "address", "ssn", "mrn", "date"}
    assert any("Manchester-by-the-Sea" in value for _, value in values)
    missed = [
        (label, value)
        for label, value in values
        for sentence in SENTENCES
        if not _covered(sentence.format(value), value)
    ]
    assert missed == []


# --- safety: linear by construction ------------------------------------------------------------


def _repeats(tree: Any) -> Iterator[tuple[int, int, Any]]:
    repeat_ops = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT}
    possessive = getattr(sre_constants, "POSSESSIVE_REPEAT", None)
    if possessive is not None:
        repeat_ops.add(possessive)
    for op, av in tree:
        if op in repeat_ops:
            low, high, body = av
            yield low, high, body
            yield from _repeats(body)
        elif op is sre_constants.BRANCH:
            for branch in av[1]:
                yield from _repeats(branch)
        elif op is sre_constants.SUBPATTERN:
            yield from _repeats(av[-1])
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            yield from _repeats(av[1])


def _all_patterns() -> list[str]:
    pats = [p.pattern.pattern for p in patterns._PASSES]
    helpers = (
        patterns._UNIT,
        patterns._STATE_BEFORE,
        patterns._CITY_BEFORE,
        patterns._EMAIL_LOCAL_BEFORE,
        patterns._ADDRESS_WORDS,
    )
    return [*pats, *(h.pattern for h in helpers)]


@pytest.mark.parametrize("source", _all_patterns())
def test_every_repetition_is_bounded_or_a_single_class_run(source: str) -> None:
    unbounded = []
    for _low, high, body in _repeats(sre_parse.parse(source)):
        if high == sre_constants.MAXREPEAT:
            body_ops = [op for op, _ in body]
            # Only a run of one character class may be unbounded ("\d{3,}", digit runs).
            assert body_ops in ([sre_constants.IN], [sre_constants.LITERAL]), source
            unbounded.append(body)
    assert len(unbounded) <= 1


@pytest.mark.parametrize("source", [p.pattern.pattern for p in patterns._PASSES])
def test_every_pass_starts_with_one_character_class(source: str) -> None:
    # So that the engine skips impossible start positions, and no scan restarts mid-run.
    first_op = sre_parse.parse(source)[0][0]
    assert first_op in (sre_constants.IN, sre_constants.LITERAL)


ADVERSARIAL_PIECES = [
    "1",
    "12",
    "1-",
    "-",
    ".",
    "@",
    "a@",
    "a.",
    "A",
    "Aa",
    "Aa ",
    "Mr. ",
    " ",
    "(",
    "+1",
    "Jan ",
    "St ",
    "O'",
    "van ",
    "MRN ",
    "x",
    "9",
    "/",
    ":",
    ",",
    "Ñ",
]


def _check_invariants(text: str, found: list[PhiMatch]) -> None:
    last_end = 0
    for m in found:
        assert 0 <= m.start < m.end <= len(text)
        assert m.start >= last_end
        last_end = m.end


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(ADVERSARIAL_PIECES), max_size=400), st.integers(1, 40))
def test_adversarial_input_costs_a_bounded_number_of_checks_per_character(
    pieces: list[str], times: int
) -> None:
    text = "".join(pieces) * times
    calls = 0
    original = patterns._PASSES

    def counting(classify: patterns._Classify) -> patterns._Classify:
        def wrapper(t: str, m: Any) -> Any:
            nonlocal calls
            calls += 1
            return classify(t, m)

        return wrapper

    counted = tuple(
        patterns._Pass(p.pattern, counting(p.classify), p.gate, p.rescan) for p in original
    )
    try:
        patterns._PASSES = counted  # type: ignore[misc]
        found = find_phi(text)
    finally:
        patterns._PASSES = original  # type: ignore[misc]
    _check_invariants(text, found)
    # Every match attempt that reaches code consumes or skips at least one character, per pass.
    assert calls <= len(patterns._PASSES) * (len(text) + 1)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=600))
def test_any_text_gives_ordered_disjoint_matches_and_redacts_them(text: str) -> None:
    found = find_phi(text)
    _check_invariants(text, found)
    assert looks_like_phi(text) == bool(found)
    redacted = redact(text, "\x00")
    assert redacted.count("\x00") - text.count("\x00") == len(found)


def test_long_runs_are_scanned_in_one_go() -> None:
    # Quadratic patterns would take minutes on these; linear ones take milliseconds.
    for piece in ("1", "1-", "a", "A", "Aa ", "a@", "a.", "Mr. ", "9 ", "+1 ", "Jan "):
        text = piece * 50_000
        _check_invariants(text, find_phi(text))
    assert _kinds("1" * 100_000) == [(PhiKind.MRN, "1" * 100_000)]
