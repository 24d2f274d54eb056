"""Micro-benchmark: the server CPU one FHIR read costs in-process, without HTTP or a client.

The real service (``open_service`` with production settings, the key ring unsealed with
shares, exactly as ``bench/fhir_bench_server.py`` builds it) on a fresh data directory; one
companion bundle and one Synthea patient are loaded through the app; then ``GET
/fhir/Observation/{id}`` by the patient's own token is driven straight into the ASGI app
(hand-made scope, receive and send: no socket, no HTTP parser, no client in the process), by
``--concurrency`` tasks. Process CPU time (all threads) divided by the requests is the figure.

* ``--search``: ``GET /fhir/Observation?patient=<id>&_count=20`` instead;
* ``--clinician``: the reads (or ``--search``) by a clinician (``Practitioner/bench-clinician``,
  role ``clinician``, ``user/*.rs``) whom an administrator assigned to the patient's care
  (``PUT /admin/care-assignments/...``): access through a care relationship, as most PHI
  access is; adds ``statements_per_request`` (SQLite: statements the store ran, counted by
  the driver's trace callback);
* ``--whoami``: the authenticated, PHI-free ``GET /whoami`` (the front door alone);
* ``--create``: ``POST /fhir/Observation`` by a ``service`` feed (the figure is per create);
* ``--load N``: the next ``N`` Synthea patient bundles loaded as ``phivault load`` sends them
  (one transaction each, after the warm-up patient); the figure is per loaded resource;
  ``--load-concurrency K`` keeps K bundles in flight (as ``fhir_bench.py`` loads);
* ``--profile OUT.prof``: the measured part under cProfile;
* ``--rate R``: open loop instead of ``--concurrency`` busy tasks: request k is due at
  ``start + k/R`` and sent then, answered or not; latency counts from its due time (as
  ``fhir_bench_client.py``'s ``rate``); adds ``rate`` and ``achieved_per_s`` to the figures;
* ``--py-spy OUT.txt``: the measured part sampled by py-spy (``PY_SPY=...`` names the
  binary), folded stacks of the thread holding the GIL;
* ``--mode policy-off``: the settings of ``fhir_bench.py``'s policy-off server (development
  environment, ``records.bench_policy_off``); ``--mode development``: the development
  environment with every control on (what separates the environment from the policy).

    python bench/_read_cpu.py [--reads 4000] [--concurrency 16]
                              [--search | --whoami | --create | --load N] [--rate R]

The last line is JSON: ``reads``, ``cpu_ms_per_read``, ``wall_ms_per_read``, ``reads_per_cpu_s``,
and each request's ``p50_ms`` and ``p99_ms`` (``--load``: per resource instead, no percentiles).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fhir_bench import Tokens, bundle_files, make_data_dir, observation  # noqa: E402
from fhir_bench_server import _factory, settings_for  # noqa: E402


async def call(
    app: Any, method: str, path: str, token: str, body: bytes = b"", query: bytes = b""
) -> tuple[int, bytes]:
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"authorization", b"Bearer " + token.encode()),
        (b"accept", b"application/fhir+json"),
    ]
    if body:
        headers.append((b"content-type", b"application/fhir+json"))
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    status = 0
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def _start_py_spy(out: str) -> subprocess.Popen[bytes]:
    """py-spy sampling this process (only the thread holding the GIL) into ``out``, folded."""
    command = [os.environ.get("PY_SPY", "py-spy"), "record", "--gil", "--rate", "500"]
    command += ["--format", "raw", "-o", out, "--pid", str(os.getpid())]
    sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the clock starts
    return sampler


def production_service(
    prefix: str,
    configure: Callable[[Any], Any] = lambda settings: settings,
    mode: str = "production",
) -> tuple[Tokens, Any]:
    """The real service on a fresh data directory made as ``phivault init`` makes a production
    one (the key ring unsealed with shares, as ``bench/fhir_bench_server.py`` builds it), and
    the tokens of its issuer. ``configure`` may change the settings (experiments). Returns
    the tokens and the service's async context manager (it yields the ASGI app)."""
    from joserfc import jwk

    from phivault.datadir import DataDir
    from phivault.identity.jwks import StaticKeySource

    work = Path(tempfile.mkdtemp(prefix=prefix))
    data = work / "data"
    make_data_dir(data, work / "shares.json")
    tokens = Tokens(work / "issuer.json")
    issuer = json.loads((work / "issuer.json").read_text())
    source = StaticKeySource({issuer["kid"]: jwk.import_key(issuer["jwk"])})  # type: ignore[dict-item]
    shares = json.loads((work / "shares.json").read_text())["shares"]
    if mode == "development":  # every control on, development environment
        from phivault.settings import Environment

        settings = settings_for("production", data).model_copy(
            update={"environment": Environment.DEVELOPMENT}
        )
    else:
        settings = settings_for(mode, data)
    settings = configure(settings)
    open_service = _factory("phivault.api.serve:open_service")
    service = open_service(
        settings, DataDir.open(data), key_sources={issuer["issuer"]: source}, unseal_shares=shares
    )
    return tokens, service


CLINICIAN = "bench-clinician"


async def assign_clinician(app: Any, tokens: Tokens, patient: str) -> str:
    """Assign ``Practitioner/bench-clinician`` to ``patient``'s care (as an administrator
    does, through the API) and return the clinician's token."""
    admin = tokens._token(
        sub="bench-admin",
        roles=["admin"],
        scope="openid user/Practitioner.cruds",
        fhirUser=None,
        amr=["pwd", "otp"],
    )
    path = f"/admin/care-assignments/{patient}/Practitioner/{CLINICIAN}"
    status, answer = await call(app, "PUT", path, admin)
    if status not in (201, 204):
        raise SystemExit(f"care assignment failed: {status} {answer[:300]!r}")
    return tokens._token(
        sub=CLINICIAN,
        roles=["clinician"],
        scope="openid fhirUser user/*.rs",
        fhirUser=f"Practitioner/{CLINICIAN}",
    )


def _count_statements(app: Any) -> list[int] | None:
    """SQLite: count the statements the records store's connections run from now on (the
    driver's trace callback, so statements run on the driver's cursor count too). Returns a
    one-element list the count accumulates in; None where the store is not SQLite."""
    from sqlalchemy import event

    seen: list[Any] = [app]
    store = None
    while seen and store is None:  # the repository hangs off the app (behind middleware)
        node = seen.pop()
        state = getattr(getattr(node, "state", None), "records", None)
        if state is not None:
            store = state._store
        nxt = getattr(node, "app", None)
        if nxt is not None:
            seen.append(nxt)
    engine = getattr(store, "_engine", None)
    if engine is None or engine.dialect.name != "sqlite":
        return None
    count = [0]

    def traced(_sql: str) -> None:
        count[0] += 1

    def checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        dbapi_connection.set_trace_callback(traced)

    event.listen(engine, "checkout", checkout)
    return count


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from phivault.api.serve import tune_for_serving
    from phivault.cli.load import add_conditional_creates

    tokens, service = production_service("read-cpu-", mode=args.mode)
    companions, patients = bundle_files(1 + args.load if args.load else 1)
    async with service as app:
        loader = tokens.loader()
        observations: list[str] = []
        patient = ""

        def encoded(file: Path) -> bytes:
            bundle = json.loads(file.read_bytes())
            add_conditional_creates(bundle)
            return json.dumps(bundle).encode()

        async def load(body: bytes) -> int:
            nonlocal patient
            status, answer = await call(app, "POST", "/fhir", loader, body)
            if status != 200:
                raise SystemExit(f"load failed: {status} {answer[:300]!r}")
            entries = json.loads(answer).get("entry", [])
            for entry in entries:
                location = entry.get("response", {}).get("location", "")
                parts = location.split("/_history/")[0].split("/")
                if parts[-2] == "Observation":
                    observations.append(parts[-1])
                elif parts[-2] == "Patient":
                    patient = patient or parts[-1]
            return len(entries)

        for file in [*companions, *patients[:1]]:
            await load(encoded(file))
        token = tokens.creator() if args.create else tokens.patient(patient)
        if args.clinician:
            token = await assign_clinician(app, tokens, patient)
        tune_for_serving()
        paths = [f"/fhir/Observation/{oid}" for oid in observations[:200]]
        query = b""
        if args.whoami:
            paths = ["/whoami"]
        elif args.search:
            paths, query = ["/fhir/Observation"], f"patient={patient}&_count=20".encode()

        if args.load:
            bodies = [encoded(file) for file in patients[1 : 1 + args.load]]
            profiler = cProfile.Profile() if args.profile else None
            sampler = _start_py_spy(args.py_spy) if args.py_spy else None
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            if args.load_concurrency > 1:  # as fhir_bench.py loads: K bundles in flight
                gate = asyncio.Semaphore(args.load_concurrency)

                async def gated(body: bytes) -> int:
                    async with gate:
                        return await load(body)

                resources = sum(await asyncio.gather(*(gated(body) for body in bodies)))
            else:
                resources = sum([await load(body) for body in bodies])
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            if sampler is not None:
                sampler.send_signal(signal.SIGINT)
                sampler.wait(60)
            return {
                "resources": resources,
                "cpu_ms_per_resource": round(1000 * cpu / resources, 4),
                "wall_ms_per_resource": round(1000 * wall / resources, 4),
                "resources_per_cpu_s": round(resources / cpu, 1),
            }
        method, created = ("POST", 201) if args.create else ("GET", 200)
        if args.create:
            paths = ["/fhir/Observation"]
        serial = iter(range(10**9))
        latencies: list[float] = []

        async def reader(n: int, offset: int) -> None:
            for i in range(n):
                path = paths[(offset + i) % len(paths)]
                body = observation(patient, next(serial)).encode() if args.create else b""
                started = time.perf_counter()
                status, answer = await call(app, method, path, token, body, query=query)
                latencies.append(time.perf_counter() - started)
                if status != created:
                    raise SystemExit(f"{method} failed: {status} {answer[:300]!r}")

        async def paced(n: int, rate: float) -> None:
            """Open loop: request k is due at start + k/rate, whether or not the earlier ones
            have been answered; its latency counts from when it was due."""
            start = time.perf_counter()
            in_flight: set[asyncio.Task[None]] = set()

            async def one(k: int, due: float) -> None:
                path = paths[(k * 7) % len(paths)]
                body = observation(patient, next(serial)).encode() if args.create else b""
                status, answer = await call(app, method, path, token, body, query=query)
                latencies.append(time.perf_counter() - due)
                if status != created:
                    raise SystemExit(f"{method} failed: {status} {answer[:300]!r}")

            for k in range(n):
                due = start + k / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(k, due))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            while in_flight:
                await asyncio.gather(*in_flight)

        per_task = max(1, args.reads // args.concurrency)
        await asyncio.gather(*(reader(50, k * 7) for k in range(args.concurrency)))  # warm up
        latencies.clear()
        statements = _count_statements(app) if args.clinician else None
        profiler = cProfile.Profile() if args.profile else None
        sampler = _start_py_spy(args.py_spy) if args.py_spy else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        if args.rate:
            await paced(args.reads, args.rate)
        else:
            await asyncio.gather(*(reader(per_task, k * 7) for k in range(args.concurrency)))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(60)
        reads = args.reads if args.rate else per_task * args.concurrency
        latencies.sort()
    figures: dict[str, Any] = {
        "reads": reads,
        "cpu_ms_per_read": round(1000 * cpu / reads, 3),
        "wall_ms_per_read": round(1000 * wall / reads, 3),
        "reads_per_cpu_s": round(reads / cpu, 1),
        # closed loop: each request's own wall time with --concurrency in flight;
        # open loop (--rate): from when the request was due
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "p99_ms": round(1000 * latencies[len(latencies) * 99 // 100], 2),
    }
    if statements is not None and statements[0]:
        figures["statements_per_request"] = round(statements[0] / reads, 2)
    if args.rate:
        figures["rate"] = args.rate
        figures["achieved_per_s"] = round(reads / wall, 1)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--profile", help="write cProfile stats of the measured reads here")
    parser.add_argument(
        "--search", action="store_true", help="search the patient's Observations, pages of 20"
    )
    parser.add_argument(
        "--clinician",
        action="store_true",
        help="read (or --search) as a clinician with a care assignment to the patient",
    )
    parser.add_argument(
        "--whoami", action="store_true", help="GET /whoami instead (the front door alone)"
    )
    parser.add_argument(
        "--create", action="store_true", help="POST Observations (a service feed) instead"
    )
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="load N more Synthea patients instead; the figure is CPU per loaded resource",
    )
    parser.add_argument(
        "--load-concurrency",
        type=int,
        default=1,
        metavar="K",
        help="--load: bundles in flight at once (default 1, one after the other)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="R",
        help="open loop: request k due at start + k/R (latency from its due time); "
        "--concurrency then only sizes the warm-up",
    )
    parser.add_argument("--py-spy", help="sample the measured reads with py-spy into this file")
    parser.add_argument(
        "--mode",
        choices=("production", "policy-off", "development"),
        default="production",
        help="policy-off: fhir_bench.py's policy-off settings; development: development "
        "environment, every control on",
    )
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
