"""``/metrics`` across the workers of one ``phivault serve --workers N``.

The N workers share one listening socket, so a scrape reaches whichever worker the kernel
hands the connection to, and each worker's registry holds only its own requests, rate
limits and breakers: a breaker open in worker 2 would be invisible to a scrape that landed on
worker 1. So every worker writes its own exposition to a directory the supervisor made for
this server (once a second, and whenever it is scraped itself), and answers ``/metrics``
with all of them, every series labelled ``worker="<n>"``. Another worker's figures are at
most about a second old; ``phivault_worker_metrics_age_seconds`` says exactly how old, so a
worker that stopped refreshing (hung) shows. A worker restarted under the same number
overwrites its predecessor's file: its counters restart from zero under the same labels,
which Prometheus reads as a counter reset.

Why not prometheus_client's multiprocess mode: docs/decisions/metrics-across-workers.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["WorkerMetrics"]

_log = structlog.get_logger("phivault.workers")

_SUFFIX: Final = ".prom"
_PREFIX: Final = "worker-"


class WorkerMetrics:
    """One worker's side of the exchange: publish its own figures, render everyone's."""

    def __init__(self, directory: Path, worker: int, own: Callable[[], bytes]) -> None:
        self._directory = directory
        self._worker = worker
        self._own = own
        self._path = directory / f"{_PREFIX}{worker}{_SUFFIX}"

    def publish(self) -> None:
        """Write this worker's exposition atomically (readers never see half a file)."""
        partial = self._path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(self._own())
        os.replace(partial, self._path)

    def render(self) -> bytes:
        """Every worker's metrics in one exposition, this worker's own figures fresh."""
        self.publish()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(self._snapshots()))
        return generate_latest(registry)

    async def run(self, period_s: float = 1.0) -> None:
        """Publish every ``period_s`` until cancelled; a failed write is logged and retried
        (a full disk must not take the worker down with it)."""
        while True:
            try:
                self.publish()
            except OSError as exc:
                _log.warning("worker metrics not written", worker=self._worker, error=str(exc))
            await asyncio.sleep(period_s)

    def close(self) -> None:
        """A worker stopping on purpose takes its figures with it."""
        self._path.unlink(missing_ok=True)

    def _snapshots(self) -> Iterator[tuple[str, float, str]]:
        now = time.time()
        for path in sorted(self._directory.glob(f"{_PREFIX}*{_SUFFIX}")):
            worker = path.name[len(_PREFIX) : -len(_SUFFIX)]
            try:
                text = path.read_text(encoding="utf-8")
                age = max(0.0, now - path.stat().st_mtime)
            except (FileNotFoundError, UnicodeDecodeError):
                continue  # the worker stopped (its file removed) while we listed: skip it
            yield worker, age, text


class _Merged(Collector):
    """The workers' families merged by name, each sample labelled with its worker."""

    def __init__(self, snapshots: Iterable[tuple[str, float, str]]) -> None:
        self._snapshots = list(snapshots)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        age = GaugeMetricFamily(
            "phivault_worker_metrics_age_seconds",
            "How old each worker's figures in this scrape are (a worker that stopped "
            "refreshing shows here).",
            labels=["worker"],
        )
        for worker, seconds, text in self._snapshots:
            age.add_metric([worker], seconds)
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError:
                _log.warning("worker metrics unreadable", worker=worker)
                continue
            for family in parsed:
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                merged.samples.extend(
                    Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp)
                    for s in family.samples
                )
        yield age
        yield from families.values()
