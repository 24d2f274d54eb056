"""Blind indexes: documented normalization, scoping per tenant and field, versioning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phivault.crypto.blind_index import (
    BlindIndexer,
    IndexField,
    Normalization,
    normalize,
)
from phivault.errors import InvalidInput

FAMILY = IndexField("Patient.name.family", Normalization.NAME)
GIVEN = IndexField("Patient.name.given", Normalization.NAME)
SSN = IndexField("Patient.identifier.ssn", Normalization.IDENTIFIER)
PHONE = IndexField("Patient.telecom.phone", Normalization.PHONE)
BIRTH = IndexField("Patient.birthDate", Normalization.DATE)


@pytest.mark.parametrize(
    "kind, a, b",
    [
        (Normalization.NAME, "  O'Brien-Smith ", "o brien smith"),
        (Normalization.NAME, "José", "JOSE"),
        (Normalization.NAME, "Müller", "muller"),
        (Normalization.NAME, "van  der\tBerg", "Van der Berg"),
        (Normalization.IDENTIFIER, "123-45-6789", "123456789"),
        (Normalization.IDENTIFIER, "ab 12.cd/3", "AB12CD3"),
        (Normalization.PHONE, "(555) 123-4567", "+1 555 123 4567"),
        (Normalization.PHONE, "0044 20 7946 0958", "+44 20 7946 0958"),
        (Normalization.DATE, "1970-01-05", "1970-01-05T10:00:00Z"),
    ],
)
def test_values_meant_alike_normalize_alike(kind: Normalization, a: str, b: str) -> None:
    assert normalize(kind, a) == normalize(kind, b)


@pytest.mark.parametrize(
    "kind, a, b",
    [
        (Normalization.DATE, "1970", "1970-01"),
        (Normalization.NAME, "Anne", "Anna"),
        (Normalization.EXACT, "Code", "code"),
    ],
)
def test_values_meant_differently_stay_different(kind: Normalization, a: str, b: str) -> None:
    assert normalize(kind, a) != normalize(kind, b)


@pytest.mark.parametrize(
    "kind, value",
    [
        (Normalization.DATE, "1970-02-30"),
        (Normalization.DATE, "05/01/1970"),
        (Normalization.PHONE, "12"),
        (Normalization.NAME, " -- "),
    ],
)
def test_bad_values_are_refused_without_echoing_them(kind: Normalization, value: str) -> None:
    with pytest.raises(InvalidInput) as info:
        normalize(kind, value)
    assert value.strip() not in str(info.value) or not value.strip()


@given(st.text(min_size=1, max_size=30))
def test_name_normalization_is_idempotent(value: str) -> None:
    try:
        once = normalize(Normalization.NAME, value)
    except InvalidInput:
        return
    assert normalize(Normalization.NAME, once) == once


def _indexer(tenant: str = "acme", versions: dict[int, bytes] | None = None) -> BlindIndexer:
    keys = versions or {1: bytes(range(32))}
    return BlindIndexer(tenant, keys, max(keys))


def test_tokens_are_scoped_per_tenant_field_and_version() -> None:
    one = _indexer()
    token = one.token(FAMILY, "Smith")
    assert len(token.token) == 22 and token.version == 1 and token.field == FAMILY.name
    assert one.token(FAMILY, " smith ") == token
    assert one.token(GIVEN, "Smith").token != token.token
    assert _indexer("globex").token(FAMILY, "Smith").token != token.token
    two = _indexer(versions={1: bytes(range(32)), 2: bytes(range(1, 33))})
    both = two.tokens(FAMILY, "Smith")
    assert [t.version for t in both] == [1, 2]
    assert both[0] == token  # version 1 still matches the old tokens during rotation
    assert two.token(FAMILY, "Smith").version == 2
    assert "Smith" not in repr(two) and bytes(range(32)).hex() not in repr(two)


def test_field_names_are_checked() -> None:
    with pytest.raises(InvalidInput):
        IndexField("name family; drop", Normalization.NAME)
