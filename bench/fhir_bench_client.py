"""The load generator of ``bench/fhir_bench.py``: a separate process, so the server's one
worker and the client do not share an interpreter (or a GIL).

It speaks HTTP/1.1 with keep-alive over raw asyncio streams rather than through httpx: on a
2-core machine the client competes with the server for CPU, and a request built once as bytes
and a response read by ``Content-Length`` cost a few tens of microseconds, where a full HTTP
client library costs several hundred. Every connection is closed-loop (one request in flight
at a time), so N connections hold exactly N requests outstanding.

    python bench/fhir_bench_client.py SPEC.json

SPEC (written by ``fhir_bench.py``) is one of

* ``{"kind": "load", "port", "token", "phases": [{"files": [...], "concurrency"}, ...]}``:
  POST each bundle to ``/fhir`` as ``phivault load`` would (directory resources made
  conditional creates), phases in order, the files of a phase over ``concurrency``
  connections, and report the resources sent, the time, and the ids the server assigned
  (from each entry's ``response.location``), per bundle;
* ``{"kind": "drive", "port", "duration", "concurrency", "requests": [[method, path, token,
  body or null], ...]}``: each connection cycles through the requests (from its own offset)
  until the duration has passed, and the report has throughput and latency percentiles;
* the same with ``"rate": R``: open loop instead. Request k is due at ``start + k / R``
  (until the duration has passed); the ``concurrency`` connections take the due requests in
  order, and each latency is counted from when the request was due, not from when a
  connection was free to send it: a server that falls behind shows the backlog in its
  latencies (no coordinated omission). This is how a latency goal at a given throughput
  ("600 creates/s with p99 under 50 ms") is measured; the closed loop above measures the
  most the server can do, where latency is only the queue of 64 requests (Little's law).

One JSON object is printed on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

MAX_SAMPLE = 300  # characters of a failed response kept for the report (OperationOutcomes)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection; reconnects after the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                "127.0.0.1", self.port, limit=1 << 20
            )
        return self._reader, self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Send a ready-made request; the status and the body (connection errors raise)."""
        reader, writer = await self._open()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = -1
            chunked, keep_alive = False, True
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    keep_alive = False
            if chunked:
                body = await _read_chunked(reader)
            elif length >= 0:
                body = await reader.readexactly(length)
            else:  # no framing: the body runs to the end of the connection
                body = await reader.read()
                keep_alive = False
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            raise
        if not keep_alive:
            self.close()
        return status, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def build_request(
    port: int, method: str, path: str, token: str | None, body: bytes | None = None
) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Accept: application/fhir+json",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines += ["Content-Type: application/fhir+json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


# --- driving a fixed workload for a fixed time ---------------------------------------------


async def drive(spec: dict[str, Any]) -> dict[str, Any]:
    port = int(spec["port"])
    duration = float(spec["duration"])
    concurrency = int(spec["concurrency"])
    rate = float(spec["rate"]) if spec.get("rate") else None
    requests = [
        build_request(port, method, path, token, None if body is None else body.encode())
        for method, path, token, body in spec["requests"]
    ]
    if not requests:
        raise SystemExit("no requests to drive")
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []
    state = {"connection_errors": 0, "next_due": 0}
    cpu_started = time.process_time()
    started = time.perf_counter()
    deadline = started + duration

    async def paced_turn() -> tuple[bytes, float] | None:
        """Open loop: the next due request and when it was due (None: the duration is over)."""
        assert rate is not None
        k = state["next_due"]
        state["next_due"] = k + 1
        due = started + k / rate
        if due >= deadline:
            return None
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        return requests[k % len(requests)], due

    async def worker(offset: int) -> None:
        conn = HttpConnection(port)
        i = offset * max(1, len(requests) // concurrency)
        try:
            while True:
                if rate is None:  # closed loop: the next request as soon as this one is done
                    if time.perf_counter() >= deadline:
                        break
                    request = requests[i % len(requests)]
                    i += 1
                    t0 = time.perf_counter()
                else:
                    turn = await paced_turn()
                    if turn is None:
                        break
                    request, t0 = turn
                try:
                    status, body = await conn.send(request)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    state["connection_errors"] += 1
                    await asyncio.sleep(0.05)
                    continue
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 300 and len(failures) < 3:
                    failures.append(f"{status} {body[:MAX_SAMPLE].decode(errors='replace')}")
        finally:
            conn.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    latencies.sort()
    ms = [v * 1000 for v in latencies]
    return {
        "rps": ok / elapsed,
        "offered_rps": rate,
        "ok": ok,
        "failed": sum(statuses.values()) - ok,
        "connection_errors": state["connection_errors"],
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": elapsed,
        "p50_ms": percentile(ms, 0.50),
        "p90_ms": percentile(ms, 0.90),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": ms[-1] if ms else 0.0,
        "client_cpu_ms_per_request": 1000 * cpu / len(ms) if ms else None,
        "failure_samples": failures,
    }


# --- loading bundles -----------------------------------------------------------------------


def _assigned(response: dict[str, Any]) -> list[str]:
    """``Type/id`` of every entry of a batch/transaction-response, from ``response.location``."""
    refs = []
    for entry in response.get("entry", []):
        location = str(entry.get("response", {}).get("location", ""))
        parts = location.split("/_history/", maxsplit=1)[0].rstrip("/").split("/")
        refs.append("/".join(parts[-2:]) if len(parts) >= 2 else "")
    return refs


def _prepare(file: str) -> tuple[bytes, list[str]]:
    """The bundle as ``phivault load`` sends it: directory resources as conditional creates."""
    from phivault.cli.load import add_conditional_creates

    bundle = json.loads(Path(file).read_bytes())
    add_conditional_creates(bundle)
    types = [e["resource"]["resourceType"] for e in bundle.get("entry", [])]
    return json.dumps(bundle, separators=(",", ":")).encode(), types


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    port = int(spec["port"])
    token = str(spec["token"])
    # Read and prepared before the clock starts: the figure is the server's.
    phases = [
        (int(phase["concurrency"]), [(file, *_prepare(file)) for file in phase["files"]])
        for phase in spec["phases"]
    ]
    bundles: list[dict[str, Any]] = []
    resources = 0
    failures: list[str] = []
    started = time.perf_counter()
    for concurrency, prepared in phases:
        queue: asyncio.Queue[tuple[str, bytes, list[str]]] = asyncio.Queue()
        for item in prepared:
            queue.put_nowait(item)

        async def worker(queue: asyncio.Queue[tuple[str, bytes, list[str]]]) -> None:
            nonlocal resources
            conn = HttpConnection(port)
            try:
                while not queue.empty():
                    file, body, types = queue.get_nowait()
                    t0 = time.perf_counter()
                    status, answer = await conn.send(
                        build_request(port, "POST", "/fhir", token, body)
                    )
                    record: dict[str, Any] = {
                        "file": Path(file).name,
                        "status": status,
                        "entries": len(types),
                        "seconds": time.perf_counter() - t0,
                        "assigned": [],
                    }
                    if 200 <= status < 300:
                        resources += len(types)
                        record["assigned"] = _assigned(json.loads(answer))
                    elif len(failures) < 5:
                        sample = answer[:MAX_SAMPLE].decode(errors="replace")
                        failures.append(f"{Path(file).name}: {status} {sample}")
                    bundles.append(record)
            finally:
                conn.close()

        await asyncio.gather(*(worker(queue) for _ in range(min(concurrency, len(prepared)))))
    elapsed = time.perf_counter() - started
    return {
        "resources": resources,
        "seconds": elapsed,
        "resources_per_s": resources / elapsed if elapsed else 0.0,
        "bundles": bundles,
        "failure_samples": failures,
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec["kind"] == "load":
        result = asyncio.run(load(spec))
    elif spec["kind"] == "drive":
        result = asyncio.run(drive(spec))
    else:
        raise SystemExit(f"unknown spec kind {spec['kind']!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
