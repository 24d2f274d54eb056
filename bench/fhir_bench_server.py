"""The server side of ``bench/fhir_bench.py``: the real app, one uvicorn worker, in its own
process, as ``phivault serve`` would run it, on a data directory made by ``phivault init``.

    python bench/fhir_bench_server.py --mode production --data-dir D --port P \
        --issuer-file ISSUER.json --shares-file SHARES.json [--profile OUT.prof]

Modes (the settings are printed on stderr, and in the benchmark's JSON line):

* ``production``: ``Settings(environment="production")``; the key ring unsealed with unseal
  shares, as an operator would; the only change is rate limits raised out of the way (a
  load generator on loopback is one address and a handful of principals);
* ``controls-off``: development environment (production refuses the switches) with
  ``records.bench_audit_off`` and ``records.bench_encryption_off``, everything else equal;
* ``policy-off``: development environment with ``records.bench_policy_off`` only;
* ``framework``: no phivault, a bare FastAPI app serving one Observation from memory (the
  ceiling of uvicorn, FastAPI and the load generator on the machine at that moment).

The token issuer is a test issuer (``phivault.identity.testing.FakeIssuer`` in the
orchestrator); this process trusts its public key from ISSUER.json. ``--profile`` runs the
server under cProfile and writes the stats when it stops (SIGTERM stops it cleanly).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phivault.api.serve import run_server

UNLIMITED = "100000000/minute"

MODES = {
    "production": "production environment, every control on (rate limits raised)",
    "controls-off": (
        "development environment (production refuses the switches) with records.bench_audit_off "
        "and records.bench_encryption_off; everything else equal (rate limits raised)"
    ),
    "policy-off": (
        "development environment (production refuses the switch) with records.bench_policy_off "
        "only; audit and encryption on, everything else equal (rate limits raised)"
    ),
    "framework": (
        "no phivault at all: a FastAPI app answering GET /fhir/Observation/{id} with one fixed "
        "Observation from memory, same uvicorn settings; the ceiling of the HTTP stack and the "
        "load generator on this machine"
    ),
}

OBSERVATION = json.dumps(
    {
        "resourceType": "Observation",
        "id": "0",
        "meta": {"versionId": "1", "lastUpdated": "2026-11-30T01:00:00Z"},
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/0"},
        "effectiveDateTime": "2026-11-30T01:00:00Z",
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org"},
    }
).encode()


def settings_for(mode: str, data_dir: Path) -> Any:
    from phivault.settings import ApiSettings, RecordsSettings, Settings

    api = ApiSettings(rate_limit_per_address=UNLIMITED, rate_limit_per_principal=UNLIMITED)
    if mode == "production":
        return Settings(environment="production", data_dir=data_dir, api=api)
    records = (
        RecordsSettings(bench_audit_off=True, bench_encryption_off=True)
        if mode == "controls-off"
        else RecordsSettings(bench_policy_off=True)
    )
    return Settings(environment="development", data_dir=data_dir, api=api, records=records)


class GcPauses:
    """Garbage collections by generation: how many, and their pauses in wall-clock and CPU
    time (total and longest), from ``gc.callbacks``.

    A collection runs inside whichever request allocated last and holds the GIL, so a long
    one stalls every request in flight; a profile shows it as time in an innocent frame. On
    a crowded machine the wall-clock pause also holds the time the process was not running,
    hence the CPU time beside it."""

    def __init__(self) -> None:
        self.started = (0.0, 0.0)
        self.stats: dict[int, list[float]] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = (time.perf_counter(), time.thread_time())
            return
        wall = time.perf_counter() - self.started[0]
        cpu = time.thread_time() - self.started[1]
        entry = self.stats.setdefault(info["generation"], [0, 0.0, 0.0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += wall
        entry[2] = max(entry[2], wall)
        entry[3] += cpu
        entry[4] = max(entry[4], cpu)

    def write(self, path: Path, tracked_objects: int) -> None:
        """The pauses, and how many objects the collector tracks (what a full one walks)."""
        doc: dict[str, object] = {
            f"gen{generation}": {
                "collections": int(count),
                "wall_ms": round(1000 * wall, 1),
                "max_wall_ms": round(1000 * max_wall, 1),
                "cpu_ms": round(1000 * cpu, 1),
                "max_cpu_ms": round(1000 * max_cpu, 1),
            }
            for generation, (count, wall, max_wall, cpu, max_cpu) in sorted(self.stats.items())
        }
        doc["tracked_objects"] = tracked_objects
        path.write_text(json.dumps(doc))


def _factory(name: str) -> Callable[..., Any]:
    module, _, attr = name.partition(":")
    factory: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return factory


def _uvicorn_config(app: Any, port: int) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        workers=1,
        access_log=False,
        server_header=False,
        log_level="warning",
        lifespan="on",
    )


async def run_framework(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI, Response

    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/fhir/Observation/{resource_id}")
    async def read(resource_id: str) -> Response:
        return Response(OBSERVATION, media_type="application/fhir+json")

    await uvicorn.Server(_uvicorn_config(app, port)).serve()


async def run(args: argparse.Namespace) -> None:
    import uvicorn
    from joserfc import jwk

    from phivault.datadir import DataDir
    from phivault.identity.jwks import StaticKeySource

    issuer = json.loads(Path(args.issuer_file).read_text())
    public = jwk.import_key(issuer["jwk"])
    source = StaticKeySource({issuer["kid"]: public})  # type: ignore[dict-item]
    shares = json.loads(Path(args.shares_file).read_text())["shares"]
    settings = settings_for(args.mode, Path(args.data_dir))
    open_service = _factory(args.service)
    async with open_service(
        settings,
        DataDir.open(Path(args.data_dir)),
        key_sources={issuer["issuer"]: source},
        unseal_shares=shares,
    ) as app:
        if args.service == "phivault.api.serve:open_service":
            from phivault.api.serve import tune_for_serving

            tune_for_serving()  # what `phivault serve` does
        await uvicorn.Server(_uvicorn_config(app, args.port)).serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--issuer-file", required=True)
    parser.add_argument("--shares-file", required=True)
    parser.add_argument("--profile", help="write cProfile stats here when the server stops")
    parser.add_argument("--gc-stats", help="write garbage collection pauses here on exit")
    # What builds the app (a test double can stand in while the real one is being written).
    parser.add_argument("--service", default="phivault.api.serve:open_service")
    args = parser.parse_args()
    pauses = GcPauses()
    gc.callbacks.append(pauses)

    tracked = 0

    def stop(signum: int, _frame: object) -> None:
        # uvicorn shuts down on SIGTERM, then raises it again under the handler it found:
        # this one, so the service closes normally and the pauses are written. The service
        # is still open here: what the collector tracks now is its live heap.
        nonlocal tracked
        tracked = len(gc.get_objects())
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        _run(args)
    finally:
        if args.gc_stats:
            pauses.write(Path(args.gc_stats), tracked)


def _run(args: argparse.Namespace) -> None:
    if args.mode == "framework":
        run_server(run_framework(args.port))
    elif args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            run_server(run(args))
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    else:
        run_server(run(args))


if __name__ == "__main__":
    main()
