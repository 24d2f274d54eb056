"""RFC 8785 canonical JSON: the rfc8785 package is the oracle, plus the RFC's own examples."""

from __future__ import annotations

import json
import math
import struct
from enum import IntEnum, StrEnum
from typing import Any

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from phivault.errors import InvalidInput
from phivault.ledger import canonical
from phivault.ledger.canonical import MAX_SAFE_INTEGER, canonical_json

safe_ints = st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
# Any Unicode scalar value: surrogate code points are not characters and JCS refuses them.
any_text = st.text(st.characters(codec="utf-8"))
# Keys whose code-point order is their UTF-16 order: everything below the surrogates.
low_keys = st.text(st.characters(max_codepoint=0xD7FF, codec="utf-8"))


def _documents(scalars: st.SearchStrategy[Any], keys: st.SearchStrategy[str]) -> Any:
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=6) | st.dictionaries(keys, children, max_size=6)
        ),
        max_leaves=40,
    )


any_documents = _documents(
    st.none() | st.booleans() | safe_ints | finite_floats | any_text, any_text
)
fast_documents = _documents(st.none() | st.booleans() | safe_ints | any_text, low_keys)


def _stdlib_fast_path(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@given(fast_documents)
def test_json_dumps_is_jcs_without_floats_and_with_low_keys(document: Any) -> None:
    # The claim the fast path rests on, checked against the oracle directly.
    expected = rfc8785.dumps(document)
    assert _stdlib_fast_path(document) == expected
    assert canonical_json(document) == expected


@given(any_documents)
def test_every_document_matches_rfc8785(document: Any) -> None:
    assert canonical_json(document) == rfc8785.dumps(document)


@given(finite_floats)
def test_every_float_matches_rfc8785(number: float) -> None:
    assert canonical_json(number) == rfc8785.dumps(number)
    assert canonical_json([number, {"x": number}]) == rfc8785.dumps([number, {"x": number}])


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_every_bit_pattern_of_a_double_matches_rfc8785(bits: int) -> None:
    number = struct.unpack(">d", bits.to_bytes(8, "big"))[0]
    if math.isfinite(number):
        assert canonical_json(number) == rfc8785.dumps(number)
    else:
        with pytest.raises(InvalidInput):
            canonical_json(number)


@given(st.dictionaries(any_text, safe_ints | any_text, max_size=12))
def test_keys_sort_by_utf16_code_units(document: dict[str, Any]) -> None:
    assert canonical_json(document) == rfc8785.dumps(document)


# RFC 8785 Appendix B: IEEE 754 bit patterns and their ECMAScript serialization.
RFC8785_NUMBERS = [
    (0x0000000000000000, "0"),
    (0x8000000000000000, "0"),
    (0x0000000000000001, "5e-324"),
    (0x8000000000000001, "-5e-324"),
    (0x7FEFFFFFFFFFFFFF, "1.7976931348623157e+308"),
    (0xFFEFFFFFFFFFFFFF, "-1.7976931348623157e+308"),
    (0x4340000000000000, "9007199254740992"),
    (0xC340000000000000, "-9007199254740992"),
    (0x4430000000000000, "295147905179352830000"),
    (0x44B52D02C7E14AF5, "9.999999999999997e+22"),
    (0x44B52D02C7E14AF6, "1e+23"),
    (0x44B52D02C7E14AF7, "1.0000000000000001e+23"),
    (0x444B1AE4D6E2EF4E, "999999999999999700000"),
    (0x444B1AE4D6E2EF4F, "999999999999999900000"),
    (0x444B1AE4D6E2EF50, "1e+21"),
    (0x3EB0C6F7A0B5ED8C, "9.999999999999997e-7"),
    (0x3EB0C6F7A0B5ED8D, "0.000001"),
    (0x41B3DE4355555553, "333333333.3333332"),
    (0x41B3DE4355555554, "333333333.33333325"),
    (0x41B3DE4355555555, "333333333.3333333"),
    (0x41B3DE4355555556, "333333333.3333334"),
    (0x41B3DE4355555557, "333333333.33333343"),
    (0xBECBF647612F3696, "-0.0000033333333333333333"),
    (0x43143FF3C1CB0959, "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "expected"), RFC8785_NUMBERS, ids=[e for _, e in RFC8785_NUMBERS])
def test_rfc8785_number_examples(bits: int, expected: str) -> None:
    number = struct.unpack(">d", bits.to_bytes(8, "big"))[0]
    assert canonical_json(number) == expected.encode()


def test_rfc8785_sample_document() -> None:
    document = {
        "numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001],
        "string": "\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"/",
        "literals": [None, True, False],
    }
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(document) == expected.encode("utf-8")


def test_rfc8785_sorting_example() -> None:
    document = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    encoded = canonical_json(document).decode("utf-8")
    order = [key for key in json.loads(encoded)]
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_string_escaping() -> None:
    assert canonical_json('\x00\x1f\x7f\u2028"\\/\b\f\n\r\t') == (
        b'"\\u0000\\u001f\x7f\xe2\x80\xa8\\"\\\\/\\b\\f\\n\\r\\t"'
    )


def test_tuples_and_subclasses_encode_as_their_base_values() -> None:
    class Colour(StrEnum):
        RED = "red"

    class Level(IntEnum):
        HIGH = 3

    assert canonical_json((1, "a")) == b'[1,"a"]'
    assert canonical_json({Colour.RED: [Level.HIGH, Colour.RED]}) == b'{"red":[3,"red"]}'
    assert canonical_json(Level.HIGH) == b"3"


def test_integer_limits() -> None:
    assert canonical_json(MAX_SAFE_INTEGER) == b"9007199254740991"
    assert canonical_json(-MAX_SAFE_INTEGER) == b"-9007199254740991"
    for too_big in (MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER - 1, 2**64):
        with pytest.raises(InvalidInput, match=r"integer outside"):
            canonical_json(too_big)


@pytest.mark.parametrize(
    ("document", "path", "reason"),
    [
        ({"a": [1, {"b": 2**53}]}, "/a/1/b", "integer outside"),
        ({"a": float("nan")}, "/a", "NaN"),
        ([0.5, float("inf")], "/1", "NaN and infinities"),
        ({"x/y~": -math.inf}, "/x~1y~0", "NaN"),
        ({"a": {1: "b"}}, "/a", "object key is not a string"),
        ({"a": b"bytes"}, "/a", "bytes is not a JSON type"),
        ({"a": {"\ud800": 1}}, "/a", "lone surrogate"),
        ({"a": ["ok", "\udfff"]}, "/a/1", "lone surrogate"),
        ({"a": 1.5, "b": "\ud83d"}, "/b", "lone surrogate"),
        ({"s": {1, 2}}, "/s", "set is not a JSON type"),
    ],
)
def test_refusals_name_the_place_not_the_value(document: Any, path: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as caught:
        canonical_json(document)
    assert caught.value.path == path
    with pytest.raises((ValueError, TypeError, rfc8785.CanonicalizationError)):
        rfc8785.dumps(document)


def test_secret_values_are_not_echoed() -> None:
    with pytest.raises(InvalidInput) as caught:
        canonical_json({"ssn": 123456789012345678})
    assert "123456789012345678" not in str(caught.value)


def test_cycles_and_deep_nesting_are_refused() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(InvalidInput, match="nested too deeply"):
        canonical_json(cyclic)
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidInput, match="nested too deeply"):
        canonical_json(deep)


def test_an_audit_event_document_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def _no_slow_path(value: Any, out: list[str]) -> None:
        raise AssertionError("slow path used")

    monkeypatch.setattr(canonical, "_write", _no_slow_path)
    document: dict[str, Any] = {
        "kind": "rest",
        "subtype": "read",
        "action": "R",
        "recorded": "2026-01-02T03:04:05.678Z",
        "outcome": 0,
        "tenant": "t1",
        "agents": [{"who": "Practitioner/1", "requestor": True, "roles": ["physician"]}],
        "source": {"observer": "node-1"},
        "seq": 42,
    }
    assert canonical_json(document) == rfc8785.dumps(document)
