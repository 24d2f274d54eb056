"""`phivault keys ...` in the scaled shape records to the audit stream, not a local file.

The machine's PostgreSQL holds the key store (a schema per test) and NATS JetStream the audit
stream (a stream per test); the commands run as an operator runs them, in a subprocess with a
settings file. Nothing is destroyed without its event acknowledged by the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from psycopg import sql

from phivault.crypto.custody import open_keyring
from phivault.crypto.invalidation_nats import invalidation_bucket
from phivault.crypto.keystore_postgres import PostgresKeyStore
from phivault.crypto.ports import KeyPurpose
from phivault.datadir import DataDir
from phivault.ledger.errors import LedgerUnavailable
from phivault.ledger.service import open_ledger
from phivault.ledger.sinks import AuditPosition, open_shape_sink
from phivault.ledger.stream import ENCODING_EVENT, ENCODING_HEADER
from phivault.settings import Settings, load_settings
from ports_support import free_port

pytestmark = pytest.mark.integration

NATS_URL = os.environ.get("PHIVAULT_TEST_NATS", "nats://127.0.0.1:4222")
STORE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
AUDIT_UNAVAILABLE_EXIT = 3


@dataclass(frozen=True)
class Scaled:
    config: Path
    data_dir: Path
    postgres: str
    keys_schema: str
    stream: str

    def env(self, config: Path | None = None) -> dict[str, str]:
        return {**os.environ, "PHIVAULT_CONFIG": str(config or self.config)}

    def settings(self, monkeypatch: pytest.MonkeyPatch) -> Settings:
        monkeypatch.setenv("PHIVAULT_CONFIG", str(self.config))
        return load_settings()


def settings_text(*, keys_schema: str, stream: str, nats_url: str, postgres: str) -> str:
    return f"""
[shape]
store = "postgres"
ledger = "jetstream"

[records]
store_url = "{STORE_URL}"

[keys]
postgres_schema = "{keys_schema}"

[ledger]
postgres_url = "{postgres}"
postgres_schema = "unused_{keys_schema}"
nats_urls = ["{nats_url}"]
stream = "{stream}"
stream_replicas = 1
publish_timeout_s = 1.0
"""


def phivault(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phivault.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


async def _nats() -> nats.NATS:
    try:
        return await asyncio.wait_for(
            nats.connect(servers=[NATS_URL], max_reconnect_attempts=1, connect_timeout=2), 5
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        pytest.fail(f"NATS with JetStream is not reachable at {NATS_URL}: {exc!r}", pytrace=False)


async def _delete_streams(*names: str) -> None:
    client = await _nats()
    try:
        for name in names:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await client.jetstream().delete_stream(name)
    finally:
        await client.close()


async def _stream_events(stream: str) -> dict[int, dict[str, Any]]:
    """Every event in the stream, by sequence (an absent stream holds none)."""
    client = await _nats()
    try:
        js = client.jetstream()
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return {}
        events = {}
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            assert msg.headers is not None and msg.headers[ENCODING_HEADER] == ENCODING_EVENT
            assert msg.data is not None
            events[seq] = json.loads(msg.data)
        return events
    finally:
        await client.close()


def _local_ledger_size(path: Path) -> int:
    async def size() -> int:
        async with open_ledger(DataDir.open(path)) as ledger:
            return ledger.size

    return asyncio.run(size())


def _live_deks(scaled: Scaled, patient: str) -> list[str]:
    store = PostgresKeyStore(STORE_URL, schema=scaled.keys_schema)
    try:
        return [r.key_id for r in store.live("default", KeyPurpose.DEK, patient)]
    finally:
        store.close()


@pytest.fixture
def scaled(postgres: str, tmp_path: Path) -> Iterator[Scaled]:
    tag = secrets.token_hex(5)
    scaled = Scaled(
        config=tmp_path / "phivault.toml",
        data_dir=tmp_path / "data",
        postgres=postgres,
        keys_schema=f"keys_cli_{tag}",
        stream=f"PV_TEST_KEYS_{tag}",
    )
    scaled.config.write_text(
        settings_text(
            keys_schema=scaled.keys_schema,
            stream=scaled.stream,
            nats_url=NATS_URL,
            postgres=postgres,
        )
    )
    try:
        init = phivault(
            "init", "--dev", "--json", "--data-dir", str(scaled.data_dir), env=scaled.env()
        )
        assert init.returncode == 0, init.stderr
        yield scaled
    finally:
        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(scaled.keys_schema)
                )
            )
        asyncio.run(_delete_streams(scaled.stream, f"KV_{invalidation_bucket(scaled.keys_schema)}"))


@contextlib.asynccontextmanager
async def _ring(scaled: Scaled, settings: Settings, *, unseal: bool = True) -> AsyncIterator[Any]:
    directory = DataDir.open(scaled.data_dir)
    async with (
        open_shape_sink(settings, directory, client_name="test-keys-cli") as shape,
        # unsealed by the dev unseal file
        open_keyring(directory, settings, shape.sink, unseal=unseal) as ring,
    ):
        assert shape.position is AuditPosition.STREAM_SEQUENCE and shape.embedded is None
        yield ring


def _seed(scaled: Scaled, settings: Settings, *patients: str) -> None:
    async def seed() -> None:
        async with _ring(scaled, settings) as ring:
            for patient in patients:
                await ring.patient_cipher("default", patient, create=True)

    asyncio.run(seed())


def test_shred_records_to_the_stream_and_not_the_local_ledger(
    scaled: Scaled, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(scaled, scaled.settings(monkeypatch), "p1", "p3")
    [dek] = _live_deks(scaled, "p1")
    local_before = _local_ledger_size(scaled.data_dir)
    streamed_before = asyncio.run(_stream_events(scaled.stream))

    done = phivault("keys", "shred", "--patient", "p1", "--yes", "--json",
                    "--data-dir", str(scaled.data_dir), env=scaled.env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["keys_destroyed"] == [dek]
    # a stream sequence is not a ledger index, and the output says which it is
    assert result["ledger_index"] is None
    assert result["audit_position"]["kind"] == "stream-sequence"
    seq = result["audit_position"]["value"]

    events = asyncio.run(_stream_events(scaled.stream))
    new = {s: e for s, e in events.items() if s not in streamed_before}
    assert seq in new
    shred = new[seq]
    assert (shred["kind"], shred["subtype"], shred["patient"]) == (
        "key-operation", "shred", "Patient/p1",
    )  # fmt: skip
    assert dek in json.dumps(shred["entities"])
    assert _live_deks(scaled, "p1") == []
    # the data directory's file ledger, which nobody verifies in this shape, got nothing
    assert _local_ledger_size(scaled.data_dir) == local_before

    said = phivault("keys", "shred", "--patient", "p3", "--yes",
                    "--data-dir", str(scaled.data_dir), env=scaled.env())  # fmt: skip
    assert said.returncode == 0, said.stderr
    assert "audit stream sequence" in said.stdout and "ledger entry" not in said.stdout

    text = phivault("keys", "hold", "--patient", "p2", "--until", "2099-01-01", "--reason",
                    "litigation", "--data-dir", str(scaled.data_dir), env=scaled.env())  # fmt: skip
    assert text.returncode == 0, text.stderr
    held = [
        e for e in asyncio.run(_stream_events(scaled.stream)).values() if e["subtype"] == "hold"
    ]
    assert [e["patient"] for e in held] == ["Patient/p2"]
    assert _local_ledger_size(scaled.data_dir) == local_before


def test_shred_fails_closed_when_nats_is_unreachable(
    scaled: Scaled, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _seed(scaled, scaled.settings(monkeypatch), "p1")
    [dek] = _live_deks(scaled, "p1")
    dead = f"nats://127.0.0.1:{free_port()}"  # a port nobody listens on
    down = tmp_path / "down.toml"
    down.write_text(
        settings_text(
            keys_schema=scaled.keys_schema,
            stream=scaled.stream,
            nats_url=dead,
            postgres=scaled.postgres,
        )
    )
    local_before = _local_ledger_size(scaled.data_dir)

    refused = phivault("keys", "shred", "--patient", "p1", "--yes", "--json",
                       "--data-dir", str(scaled.data_dir), env=scaled.env(down))  # fmt: skip
    assert refused.returncode == AUDIT_UNAVAILABLE_EXIT, refused.stdout + refused.stderr
    error = json.loads(refused.stdout)
    assert error["error"] == "audit-unavailable" and "cannot connect to NATS" in error["message"]
    assert _live_deks(scaled, "p1") == [dek]
    assert _local_ledger_size(scaled.data_dir) == local_before  # no fallback to the file ledger


def test_a_stream_that_stops_taking_events_leaves_the_keys_alone(
    scaled: Scaled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream goes away between opening and shredding: the shred's event is refused, so
    the keys are not destroyed (the key ring records, then acts)."""
    settings = scaled.settings(monkeypatch)
    _seed(scaled, settings, "p1")
    [dek] = _live_deks(scaled, "p1")

    async def shred() -> None:
        # sealed, as `phivault keys shred` opens it: shredding needs no key
        async with _ring(scaled, settings, unseal=False) as ring:
            await _delete_streams(scaled.stream)
            await ring.shred_patient("default", "p1", reason="erasure-request")

    # "no responders" at once, or (on a loaded machine) no acknowledgement before the timeout
    with pytest.raises(LedgerUnavailable, match=r"did not (answer|acknowledge)"):
        asyncio.run(shred())
    assert _live_deks(scaled, "p1") == [dek]
    store = PostgresKeyStore(STORE_URL, schema=scaled.keys_schema)
    try:
        assert store.shred_record("default", "p1") is None
    finally:
        store.close()


def test_read_only_inventory_publishes_nothing(
    scaled: Scaled, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(scaled, scaled.settings(monkeypatch), "p1")
    before = asyncio.run(_stream_events(scaled.stream))
    listed = phivault("keys", "inventory", "--json", "--data-dir", str(scaled.data_dir),
                      env=scaled.env())  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert asyncio.run(_stream_events(scaled.stream)) == before
