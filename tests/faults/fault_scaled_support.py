"""The scaled shape, deployed for the end-to-end fault tests: ``phivault serve --workers N``
and ``phivault sequencer`` as real processes, over a private PostgreSQL (records, keys and
ledger schemas) and a private 3-node NATS JetStream cluster (the audit stream, 3 replicas),
with the machine's Redis under a key prefix of its own (removed afterwards: Redis is never
stopped here). Every process lives in the test's harness and dies with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fault_sequencer_support import SequencerProcess
from fault_support import (
    Harness,
    ManagedProcess,
    NatsCluster,
    PrivatePostgres,
    free_port,
    wait_until,
)

from phivault.datadir import DataDir
from phivault.identity.dev_provider import DevIdentityProvider, DevProviderWarning
from phivault.identity.principal import Role
from phivault.ledger.postgres_store import PostgresLedgerStore
from phivault.settings import load_settings

__all__ = ["ScaledDeployment", "deploy_scaled"]

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
REDIS_URL = "redis://127.0.0.1:6379/0"
OUTCOMES = frozenset({"committed", "rolled-back", "reconciled-committed", "reconciled-absent"})


@dataclass
class ScaledDeployment:
    harness: Harness
    pg: PrivatePostgres
    nats: NatsCluster
    config: Path
    data_dir: Path
    url: str
    serve: ManagedProcess
    sequencer: SequencerProcess
    ledger_schema: str
    records_schema: str
    stream: str
    _minter: DevIdentityProvider | None = None
    _audience: str = ""

    def env(self) -> dict[str, str]:
        return _env(self.config)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PHIVAULT, *args], capture_output=True, text=True, timeout=timeout,
            env=self.env(), check=False,
        )  # fmt: skip

    def _provider(self) -> DevIdentityProvider:
        if self._minter is None:
            settings = load_settings(self.config)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DevProviderWarning)
                self._minter = DevIdentityProvider.open(DataDir.open(self.data_dir), settings)
            self._audience = settings.identity.audience
        return self._minter

    def _bearer(self, **claims: Any) -> dict[str, str]:
        # Minted in process by the data directory's dev identity provider, as
        # ``phivault token`` would (a subprocess per token is a second and a half).
        token = self._provider().mint(audience=self._audience, **claims)
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}

    def loader(self) -> dict[str, str]:
        return self._bearer(
            user="fault-loader",
            roles=[Role.SERVICE],
            scopes=["system/*.cruds"],
            purpose_of_use=["HOPERAT"],
        )

    def patient(self, patient_id: str) -> dict[str, str]:
        return self._bearer(
            user=f"patient-{patient_id}",
            roles=[Role.PATIENT],
            fhir_user=f"Patient/{patient_id}",
            scopes=["patient/*.rs"],
        )

    def ledger_documents(self) -> list[dict[str, Any]]:
        store = PostgresLedgerStore(self.pg.conninfo, schema=self.ledger_schema, writable=False)
        try:
            return [json.loads(leaf) for leaf in store.scan()]
        finally:
            store.close()

    def stream_last_seq(self) -> int:
        """The audit stream's last sequence number, from a NATS node's monitoring endpoint."""
        for node in self.nats.nodes:
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(
                    f"http://127.0.0.1:{node.monitor_port}/jsz?streams=true", timeout=1.0
                )
                for account in response.json().get("account_details", []):
                    for stream in account.get("stream_detail", []):
                        if stream.get("name") == self.stream:
                            return int(stream["state"]["last_seq"])
        raise RuntimeError("no NATS node reports the audit stream")

    def wait_ledger_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until the sequencer has appended everything the stream holds now."""
        last = self.stream_last_seq()
        wait_until(
            lambda: self.sequencer.last_applied() >= last,
            timeout,
            what=f"the sequencer to append up to stream message {last}",
        )

    def verify_ledger(self) -> None:
        """``phivault ledger verify`` on the PostgreSQL ledger, as an operator runs it."""
        verified = self.cli(
            "ledger", "verify", "--json", "--postgres", self.pg.conninfo,
            "--schema", self.ledger_schema, "--data-dir", str(self.data_dir),
        )  # fmt: skip
        assert verified.returncode == 0, verified.stdout + verified.stderr

    def worker_pids(self) -> list[int]:
        """The serve supervisor's worker processes (its spawned children)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if (
                ppid == self.serve.pid
                and b"multiprocessing" in cmdline
                and b"spawn_main" in cmdline
            ):
                pids.append(int(entry.name))
        return sorted(pids)

    def workers_serving(self, client_pid: int) -> list[int]:
        """The workers holding an open connection from process ``client_pid`` (read from
        /proc: the kernel hands each connection to one worker)."""
        port = int(self.url.rsplit(":", 1)[1])
        rows = _tcp_rows()
        ours = _socket_inodes(client_pid)
        # Our ends: connections to the server's port; their local ports name the server ends.
        client_ports = {local for local, remote, inode in rows if inode in ours and remote == port}
        server_inodes = {
            inode for local, remote, inode in rows if local == port and remote in client_ports
        }
        return [pid for pid in self.worker_pids() if _socket_inodes(pid) & server_inodes]

    def healthz(self) -> int:
        return httpx.get(f"{self.url}/healthz", timeout=3).status_code


def _tcp_rows() -> list[tuple[int, int, int]]:
    """(local port, remote port, inode) of every established loopback TCP socket."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] != "01":  # ESTABLISHED
            continue
        local = int(fields[1].split(":")[1], 16)
        remote = int(fields[2].split(":")[1], 16)
        rows.append((local, remote, int(fields[9])))
    return rows


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _env(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
    env["PHIVAULT_CONFIG"] = str(config)
    env["PHIVAULT_API__RATE_LIMIT_PER_ADDRESS"] = "100000/minute"
    env["PHIVAULT_API__RATE_LIMIT_PER_PRINCIPAL"] = "100000/minute"
    return env


def _settings(
    pg: PrivatePostgres, nats: NatsCluster, *, tag: str, stream: str, settle_after_s: float
) -> str:
    urls = ", ".join(f'"{u}"' for u in nats.urls)
    return f"""
[shape]
store = "postgres"
ledger = "jetstream"
shared_state = "redis"

[records]
store_url = "{pg.url}"
store_schema = "rec_{tag}"
reconcile_every_s = 0.5
settle_intents_after_s = {settle_after_s}

[keys]
postgres_schema = "keys_{tag}"

[ledger]
postgres_url = "{pg.conninfo}"
postgres_schema = "ledger_{tag}"
nats_urls = [{urls}]
stream = "{stream}"
stream_replicas = 3

[api]
redis_url = "{REDIS_URL}"
redis_key_prefix = "pv-fault-{tag}"
"""


def _drop_redis_keys(prefix: str) -> None:
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()


def deploy_scaled(
    harness: Harness, *, workers: int = 2, settle_after_s: float = 2.0
) -> ScaledDeployment:
    """Start everything and return once ``/healthz`` answers and the sequencer is active."""
    pg = harness.postgres()
    nats = harness.nats(3)
    tag = secrets.token_hex(5)
    stream = f"AUDIT_{tag.upper()}"
    root = harness.tmpdir("pv-fault-scaled-")
    config = root / "phivault.toml"
    config.write_text(_settings(pg, nats, tag=tag, stream=stream, settle_after_s=settle_after_s))
    harness.on_close(lambda: _drop_redis_keys(f"pv-fault-{tag}"))
    with psycopg.connect(pg.conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA rec_{tag}")
    env = _env(config)

    def cli(*args: str) -> None:
        done = subprocess.run(
            [PHIVAULT, *args], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        assert done.returncode == 0, f"phivault {args[0]} failed: {done.stderr or done.stdout}"

    data_dir = root / "data"
    cli("sequencer", "--create-schema")
    cli("init", "--dev", "--json", "--data-dir", str(data_dir))
    metrics = free_port()
    sequencer = SequencerProcess(
        harness.process(
            "sequencer",
            [PHIVAULT, "sequencer", "--data-dir", str(data_dir), "--metrics-port", str(metrics)],
            env=env,
        ),
        metrics,
    )
    wait_until(sequencer.active, 30, what="the sequencer to be active")
    port = free_port()
    serve = harness.process(
        "serve",
        [PHIVAULT, "serve", "--workers", str(workers), "--port", str(port),
         "--data-dir", str(data_dir)],
        env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not serve.running:
            raise RuntimeError("phivault serve exited (see its log)")
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200

    wait_until(up, 60, what="phivault serve to answer /healthz")
    deployment = ScaledDeployment(
        harness, pg, nats, config, data_dir, url, serve, sequencer,
        f"ledger_{tag}", f"rec_{tag}", stream,
    )  # fmt: skip
    wait_until(lambda: len(deployment.worker_pids()) == workers, 60, what=f"{workers} workers")
    return deployment
