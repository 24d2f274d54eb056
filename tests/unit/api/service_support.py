"""The composed service (``open_service``) on a fresh production data directory, driven
in-process: for tests of routes that need the real ledger, key ring and records store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI

from phivault.api.serve import open_service
from phivault.datadir import DataDir
from phivault.identity.testing import FakeIssuer
from phivault.initialize import initialize_data_dir
from phivault.settings import Settings

MFA = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def bearer(issuer: FakeIssuer, **claims: object) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {issuer.token(**claims)}",
        "Content-Type": "application/fhir+json",
    }


@dataclass
class Served:
    http: httpx.AsyncClient
    issuer: FakeIssuer
    data_dir: DataDir

    def loader(self) -> dict[str, str]:
        return bearer(
            self.issuer, roles=["service"], scope="system/*.cruds", purpose_of_use=["HOPERAT"],
            fhirUser=None,
        )  # fmt: skip

    def officer(self) -> dict[str, str]:
        return bearer(
            self.issuer, sub="po-1", roles=["privacy-officer"], scope="user/AuditEvent.rs",
            fhirUser=None, amr=["pwd", "otp"], acr=MFA,
        )  # fmt: skip

    def patient(self, patient_id: str) -> dict[str, str]:
        return bearer(
            self.issuer, roles=["patient"], scope="patient/*.rs", fhirUser=f"Patient/{patient_id}"
        )


@asynccontextmanager
async def served(tmp_path: Path, settings: Settings | None = None) -> AsyncIterator[Served]:
    init = initialize_data_dir(tmp_path / "data", dev=False, threshold=2, shares=3)
    data_dir = DataDir.open(tmp_path / "data")
    issuer = FakeIssuer()
    async with (
        open_service(
            settings or Settings(),
            data_dir,
            key_sources={issuer.issuer: issuer.key_source()},
            unseal_shares=init.keystore.shares[:2],
        ) as app,
        client(app) as http,
    ):
        yield Served(http, issuer, data_dir)
