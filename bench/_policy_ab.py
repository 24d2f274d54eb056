"""Micro-benchmark: what the access policy costs a search, in one process, A/B interleaved.

``fhir_bench.py`` measures the policy's cost as the difference between two servers measured
in turns; on a shared 2-core machine a few per cent is within the drift between turns. Here
both services live in one process on the same records: the production service (every
control on) on a data directory made as ``phivault init`` makes one, loaded with the
companion bundles and ``--patients`` Synthea patients, and a copy of that directory served
with ``fhir_bench.py``'s policy-off settings (development environment,
``records.bench_policy_off``). ``GET /fhir/Observation?patient=<id>&_count=20`` by each
patient's own token is driven straight into the ASGI apps (no HTTP), ``--concurrency`` tasks
at a time, in batches of ``--batch`` requests that alternate between the two services; each
batch's process CPU time is one sample, and the figure is the median per service.

    python bench/_policy_ab.py [--patients 3] [--batches 20] [--batch 200] [--concurrency 16]
                               [--sequential]

The last line is JSON: ``on_cpu_ms``, ``off_cpu_ms`` (medians of CPU per search),
``policy_cost_cpu`` (1 - off / on), and every batch's figure. ``--sequential``: one search
at a time instead, each one's CPU time a sample; the figures are then the lower quartiles of
all the samples (a search the neighbours slowed down only ever costs more, so the lower
quartile is the steadiest estimate of what it costs undisturbed), ``*_median_ms`` beside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _read_cpu import call  # noqa: E402
from fhir_bench import Tokens, bundle_files, make_data_dir  # noqa: E402
from fhir_bench_server import _factory, settings_for  # noqa: E402


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from joserfc import jwk

    from phivault.api.serve import tune_for_serving
    from phivault.cli.load import add_conditional_creates
    from phivault.datadir import DataDir
    from phivault.identity.jwks import StaticKeySource

    work = Path(tempfile.mkdtemp(prefix="policy-ab-"))
    make_data_dir(work / "on", work / "shares.json")
    tokens = Tokens(work / "issuer.json")
    issuer = json.loads((work / "issuer.json").read_text())
    source = StaticKeySource({issuer["kid"]: jwk.import_key(issuer["jwk"])})  # type: ignore[dict-item]
    shares = json.loads((work / "shares.json").read_text())["shares"]
    open_service = _factory("phivault.api.serve:open_service")

    def service(mode: str, data: Path) -> Any:
        return open_service(
            settings_for(mode, data),
            DataDir.open(data),
            key_sources={issuer["issuer"]: source},
            unseal_shares=shares,
        )

    companions, patient_files = bundle_files(args.patients)
    patients: list[str] = []
    async with service("production", work / "on") as app:
        loader = tokens.loader()
        for file in [*companions, *patient_files]:
            bundle = json.loads(file.read_bytes())
            add_conditional_creates(bundle)
            status, answer = await call(app, "POST", "/fhir", loader, json.dumps(bundle).encode())
            if status != 200:
                raise SystemExit(f"load failed: {status} {answer[:300]!r}")
            for entry in json.loads(answer).get("entry", []):
                location = entry.get("response", {}).get("location", "")
                parts = location.split("/_history/")[0].split("/")
                if parts[-2] == "Patient" and file in patient_files:
                    patients.append(parts[-1])
                    break
    shutil.copytree(work / "on", work / "off")
    requests = [(tokens.patient(p), f"patient={p}&_count=20".encode()) for p in patients]
    samples: dict[str, list[float]] = {"on": [], "off": []}
    async with service("production", work / "on") as on, service("policy-off", work / "off") as off:
        apps = {"on": on, "off": off}
        tune_for_serving()

        async def batch(app: Any, n: int) -> None:
            serial = iter(range(n))

            async def worker() -> None:
                for i in serial:
                    token, query = requests[i % len(requests)]
                    status, answer = await call(app, "GET", "/fhir/Observation", token, query=query)
                    if status != 200:
                        raise SystemExit(f"search failed: {status} {answer[:300]!r}")

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))

        for app in apps.values():  # warm up both
            await batch(app, args.batch)
        for n in range(args.batches):
            order = ("on", "off") if n % 2 == 0 else ("off", "on")
            for name in order:
                if args.sequential:
                    for i in range(args.batch):
                        token, query = requests[i % len(requests)]
                        cpu0 = time.process_time()
                        status, _ = await call(
                            apps[name], "GET", "/fhir/Observation", token, query=query
                        )
                        samples[name].append(1000 * (time.process_time() - cpu0))
                        if status != 200:
                            raise SystemExit(f"search failed: {status}")
                    continue
                cpu0 = time.process_time()
                await batch(apps[name], args.batch)
                samples[name].append(1000 * (time.process_time() - cpu0) / args.batch)
    shutil.rmtree(work, ignore_errors=True)
    if args.sequential:
        on_ms, off_ms = (statistics.quantiles(samples[k], n=4)[0] for k in ("on", "off"))
        return {
            "patients": len(patients),
            "on_cpu_ms": round(on_ms, 4),
            "off_cpu_ms": round(off_ms, 4),
            "policy_cost_cpu": round(1 - off_ms / on_ms, 4),
            "on_median_ms": round(statistics.median(samples["on"]), 4),
            "off_median_ms": round(statistics.median(samples["off"]), 4),
            "searches": len(samples["on"]),
        }
    on_ms, off_ms = statistics.median(samples["on"]), statistics.median(samples["off"])
    return {
        "patients": len(patients),
        "on_cpu_ms": round(on_ms, 4),
        "off_cpu_ms": round(off_ms, 4),
        "policy_cost_cpu": round(1 - off_ms / on_ms, 4),
        "on": [round(v, 3) for v in samples["on"]],
        "off": [round(v, 3) for v in samples["off"]],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--sequential", action="store_true", help="one search at a time, each one a sample"
    )
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
