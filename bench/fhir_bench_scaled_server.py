"""The scaled shape's server side for ``bench/fhir_bench.py --shape scaled``: N worker
processes on one listening socket, each the whole service opened by ``open_service`` from a
settings file, as ``phivault serve --config FILE --workers N`` runs them; the only
differences are the benchmark's token issuer (trusted from ISSUER.json) and the unseal
shares given at start.

    python bench/fhir_bench_scaled_server.py --config F --workers N --data-dir D --port P \
        --issuer-file ISSUER.json --shares-file SHARES.json

SIGTERM stops the workers (each finishes what is in flight) and then this process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

from phivault.api.serve import run_server


async def run_worker(args: argparse.Namespace, listener: socket.socket) -> None:
    import uvicorn
    from joserfc import jwk

    from fhir_bench_server import _uvicorn_config
    from phivault.api.serve import open_service, tune_for_serving
    from phivault.datadir import DataDir
    from phivault.identity.jwks import StaticKeySource
    from phivault.settings import load_settings

    issuer = json.loads(Path(args.issuer_file).read_text())
    source = StaticKeySource({issuer["kid"]: jwk.import_key(issuer["jwk"])})  # type: ignore[dict-item]
    shares = json.loads(Path(args.shares_file).read_text())["shares"]
    settings = load_settings(Path(args.config))
    async with open_service(
        settings,
        DataDir.open(Path(args.data_dir)),
        key_sources={issuer["issuer"]: source},
        unseal_shares=shares,
    ) as app:
        tune_for_serving()
        await uvicorn.Server(_uvicorn_config(app, args.port)).serve(sockets=[listener])


def worker(args: argparse.Namespace, listener: socket.socket) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # fhir_bench_server, when spawned
    run_server(run_worker(args, listener))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--issuer-file", required=True)
    parser.add_argument("--shares-file", required=True)
    args = parser.parse_args()

    listener = socket.create_server(("127.0.0.1", args.port), backlog=2048)
    listener.set_inheritable(True)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=worker, args=(args, listener), name=f"bench-worker-{n}")
        for n in range(args.workers)
    ]
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for process in workers:
        process.start()
    try:
        while not stopping and all(p.is_alive() for p in workers):
            time.sleep(0.2)
    finally:
        for process in workers:
            if process.is_alive():
                process.terminate()
        for process in workers:
            process.join(30)
            if process.is_alive():
                process.kill()
        listener.close()
    if not stopping:
        sys.exit("a worker died")


if __name__ == "__main__":
    main()
