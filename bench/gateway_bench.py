"""Gateway benchmark: what the front door costs in throughput.

Runs the same authenticated, PHI-free endpoint (``GET /whoami``) twice, each in its own
server process on loopback:

* **front door**: ``phivault.api.serve`` exactly as ``phivault serve`` runs it (real ledger,
  dev identity provider, every layer: request id, body guard, rate limit with limits raised
  out of the way, token validation, session store, audit context, error mapping, scrubbing,
  the scrubbed JSON access log and the metrics);
* **bare**: a FastAPI app with the same handler and no middleware at all.

Load comes from a separate process (a small keep-alive HTTP/1.1 client on raw sockets, so
the client is cheaper than the server), bounded by a request count and a time limit. The last
line printed is one JSON object: ``front_door_rps``, ``bare_rps``, ``front_door_ratio``.

    python bench/gateway_bench.py [--requests 4000] [--duration 8] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# --- servers ---------------------------------------------------------------------------------


def serve_front(port: int, data_dir: str) -> None:
    from phivault.api.serve import ServeOptions, serve
    from phivault.datadir import DataDir
    from phivault.settings import Settings

    serve(Settings(), DataDir.open(Path(data_dir)), ServeOptions(port=port))


def serve_bare(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from phivault.api.routes import WhoAmI, whoami_document
    from phivault.identity.principal import principal_from_claims
    from phivault.identity.sessions import SessionPolicy

    principal = principal_from_claims(
        {
            "iss": "https://bench.invalid",
            "sub": "service-loader",
            "tenant": "default",
            "roles": ["service"],
            "scope": "openid system/*.cruds",
            "iat": 0,
            "exp": 0,
            "amr": ["pwd"],
        }
    )
    policy = SessionPolicy()
    app = FastAPI()

    @app.get("/whoami", response_model=WhoAmI)
    async def whoami() -> WhoAmI:
        return whoami_document(principal, policy)

    uvicorn.run(
        app, host="127.0.0.1", port=port, access_log=False, log_level="warning", server_header=False
    )


# --- load ------------------------------------------------------------------------------------


async def _connection(
    port: int, request: bytes, state: dict[str, int], deadline: float, limit: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while state["sent"] < limit and time.perf_counter() < deadline:
            state["sent"] += 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            state["ok" if status == 200 else "errors"] += 1
    finally:
        writer.close()


async def _load(
    port: int, token: str, requests: int, duration: float, concurrency: int
) -> dict[str, float]:
    request = (
        f"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    state = {"sent": 0, "ok": 0, "errors": 0}
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(_connection(port, request, state, deadline, requests) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - started
    return {
        "rps": state["ok"] / elapsed,
        "ok": state["ok"],
        "errors": state["errors"],
        "seconds": elapsed,
    }


def load(port: int, token: str, requests: int, duration: float, concurrency: int) -> None:
    print(json.dumps(asyncio.run(_load(port, token, requests, duration, concurrency))))


# --- orchestration ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def _run_load(
    port: int, token: str, requests: int, duration: float, concurrency: int
) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            str(HERE),
            "--load",
            "--port",
            str(port),
            "--token",
            token,
            "--requests",
            str(requests),
            "--duration",
            str(duration),
            "--concurrency",
            str(concurrency),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(args: argparse.Namespace) -> None:
    from phivault.identity.dev_provider import DevIdentityProvider
    from phivault.identity.principal import Role
    from phivault.initialize import initialize_data_dir
    from phivault.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        # Exactly what `phivault init --dev` makes: the server unseals from the dev unseal file.
        data_dir = initialize_data_dir(Path(tmp) / "data", dev=True).data_dir
        provider = DevIdentityProvider.open(data_dir, Settings())
        token = provider.mint(
            user="service-loader",
            roles=[Role.SERVICE],
            audience=Settings().identity.audience,
            scopes=["system/*.cruds"],
            ttl_s=3600,
        )
        env = {
            **os.environ,
            "PHIVAULT_API__RATE_LIMIT_PER_ADDRESS": "10000000/minute",
            "PHIVAULT_API__RATE_LIMIT_PER_PRINCIPAL": "10000000/minute",
        }
        servers = {}
        processes = []
        try:
            for name, extra in (("front", ["--data-dir", str(data_dir.path)]), ("bare", [])):
                port = _free_port()
                process = subprocess.Popen(
                    [sys.executable, str(HERE), "--serve", name, "--port", str(port), *extra],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                processes.append(process)
                _wait_ready(port, process)
                servers[name] = port
            results: dict[str, list[float]] = {"front": [], "bare": []}
            for port in servers.values():  # warm-up: imports, caches, first session
                _run_load(port, token, 300, 3, args.concurrency)
            for _ in range(args.rounds):
                for name, port in servers.items():
                    run = _run_load(port, token, args.requests, args.duration, args.concurrency)
                    if run["errors"]:
                        raise RuntimeError(f"{name}: {run['errors']} requests failed")
                    results[name].append(run["rps"])
                    print(
                        f"{name}: {run['rps']:.0f} req/s "
                        f"({run['ok']:.0f} in {run['seconds']:.2f}s)",
                        file=sys.stderr,
                    )
        finally:
            for process in processes:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
        # Rounds alternate between the two servers; medians resist a noisy neighbour.
        front = statistics.median(results["front"])
        bare = statistics.median(results["bare"])
        summary = {
            "front_door_rps": round(front, 1),
            "bare_rps": round(bare, 1),
            "front_door_ratio": round(front / bare, 3),
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=["front", "bare"])
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--token")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parsed = parser.parse_args()
    if parsed.serve == "front":
        serve_front(parsed.port, parsed.data_dir)
    elif parsed.serve == "bare":
        serve_bare(parsed.port)
    elif parsed.load:
        load(parsed.port, parsed.token, parsed.requests, parsed.duration, parsed.concurrency)
    else:
        main(parsed)
