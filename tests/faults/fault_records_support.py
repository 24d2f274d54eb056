"""The records side of the fault tests: a records repository on a (private) PostgreSQL with
the embedded ledger as its audit sink, a load of PHI writes and reads that keeps a tally of
what was acknowledged, and the checks every fault test makes afterwards.

Why the embedded file ledger as the sink: it is the one audit path these tests do not break,
and it can be verified offline afterwards (``verify_ledger`` against its signed checkpoints),
so "every disclosure has its event" and "the ledger verifies" are checked on a real ledger.

The writes are updates with ids chosen here (FHIR update-as-create), so a write that failed
can still be looked up afterwards: it must be absent, and its intent must have an outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from phivault.access.decision import AccessContext, compile_policy
from phivault.access.policy import default_policy
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.crypto.signing import Ed25519NoteSigner
from phivault.datadir import DataDir
from phivault.errors import StoreUnavailable
from phivault.identity.principal import Role
from phivault.identity.scopes import parse_scopes
from phivault.ledger.file_store import FileLedgerStore
from phivault.ledger.note import NoteVerifier
from phivault.ledger.service import Ledger, initialize_ledger, open_ledger, signer_path
from phivault.ledger.verify import VerificationReport, verify_ledger
from phivault.records.errors import http_status
from phivault.records.repository import RecordsRepository
from phivault.records.results import Caller
from phivault.records.store import ResourceKey, SqlRecordStore
from phivault.records.testing import FixedCallerTrail

__all__ = [
    "TENANT",
    "RecordsKit",
    "Tally",
    "check_records_afterwards",
    "create_schema",
    "open_records_kit",
    "patient_caller",
    "run_records_load",
    "writer_caller",
]

TENANT = "t1"
_WRITER_SCOPES = "system/Patient.cu"


def fault_trail(sink: Any, who: str, request_id: str) -> FixedCallerTrail:
    """The audit trail of one request (its own request id), over any sink."""
    return FixedCallerTrail(sink, who, tenant=TENANT, observer="fault-test", request_id=request_id)


_request_numbers = itertools.count()


def _request_id(prefix: str) -> str:
    return f"{prefix}-{next(_request_numbers)}-{secrets.token_hex(3)}"


def _caller(sink: Any, who: str, role: Role, scopes: str, **access: Any) -> Caller:
    context = AccessContext(
        subject=who,
        tenant=TENANT,
        roles=frozenset({role}),
        scopes=parse_scopes(scopes)[0],
        **access,
    )
    return Caller(context, fault_trail(sink, who, _request_id(who)))


def writer_caller(sink: Any) -> Caller:
    """A service account that writes patients (never reads PHI back)."""
    return _caller(sink, "loader", Role.SERVICE, _WRITER_SCOPES, purposes=("HOPERAT",))


def patient_caller(sink: Any, patient_id: str) -> Caller:
    """The patient themselves, reading their own record."""
    return _caller(
        sink,
        "p-user",
        Role.PATIENT,
        "patient/*.rs",
        fhir_user=f"Patient/{patient_id}",
        patient_context=patient_id,
    )


def request_id_of(caller: Caller) -> str:
    trail = caller.audit
    assert isinstance(trail, FixedCallerTrail) and trail.request_id is not None
    return trail.request_id


def create_schema(conninfo: str, prefix: str = "pv_fault") -> str:
    schema = f"{prefix}_{secrets.token_hex(5)}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    return schema


@dataclass
class RecordsKit:
    repo: RecordsRepository
    store: SqlRecordStore
    ledger: Ledger
    data_dir: DataDir


@asynccontextmanager
async def open_records_kit(
    workdir: Path, store: Callable[[], SqlRecordStore]
) -> AsyncIterator[RecordsKit]:
    """A repository over ``store()`` with a fresh key ring and the embedded ledger of a new
    data directory in ``workdir`` as the audit sink."""
    data_dir = DataDir.create(workdir / "data", dev=True)
    initialize_ledger(data_dir)
    keys = workdir / "keys"
    _, shares = SealedLocalProvider.initialize(keys, threshold=2, shares=2)
    keystore = SqliteKeyStore(keys / SqliteKeyStore.FILENAME)
    records = store()
    try:
        async with open_ledger(data_dir) as ledger:
            ring = KeyRing(
                store=keystore, provider=SealedLocalProvider(keys), audit=ledger, observer="fault"
            )
            await ring.unseal(shares)
            repo = RecordsRepository(
                records, ring, compile_policy(default_policy()), observer="fault-test"
            )
            yield RecordsKit(repo, records, ledger, data_dir)
    finally:
        records.close()
        keystore.close()


def patient_resource(patient_id: str, n: int) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "active": True,
        "name": [{"family": f"Faultline{n}", "given": ["Test"]}],
        "gender": "unknown",
    }


@dataclass
class Tally:
    """What a load saw: acknowledged writes, failed writes, disclosures, and errors."""

    acked: dict[str, int] = field(default_factory=dict)  # patient id -> version
    failed_writes: set[str] = field(default_factory=set)
    disclosures: list[tuple[str, str]] = field(default_factory=list)  # (request id, reference)
    failures: Counter[str] = field(default_factory=Counter)  # error class -> count
    unexpected: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # the first few failures, with causes
    reads: int = 0
    writes: int = 0
    last_ok: float = 0.0

    def failed(self, exc: BaseException) -> None:
        """A request failed: fine only as "unavailable" (503 at the API)."""
        name = type(exc).__name__
        if len(self.details) < 20:
            cause = exc.__cause__
            self.details.append(
                f"{name}: {exc}" + (f" (from {type(cause).__name__}: {cause})" if cause else "")
            )
        if isinstance(exc, StoreUnavailable) and http_status(exc) == 503:
            self.failures[name] += 1
        else:
            self.unexpected.append(f"{name}: {exc}")


async def run_records_load(
    kit: RecordsKit,
    tally: Tally,
    stop: asyncio.Event,
    *,
    writers: int = 3,
    readers: int = 3,
    reader_caller: Callable[[str], Caller] | None = None,
    read_ids: Sequence[str] | None = None,
    reader_context: Callable[[int], AbstractContextManager[Any]] | None = None,
) -> None:
    """Writers put new patients, readers read acknowledged ones back as the patient (or as
    ``reader_caller(id)``), until ``stop`` is set. Never raises for a failed request: the
    tally says what happened.

    ``read_ids``: read only these (say, patients a replica has surely replayed) instead of
    every acknowledged one. ``reader_context(n)``: a context reader ``n`` runs in (say, its
    own read-your-writes session)."""
    sink = kit.ledger
    counter = itertools.count()
    reader_of = reader_caller or (lambda pid: patient_caller(sink, pid))

    async def write_loop() -> None:
        while not stop.is_set():
            n = next(counter)
            patient_id = f"fault-{n}-{secrets.token_hex(4)}"
            try:
                result = await kit.repo.update(
                    writer_caller(sink), "Patient", patient_id, patient_resource(patient_id, n)
                )
            except Exception as exc:
                tally.failed_writes.add(patient_id)
                tally.failed(exc)
                await asyncio.sleep(0.02)
                continue
            tally.writes += 1
            tally.acked[patient_id] = result.record.version
            tally.last_ok = time.monotonic()

    async def read_loop(seed: int) -> None:
        if reader_context is None:
            await reads(seed)
            return
        with reader_context(seed):
            await reads(seed)

    async def reads(seed: int) -> None:
        turn = seed
        while not stop.is_set():
            known = list(tally.acked) if read_ids is None else list(read_ids)
            if not known:
                await asyncio.sleep(0.01)
                continue
            turn += 7
            patient_id = known[turn % len(known)]
            caller = reader_of(patient_id)
            try:
                got = await kit.repo.read(caller, "Patient", patient_id)
            except Exception as exc:
                tally.failed(exc)
                await asyncio.sleep(0.02)
                continue
            tally.reads += 1
            tally.disclosures.append((request_id_of(caller), got.versioned_reference))
            tally.last_ok = time.monotonic()

    await asyncio.gather(
        *(write_loop() for _ in range(writers)), *(read_loop(i) for i in range(readers))
    )


def ledger_events(data_dir: DataDir) -> list[dict[str, Any]]:
    """Every entry of the embedded ledger, as stored (read-only, beside or after the writer)."""
    import json

    store = FileLedgerStore(data_dir.ledger_dir, writable=False)
    try:
        return [json.loads(leaf) for leaf in store.scan()]
    finally:
        store.close()


def verify_embedded_ledger(data_dir: DataDir) -> VerificationReport:
    """``phivault ledger verify`` on the data directory's ledger (raises if it does not)."""
    signer = Ed25519NoteSigner.load(signer_path(data_dir))
    verifier = NoteVerifier.from_verifier_key(signer.verifier_key)
    store = FileLedgerStore(data_dir.ledger_dir, writable=False)
    try:
        return verify_ledger(store.scan, store.checkpoints(), verifier, origin=data_dir.origin)
    finally:
        store.close()


def _entities(doc: dict[str, Any]) -> set[str]:
    return {str(e.get("what")) for e in doc.get("entities", ())}


def check_records_afterwards(kit: RecordsKit, tally: Tally) -> VerificationReport:
    """The checks every fault test makes (the ledger must be closed first):

    * every acknowledged write is in the store, at its version, and has its intent and its
      committed outcome in the ledger;
    * every write that failed is absent from the store and its intent (if one was recorded)
      has an outcome (rolled back);
    * every disclosure has its read event (same request id, same versioned reference);
    * only "unavailable" errors were seen; the ledger verifies.
    """
    assert tally.unexpected == [], f"errors other than unavailable: {tally.unexpected[:5]}"
    events = ledger_events(kit.data_dir)
    by_request: dict[str, list[dict[str, Any]]] = {}
    writes: dict[str, Counter[str]] = {}
    for doc in events:
        by_request.setdefault(str(doc.get("request_id")), []).append(doc)
        if doc.get("subtype") in ("update", "create") and doc.get("outcome_reason"):
            # A write's events name the version written (Patient/<id>/_history/<n>).
            for what in _entities(doc):
                if what.startswith("Patient/") and "/_history/" in what:
                    key = what.split("/")[1]
                    writes.setdefault(key, Counter())[str(doc["outcome_reason"])] += 1
    with kit.store.unit_of_work(read_only=True) as uow:
        for patient_id, version in tally.acked.items():
            stored = uow.read(ResourceKey(TENANT, "Patient", patient_id))
            assert stored is not None, f"acknowledged write Patient/{patient_id} is missing"
            assert stored.version == version, f"Patient/{patient_id} is at {stored.version}"
            reasons = writes.get(patient_id, Counter())
            assert reasons["intent"] == 1 and reasons["committed"] == 1, (
                f"acknowledged write Patient/{patient_id} has ledger outcomes {dict(reasons)}"
            )
        for patient_id in tally.failed_writes:
            stored = uow.read(ResourceKey(TENANT, "Patient", patient_id))
            reasons = writes.get(patient_id, Counter())
            assert stored is None, (
                f"Patient/{patient_id} answered unavailable but was committed "
                f"(ledger outcomes {dict(reasons)})"
            )
            if reasons["intent"]:
                assert reasons["rolled-back"] == reasons["intent"], (
                    f"failed write Patient/{patient_id}: intent without outcome {dict(reasons)}"
                )
    for request_id, reference in tally.disclosures:
        recorded = [
            doc
            for doc in by_request.get(request_id, ())
            if doc.get("subtype") == "read" and reference in _entities(doc)
        ]
        assert recorded, f"disclosure {reference} (request {request_id}) has no read event"
    return verify_embedded_ledger(kit.data_dir)
