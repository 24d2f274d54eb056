"""Micro-benchmark: the CPU one FHIR read (or search, or create: ``--kind``) costs in the
scaled shape, per process involved.

A read in the scaled shape costs CPU in more processes than the API worker: the sequencer
(which appends its disclosure event to the ledger), nats-server (the publish, its ack, the
sequencer's fetch), redis-server (rate limits, the session touch), the PostgreSQL backends
serving the workers and the sequencer, and the load generator. On a 2-core machine all of it
counts, so this script attributes it: each deployment gets its *own* redis-server and
nats-server (started here, on free ports, so other users of the machine's shared servers do
not show up in the figures), and the PostgreSQL backends are the ones whose client ports are
sockets of the deployment's workers or sequencer (found through ``/proc`` and
``pg_stat_activity``). CPU is user + system time from ``/proc/<pid>/stat`` (the load
generator's from its ``wait4`` rusage), taken around each measured period.

With ``--baseline-src DIR`` (another checkout's ``src``, e.g. ``git archive <commit> src``) a
second deployment runs that code beside this one, and the measured rounds alternate between
them: "before" and "after" come from the same minutes of the same loaded machine.

    python bench/_scaled_read_cpu.py [--baseline-src DIR] [--kind read|search|create]
        [--patients 3] [--duration 4] [--rounds 3] [--conc 32] [--workers 2] [--py-spy DIR]

``--py-spy DIR`` (``PY_SPY=...`` names the binary) samples the workers and the sequencer of
each deployment during the last round into ``DIR/<deployment>-{worker-PID,sequencer}.txt``
(folded stacks). The last line is JSON: per deployment, ``reads`` and ``cpu_ms_per_read``
per process group and in total, over all rounds and as the median of the rounds ("read"
stands for a request of the measured ``--kind``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fhir_bench as fb  # noqa: E402
import fhir_bench_scaled as fbs  # noqa: E402

_PG_PORT_HEX = f"{5432:04X}"
GROUPS = ("workers", "sequencer", "nats", "redis", "postgres", "client")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    out, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        out.append(current)
        pending += [int(c) for c in children]
    return out


def _postgres_client_ports(pids: list[int]) -> set[int]:
    """Local ports of the TCP connections to port 5432 held by ``pids``."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[9] in inodes and cols[2].endswith(":" + _PG_PORT_HEX):
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _backends(ports: set[int]) -> list[int]:
    import psycopg

    if not ports:
        return []
    with psycopg.connect(fbs.POSTGRES, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", (list(ports),)
        ).fetchall()
    return [int(r[0]) for r in rows]


@dataclass
class Variant:
    """One scaled deployment with its own redis-server and nats-server."""

    name: str
    src: Path | None
    work: Path
    deployment: fbs.Deployment = field(init=False)
    server: fbs.ScaledServer = field(init=False)
    redis: subprocess.Popen[bytes] | None = None
    nats: subprocess.Popen[bytes] | None = None
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0.0))
    reads: int = 0
    failed: int = 0
    rounds: list[dict[str, float]] = field(default_factory=list)  # CPU ms per read, per round

    def start_state_servers(self) -> None:
        redis_port, nats_port = _free_port(), _free_port()
        store = self.work / f"nats-{self.name}"
        store.mkdir()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.nats = subprocess.Popen(
            ["nats-server", "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(store)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for port in (redis_port, nats_port):
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name}: no server on port {port}") from None
                    time.sleep(0.1)
        tag = f"{self.name[:4]}{uuid.uuid4().hex[:8]}"
        self.deployment = fbs.Deployment(
            tag,
            self.work / f"{self.name}.toml",
            nats_url=f"nats://127.0.0.1:{nats_port}",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            src=self.src,
        )

    def snapshot(self) -> dict[str, Any]:
        assert self.server.process is not None and self.deployment.sequencer is not None
        workers = _tree(self.server.process.pid)
        sequencer = _tree(self.deployment.sequencer.pid)
        backends = _backends(_postgres_client_ports(workers + sequencer))
        return {
            "workers": sum(_cpu(p) or 0.0 for p in workers),
            "sequencer": sum(_cpu(p) or 0.0 for p in sequencer),
            "nats": _cpu(self.nats.pid) if self.nats else 0.0,
            "redis": _cpu(self.redis.pid) if self.redis else 0.0,
            "postgres": {p: _cpu(p) or 0.0 for p in backends},
        }

    def stop(self) -> None:
        self.server.stop()
        fbs.tear_down(self.deployment)
        for proc in (self.redis, self.nats):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)


def _drive(variant: Variant, requests: list[list[Any]], duration: float, conc: int) -> None:
    """One measured period; adds each group's CPU to the variant's totals."""
    spec = variant.work / f"spec-{variant.name}.json"
    spec.write_text(
        json.dumps(
            {
                "kind": "drive",
                "port": variant.server.port,
                "duration": duration,
                "concurrency": conc,
                "requests": requests,
            }
        )
    )
    before = variant.snapshot()
    # Only the load generator is reaped in this window: its CPU is the children's delta.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = subprocess.Popen(
        [sys.executable, str(fb.CLIENT), str(spec)], stdout=subprocess.PIPE, text=True
    )
    out, _ = client.communicate(timeout=duration + 300)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = variant.snapshot()
    if client.returncode != 0:
        raise RuntimeError(f"the load generator failed ({client.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    own = ("workers", "sequencer", "nats", "redis")
    spent = {group: after[group] - before[group] for group in own}
    spent["postgres"] = sum(
        cpu - before["postgres"].get(pid, 0.0) for pid, cpu in after["postgres"].items()
    )
    spent["client"] = (reaped.ru_utime + reaped.ru_stime) - (children.ru_utime + children.ru_stime)
    for group, seconds in spent.items():
        variant.totals[group] += seconds
    reads = int(result["ok"])
    variant.reads += reads
    variant.failed += int(result["failed"])
    if reads:
        per_read = {group: 1000 * seconds / reads for group, seconds in spent.items()}
        per_read["total"] = sum(per_read.values())
        variant.rounds.append(per_read)


def _py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    # Only the thread holding the GIL: the Python CPU, not threads waiting on a socket.
    command = [os.environ.get("PY_SPY", "py-spy"), "record", "--gil", "--rate", "250"]
    command += ["--format", "raw", "--duration", str(int(seconds))]
    command += ["-o", str(out), "--pid", str(pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="scaled-read-cpu-"))
    tokens = fb.Tokens(tmp / "issuer.json")
    variants = [Variant("after", None, tmp)]
    if args.baseline_src:
        variants.insert(0, Variant("before", Path(args.baseline_src).resolve(), tmp))
    try:
        for v in variants:
            v.start_state_servers()
            fbs.settings_file(v.deployment, v.deployment.config)
            fbs.set_up(v.deployment, tmp / v.name, tmp / f"{v.name}.shares.json")
            fbs.start_sequencer(v.deployment, tmp / v.name, tmp / f"sequencer-{v.name}.log")
            v.server = fbs.ScaledServer(v.name, "scaled", tmp / v.name, tmp)
            v.server.deployment = v.deployment
            v.server.workers = args.workers
            v.server.start()
        for v in variants:
            v.server.wait_ready()
        reads: dict[str, list[list[Any]]] = {}
        for v in variants:
            loaded = fb.load(v.server, tokens, tmp, args.patients, 4)
            reads[v.name] = getattr(fb.workloads(loaded, tokens), args.kind)
            if not reads[v.name]:
                raise RuntimeError(f"{v.name}: no {args.kind} requests after loading")
        for v in variants:  # warm up (not counted)
            saved = dict(v.totals)
            _drive(v, reads[v.name], 2.0, args.conc)
            v.totals, v.reads, v.failed, v.rounds = saved, 0, 0, []
        for n in range(args.rounds):
            for v in variants:
                samplers: list[subprocess.Popen[bytes]] = []
                if args.py_spy and n == args.rounds - 1:
                    out = Path(args.py_spy)
                    out.mkdir(parents=True, exist_ok=True)
                    assert v.server.process is not None and v.deployment.sequencer is not None
                    # Every process under the server (its workers; spawn's resource tracker
                    # idles): which of them takes the connections is up to the kernel.
                    samplers = [
                        _py_spy(pid, out / f"{v.name}-worker-{pid}.txt", args.duration)
                        for pid in _tree(v.server.process.pid)[1:]
                    ]
                    samplers.append(
                        _py_spy(v.deployment.sequencer.pid, out / f"{v.name}-sequencer.txt",
                                args.duration)
                    )  # fmt: skip
                    time.sleep(0.5)
                _drive(v, reads[v.name], args.duration, args.conc)
                for sampler in samplers:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        sampler.wait(30)
                print(f"round {n + 1} {v.name}: {v.reads} reads so far", file=sys.stderr)
    finally:
        for v in variants:
            with contextlib.suppress(Exception):
                v.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report: dict[str, Any] = {}
    for v in variants:
        per = {g: round(1000 * s / v.reads, 3) if v.reads else None for g, s in v.totals.items()}
        report[v.name] = {
            "reads": v.reads,
            "failed": v.failed,
            "cpu_ms_per_read": per,
            "total_cpu_ms_per_read": round(1000 * sum(v.totals.values()) / v.reads, 3)
            if v.reads
            else None,
            # The median over the measured rounds, per group (less moved by one bad round).
            "median_cpu_ms_per_read": {
                g: round(statistics.median(r[g] for r in v.rounds), 3) for g in (*GROUPS, "total")
            }
            if v.rounds
            else None,
            "total_cpu_ms_per_read_per_round": [round(r["total"], 3) for r in v.rounds],
        }
    report["kind"] = args.kind
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", help="run this src tree beside the current one")
    parser.add_argument("--kind", choices=("read", "search", "create"), default="read")
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conc", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--py-spy", help="folded stacks of a worker and the sequencer here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(json.dumps(main(parser.parse_args())))
