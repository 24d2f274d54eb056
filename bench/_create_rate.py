"""Micro-benchmark: creates at a paced rate (open loop), in-process, without HTTP.

The real service as ``bench/_read_cpu.py`` builds it (production settings, one companion
bundle and one Synthea patient loaded first); then ``POST /fhir/Observation`` by a
``service`` feed token is driven straight into the ASGI app at ``--rate`` creates a second,
each started when it is due whatever the others are doing (an open loop, as
``fhir_bench_client.py`` paces its rate), its latency measured from when it was due
(docs/decisions/bench-latency-goals.md). Process CPU time (all threads) divided by the
creates is the CPU figure.

Also reported: the rate achieved, p50/p99/max latency, and the sizes of the groups the
SQLite store committed and of the ledger's group commits (mean, and the share of writes
alone in theirs).

    python bench/_create_rate.py [--rate 600] [--seconds 10] [--profile OUT.prof]
                                 [--py-spy OUT.txt]

``--rate 0``: closed loop instead, ``--concurrency`` creates always in flight.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import resource
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _read_cpu import _start_py_spy, call, production_service  # noqa: E402
from fhir_bench import bundle_files, observation  # noqa: E402

THREAD_TIMES: Counter[str] = Counter()  # seconds spent in the store's groups, per thread clock


def _count_groups() -> tuple[Counter[int], Counter[int]]:
    """Sizes of the store's SQLite groups and of the ledger's group commits, as they happen."""
    from phivault.ledger.service import Ledger
    from phivault.records.store.group_commit import GroupCommit

    store_groups: Counter[int] = Counter()
    ledger_groups: Counter[int] = Counter()
    write_group = GroupCommit._write_group
    appended = Ledger._appended

    def counted_group(self: Any, batch: list[Any]) -> None:
        store_groups[len(batch)] += 1
        cpu, wall = time.thread_time(), time.perf_counter()
        write_group(self, batch)
        THREAD_TIMES["store_cpu"] += time.thread_time() - cpu
        THREAD_TIMES["store_wall"] += time.perf_counter() - wall

    def counted_append(self: Any, loop: Any, leaves: list[bytes]) -> Any:
        ledger_groups[len(leaves)] += 1
        return appended(self, loop, leaves)

    GroupCommit._write_group = counted_group  # type: ignore[method-assign]
    Ledger._appended = counted_append  # type: ignore[method-assign]
    return store_groups, ledger_groups


def _summary(groups: Counter[int]) -> dict[str, float]:
    count = sum(groups.values())
    items = sum(size * n for size, n in groups.items())
    return {
        "groups": count,
        "mean": round(items / count, 2) if count else 0.0,
        "alone": round(groups.get(1, 0) / items, 3) if items else 0.0,
        "max": max(groups, default=0),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from phivault.api.serve import tune_for_serving
    from phivault.cli.load import add_conditional_creates

    store_groups, ledger_groups = _count_groups()

    def configure(settings: Any) -> Any:
        if not args.ledger_window:
            return settings
        # an experiment: the ledger's group commit gathers this long
        ledger = settings.ledger.model_copy(update={"group_commit_window_s": args.ledger_window})
        return settings.model_copy(update={"ledger": ledger})

    tokens, service = production_service("create-rate-", configure)
    companions, patients = bundle_files(1)
    async with service as app:
        patient = ""
        for file in [*companions, *patients[:1]]:
            bundle = json.loads(file.read_bytes())
            add_conditional_creates(bundle)
            body = json.dumps(bundle).encode()
            status, answer = await call(app, "POST", "/fhir", tokens.loader(), body)
            if status != 200:
                raise SystemExit(f"load failed: {status} {answer[:300]!r}")
            for entry in json.loads(answer).get("entry", []):
                location = entry.get("response", {}).get("location", "")
                parts = location.split("/_history/")[0].split("/")
                if parts[-2] == "Patient":
                    patient = patient or parts[-1]
        token = tokens.creator()
        tune_for_serving()
        if args.switch_interval:
            sys.setswitchinterval(args.switch_interval)
        serial = iter(range(10**9))
        latencies: list[float] = []

        async def create(due: float) -> None:
            body = observation(patient, next(serial)).encode()
            status, answer = await call(app, "POST", "/fhir/Observation", token, body)
            latencies.append(time.perf_counter() - due)
            if status != 201:
                raise SystemExit(f"POST failed: {status} {answer[:300]!r}")

        async def paced(rate: float, seconds: float) -> int:
            total = int(rate * seconds)
            start = time.perf_counter()
            tasks = []
            for i in range(total):
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(create(due)))
            await asyncio.gather(*tasks)
            return total

        async def closed(concurrency: int, seconds: float) -> int:
            stop = time.perf_counter() + seconds
            done = 0

            async def client() -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    await create(time.perf_counter())
                    done += 1

            await asyncio.gather(*(client() for _ in range(concurrency)))
            return done

        async def drive(seconds: float) -> int:
            if args.rate:
                return await paced(args.rate, seconds)
            return await closed(args.concurrency, seconds)

        await drive(args.warmup)
        latencies.clear()
        store_groups.clear()
        THREAD_TIMES.clear()
        ledger_groups.clear()
        profiler = cProfile.Profile() if args.profile else None
        sampler = _start_py_spy(args.py_spy) if args.py_spy else None
        use0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        creates = await drive(args.seconds)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        use = resource.getrusage(resource.RUSAGE_SELF)
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(60)
    latencies.sort()
    return {
        "rate": args.rate,
        "creates": creates,
        "achieved_per_s": round(creates / wall, 1),
        "cpu_ms_per_create": round(1000 * cpu / creates, 3),
        "user_ms": round(1000 * (use.ru_utime - use0.ru_utime) / creates, 3),
        "sys_ms": round(1000 * (use.ru_stime - use0.ru_stime) / creates, 3),
        "switches": round((use.ru_nvcsw - use0.ru_nvcsw) / creates, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "p99_ms": round(1000 * latencies[len(latencies) * 99 // 100], 2),
        "max_ms": round(1000 * latencies[-1], 2),
        "store_groups": _summary(store_groups),
        # per create: CPU and wall time of the storage threads writing groups
        "store_group_ms": {k: round(1000 * v / creates, 3) for k, v in THREAD_TIMES.items()},
        # ledger group commits hold every event: intents, outcomes and other events
        "ledger_groups": _summary(ledger_groups),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=600.0, help="creates a second (0: closed)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--concurrency", type=int, default=64, help="closed loop (--rate 0)")
    parser.add_argument(
        "--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (s) to try"
    )
    parser.add_argument(
        "--ledger-window", type=float, default=0.0, help="ledger.group_commit_window_s to try"
    )
    parser.add_argument("--profile", help="write cProfile stats of the measured part here")
    parser.add_argument("--py-spy", help="sample the measured part with py-spy into this file")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
