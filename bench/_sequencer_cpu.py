"""Micro-benchmark: the CPU the ledger sequencer spends per audit event, alone.

The scaled read benchmark (``bench/_scaled_read_cpu.py``) measures the sequencer among
everything else on a loaded 2-core machine. This one isolates it: a publisher (this process)
sends realistic grouped audit messages (``--per-msg`` read events each, as the workers'
JetStream sink groups them) at ``--rate`` events a second to a nats-server of its own, and one
sequencer per source tree (this checkout's ``src``, and ``--baseline-src`` if given) appends
them to a PostgreSQL ledger schema of its own. Both run at once, fed the same messages, so
"before" and "after" share the same minutes of the same machine. Reported per deployment:
CPU ms per event of the sequencer process and of its PostgreSQL backends, and events per
batch (INSERT).

    python bench/_sequencer_cpu.py [--baseline-src DIR] [--rate 900] [--per-msg 4]
        [--duration 10] [--rounds 3] [--py-spy DIR] [--gather-s S] [--baseline-gather-s S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import nats  # noqa: E402
import psycopg  # noqa: E402

import _scaled_read_cpu as src_cpu  # noqa: E402
from fhir_bench_scaled import POSTGRES  # noqa: E402
from phivault.crypto.signing import Ed25519NoteSigner  # noqa: E402
from phivault.ledger.canonical import canonical_json_of_plain_document  # noqa: E402
from phivault.ledger.postgres_store import create_ledger_schema  # noqa: E402
from phivault.ledger.sequencer import create_cursor_table  # noqa: E402
from phivault.ledger.stream import (  # noqa: E402
    BATCH_HEADER,
    BATCH_SEPARATOR,
    ENCODING_BATCH,
    ENCODING_EVENT,
    ENCODING_HEADER,
    ensure_audit_stream,
)
from phivault.ledger.testing import sample_event  # noqa: E402

ORIGIN = "phivault.bench/sequencer"

# Runs in the sequencer's own process, with the variant's src first on sys.path.
_RUNNER = """
import asyncio, signal, sys
from phivault.crypto.signing import Ed25519NoteSigner
from phivault.ledger.sequencer import Sequencer
nats_url, stream, conninfo, schema, key, origin, gather = sys.argv[1:8]
options = {"gather_s": float(gather)} if gather else {}

async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    worker = Sequencer(nats_urls=[nats_url], stream=stream, ledger_conninfo=conninfo,
                       ledger_schema=schema, signer=Ed25519NoteSigner.load(key), origin=origin,
                       subject="phivault.audit." + stream, **options)
    await worker.run(stop)

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Variant:
    name: str
    src: Path
    stream: str
    schema: str
    gather: str = ""  # the sequencer's gather_s ("": its default)
    process: subprocess.Popen[bytes] | None = None
    cpu_s: float = 0.0
    pg_s: float = 0.0
    events: int = 0
    batches: int = 0
    rounds: list[dict[str, float]] = field(default_factory=list)

    def size(self) -> tuple[int, int]:
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            row = conn.execute(
                f'SELECT coalesce(max(idx) + 1, 0) FROM "{self.schema}".leaves'
            ).fetchone()
        return int(row[0]) if row else 0, 0

    def snapshot(self) -> tuple[float, dict[int, float]]:
        assert self.process is not None
        pids = src_cpu._tree(self.process.pid)
        backends = src_cpu._backends(src_cpu._postgres_client_ports(pids))
        own = sum(src_cpu._cpu(p) or 0.0 for p in pids)
        return own, {p: src_cpu._cpu(p) or 0.0 for p in backends}


def _messages(per_msg: int, count: int) -> list[tuple[bytes, dict[str, str]]]:
    out = []
    for m in range(count):
        payloads = [
            canonical_json_of_plain_document(
                sample_event(
                    m * per_msg + i, patient=f"Patient/p-{(m * per_msg + i) % 97}"
                ).to_document()
            )
            for i in range(per_msg)
        ]
        if per_msg == 1:
            out.append((payloads[0], {ENCODING_HEADER: ENCODING_EVENT}))
        else:
            headers = {
                ENCODING_HEADER: ENCODING_BATCH,
                BATCH_HEADER: ",".join([ENCODING_EVENT] * per_msg),
            }
            out.append((BATCH_SEPARATOR.join(payloads), headers))
    return out


async def _publish(
    nats_url: str, variants: list[Variant], rate: float, per_msg: int, stop: asyncio.Event
) -> None:
    client = await nats.connect(servers=[nats_url])
    messages = _messages(per_msg, 512)
    tick = 0.005
    per_tick = rate * tick / per_msg
    owed = 0.0
    n = 0
    try:
        next_at = time.monotonic()
        while not stop.is_set():
            owed += per_tick
            while owed >= 1:
                owed -= 1
                payload, headers = messages[n % len(messages)]
                n += 1
                for v in variants:
                    await client.publish(f"phivault.audit.{v.stream}", payload, headers=headers)
            await client.flush()
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", type=Path)
    parser.add_argument("--rate", type=float, default=900.0)
    parser.add_argument("--per-msg", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--py-spy", type=Path)
    parser.add_argument("--gather-s", default="", help="this checkout's sequencer gather_s")
    parser.add_argument("--baseline-gather-s", default="", help="the baseline's gather_s")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="seqcpu-"))
    port = _free_port()
    nats_proc = subprocess.Popen(
        ["nats-server", "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(work / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nats_url = f"nats://127.0.0.1:{port}"
    key = work / "signing.key"
    Ed25519NoteSigner.generate(ORIGIN).save(key)
    tag = secrets.token_hex(4)
    sources = [("after", HERE.parent / "src", args.gather_s)]
    if args.baseline_src:
        sources.append(("before", args.baseline_src.resolve(), args.baseline_gather_s))
    variants = [
        Variant(name, src, f"SEQB_{name}_{tag}", f"seqb_{name}_{tag}", gather)
        for name, src, gather in sources
    ]
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.1)
        asyncio.run(_setup(nats_url, variants))
        for v in variants:
            env = {**os.environ, "PYTHONPATH": str(v.src)}
            with open(work / f"{v.name}.log", "wb") as log:
                v.process = subprocess.Popen(
                    [sys.executable, "-c", _RUNNER, nats_url, v.stream, POSTGRES, v.schema,
                     str(key), ORIGIN, v.gather],
                    env=env, stderr=log,
                )  # fmt: skip
        asyncio.run(_drive(nats_url, variants, args))
    finally:
        for v in variants:
            if v.process is not None and v.process.poll() is None:
                v.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    v.process.wait(20)
        asyncio.run(_teardown(nats_url, variants))
        nats_proc.terminate()
        nats_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {"rate": args.rate, "per_msg": args.per_msg}
    for v in variants:
        report[v.name] = {
            "events": v.events,
            "sequencer_ms_per_event": round(1000 * v.cpu_s / max(1, v.events), 4),
            "postgres_ms_per_event": round(1000 * v.pg_s / max(1, v.events), 4),
            "rounds": v.rounds,
        }
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report))
    return 0


async def _setup(nats_url: str, variants: list[Variant]) -> None:
    client = await nats.connect(servers=[nats_url])
    for v in variants:
        await ensure_audit_stream(
            client.jetstream(), name=v.stream, subject=f"phivault.audit.{v.stream}", replicas=1
        )
        create_ledger_schema(POSTGRES, schema=v.schema)
        create_cursor_table(POSTGRES, schema=v.schema)
    await client.close()


async def _teardown(nats_url: str, variants: list[Variant]) -> None:
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        for v in variants:
            conn.execute(f'DROP SCHEMA IF EXISTS "{v.schema}" CASCADE')
    with contextlib.suppress(Exception):
        client = await nats.connect(servers=[nats_url])
        for v in variants:
            with contextlib.suppress(Exception):
                await client.jetstream().delete_stream(v.stream)
        await client.close()


async def _drive(nats_url: str, variants: list[Variant], args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    publisher = asyncio.create_task(_publish(nats_url, variants, args.rate, args.per_msg, stop))
    try:
        await asyncio.sleep(3.0)  # the sequencers take the lock and catch up
        for number in range(args.rounds):
            before = {v.name: (v.snapshot(), v.size()[0]) for v in variants}
            spies = []
            if args.py_spy and number == args.rounds - 1:
                args.py_spy.mkdir(parents=True, exist_ok=True)
                for v in variants:
                    assert v.process is not None
                    spies.append(
                        subprocess.Popen(
                            [
                                os.environ.get("PY_SPY", "py-spy"),
                                "record",
                                "-p",
                                str(v.process.pid),
                                "-d",
                                str(int(args.duration)),
                                "-f",
                                "raw",
                                "-o",
                                str(args.py_spy / f"{v.name}-sequencer.txt"),
                                "--gil",
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
            await asyncio.sleep(args.duration)
            for v in variants:
                (own0, pg0), size0 = before[v.name]
                own1, pg1 = v.snapshot()
                size1 = v.size()[0]
                events = size1 - size0
                pg = sum(pg1[p] - pg0.get(p, pg1[p]) for p in pg1)
                v.cpu_s += own1 - own0
                v.pg_s += pg
                v.events += events
                v.rounds.append(
                    {
                        "seq_ms": round(1000 * (own1 - own0) / max(1, events), 4),
                        "pg_ms": round(1000 * pg / max(1, events), 4),
                        "events": events,
                    }
                )
            for spy in spies:
                spy.wait(args.duration + 30)
    finally:
        stop.set()
        await publisher


if __name__ == "__main__":
    raise SystemExit(main())
