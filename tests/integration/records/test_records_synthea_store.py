"""Synthea patients through the real pipeline into the store, on both engines: planned as
transactions (references rewritten), split into groups, sealed under real per-patient keys,
indexed with real blind tokens; then found again, read back equal, re-sealed by DEK rotation
and shredded; and the SQLite files hold no direct identifier in clear."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from records_store_support import StoreFactory

from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.ledger.testing import InMemoryAuditSink
from phivault.records.bundles import ConditionalLookup, plan_transaction
from phivault.records.classification import ElementGroup
from phivault.records.query import parse_search
from phivault.records.search_params import index_entries, patient_of
from phivault.records.split import ClassifiedResource, group_element_ref, split
from phivault.records.store import (
    DIRECTORY_SUBJECT,
    NewVersion,
    ResourceKey,
    SqlRecordStore,
    StaleBlindIndex,
    StoredVersion,
    VersionConflict,
    blind_terms,
)
from postgres_support import ADMIN_CONNINFO

TENANT = "t1"
NOW = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)
PATIENTS = ("sof2019_Clemente_Kreiger.json", "sof2019_Felipe_Cazares.json")


@pytest.fixture
async def ring(tmp_path: Path) -> AsyncIterator[KeyRing]:
    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=2)
    keystore = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    ring = KeyRing(
        store=keystore, provider=SealedLocalProvider(keys_dir), audit=InMemoryAuditSink(),
        observer="records-store-test",
    )  # fmt: skip
    await ring.unseal(shares)
    try:
        yield ring
    finally:
        keystore.close()


def bundle(fixtures_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((fixtures_dir / "synthea" / name).read_bytes())
    return data


async def load(store: SqlRecordStore, ring: KeyRing, doc: dict[str, Any]) -> dict[str, dict]:
    """What the records repository will do for a transaction; returns Type/id -> resource."""
    indexer = await ring.blind_indexer(TENANT)
    stored: dict[str, dict[str, Any]] = {}
    with store.unit_of_work() as uow:

        def resolve(lookup: ConditionalLookup) -> list[str]:
            terms = blind_terms(lookup.query, indexer.tokens)
            return uow.find_ids(TENANT, lookup.query, blind=terms)

        plan = plan_transaction(doc, resolve)
        for entry in plan.entries:
            assert entry.resource is not None and entry.id is not None
            resource = {**entry.resource, "id": entry.id}
            resource["meta"] = {**resource.get("meta", {}), "versionId": "1",
                                "lastUpdated": NOW.isoformat()}  # fmt: skip
            subject = patient_of(resource) or DIRECTORY_SUBJECT
            cipher = await ring.patient_cipher(TENANT, subject, create=True)
            classified = split(resource)
            refs = [
                (group_element_ref(TENANT, classified.envelope, group), data)
                for group, data in classified.groups.items()
            ]
            sealed = cipher.seal_many(refs)
            uow.write(
                NewVersion(
                    ResourceKey(TENANT, resource["resourceType"], entry.id), 1, NOW, subject,
                    {g.value: c for g, c in zip(classified.groups, sealed, strict=True)},
                    index_entries(resource, indexer.tokens),
                ),
                previous=None,
            )  # fmt: skip
            stored[f"{resource['resourceType']}/{entry.id}"] = resource
        uow.commit()
    return stored


async def opened(ring: KeyRing, version: StoredVersion) -> dict[str, Any]:
    cipher = await ring.patient_cipher(TENANT, version.key_subject)
    envelope = split(
        {"resourceType": version.key.resource_type, "id": version.key.resource_id,
         "meta": {"versionId": str(version.version),
                  "lastUpdated": version.last_updated.isoformat()}}
    ).envelope  # fmt: skip
    groups = {
        ElementGroup(name): cipher.open(
            group_element_ref(TENANT, envelope, ElementGroup(name)), data
        )
        for name, data in version.groups.items()
    }
    return ClassifiedResource(envelope, groups).assemble()


def search(store: SqlRecordStore, ring_indexer: Any, rtype: str, query: str) -> list[str]:
    parsed = parse_search(rtype, query)
    with store.unit_of_work(read_only=True) as uow:
        page = uow.search(TENANT, parsed, blind=blind_terms(parsed, ring_indexer.tokens))
    return [m.key.resource_id for m in page.matches]


def direct_identifiers(patient: dict[str, Any]) -> Iterator[str]:
    for name in patient.get("name", []):
        yield name["family"]
        yield from name.get("given", [])
    for identifier in patient.get("identifier", []):
        yield identifier["value"]
    for telecom in patient.get("telecom", []):
        yield telecom["value"]
    for address in patient.get("address", []):
        yield from address.get("line", [])
    yield patient["birthDate"]


def the_patient(doc: dict[str, Any]) -> dict[str, Any]:
    return next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Patient")


async def test_synthea_patients_are_found_again_and_read_back_equal(
    store: SqlRecordStore, ring: KeyRing, fixtures_dir: Path
) -> None:
    docs = [bundle(fixtures_dir, name) for name in PATIENTS]
    loaded = [await load(store, ring, doc) for doc in docs]
    indexer = await ring.blind_indexer(TENANT)
    for doc, stored in zip(docs, loaded, strict=True):
        source = the_patient(doc)
        pid = next(k.split("/")[1] for k in stored if k.startswith("Patient/"))
        ssn = next(i["value"] for i in source["identifier"] if "us-ssn" in i["system"])
        family = source["name"][0]["family"]
        for query in (
            f"identifier=http://hl7.org/fhir/sid/us-ssn|{ssn}",
            f"identifier={ssn}",
            f"family={family[:3].lower()}",
            f"name={source['name'][0]['given'][0]}",
            f"birthdate={source['birthDate']}",
            f"birthdate={source['birthDate'][:4]}&family:exact={family}",
        ):
            assert search(store, indexer, "Patient", query) == [pid], query
        observations = sorted(
            k.split("/")[1] for k, r in stored.items() if r["resourceType"] == "Observation"
        )
        found = search(store, indexer, "Observation", f"patient=Patient/{pid}&_count=1000")
        assert found == observations
        sample = next(r for r in stored.values() if r["resourceType"] == "Observation")
        code = sample["code"]["coding"][0]
        when = sample["effectiveDateTime"][:10]
        hits = search(
            store, indexer, "Observation",
            f"code={code['system']}|{code['code']}&date={when}&subject={pid}&_count=1000",
        )  # fmt: skip
        assert sample["id"] in hits
        assert set(hits) <= set(observations)
        assert search(store, indexer, "Observation", f"date=ge2100&patient={pid}") == []
        # everything reads back equal to what was stored (and only sealed groups were kept)
        with store.unit_of_work(read_only=True) as uow:
            for ref, resource in list(stored.items())[:60]:
                rtype, rid = ref.split("/")
                version = uow.read(ResourceKey(TENANT, rtype, rid))
                assert version is not None
                assert await opened(ring, version) == resource
    # the other patient's name finds only the other patient
    first, second = (the_patient(d)["name"][0]["family"] for d in docs)
    assert search(store, indexer, "Patient", f"family:exact={first}") != search(
        store, indexer, "Patient", f"family:exact={second}"
    )


async def test_dek_rotation_and_shredding_work_on_stored_records(
    store: SqlRecordStore, ring: KeyRing, fixtures_dir: Path
) -> None:
    stored = await load(store, ring, bundle(fixtures_dir, PATIENTS[0]))
    pid = next(k.split("/")[1] for k in stored if k.startswith("Patient/"))
    elements = store.sealed_elements()
    before = elements.scan(TENANT, patient=pid, after=0, limit=100_000)
    assert before and all(e.patient == pid for e in before)
    report = await ring.rotate_deks(TENANT, elements, patient=pid, batch=50)
    assert report.processed == len(before) and report.retired
    after = elements.scan(TENANT, patient=pid, after=0, limit=100_000)
    assert [e.position for e in after] == [e.position for e in before]
    assert all(a.ciphertext != b.ciphertext for a, b in zip(after, before, strict=True))
    with store.unit_of_work(read_only=True) as uow:
        for ref, resource in stored.items():
            rtype, rid = ref.split("/")
            version = uow.read(ResourceKey(TENANT, rtype, rid))
            assert version is not None
            assert await opened(ring, version) == resource  # opens under the new key only
    # a stale compare-and-swap changes nothing
    assert not elements.replace(before[0], b"stale")
    # a whole-tenant rotation re-seals every subject's elements, the directory's included
    everything = elements.scan(TENANT, patient=None, after=0, limit=100_000)
    whole = await ring.rotate_deks(TENANT, elements)
    assert whole.processed == len(everything) and len(whole.retired) == 2
    indexer = await ring.blind_indexer(TENANT)
    family = the_patient(bundle(fixtures_dir, PATIENTS[0]))["name"][0]["family"]
    assert search(store, indexer, "Patient", f"family={family}") == [pid]
    await ring.shred_patient(TENANT, pid, reason="erasure", elements=elements)
    assert search(store, indexer, "Patient", f"family={family}") == []
    # directory resources (sealed under the tenant's directory key) are untouched
    practitioners = [k for k in stored if k.startswith("Practitioner/")]
    assert practitioners
    with store.unit_of_work(read_only=True) as uow:
        practitioner = uow.read(ResourceKey(TENANT, "Practitioner", practitioners[0][13:]))
    assert practitioner is not None and practitioner.key_subject == DIRECTORY_SUBJECT
    assert await opened(ring, practitioner) == stored[practitioners[0]]


async def test_no_direct_identifier_in_clear_at_rest(
    stores: StoreFactory, ring: KeyRing, fixtures_dir: Path
) -> None:
    """SQLite: the raw bytes of the database file and its WAL; PostgreSQL: a pg_dump."""
    store = stores.open()
    docs = [bundle(fixtures_dir, name) for name in PATIENTS]
    for doc in docs:
        await load(store, ring, doc)
    values = {v for doc in docs for v in direct_identifiers(the_patient(doc))}
    for doc in docs:  # practitioners' names are direct identifiers too (the directory key)
        for entry in doc["entry"]:
            if entry["resource"]["resourceType"] == "Practitioner":
                values |= set(direct_identifiers({"birthDate": "-", **entry["resource"]}))
    # short numbers (a practitioner identifier "530") occur by chance in any few hundred
    # kilobytes of ciphertext and integers; names, SSNs, phones and lines are kept whatever
    values = {v for v in values if v != "-" and not (v.isdigit() and len(v) <= 4)}
    assert len(values) > 10
    if stores.path is not None:
        with store.unit_of_work(read_only=True) as uow:  # holds the WAL open while we read
            assert uow.history(TENANT, "Patient")
            files = [p for p in (stores.path, Path(f"{stores.path}-wal")) if p.exists()]
            raw = b"".join(p.read_bytes() for p in files)
    else:
        assert stores.schema is not None
        raw = subprocess.run(
            ["pg_dump", "--no-owner", "-d", ADMIN_CONNINFO, "-n", stores.schema],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
    assert len(raw) > 100_000
    leaks = sorted(v for v in values if v.encode() in raw)
    assert leaks == []
    # the check itself can see clear text: a code stored in clear is there
    assert b"http://loinc.org" in raw


async def test_index_key_rotation_needs_a_reindex_and_then_retires_the_old_tokens(
    store: SqlRecordStore, ring: KeyRing, fixtures_dir: Path
) -> None:
    doc = bundle(fixtures_dir, PATIENTS[0])
    stored = await load(store, ring, doc)
    pid = next(k.split("/")[1] for k in stored if k.startswith("Patient/"))
    family = the_patient(doc)["name"][0]["family"]
    elements = store.sealed_elements()
    # the key ring cannot re-index sealed groups: retiring the old version is refused
    with pytest.raises(StaleBlindIndex):
        await ring.rotate_index(TENANT, elements)
    indexer = await ring.blind_indexer(TENANT)
    assert len(indexer.versions) == 2
    assert search(store, indexer, "Patient", f"family={family}") == [pid]
    # what the repository's re-index does: open, assemble, index with every live version
    after = None
    with store.unit_of_work() as uow:
        while batch := uow.scan_current(TENANT, after=after, limit=100):
            for version in batch:
                resource = await opened(ring, version)
                uow.reindex(
                    version.key, version=version.version,
                    index=index_entries(resource, indexer.tokens),
                )  # fmt: skip
            after = (batch[-1].key.resource_type, batch[-1].key.resource_id)
        uow.commit()
    report = await ring.rotate_index(TENANT, elements)  # resumes the job and finishes it
    assert report.retired
    fresh = await ring.blind_indexer(TENANT)
    assert len(fresh.versions) == 1
    assert search(store, fresh, "Patient", f"family={family}") == [pid]
    ssn = next(i["value"] for i in the_patient(doc)["identifier"] if "us-ssn" in i["system"])
    assert search(store, fresh, "Patient", f"identifier={ssn}") == [pid]
    with store.unit_of_work() as uow, pytest.raises(VersionConflict):
        uow.reindex(ResourceKey(TENANT, "Patient", pid), version=7, index=[])
