"""The FHIR routes over the real records stack: repository, SQLite store, key ring, policy.

Only the identity provider (a :class:`FakeIssuer`), the clock and the audit sink (an
:class:`InMemoryAuditSink`, which tests can make fail) are test doubles; everything between
the HTTP request and the database file is what production runs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from phivault.access.decision import compile_policy
from phivault.access.policy import Policy, default_policy
from phivault.api import MountedRouter, create_app
from phivault.api.fhir import FHIR_PREFIX, fhir_router
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.identity.testing import FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink
from phivault.records.repository import RecordsRepository
from phivault.records.store import SqlRecordStore
from phivault.settings import ApiSettings, IdentitySettings, Settings

START = 1_800_000_000.0
FHIR_JSON = "application/fhir+json"
MAX_BODY = 512 * 1024


class Clock:
    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t


@dataclass
class Fhir:
    app: FastAPI
    client: httpx.AsyncClient
    issuer: FakeIssuer
    sink: InMemoryAuditSink
    clock: Clock
    repository: RecordsRepository
    store: SqlRecordStore
    keyring: KeyRing

    def use_policy(self, policy: Policy) -> RecordsRepository:
        """Serve from now on with ``policy`` (same store, keys and clock); returns the
        repository that does."""
        repository = RecordsRepository(
            self.store, self.keyring, compile_policy(policy), clock=self.clock
        )
        self.app.state.records = repository
        return repository

    def token(self, **claims: Any) -> str:
        return self.issuer.token(now=self.clock.t, **claims)

    def service(self, **extra: str) -> dict[str, str]:
        """A loader: role ``service``, purpose HOPERAT, ``system/*.cruds``."""
        token = self.token(
            sub="loader",
            roles=["service"],
            scope="system/*.cruds",
            purpose_of_use=["HOPERAT"],
            fhirUser=None,
        )
        return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON, **extra}

    def admin(self, **extra: str) -> dict[str, str]:
        """Keeps the directory (Organization, Practitioner...): the only role that deletes."""
        token = self.token(
            sub="admin-1",
            roles=["admin"],
            amr=["pwd", "otp"],
            scope="user/*.cruds",
            purpose_of_use=["HSYSADMIN"],
            fhirUser=None,
        )
        return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON, **extra}

    def patient(self, patient_id: str, **extra: str) -> dict[str, str]:
        token = self.token(
            sub=f"patient-{patient_id}",
            roles=["patient"],
            scope="openid fhirUser patient/*.rs",
            fhirUser=f"Patient/{patient_id}",
        )
        return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON, **extra}

    def clinician(self, practitioner_id: str, **extra: str) -> dict[str, str]:
        token = self.token(
            sub=f"dr-{practitioner_id}",
            roles=["clinician"],
            scope="openid fhirUser user/*.rs",
            fhirUser=f"Practitioner/{practitioner_id}",
            purpose_of_use=["TREAT"],
        )
        return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON, **extra}

    async def create(
        self, resource: dict[str, Any], auth: dict[str, str] | None = None, **headers: str
    ) -> httpx.Response:
        return await self.client.post(
            f"/fhir/{resource['resourceType']}",
            content=json.dumps(resource),
            headers={**(auth or self.service()), "Content-Type": FHIR_JSON, **headers},
        )

    async def created(
        self, resource: dict[str, Any], auth: dict[str, str] | None = None
    ) -> dict[str, Any]:
        response = await self.create(resource, auth)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def row_count(self) -> int:
        """Versions in the store (all types): what a failed write must leave unchanged."""
        with self.store.engine.connect() as conn:
            tables = [
                name
                for (name,) in conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            ]
            return sum(
                int(conn.exec_driver_sql(f'SELECT count(*) FROM "{name}"').scalar_one())
                for name in tables
                if name != "alembic_version"
            )


def settings(max_body_bytes: int = MAX_BODY) -> Settings:
    return Settings(
        identity=IdentitySettings(mfa_acr_values=["urn:mfa"]),
        api=ApiSettings(
            rate_limit_per_address="100000/minute",
            rate_limit_per_principal="100000/minute",
            max_body_bytes=max_body_bytes,
        ),
    )


@asynccontextmanager
async def open_fhir(
    tmp_path: Path, *, default_count: int = 50, max_bundle_entries: int = 1000
) -> AsyncIterator[Fhir]:
    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=2)
    keystore = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    sink = InMemoryAuditSink()
    clock = Clock()
    ring = KeyRing(
        store=keystore,
        provider=SealedLocalProvider(keys_dir),
        audit=sink,
        observer="fhir-test",
    )
    await ring.unseal(shares)
    store = SqlRecordStore(f"sqlite:///{tmp_path}/records.db")
    repository = RecordsRepository(
        store,
        ring,
        compile_policy(default_policy()),
        clock=clock,
        max_bundle_entries=max_bundle_entries,
    )
    issuer = FakeIssuer()
    app = create_app(
        settings(),
        audit_sink=sink,
        key_sources={issuer.issuer: issuer.key_source()},
        routers=[
            MountedRouter(
                fhir_router(default_count=default_count, max_bundle_entries=max_bundle_entries),
                prefix=FHIR_PREFIX,
            )
        ],
        state={"records": repository},
        clock=clock,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
    try:
        async with client:
            yield Fhir(app, client, issuer, sink, clock, repository, store, ring)
    finally:
        store.close()
        keystore.close()


def patient(family: str = "Quackenbush", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "name": [{"family": family, "given": ["Zebulon"]}],
        "gender": "male",
        "birthDate": "1970-04-01",
        "identifier": [{"system": "urn:mrn", "value": f"mrn-{family.lower()}"}],
        **extra,
    }


def observation(patient_id: str, code: str = "8867-4", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2024-01-02T03:04:05Z",
        "valueQuantity": {"value": 72, "unit": "/min"},
        **extra,
    }


def organization(name: str = "Acme Clinic", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Organization",
        "name": name,
        "identifier": [{"system": "urn:org", "value": name.lower().replace(" ", "-")}],
        **extra,
    }
