"""Rotation (KEK, DEK, blind index), shredding and holds, on real SQLite element stores and
both keystores (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from crypto_support import Env, stored_bytes

from phivault.crypto.blind_index import IndexField, Normalization
from phivault.crypto.element_store import SqliteSealedElementStore
from phivault.crypto.elements import ElementRef, key_version_of
from phivault.crypto.errors import (
    DecryptionFailed,
    PatientShredded,
    RetentionHold,
    RotationInProgress,
)
from phivault.crypto.ports import JobKind, KeyPurpose, KeyState
from phivault.errors import InvalidInput
from phivault.ledger.events import Outcome

FAMILY = IndexField("Patient.name.family", Normalization.NAME)
NAMES = {"p1": "Smith", "p2": "Jones", "p3": "Smith"}


async def _load(env: Env, store: SqliteSealedElementStore, tenant: str = "acme") -> None:
    indexer = await env.ring.blind_indexer(tenant)
    for patient, family in NAMES.items():
        cipher = await env.ring.patient_cipher(tenant, patient, create=True)
        for path, value in (("name[0].family", family), ("birthDate", "1970-01-01")):
            ref = ElementRef(tenant, "Patient", patient, path)
            index = FAMILY if path.startswith("name") else None
            tokens = indexer.tokens(FAMILY, value) if index else ()
            store.put(ref, patient, cipher.seal(ref, value.encode()), index=index, tokens=tokens)


async def _read_all(
    env: Env, store: SqliteSealedElementStore, tenant: str = "acme"
) -> dict[str, str]:
    out = {}
    for element in store.scan(tenant, patient=None, after=0, limit=1000):
        cipher = await env.ring.patient_cipher(tenant, element.patient)
        out[f"{element.patient}/{element.ref.path}"] = cipher.open(
            element.ref, element.ciphertext
        ).decode()
    return out


async def test_kek_rotation_rewraps_without_touching_data(
    env: Env, elements: SqliteSealedElementStore
) -> None:
    await _load(env, elements)
    before = {
        e.position: e.ciphertext for e in elements.scan("acme", patient=None, after=0, limit=100)
    }
    (old_kek,) = env.store.live("acme", KeyPurpose.KEK)
    report = await env.ring.rotate_kek("acme", batch=2)
    assert report.kind is JobKind.KEK and report.processed == 5  # 3 DEKs + index + token key
    assert report.retired == (old_kek.key_id,)
    (new_kek,) = env.store.live("acme", KeyPurpose.KEK)
    assert new_kek.version == 2
    assert all(r.wrapped_by == new_kek.key_id for r in env.store.records("acme", KeyPurpose.DEK))
    assert env.store.get(old_kek.key_id).wrapped is None
    after = {
        e.position: e.ciphertext for e in elements.scan("acme", patient=None, after=0, limit=100)
    }
    assert after == before
    await env.ring.seal()
    await env.ring.unseal(env.shares[1:4])  # fresh process state: everything unwraps from disk
    assert (await _read_all(env, elements))["p2/name[0].family"] == "Jones"
    assert [e.outcome_reason for e in env.sink.events if e.subtype == "rotate"] == [
        "kek-start",
        "kek-done",
    ]


async def test_dek_rotation_reencrypts_and_retires_old_versions(
    env: Env, elements: SqliteSealedElementStore
) -> None:
    await _load(env, elements)
    old = {e.ref: e.ciphertext for e in elements.scan("acme", patient=None, after=0, limit=100)}
    seen: list[int] = []
    report = await env.ring.rotate_deks(
        "acme", elements, batch=2, progress=lambda d, t: seen.append(d)
    )
    assert report.new_keys == 3 and report.processed == 6 and len(report.retired) == 3
    assert seen == [2, 4, 6]
    for element in elements.scan("acme", patient=None, after=0, limit=100):
        assert key_version_of(element.ciphertext) == 2
    assert (await _read_all(env, elements))["p1/name[0].family"] == "Smith"
    # old ciphertext (say, from a backup) no longer opens: version 1 is destroyed
    cipher = await env.ring.patient_cipher("acme", "p1")
    ref = ElementRef("acme", "Patient", "p1", "name[0].family")
    with pytest.raises(DecryptionFailed):
        cipher.open(ref, old[ref])
    states = {(r.subject, r.version): r.state for r in env.store.records("acme", KeyPurpose.DEK)}
    assert states[("p1", 1)] is KeyState.DESTROYED and states[("p1", 2)] is KeyState.ACTIVE


async def test_dek_rotation_of_one_patient(env: Env, elements: SqliteSealedElementStore) -> None:
    await _load(env, elements)
    report = await env.ring.rotate_deks("acme", elements, patient="p2")
    assert report.new_keys == 1 and report.processed == 2
    versions = {
        e.patient: key_version_of(e.ciphertext)
        for e in elements.scan("acme", patient=None, after=0, limit=100)
    }
    assert versions == {"p1": 1, "p2": 2, "p3": 1}


async def test_index_rotation_keeps_search_working_then_retires(
    env: Env, elements: SqliteSealedElementStore
) -> None:
    await _load(env, elements)
    indexer = await env.ring.blind_indexer("acme")
    assert {e.patient for e in elements.find("acme", indexer.tokens(FAMILY, "smith"))} == {
        "p1",
        "p3",
    }
    report = await env.ring.rotate_index("acme", elements, batch=1)
    assert report.new_keys == 1 and report.processed == 6
    indexer = await env.ring.blind_indexer("acme")
    assert indexer.versions == (2,)
    assert elements.token_versions("acme") == {2}
    assert {e.patient for e in elements.find("acme", indexer.tokens(FAMILY, "SMITH"))} == {
        "p1",
        "p3",
    }


async def test_lookups_use_all_live_versions_mid_rotation(
    env: Env, elements: SqliteSealedElementStore
) -> None:
    await _load(env, elements)
    old_tokens = (await env.ring.blind_indexer("acme")).tokens(FAMILY, "Jones")
    # simulate a rotation stopped after its new key was made: both versions are live
    (old,) = env.store.live("acme", KeyPurpose.BLIND_INDEX)
    (kek,) = env.store.live("acme", KeyPurpose.KEK)
    kek_aead = await env.ring._kek(kek.key_id)
    new = env.ring._wrapped_new(
        "acme",
        purpose=KeyPurpose.BLIND_INDEX,
        subject="",
        version=2,
        kek=kek,
        kek_aead=kek_aead,
        job=None,
    )
    env.store.add([new], demote=[old.key_id])
    env.ring._indexers.clear()
    indexer = await env.ring.blind_indexer("acme")
    tokens = indexer.tokens(FAMILY, "Jones")
    assert [t.version for t in tokens] == [1, 2] and tokens[0] == old_tokens[0]
    assert {e.patient for e in elements.find("acme", tokens)} == {"p2"}


async def test_another_kind_of_rotation_must_finish_first(
    env: Env, elements: SqliteSealedElementStore
) -> None:
    await _load(env, elements)
    job = await env.ring._job("acme", JobKind.DEK, None)  # an unfinished DEK rotation
    with pytest.raises(RotationInProgress, match="rotate --dek"):
        await env.ring.rotate_kek("acme")
    report = await env.ring.rotate_deks("acme", elements)
    assert report.job_id == job.job_id


async def test_shred_destroys_keys_tokens_and_leaves_evidence(
    env: Env, elements: SqliteSealedElementStore
) -> None:
    await _load(env, elements)
    element = elements.get(ElementRef("acme", "Patient", "p1", "name[0].family"))
    assert element is not None
    p1_before = env.store.records("acme", KeyPurpose.DEK, "p1")
    assert p1_before[0].wrapped is not None and p1_before[0].wrapped in stored_bytes(env)
    outcome = await env.ring.shred_patient(
        "acme", "p1", reason="erasure-request", elements=elements
    )
    record = outcome.record
    assert len(record.keys_destroyed) == 1 and record.reason == "erasure-request"
    # one process (embedded shape): its own cache was the only one, dropped at once
    assert outcome.propagation.complete and not outcome.pending
    event = env.sink.events[record.ledger_index]
    assert event.subtype == "shred" and event.patient == "Patient/p1"
    with pytest.raises(PatientShredded):
        await env.ring.patient_cipher("acme", "p1")
    with pytest.raises(PatientShredded):
        await env.ring.create_patient_key("acme", "p1")
    assert all(r.wrapped is None for r in env.store.records("acme", KeyPurpose.DEK, "p1"))
    indexer = await env.ring.blind_indexer("acme")
    assert {e.patient for e in elements.find("acme", indexer.tokens(FAMILY, "Smith"))} == {"p3"}
    # the wrapped key bytes are gone from the database file itself (PostgreSQL: from every row
    # a session can read; old row versions: see test_keystore_postgres.py)
    raw = stored_bytes(env)
    (p2,) = env.store.records("acme", KeyPurpose.DEK, "p2")
    assert p2.wrapped is not None and p2.wrapped in raw
    assert all(r.wrapped is None or r.wrapped not in raw for r in [*p1_before])
    again = await env.ring.shred_patient("acme", "p1", reason="again")  # idempotent
    assert again.record == record and again.propagation.complete
    # shredding works while sealed: it needs no key
    await env.ring.seal()
    await env.ring.shred_patient("acme", "p2", reason="erasure-request")
    assert p2.wrapped not in stored_bytes(env)


async def test_shredded_patient_data_in_a_backup_stays_unreadable(
    env: Env, elements: SqliteSealedElementStore, tmp_path: Path
) -> None:
    await _load(env, elements)
    backup_path = tmp_path / "backup.sqlite3"
    elements._db.execute(f"VACUUM INTO '{backup_path}'")
    await env.ring.shred_patient("acme", "p1", reason="erasure-request", elements=elements)
    await env.ring.seal()
    await env.ring.unseal(env.shares[:3])  # a restarted server, keys reloaded from disk
    backup = SqliteSealedElementStore(backup_path)
    rows = backup.scan("acme", patient="p1", after=0, limit=100)
    assert rows  # the backup still holds p1's ciphertext ...
    with pytest.raises(PatientShredded):
        await env.ring.patient_cipher("acme", "p1")  # ... and nothing opens it
    other = await env.ring.patient_cipher("acme", "p2")
    for row in rows:  # not even another patient's key, of course
        with pytest.raises(DecryptionFailed):
            other.open(row.ref, row.ciphertext)
    backup.close()


async def test_hold_refuses_shred_and_changes_nothing(
    env: Env, elements: SqliteSealedElementStore
) -> None:
    await _load(env, elements)
    until = env.clock() + timedelta(days=30)
    await env.ring.place_hold("acme", "p1", until=until, reason="litigation")
    with pytest.raises(RetentionHold, match="retention hold until") as info:
        await env.ring.shred_patient("acme", "p1", reason="erasure-request")
    assert info.value.reason == "litigation"
    refused = env.sink.events[-1]
    assert refused.outcome is Outcome.MINOR_FAILURE and refused.outcome_reason == "retention-hold"
    assert env.store.shred_record("acme", "p1") is None
    assert (await env.ring.patient_cipher("acme", "p1")).active_version == 1
    env.clock.advance(days=31)
    await env.ring.shred_patient("acme", "p1", reason="erasure-request")


async def test_hold_input_is_checked(env: Env) -> None:
    with pytest.raises(InvalidInput, match="future"):
        await env.ring.place_hold("acme", "p1", until=env.clock(), reason="litigation")
    with pytest.raises(InvalidInput, match="never free text"):
        await env.ring.place_hold(
            "acme", "p1", until=env.clock() + timedelta(days=1), reason="John Smith asked"
        )


async def test_inventory_lists_custody_facts_not_material(env: Env) -> None:
    await env.ring.create_patient_key("acme", "p1")
    inventory = env.ring.inventory()
    assert inventory.root.purpose == "root" and inventory.root.state == "unsealed"
    purposes = sorted(k.purpose for k in inventory.keys)
    assert purposes == ["blind-index", "kek", "ledger-token"]
    assert inventory.deks[0].count == 1
    kek = next(k for k in inventory.keys if k.purpose == "kek")
    assert kek.principals == ("service:phivault-keys",) and kek.provider == "sealed"
    one = env.ring.inventory(tenant="acme", patient="p1")
    assert [k.purpose for k in one.keys] == ["dek"]
    doc = inventory.to_json()
    assert "wrapped" not in str(doc).replace("wrapped_by", "")


async def test_rotating_an_unknown_patient_is_refused_and_changes_nothing(
    env: Env, elements: SqliteSealedElementStore
) -> None:
    from phivault.crypto.errors import KeyNotFound

    await _load(env, elements)
    before = len(env.sink.events)
    with pytest.raises(KeyNotFound, match="Patient/nobody"):
        await env.ring.rotate_deks("acme", elements, patient="nobody")
    assert env.store.open_jobs("acme") == [] and len(env.sink.events) == before


async def test_concurrent_creates_make_one_key(env: Env) -> None:
    import asyncio

    infos = await asyncio.gather(*(env.ring.create_patient_key("acme", "p9") for _ in range(10)))
    assert len({info.key_id for info in infos}) == 1
    assert len(env.store.records("acme", KeyPurpose.DEK, "p9")) == 1
    assert len(env.store.records("acme", KeyPurpose.KEK)) == 1


async def test_rotations_skip_a_shredded_patient(
    env: Env, elements: SqliteSealedElementStore
) -> None:
    await _load(env, elements)
    await env.ring.shred_patient("acme", "p1", reason="erasure-request", elements=elements)
    index = await env.ring.rotate_index("acme", elements)
    deks = await env.ring.rotate_deks("acme", elements)
    assert index.processed == 6 and deks.new_keys == 2
    versions = {
        e.patient: key_version_of(e.ciphertext)
        for e in elements.scan("acme", patient=None, after=0, limit=100)
    }
    assert versions == {"p1": 1, "p2": 2, "p3": 2}  # p1's ciphertext is noise now
    indexer = await env.ring.blind_indexer("acme")
    assert {e.patient for e in elements.find("acme", indexer.tokens(FAMILY, "Smith"))} == {"p3"}


async def test_settle_pass_reseals_what_a_stale_worker_wrote(
    env: Env, elements: SqliteSealedElementStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker with a cached pre-rotation cipher writes during the rotation: the second
    pass after the settle time re-seals it before the old key is destroyed."""
    import asyncio

    await _load(env, elements)
    stale = await env.ring.patient_cipher("acme", "p2")  # a worker's cache, old version active
    ref = ElementRef("acme", "Patient", "p2", "telecom[0].value")
    real_sleep = asyncio.sleep

    async def sleep_and_write(seconds: float) -> None:
        elements.put(ref, "p2", stale.seal(ref, b"555-0100"))  # written with version 1
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep_and_write)
    report = await env.ring.rotate_deks("acme", elements, settle_s=300)
    assert report.processed == 6 + 7  # first pass, then the verify pass (one more element)
    element = elements.get(ref)
    assert element is not None and key_version_of(element.ciphertext) == 2
    cipher = await env.ring.patient_cipher("acme", "p2")
    assert cipher.open(ref, element.ciphertext) == b"555-0100"


async def test_index_settle_pass_indexes_what_a_stale_worker_wrote(
    env: Env, elements: SqliteSealedElementStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    await _load(env, elements)
    stale = await env.ring.blind_indexer("acme")  # a worker's cache: version 1 only
    cipher = await env.ring.patient_cipher("acme", "p4", create=True)
    ref = ElementRef("acme", "Patient", "p4", "name[0].family")
    real_sleep = asyncio.sleep

    async def sleep_and_write(seconds: float) -> None:
        elements.put(
            ref,
            "p4",
            cipher.seal(ref, b"Smith"),
            index=FAMILY,
            tokens=stale.tokens(FAMILY, "Smith"),
        )
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep_and_write)
    await env.ring.rotate_index("acme", elements, settle_s=300)
    indexer = await env.ring.blind_indexer("acme")
    assert indexer.versions == (2,)
    found = {e.patient for e in elements.find("acme", indexer.tokens(FAMILY, "Smith"))}
    assert found == {"p1", "p3", "p4"}
