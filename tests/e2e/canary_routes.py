"""Routes standing in for the records service in e2e tests: read (audited, tainted), write,
fail; and :func:`serve_fhir`, the real FHIR routes over the real records stack."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter
from live_server import Live
from pydantic import BaseModel

from phivault.access.decision import compile_policy
from phivault.access.policy import default_policy
from phivault.api import (
    AuditCtx,
    Conflict,
    CurrentPrincipal,
    MountedRouter,
    PreconditionFailed,
    create_app,
)
from phivault.api.fhir import FHIR_PREFIX, fhir_router
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.identity.testing import FakeIssuer
from phivault.ledger.events import Action, EventKind
from phivault.ledger.testing import InMemoryAuditSink
from phivault.privacy.scrub import taint
from phivault.records.repository import RecordsRepository
from phivault.records.store import SqlRecordStore
from phivault.settings import ApiSettings, IdentitySettings, Settings


class Demographics(BaseModel):
    name: str
    ssn: str
    phone: str
    address: str


def canary_router() -> APIRouter:
    router = APIRouter()

    @router.get("/patients/{patient_id}")
    async def read(patient_id: str, principal: CurrentPrincipal, audit: AuditCtx) -> dict[str, Any]:
        if not patient_id.isalnum():
            raise PreconditionFailed("unknown patient id")
        await audit.record(
            audit.event(
                kind=EventKind.REST,
                subtype="read",
                action=Action.READ,
                patient=f"Patient/{patient_id}",
            )
        )
        return {"id": patient_id}

    @router.post("/patients")
    async def create(
        body: Demographics, principal: CurrentPrincipal, audit: AuditCtx
    ) -> dict[str, str]:
        # What the records layer will do on decrypt/encrypt of PHI-classified elements.
        taint(body.name, body.ssn, body.phone, body.address)
        # A careless message: the lower-cased name fits no PHI pattern, only the tainted-value net.
        raise Conflict(f"duplicate of {body.name.lower()} at {body.address}")

    return router


# --- the FHIR routes over the real records stack, served by uvicorn ---------------------------


@contextmanager
def serve_fhir(folder: Path) -> Iterator[Live]:
    """The FHIR routes (real repository, SQLite store, unsealed key ring, default policy)
    behind the front door, served over loopback. Everything is built on the server's own
    event loop, in its thread, so nothing async crosses loops."""
    issuer = FakeIssuer("https://idp.e2e.test")
    sink = InMemoryAuditSink()
    logs = io.StringIO()
    settings = Settings(
        identity=IdentitySettings(mfa_acr_values=["urn:mfa"]),
        api=ApiSettings(
            max_body_bytes=64 * 1024,
            rate_limit_per_address="100000/minute",
            rate_limit_per_principal="100000/minute",
        ),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    built: dict[str, Any] = {}
    failed: list[BaseException] = []

    async def main() -> None:
        keys_dir = folder / "keys"
        _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=2)
        keystore = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
        ring = KeyRing(
            store=keystore, provider=SealedLocalProvider(keys_dir), audit=sink, observer="canary"
        )
        await ring.unseal(shares)
        store = SqlRecordStore(f"sqlite:///{folder}/records.db")
        try:
            repository = RecordsRepository(store, ring, compile_policy(default_policy()))
            app = create_app(
                settings,
                audit_sink=sink,
                key_sources={issuer.issuer: issuer.key_source()},
                routers=[MountedRouter(fhir_router(), prefix=FHIR_PREFIX)],
                state={"records": repository},
                log_stream=logs,
            )
            config = uvicorn.Config(
                app, log_level="warning", access_log=False, server_header=False, lifespan="on"
            )
            server = uvicorn.Server(config)
            built["app"], built["server"] = app, server
            await server.serve(sockets=[sock])
        finally:
            store.close()
            keystore.close()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the test below
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while "server" not in built or not built["server"].started:
        if failed or time.monotonic() > deadline:
            raise RuntimeError("the FHIR server did not start") from (failed or [None])[0]
        time.sleep(0.01)
    try:
        yield Live(url=f"http://127.0.0.1:{port}", app=built["app"], issuer=issuer, sink=sink,
                   logs=logs)  # fmt: skip
    finally:
        built["server"].should_exit = True
        thread.join(timeout=10)
        sock.close()
