"""/metrics across workers: every worker's figures, labelled by worker, from any worker."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from phivault.api.observability import Metrics
from phivault.api.worker_metrics import WorkerMetrics
from phivault.resilience import Breakers


def _samples(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def _worker(directory: Path, number: int) -> tuple[Metrics, WorkerMetrics]:
    metrics = Metrics()
    exchange = WorkerMetrics(directory, number, metrics.render_own)
    metrics.render_across_workers(exchange.render)
    return metrics, exchange


def test_a_scrape_of_any_worker_answers_for_all_of_them(tmp_path: Path) -> None:
    first, first_exchange = _worker(tmp_path, 0)
    second, second_exchange = _worker(tmp_path, 1)
    first.children("GET", "/fhir/Observation/{id}", 200)[0].inc(3)
    second.children("GET", "/fhir/Observation/{id}", 200)[0].inc(5)
    second.rate_limited.labels("per-client").inc()
    second_exchange.publish()

    for scraped in (first, second):
        samples = _samples(scraped.render())
        labels = {"method": "GET", "route": "/fhir/Observation/{id}", "status": "200"}
        assert (
            samples[("phivault_http_requests_total", frozenset({**labels, "worker": "0"}.items()))]
            == 3
        )
        assert (
            samples[("phivault_http_requests_total", frozenset({**labels, "worker": "1"}.items()))]
            == 5
        )
        assert (
            samples[
                (
                    "phivault_rate_limited_total",
                    frozenset({"limit": "per-client", "worker": "1"}.items()),
                )
            ]
            == 1
        )
        ages = {k: v for k, v in samples.items() if k[0] == "phivault_worker_metrics_age_seconds"}
        assert {dict(k[1])["worker"] for k in ages} == {"0", "1"}
    first_exchange.close()
    second_exchange.close()


def test_an_open_breaker_in_one_worker_shows_in_the_others_scrape(tmp_path: Path) -> None:
    first, _ = _worker(tmp_path, 0)
    second, second_exchange = _worker(tmp_path, 1)
    breakers = Breakers(second.registry)
    breaker = breakers.breaker("audit.stream", failure_threshold=1, call_timeout_s=None)

    async def fail() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        asyncio.run(breaker.call(fail))
    second_exchange.publish()

    samples = _samples(first.render())
    state = samples[
        ("phivault_breaker_state", frozenset({"breaker": "audit.stream", "worker": "1"}.items()))
    ]
    assert state == 2  # open, as worker 1 sees it, in worker 0's answer


def test_a_worker_that_stopped_refreshing_shows_its_age(tmp_path: Path) -> None:
    first, _ = _worker(tmp_path, 0)
    _, stale = _worker(tmp_path, 1)
    stale.publish()
    long_ago = time.time() - 120
    os.utime(tmp_path / "worker-1.prom", (long_ago, long_ago))
    samples = _samples(first.render())
    age = samples[("phivault_worker_metrics_age_seconds", frozenset({"worker": "1"}.items()))]
    assert age >= 119


def test_a_stopped_worker_takes_its_figures_and_a_restarted_one_replaces_them(
    tmp_path: Path,
) -> None:
    first, _ = _worker(tmp_path, 0)
    old, old_exchange = _worker(tmp_path, 1)
    old.auth_failures.labels("expired").inc(7)
    old_exchange.publish()
    _restarted, new_exchange = _worker(tmp_path, 1)  # the supervisor restarted worker 1
    new_exchange.publish()
    samples = _samples(first.render())
    assert (
        "phivault_auth_failures_total",
        frozenset({"reason": "expired", "worker": "1"}.items()),
    ) not in samples
    new_exchange.close()
    assert not any(dict(k[1]).get("worker") == "1" for k in _samples(first.render()))


def test_an_unreadable_file_is_skipped_not_fatal(tmp_path: Path) -> None:
    first, _ = _worker(tmp_path, 0)
    (tmp_path / "worker-9.prom").write_bytes(b"this is {not an exposition\n")
    samples = _samples(first.render())
    assert ("phivault_worker_metrics_age_seconds", frozenset({"worker": "0"}.items())) in samples


def test_publishing_goes_on_after_a_failed_write(tmp_path: Path) -> None:
    directory = tmp_path / "gone"
    metrics = Metrics()
    exchange = WorkerMetrics(directory, 0, metrics.render_own)

    async def run_briefly() -> None:
        task = asyncio.create_task(exchange.run(period_s=0.01))
        await asyncio.sleep(0.05)  # the directory is missing: writes fail, the loop goes on
        directory.mkdir()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_briefly())
    assert (directory / "worker-0.prom").exists()
