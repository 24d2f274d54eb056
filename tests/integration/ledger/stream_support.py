"""Shared fixtures for the audit stream and sequencer tests (this module holds no tests).

* ``audit_stream`` (``stream_fixture``): a JetStream stream with a unique name and subject on
  the test NATS server (``PHIVAULT_TEST_NATS``, default 127.0.0.1:4222), deleted afterwards.
* ``signer`` (``signer_fixture``): the checkpoint signer of a test's ledgers.
* ``private_nats`` (``private_nats_fixture``): a nats-server of the test's own, to kill and
  restart.
* ``seq_ledger`` (``seq_ledger_fixture``): a PostgreSQL ledger schema and application role
  (from ``test_postgres_support``) with the sequencer's cursor table.

NATS or PostgreSQL being down fails the tests clearly; they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.js import JetStreamContext
from test_postgres_support import PgLedger

from phivault.crypto.signing import Ed25519NoteSigner
from phivault.ledger.note import NoteVerifier
from phivault.ledger.postgres_store import PostgresLedgerStore
from phivault.ledger.sequencer import create_cursor_table
from phivault.ledger.stream import ensure_audit_stream
from phivault.ledger.verify import Damaged, VerificationReport, verify_ledger
from ports_support import free_port

NATS_URL = os.environ.get("PHIVAULT_TEST_NATS", "nats://127.0.0.1:4222")
ORIGIN = "phivault.test/sequencer"


@dataclass(frozen=True)
class AuditStream:
    name: str
    subject: str
    js: JetStreamContext


@pytest_asyncio.fixture(name="audit_stream")
async def stream_fixture() -> AsyncIterator[AuditStream]:
    suffix = secrets.token_hex(5)
    name, subject = f"PV_TEST_{suffix}", f"phivault.test.{suffix}"
    try:
        client = await asyncio.wait_for(
            nats.connect(servers=[NATS_URL], max_reconnect_attempts=1, connect_timeout=2), 5
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        pytest.fail(
            f"NATS with JetStream is not reachable at {NATS_URL} (CI starts it; set "
            f"PHIVAULT_TEST_NATS): {exc!r}",
            pytrace=False,
        )
    js = client.jetstream()
    try:
        await ensure_audit_stream(js, name=name, subject=subject, replicas=1)
        yield AuditStream(name, subject, js)
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
        await client.close()


@pytest.fixture(name="seq_ledger")
def seq_ledger_fixture(pg: PgLedger) -> PgLedger:
    create_cursor_table(pg.admin, schema=pg.schema, app_role=pg.role)
    return pg


@pytest.fixture(name="signer")
def signer_fixture() -> Ed25519NoteSigner:
    # Per test (a key pair takes microseconds): a module-scoped one would tie the module's
    # tests to one xdist worker (tests/conftest.py).
    return Ed25519NoteSigner.generate(ORIGIN)


def ledger_size(pg: PgLedger) -> int:
    ((count,),) = pg.admin_sql("SELECT count(*) FROM {s}.leaves")
    return int(str(count))


def checkpoint_count(pg: PgLedger) -> int:
    ((count,),) = pg.admin_sql("SELECT count(*) FROM {s}.checkpoints")
    return int(str(count))


def read_leaves(pg: PgLedger) -> list[bytes]:
    store = PostgresLedgerStore(pg.app, schema=pg.schema, writable=False)
    try:
        return store.read(0, store.size())
    finally:
        store.close()


def verify(pg: PgLedger, signer: Ed25519NoteSigner) -> VerificationReport:
    store = PostgresLedgerStore(pg.app, schema=pg.schema, writable=False)
    try:

        def leaves() -> Iterator[bytes | Damaged]:
            for _index, leaf, reason in store.raw_frames():
                yield leaf if leaf is not None else Damaged(reason or "damaged")

        return verify_ledger(
            leaves,
            store.checkpoints(),
            NoteVerifier.from_verifier_key(signer.verifier_key),
            origin=ORIGIN,
        )
    finally:
        store.close()


async def eventually(
    condition: Callable[[], bool], *, timeout_s: float = 10.0, what: str = "condition"
) -> float:
    """Poll ``condition`` until true; return how long it took (fails the test on timeout)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        if loop.time() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)  # each poll may open a connection: keep it light
    return loop.time() - start


class PrivateNats:
    """A nats-server of the test's own on a free loopback port, to stop and restart."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [
                shutil.which("nats-server") or "nats-server",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.store_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        pytest.fail("the test's own nats-server did not start")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)


def _free_port() -> int:
    return free_port()


@pytest.fixture(name="private_nats")
def private_nats_fixture(tmp_path: Path) -> Iterator[PrivateNats]:
    if shutil.which("nats-server") is None:
        pytest.fail("nats-server is not installed (CI installs it)", pytrace=False)
    server = PrivateNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
