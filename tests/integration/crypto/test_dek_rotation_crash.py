"""DEK rotation survives SIGKILL mid-way: rerunning resumes the same job and finishes cleanly,
with the keystore in SQLite and in PostgreSQL."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from phivault.crypto.element_store import SqliteSealedElementStore
from phivault.crypto.elements import ElementRef, key_version_of
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.keystore_postgres import PostgresKeyStore
from phivault.crypto.ports import JobKind, KeyPurpose, KeyState, KeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.ledger.testing import InMemoryAuditSink

pytestmark = pytest.mark.integration

PATIENTS = 40
PATHS = ("name[0].family", "name[0].given[0]", "birthDate", "telecom[0].value", "address[0].city")

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pathlib import Path
    from phivault.crypto.element_store import SqliteSealedElementStore
    from phivault.crypto.keyring import KeyRing
    from phivault.crypto.keystore import SqliteKeyStore
    from phivault.crypto.keystore_postgres import PostgresKeyStore
    from phivault.crypto.providers.sealed import SealedLocalProvider
    from phivault.ledger.testing import InMemoryAuditSink

    async def main(base: Path) -> None:
        where = json.loads((base / "store.json").read_text())
        if where["kind"] == "sqlite":
            store = SqliteKeyStore(base / "keys" / "keystore.sqlite3")
        else:
            store = PostgresKeyStore(where["conninfo"], schema=where["schema"], create=False)
        ring = KeyRing(store=store, provider=SealedLocalProvider(base / "keys"),
                       audit=InMemoryAuditSink(), observer="node-child")
        await ring.unseal(json.loads((base / "shares.json").read_text()))
        elements = SqliteSealedElementStore(base / "elements.sqlite3")

        def progress(done: int, total: object) -> None:
            print(f"progress {done}", flush=True)
            time.sleep(0.05)

        await ring.rotate_deks("acme", elements, batch=10, progress=progress)
        print("finished", flush=True)

    asyncio.run(main(Path(sys.argv[1])))
    """
)


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Where the keystore lives (written for the child process too)."""
    if request.param == "sqlite":
        found = {"kind": "sqlite"}
        (tmp_path / "store.json").write_text(json.dumps(found))
        yield found
        return
    conninfo = request.getfixturevalue("postgres")
    schema = f"test_keys_{secrets.token_hex(6)}"
    found = {"kind": "postgres", "conninfo": conninfo, "schema": schema}
    (tmp_path / "store.json").write_text(json.dumps(found))
    yield found
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _ring(base: Path, where: dict[str, str]) -> tuple[KeyRing, KeyStore]:
    store: KeyStore
    if where["kind"] == "sqlite":
        store = SqliteKeyStore(base / "keys" / "keystore.sqlite3")
    else:
        store = PostgresKeyStore(where["conninfo"], schema=where["schema"])
    provider = SealedLocalProvider(base / "keys")
    return KeyRing(store=store, provider=provider, audit=InMemoryAuditSink(), observer="n"), store


async def test_sigkill_mid_rotation_then_resume(tmp_path: Path, where: dict[str, str]) -> None:
    _, shares = SealedLocalProvider.initialize(tmp_path / "keys", threshold=2, shares=3)
    (tmp_path / "shares.json").write_text(json.dumps(shares[:2]))
    ring, store = _ring(tmp_path, where)
    await ring.unseal(shares[:2])
    elements = SqliteSealedElementStore(tmp_path / "elements.sqlite3")
    plaintexts: dict[ElementRef, bytes] = {}
    for i in range(PATIENTS):
        patient = f"p{i:03d}"
        cipher = await ring.patient_cipher("acme", patient, create=True)
        for path in PATHS:
            ref = ElementRef("acme", "Patient", patient, path)
            plaintexts[ref] = f"{patient}:{path}".encode()
            elements.put(ref, patient, cipher.seal(ref, plaintexts[ref]))
    await ring.seal()

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert child.stdout is not None
    seen = 0
    for line in child.stdout:
        if line.startswith("progress"):
            seen += 1
            if seen == 6:
                child.send_signal(signal.SIGKILL)
                break
        assert line.strip() != "finished", "the child finished before it could be killed"
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    (job,) = store.open_jobs("acme")
    assert job.kind is JobKind.DEK and job.phase == "reencrypt" and job.cursor > 0
    versions = {
        key_version_of(e.ciphertext)
        for e in elements.scan("acme", patient=None, after=0, limit=10_000)
    }
    assert versions == {1, 2}  # really stopped half-way

    await ring.unseal(shares[1:3])
    # mid-rotation every element still opens (old and new versions are both live)
    for element in elements.scan("acme", patient=None, after=0, limit=10_000):
        cipher = await ring.patient_cipher("acme", element.patient)
        assert cipher.open(element.ref, element.ciphertext) == plaintexts[element.ref]
    report = await ring.rotate_deks("acme", elements, batch=10)
    assert report.job_id == job.job_id  # resumed, not restarted
    assert store.open_jobs("acme") == []
    for element in elements.scan("acme", patient=None, after=0, limit=10_000):
        assert key_version_of(element.ciphertext) == 2
        cipher = await ring.patient_cipher("acme", element.patient)
        assert cipher.open(element.ref, element.ciphertext) == plaintexts[element.ref]
    deks = store.records("acme", KeyPurpose.DEK)
    assert len(deks) == 2 * PATIENTS  # exactly one new version per patient, despite the crash
    assert {(r.version, r.state) for r in deks} == {(1, KeyState.DESTROYED), (2, KeyState.ACTIVE)}
    elements.close()
    store.close()
