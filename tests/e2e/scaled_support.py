"""The scaled shape on this machine, as an operator would run it: a settings file, the
machine's PostgreSQL (a fresh schema each for records, keys and the ledger), NATS JetStream
(a fresh stream), Redis (a fresh key prefix), ``phivault sequencer`` and ``phivault serve
--workers N`` as real processes. Everything is removed afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from live_server import phivault_serve

from ports_support import free_port
from postgres_support import require_postgres

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
NATS_URL = "nats://127.0.0.1:4222"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHIVAULT, *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


@dataclass
class Scaled:
    """One scaled deployment: its settings file, data directory, names and processes."""

    config: Path
    data_dir: Path
    admin: str
    records_schema: str
    keys_schema: str
    ledger_schema: str
    stream: str
    redis_prefix: str
    url: str = ""
    logs: Path | None = None
    sequencers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PHIVAULT_CONFIG": str(self.config),
            "PHIVAULT_API__RATE_LIMIT_PER_ADDRESS": "100000/minute",
            "PHIVAULT_API__RATE_LIMIT_PER_PRINCIPAL": "100000/minute",
        }


def settings_text(scaled: Scaled, *, settle_after_s: float, records_extra: str = "") -> str:
    return f"""
[shape]
store = "postgres"
ledger = "jetstream"
shared_state = "redis"

[records]
store_url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
store_schema = "{scaled.records_schema}"
reconcile_every_s = 0.5
settle_intents_after_s = {settle_after_s}
{records_extra}

[keys]
postgres_schema = "{scaled.keys_schema}"

[ledger]
postgres_url = "{scaled.admin}"
postgres_schema = "{scaled.ledger_schema}"
nats_urls = ["{NATS_URL}"]
stream = "{scaled.stream}"
stream_replicas = 1

[api]
redis_key_prefix = "{scaled.redis_prefix}"
"""


@contextlib.contextmanager
def scaled_deployment(
    workers: int = 2,
    *,
    settle_after_s: float = 3.0,
    sequencers: int = 1,
    records_extra: str = "",
) -> Iterator[Scaled]:
    """``records_extra``: more lines for the settings' ``[records]`` table (replicas)."""
    admin = require_postgres()
    tag = uuid.uuid4().hex[:10]
    with tempfile.TemporaryDirectory(prefix="phivault-scaled-") as folder:
        root = Path(folder)
        scaled = Scaled(
            config=root / "phivault.toml",
            data_dir=root / "data",
            admin=admin,
            records_schema=f"rec_{tag}",
            keys_schema=f"keys_{tag}",
            ledger_schema=f"ledger_{tag}",
            stream=f"AUDIT_{tag}",
            redis_prefix=f"phivault-test-{tag}",
        )
        scaled.config.write_text(
            settings_text(scaled, settle_after_s=settle_after_s, records_extra=records_extra)
        )
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {scaled.records_schema}")
        try:
            created = run_cli("sequencer", "--create-schema", env=scaled.env)
            assert created.returncode == 0, created.stdout + created.stderr
            init = run_cli(
                "init", "--dev", "--json", "--data-dir", str(scaled.data_dir), env=scaled.env
            )
            assert init.returncode == 0, init.stderr
            logs = scaled.logs = root / "logs"
            logs.mkdir()
            for n in range(sequencers):
                scaled.sequencers.append(start_sequencer(scaled, logs / f"sequencer-{n}.log"))
            port = free_port()
            scaled.url = f"http://127.0.0.1:{port}"
            with phivault_serve(
                [
                    "--workers",
                    str(workers),
                    "--port",
                    str(port),
                    "--data-dir",
                    str(scaled.data_dir),
                ],
                url=scaled.url,
                verify=False,
                env=scaled.env,
            ):
                yield scaled
        finally:
            for process in scaled.sequencers:
                stop(process)
            _remove(scaled)


def start_sequencer(scaled: Scaled, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [PHIVAULT, "sequencer", "--data-dir", str(scaled.data_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=scaled.env,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _remove(scaled: Scaled) -> None:
    with psycopg.connect(scaled.admin, autocommit=True) as conn:
        for schema in (scaled.records_schema, scaled.keys_schema, scaled.ledger_schema):
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        for key in client.scan_iter(f"{scaled.redis_prefix}*"):
            client.delete(key)
    _delete_stream(scaled.stream)
    # the workers' key invalidation leases (a JetStream key-value bucket is a stream)
    from phivault.crypto.invalidation_nats import invalidation_bucket

    _delete_stream(f"KV_{invalidation_bucket(scaled.keys_schema)}")


def _delete_stream(name: str) -> None:
    import asyncio

    import nats

    async def delete() -> None:
        client = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
        try:
            with contextlib.suppress(Exception):
                await client.jetstream().delete_stream(name)
        finally:
            await client.close()

    with contextlib.suppress(Exception):
        asyncio.run(delete())


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, *, logs: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    shown = ""
    if logs is not None:
        for log in sorted(logs.glob("*.log")):
            shown += f"\n--- {log.name}\n" + log.read_text(errors="replace")[-3000:]
    raise AssertionError(f"timed out waiting for {what}{shown}")
