"""The early check that a written id is one the audit ledger can record, and its shortcut for
server-assigned ids (``str(uuid.uuid4())``), which skips building the ledger's model."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phivault.errors import InvalidInput
from phivault.ledger.events import Entity
from phivault.records.repository import _SERVER_ID, _check_auditable


@given(st.uuids())
def test_every_uuid_the_shortcut_admits_is_one_the_ledger_records(value: uuid.UUID) -> None:
    the_id = str(value)
    assert _SERVER_ID.fullmatch(the_id)
    Entity(what=f"Observation/{the_id}")  # the model agrees: no PHI shape fits a uuid
    _check_auditable("Observation", the_id)


@given(st.from_regex(r"[0-9]{8}-[0-9]{4}-[0-9]{4}-[0-9]{4}-[0-9]{12}", fullmatch=True))
def test_all_digit_uuids_are_recorded_too(the_id: str) -> None:
    """The groups most like personal data (digits only) still fit no refused shape."""
    Entity(what=f"Observation/{the_id}")
    _check_auditable("Observation", the_id)


@pytest.mark.parametrize(
    ("resource_type", "the_id"),
    [
        ("Patient", "123-45-6789"),  # an SSN
        ("Patient", "555-123-4567"),  # a phone number
        ("Patient", "1980-01-02"),  # a date
        ("Patient", "12345678-1234-1234-1234-123-45-6789"),  # uuid-like, not a uuid
        ("patient", "8b6a3c52-1f0e-4d5e-9a4b-2c1d0e9f8a7b"),  # not a type name
    ],
)
def test_ids_outside_the_shortcut_still_meet_the_ledgers_model(
    resource_type: str, the_id: str
) -> None:
    assert not (_SERVER_ID.fullmatch(the_id) and resource_type[0].isupper())
    with pytest.raises(InvalidInput) as caught:
        _check_auditable(resource_type, the_id, path="Bundle.entry[0].request.url")
    assert caught.value.path == "Bundle.entry[0].request.url"
    assert the_id not in str(caught.value)
