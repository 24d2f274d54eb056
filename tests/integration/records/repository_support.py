"""Helpers for the records repository tests: a real key ring, a real store, callers by role."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from records_store_support import StoreFactory

from phivault.access.decision import AccessContext, compile_policy
from phivault.access.policy import default_policy
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.identity.principal import Role
from phivault.identity.scopes import parse_scopes
from phivault.ledger.ports import AuditSink
from phivault.ledger.testing import InMemoryAuditSink
from phivault.records.repository import RecordsRepository
from phivault.records.results import Caller, RecordControls
from phivault.records.testing import FixedCallerTrail

TENANT = "t1"
LOADER_SCOPES = (
    "system/*.cu system/Practitioner.rs system/Organization.rs system/Location.rs "
    "system/PractitionerRole.rs"
)


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def trail(sink: AuditSink, who: str, tenant: str = TENANT) -> FixedCallerTrail:
    """An audit trail as the front door builds one (who/where filled in), over any sink."""
    return FixedCallerTrail(
        sink, who, tenant=tenant, observer="repository-test", request_id="req-1",
        clock=lambda: datetime(2027, 1, 15, 8, 0, tzinfo=UTC),
    )  # fmt: skip


def caller(
    sink: AuditSink,
    role: Role,
    scopes: str,
    *,
    who: str = "user-1",
    fhir_user: str | None = None,
    purposes: tuple[str, ...] = (),
    tenant: str = TENANT,
    patient_context: str | None = None,
) -> Caller:
    access = AccessContext(
        subject=who,
        tenant=tenant,
        roles=frozenset({role}),
        scopes=parse_scopes(scopes)[0],
        purposes=purposes,
        fhir_user=fhir_user,
        patient_context=patient_context
        or (
            fhir_user.removeprefix("Patient/")
            if fhir_user and fhir_user.startswith("Patient/")
            else None
        ),
    )
    return Caller(access, trail(sink, who, tenant))


def loader(sink: AuditSink) -> Caller:
    return caller(sink, Role.SERVICE, LOADER_SCOPES, who="loader", purposes=("HOPERAT",))


def patient_caller(sink: AuditSink, patient_id: str) -> Caller:
    return caller(
        sink, Role.PATIENT, "patient/*.rs", who="p-user", fhir_user=f"Patient/{patient_id}"
    )


def bundle(fixtures_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((fixtures_dir / "synthea" / name).read_bytes())
    return data


@dataclass
class Kit:
    repo: RecordsRepository
    ring: KeyRing
    sink: InMemoryAuditSink
    clock: Clock
    stores: StoreFactory


@asynccontextmanager
async def open_kit(
    stores: StoreFactory, tmp_path: Path, *, controls: RecordControls | None = None
) -> AsyncIterator[Kit]:
    keys = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys, threshold=2, shares=2)
    keystore = SqliteKeyStore(keys / SqliteKeyStore.FILENAME)
    sink = InMemoryAuditSink()
    ring = KeyRing(
        store=keystore, provider=SealedLocalProvider(keys), audit=sink, observer="repository-test"
    )
    await ring.unseal(shares)
    clock = Clock()
    repo = RecordsRepository(
        stores.open(),
        ring,
        compile_policy(default_policy()),
        clock=clock,
        controls=controls or RecordControls(),
    )
    try:
        yield Kit(repo, ring, sink, clock, stores)
    finally:
        keystore.close()
