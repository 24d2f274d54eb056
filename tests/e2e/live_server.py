"""A real uvicorn server on a loopback port, in a background thread, around ``create_app``."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from phivault.identity.testing import FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink


@dataclass
class Live:
    url: str
    app: FastAPI
    issuer: FakeIssuer
    sink: InMemoryAuditSink
    logs: io.StringIO

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines() if line.strip()]


@contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, server_header=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def phivault_serve(
    args: list[str], *, url: str, verify: ssl.SSLContext | bool = True, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``phivault serve ARGS`` as a user would; wait for /healthz; SIGINT it after.

    The server's output goes to a temporary file, never to a pipe nobody reads (a full pipe
    would block the server after a few thousand log lines); it is shown if the start fails.
    """
    phivault = str(Path(sys.executable).with_name("phivault"))
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [phivault, "serve", *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        # Generous: on the loaded 2-core machine, with other tests running beside it, two
        # scaled workers once took over 30 s to answer (a server that never starts still fails).
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/healthz", verify=verify, timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    log.seek(0)
                    output = log.read().decode(errors="replace")[-4000:]
                    raise RuntimeError(f"phivault serve did not start:\n{output}") from None
                time.sleep(0.1)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
