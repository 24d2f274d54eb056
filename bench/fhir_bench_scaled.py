"""``bench/fhir_bench.py --shape scaled``: the scaled shape beside the embedded one, one run.

Two deployments on this machine, loaded the same way and measured in alternating rounds
(read, search, create; 64 connections, closed loop), so that the ratio comes from the same
minutes of the same shared machine:

* **embedded**: one uvicorn worker, SQLite, the local ledger (fsync'd group commits), the
  production environment, exactly as ``bench/fhir_bench.py`` runs it;
* **scaled**: ``--workers`` processes (default 2) behind one socket
  (``bench/fhir_bench_scaled_server.py``, as ``phivault serve --workers N``) on the
  machine's PostgreSQL (records and wrapped keys in fresh schemas), the JetStream audit
  stream (a fresh stream; every disclosure waits for the publish acknowledgement) with
  ``phivault sequencer`` appending to the PostgreSQL ledger, and Redis for rate limits,
  the DPoP replay cache and sessions (a fresh key prefix). The development environment:
  production settings demand 3 stream replicas and this machine runs one NATS server;
  every control is on all the same.

The last line is one JSON object: ``embedded`` and ``scaled`` figures, ``scaled_ratio``
(scaled / embedded throughput per workload; the goal of issue 7 is at least 0.7 on this
2-core machine), the scaled shape's CPU per request summed over its workers, and the
sequencer's CPU time. Everything created (schemas, stream, keys) is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fhir_bench as fb

HERE = Path(__file__).resolve().parent
SCALED_SERVER = HERE / "fhir_bench_scaled_server.py"
PHIVAULT = str(Path(sys.executable).with_name("phivault"))
POSTGRES = os.environ.get(
    "PHIVAULT_TEST_POSTGRES", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)
NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"
GOAL_RATIO = 0.7


@dataclass
class Deployment:
    """The scaled shape's names, settings file and sequencer."""

    tag: str
    config: Path
    sequencer: subprocess.Popen[bytes] | None = None
    nats_url: str = NATS_URL
    redis_url: str = REDIS_URL
    # Another phivault source tree (its ``src``) for the workers and the sequencer, put first
    # on PYTHONPATH: how bench/_scaled_read_cpu.py runs the code before a change beside it.
    src: Path | None = None

    @property
    def schemas(self) -> tuple[str, str, str]:
        return (f"bench_rec_{self.tag}", f"bench_keys_{self.tag}", f"bench_ledger_{self.tag}")

    @property
    def stream(self) -> str:
        return f"BENCH_AUDIT_{self.tag}"

    @property
    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
        if self.src is not None:
            clean["PYTHONPATH"] = str(self.src)
        return {
            **clean,
            "PHIVAULT_CONFIG": str(self.config),
            "PHIVAULT_API__RATE_LIMIT_PER_ADDRESS": "100000000/minute",
            "PHIVAULT_API__RATE_LIMIT_PER_PRINCIPAL": "100000000/minute",
        }


def settings_file(deployment: Deployment, path: Path) -> None:
    records, keys, ledger = deployment.schemas
    path.write_text(
        f"""environment = "development"

[shape]
store = "postgres"
ledger = "jetstream"
shared_state = "redis"

[records]
store_url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
store_schema = "{records}"

[keys]
postgres_schema = "{keys}"

[ledger]
postgres_url = "{POSTGRES}"
postgres_schema = "{ledger}"
nats_urls = ["{deployment.nats_url}"]
stream = "{deployment.stream}"

[api]
redis_url = "{deployment.redis_url}"
redis_key_prefix = "phivault-bench-{deployment.tag}"
"""
    )


class ScaledServer(fb.Server):
    """The scaled workers (a parent and its spawned children); CPU is the whole tree's."""

    deployment: Deployment

    def start(self) -> None:
        self.port = fb.free_port()
        with self.log.open("ab") as log:
            shares = self.data_dir.parent / f"{self.data_dir.name}.shares.json"
            options = {
                "--config": str(self.deployment.config),
                "--workers": str(self.workers),
                "--data-dir": str(self.data_dir),
                "--port": str(self.port),
                "--issuer-file": str(self.work / "issuer.json"),
                "--shares-file": str(shares),
            }
            self.process = subprocess.Popen(
                [sys.executable, str(SCALED_SERVER), *(x for kv in options.items() for x in kv)],
                env=self.deployment.env,
                stdout=log,
                stderr=log,
            )

    workers: int = 2

    def cpu_seconds(self) -> float | None:
        if self.process is None:
            return None
        return tree_cpu_seconds(self.process.pid)


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process and all its descendants (Linux /proc)."""
    total = 0
    pending = [pid]
    seen = False
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, IndexError):
            continue
        seen = True
        total += int(fields[11]) + int(fields[12])
        pending += [int(c) for c in children]
    return total / os.sysconf("SC_CLK_TCK") if seen else None


def set_up(deployment: Deployment, data_dir: Path, shares_file: Path) -> None:
    import psycopg

    from phivault.initialize import initialize_data_dir
    from phivault.settings import load_settings

    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {deployment.schemas[0]}")
    created = subprocess.run(
        [PHIVAULT, "sequencer", "--create-schema"],
        env=deployment.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if created.returncode != 0:
        raise RuntimeError(f"sequencer --create-schema failed: {created.stderr[-1000:]}")
    made = initialize_data_dir(data_dir, dev=False, settings=load_settings(deployment.config))
    shares_file.write_text(
        json.dumps({"shares": list(made.keystore.shares[: made.keystore.threshold])})
    )
    shares_file.chmod(0o600)


def start_sequencer(deployment: Deployment, data_dir: Path, log: Path) -> None:
    with log.open("ab") as out:
        deployment.sequencer = subprocess.Popen(
            [PHIVAULT, "sequencer", "--data-dir", str(data_dir)],
            env=deployment.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def tear_down(deployment: Deployment) -> None:
    if deployment.sequencer is not None and deployment.sequencer.poll() is None:
        deployment.sequencer.terminate()
        try:
            deployment.sequencer.wait(30)
        except subprocess.TimeoutExpired:
            deployment.sequencer.kill()
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            for schema in deployment.schemas:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(deployment.redis_url)
        for key in client.scan_iter(f"phivault-bench-{deployment.tag}*"):
            client.delete(key)
    with contextlib.suppress(Exception):
        import asyncio

        import nats

        async def delete() -> None:
            client = await nats.connect(
                deployment.nats_url, connect_timeout=2, max_reconnect_attempts=0
            )
            try:
                await client.jetstream().delete_stream(deployment.stream)
            finally:
                await client.close()

        asyncio.run(delete())


def main(args: argparse.Namespace) -> int:
    duration = args.duration or (1.5 if args.quick else 2.0)
    rounds = args.rounds or (2 if args.quick else 4)
    patients = args.patients if args.patients is not None else (4 if args.quick else None)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="fhir-bench-scaled-"))
    deployment = Deployment(uuid.uuid4().hex[:10], tmp / "phivault.toml")
    servers: list[fb.Server] = []
    summary: dict[str, Any] = {}
    try:
        with fb.Ui() as ui:
            with ui.step("setting up both shapes"):
                tokens = fb.Tokens(tmp / "issuer.json")
                fb.make_data_dir(tmp / "embedded", tmp / "embedded.shares.json")
                settings_file(deployment, deployment.config)
                set_up(deployment, tmp / "scaled", tmp / "scaled.shares.json")
                start_sequencer(deployment, tmp / "scaled", tmp / "sequencer.log")
            embedded = fb.Server("embedded", "production", tmp / "embedded", tmp)
            scaled = ScaledServer("scaled", "scaled", tmp / "scaled", tmp)
            scaled.deployment = deployment
            scaled.workers = args.workers
            servers += [embedded, scaled]
            with ui.step("starting servers"):
                for server in servers:
                    server.start()
                for server in servers:
                    server.wait_ready()
            loaded: dict[str, fb.Loaded] = {}
            for server in servers:
                with ui.step(f"{server.name}: loading Synthea bundles"):
                    loaded[server.name] = fb.load(server, tokens, tmp, patients, args.load_conc)
                got = loaded[server.name]
                ui.log(
                    f"{server.name}: loaded {got.resources} resources in {got.seconds:.1f}s "
                    f"({got.resources_per_s:.0f}/s)"
                )
                for failure in got.failures:
                    fb.warn(f"{server.name}: load: {failure}")
            work = {s.name: fb.workloads(loaded[s.name], tokens) for s in servers}
            checks = {s.name: fb.preflight(s, work[s.name]) for s in servers}
            results: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {} for s in servers}
            sequencer_cpu_before = tree_cpu_seconds(deployment.sequencer.pid)  # type: ignore[union-attr]
            for kind in ("read", "search", "create"):
                for server in servers:
                    with ui.step(f"{server.name}: warming up ({kind}s)"):
                        fb.drive(server, getattr(work[server.name], kind), tmp, 1.0, args.conc)
                for n in range(rounds):
                    for server in servers:
                        label = f"{server.name}: {kind}s, round {n + 1}/{rounds}"
                        with ui.step(label):
                            run = fb.drive(
                                server, getattr(work[server.name], kind), tmp, duration, args.conc
                            )
                        results[server.name].setdefault(kind, []).append(run)
                        ui.log(f"{label}: {run['rps']:.0f}/s, p99 {run['p99_ms']:.1f} ms")
                        for sample in run["failure_samples"][:1]:
                            fb.warn(f"{server.name} {kind}: {sample}")
            sequencer_cpu = (tree_cpu_seconds(deployment.sequencer.pid) or 0.0) - (  # type: ignore[union-attr]
                sequencer_cpu_before or 0.0
            )
        embedded_figures = fb.figures(results["embedded"], loaded["embedded"].resources_per_s)
        scaled_figures = fb.figures(results["scaled"], loaded["scaled"].resources_per_s)
        ratio = {
            kind: (
                round(scaled_figures[f"{kind}_rps"] / embedded_figures[f"{kind}_rps"], 3)
                if scaled_figures.get(f"{kind}_rps") and embedded_figures.get(f"{kind}_rps")
                else None
            )
            for kind in ("read", "search", "create")
        }
        worst = min((r for r in ratio.values() if r is not None), default=None)
        summary = {
            "shape": "scaled",
            "embedded": embedded_figures,
            "scaled": scaled_figures,
            "scaled_ratio": ratio,
            "goals": {
                "scaled_ratio": {
                    "goal": f">= {GOAL_RATIO}",
                    "value": worst,
                    "pass": worst is not None and worst >= GOAL_RATIO,
                }
            },
            "sequencer_cpu_s": round(sequencer_cpu, 2),
            "setup": {
                "embedded": "uvicorn, 1 worker, " + fb.MODES["production"],
                "scaled": (
                    f"{args.workers} workers on one socket; PostgreSQL records and keys, "
                    "JetStream audit stream + phivault sequencer, Redis; development "
                    "environment (one NATS server: production demands 3 stream replicas)"
                ),
                "concurrency": args.conc,
                "duration_s": duration,
                "rounds": rounds,
                "resources_loaded": loaded["embedded"].resources,
                "checks": checks,
                "wall_s": round(time.monotonic() - started, 1),
                "load_average": [round(x, 2) for x in os.getloadavg()],
            },
        }
    except Exception as exc:
        traceback.print_exc()
        fb.warn(f"failed: {exc}")
        for server in servers:
            tail = server.log_tail()
            if tail:
                fb.warn(f"{server.name} server log (last lines):\n{tail}")
        sequencer_log = tmp / "sequencer.log"
        if sequencer_log.exists():
            fb.warn("sequencer log:\n" + sequencer_log.read_text(errors="replace")[-2000:])
        print(json.dumps({"error": str(exc).splitlines()[0][:500], **summary}))
        return 1
    finally:
        for server in servers:
            server.stop()
        tear_down(deployment)
        if args.keep:
            fb.warn(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary))
    return 0
