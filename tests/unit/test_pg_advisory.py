"""Advisory lock keys: one derivation, and the keys of existing locks never change (a process
of the previous release and one of this release must exclude each other)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from phivault.crypto.keystore_postgres import _lock_key
from phivault.ledger.postgres_store import writer_lock_key
from phivault.pg_advisory import advisory_key


def test_the_keys_of_existing_locks_are_what_earlier_releases_derived() -> None:
    assert writer_lock_key("phivault_ledger") == 1904971120363203767
    assert _lock_key("shred", "phivault_keys", "default") == -1485825772337186095
    assert advisory_key("phivault.records.migrate") == -6228991518800874092


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
def test_every_key_fits_a_signed_bigint(name: str) -> None:
    assert -(2**63) <= advisory_key(name) < 2**63


def test_locks_of_different_schemas_differ() -> None:
    assert writer_lock_key("a") != writer_lock_key("b")
    assert advisory_key("phivault.records.reconcile:a") != advisory_key(
        "phivault.records.reconcile:b"
    )
