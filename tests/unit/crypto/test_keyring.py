"""The key ring end to end on the sealed local keystore, with its keys in SQLite and in PostgreSQL
(the `env` fixture runs each test on both): create, seal/open, audit."""

from __future__ import annotations

import pytest
from crypto_support import Env

from phivault.crypto.elements import ElementRef, key_version_of
from phivault.crypto.errors import (
    DecryptionFailed,
    InvalidShares,
    KeyNotFound,
    KeyUnavailable,
    Sealed,
)
from phivault.crypto.ports import KeyPurpose
from phivault.errors import InvalidInput
from phivault.ledger.events import EventKind, Outcome

REF = ElementRef("acme", "Patient", "p1", "name[0].family")


async def test_create_seal_open_round_trip(env: Env) -> None:
    info = await env.ring.create_patient_key("acme", "p1")
    assert info.purpose == "dek" and info.version == 1 and info.patient == "p1"
    cipher = await env.ring.patient_cipher("acme", "p1")
    sealed = cipher.seal(REF, b"Smith")
    assert b"Smith" not in sealed
    assert cipher.open(REF, sealed) == b"Smith"
    assert key_version_of(sealed) == 1


async def test_create_is_idempotent_and_audited(env: Env) -> None:
    first = await env.ring.create_patient_key("acme", "p1")
    second = await env.ring.create_patient_key("acme", "p1")
    assert first.key_id == second.key_id
    creates = [e for e in env.sink.events if e.subtype == "create"]
    # tenant keys (KEK, blind index, ledger token) once, then the patient's DEK once
    assert len(creates) == 2
    assert all(e.kind is EventKind.KEY_OPERATION for e in env.sink.events)
    assert creates[1].patient == "Patient/p1"


async def test_fetch_unknown_patient_is_key_not_found(env: Env) -> None:
    with pytest.raises(KeyNotFound):
        await env.ring.patient_cipher("acme", "nobody")
    cipher = await env.ring.patient_cipher("acme", "new", create=True)
    assert cipher.active_version == 1


async def test_sealed_refuses_and_changes_nothing(env: Env) -> None:
    await env.ring.create_patient_key("acme", "p1")
    await env.ring.seal()
    assert env.ring.cached_ciphers == 0
    with pytest.raises(Sealed):
        await env.ring.patient_cipher("acme", "p1")
    with pytest.raises(Sealed):
        await env.ring.create_patient_key("acme", "p2")
    with pytest.raises(Sealed):
        await env.ring.rotate_kek("acme")
    assert env.store.open_jobs("acme") == []
    assert [k.subject for k in env.store.records("acme", KeyPurpose.DEK)] == ["p1"]
    assert env.sink.events[-1].subtype == "seal"


async def test_wrong_shares_are_refused_and_audited(env: Env) -> None:
    await env.ring.seal()
    with pytest.raises(InvalidShares):
        await env.ring.unseal(env.shares[:2])
    assert env.ring.sealed
    event = env.sink.events[-1]
    assert event.subtype == "unseal" and event.outcome is Outcome.MINOR_FAILURE
    await env.ring.unseal(env.shares[2:])
    assert not env.ring.sealed


async def test_bad_ids_are_invalid_input(env: Env) -> None:
    with pytest.raises(InvalidInput):
        await env.ring.create_patient_key("acme", "John Smith")
    with pytest.raises(InvalidInput):
        await env.ring.create_patient_key("", "p1")


async def test_tampered_wrapped_dek_is_a_failed_unwrap_event(env: Env) -> None:
    await env.ring.create_patient_key("acme", "p1")
    (record,) = env.store.records("acme", KeyPurpose.DEK, "p1")
    assert record.wrapped is not None
    flipped = bytes([record.wrapped[0] ^ 1]) + record.wrapped[1:]
    env.store.rewrap([(record.seq, record.wrapped, flipped, record.wrapped_by)], env.clock())
    with pytest.raises(KeyUnavailable):
        await env.ring.patient_cipher("acme", "p1")
    event = env.sink.events[-1]
    assert event.subtype == "unwrap" and event.outcome is Outcome.SERIOUS_FAILURE
    assert event.patient == "Patient/p1"


async def test_wrapped_dek_moved_to_another_patient_does_not_unwrap(env: Env) -> None:
    await env.ring.create_patient_key("acme", "p1")
    await env.ring.create_patient_key("acme", "p2")
    (one,) = env.store.records("acme", KeyPurpose.DEK, "p1")
    (two,) = env.store.records("acme", KeyPurpose.DEK, "p2")
    assert one.wrapped is not None and two.wrapped is not None
    env.store.rewrap([(two.seq, two.wrapped, one.wrapped, two.wrapped_by)], env.clock())
    with pytest.raises(KeyUnavailable):
        await env.ring.patient_cipher("acme", "p2")


async def test_tenants_are_separate(env: Env) -> None:
    acme = await env.ring.patient_cipher("acme", "p1", create=True)
    other = await env.ring.patient_cipher("globex", "p1", create=True)
    sealed = acme.seal(REF, b"x")
    moved = ElementRef("globex", REF.resource_type, REF.resource_id, REF.path)
    with pytest.raises(DecryptionFailed):
        other.open(moved, sealed)
    with pytest.raises(InvalidInput):
        other.open(REF, sealed)  # a cipher refuses another tenant's element outright


async def test_ledger_tokens_fit_the_event_grammar(env: Env) -> None:
    tokenizer = await env.ring.ledger_tokenizer("acme")
    token = tokenizer.token("mrn", "MRN-0001")
    assert len(token) == 22 and token == tokenizer.token("mrn", "MRN-0001")
    assert token != tokenizer.token("query", "MRN-0001")
    other = await env.ring.ledger_tokenizer("globex")
    assert other.token("mrn", "MRN-0001") != token


async def test_cache_is_bounded_and_wiped_on_seal(env: Env) -> None:
    for i in range(5):
        await env.ring.patient_cipher("acme", f"p{i}", create=True)
    assert env.ring.cached_ciphers == 5
    await env.ring.seal()
    assert env.ring.cached_ciphers == 0


async def test_unseal_is_undone_when_the_ledger_cannot_record_it(env: Env) -> None:
    from phivault.ledger.errors import LedgerUnavailable

    await env.ring.seal()
    env.sink.failing = True
    with pytest.raises(LedgerUnavailable):
        await env.ring.unseal(env.shares[:3])
    assert env.ring.sealed


async def test_destructive_operations_fail_closed_without_the_ledger(env: Env) -> None:
    from datetime import timedelta

    from phivault.ledger.errors import LedgerUnavailable

    await env.ring.create_patient_key("acme", "p1")
    env.sink.failing = True
    with pytest.raises(LedgerUnavailable):
        await env.ring.shred_patient("acme", "p1", reason="erasure-request")
    with pytest.raises(LedgerUnavailable):
        await env.ring.place_hold("acme", "p1", until=env.clock() + timedelta(days=1), reason="x")
    with pytest.raises(LedgerUnavailable):
        await env.ring.create_patient_key("acme", "p2")
    assert env.store.shred_record("acme", "p1") is None
    assert env.store.holds("acme", "p1") == []
    assert env.store.records("acme", KeyPurpose.DEK, "p2") == []
