"""Loopback ports for the servers that tests start, safe with several pytest workers.

The usual trick (bind to port 0, close, hand the number to a server) has two races once the
suite runs on several xdist workers: two workers can be handed the same port between the probe
and the server's own bind, and the kernel takes ports for outgoing connections (PostgreSQL,
Redis, NATS, HTTP clients: thousands per run) from the same ephemeral range. Either way a
server fails to bind, or, worse, a readiness probe reaches another test's server.

So :func:`free_port` picks at random from a slice of 20000-32767, which the kernel never hands
out by itself (the ephemeral range starts at 32768), one slice per xdist worker so that no two
workers of a run can meet; it probes the port (a bind without ``SO_REUSEADDR`` also fails on a
connection still in TIME_WAIT) and never hands the same port out twice in a process.
"""

from __future__ import annotations

import os
import random
import socket
import threading

__all__ = ["free_port", "worker_slice"]

_LOW, _HIGH = 20000, 32768  # [low, high): below Linux's default ephemeral range
_handed_out: set[int] = set()
_lock = threading.Lock()
_random = random.SystemRandom()  # two runs started at once must not walk the same sequence


def worker_slice() -> range:
    """The ports this process may hand out: its xdist worker's share, or all of them."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under xdist
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or "1")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    if count <= 1 or index >= count:
        return range(_LOW, _HIGH)
    size = (_HIGH - _LOW) // count
    return range(_LOW + index * size, _LOW + (index + 1) * size)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port that nothing uses now and that no other worker will hand out."""
    ports = worker_slice()
    with _lock:
        for _ in range(200):
            port = _random.choice(ports)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free loopback port in {ports.start}-{ports.stop - 1}")
