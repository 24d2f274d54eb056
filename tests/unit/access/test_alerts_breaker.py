"""The webhook alert sink through an outage: queued, retried, held while the breaker is open,
delivered once the receiver is back; a request never waits for it."""

from __future__ import annotations

import asyncio
import time

import httpx

from phivault.access.alerts import AlertFanout, WebhookAlertSink
from phivault.access.breakglass import BreakGlassReason, GrantRecord
from phivault.resilience import Breaker
from ports_support import free_port

T0 = 1_800_000_000.0
RECORD = GrantRecord(
    tenant="t1",
    grant_id="bg-0456",
    subject="dr-er",
    patient="patient-42",
    reason=BreakGlassReason.EMERGENCY_TREATMENT,
    created_at=T0,
    starts_at=T0,
    expires_at=T0 + 3600,
    justification=b"sealed",
)


def _closed_port() -> int:
    return free_port()


def _breaker(**kwargs: float) -> Breaker:
    options = {"failure_threshold": 2, "reset_timeout_s": 0.05, "call_timeout_s": 1.0, **kwargs}
    return Breaker(
        "alerts.webhook",
        failure_threshold=int(options["failure_threshold"]),
        reset_timeout_s=options["reset_timeout_s"],
        call_timeout_s=options["call_timeout_s"],
    )


async def test_alerts_wait_out_an_outage_and_are_delivered_when_the_receiver_is_back() -> None:
    up = False
    posts = 0
    received: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal posts
        posts += 1
        if not up:
            return httpx.Response(503)
        received.append(request.read().decode())
        return httpx.Response(204)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    sink = WebhookAlertSink(
        "https://hooks.example.test/bg",
        client=client,
        attempts=3,
        backoff_s=0.001,
        max_backoff_s=0.002,
        breaker=_breaker(),
    )
    fanout = AlertFanout([sink])
    for _ in range(3):
        fanout.grant_made(RECORD)
    await asyncio.sleep(0.3)
    # Down for 0.3 s: two failures opened the breaker, then about one probe per 0.05 s
    # (no attempt was used up while the breaker was open).
    assert 2 <= posts <= 2 + 0.3 / 0.05 + 2
    assert (sink.delivered, sink.failed) == (0, 0)
    assert sink.breaker.state in ("open", "half-open")
    up = True
    await sink.drain(timeout_s=2)
    assert (sink.delivered, sink.failed, sink.dropped) == (3, 0, 0)
    assert len(received) == 3 and all('"grant": "bg-0456"' in body for body in received)
    assert sink.breaker.state == "closed"
    await sink.aclose()
    await client.aclose()


async def test_an_alert_is_held_for_at_most_hold_s_against_a_closed_port() -> None:
    sink = WebhookAlertSink(
        f"http://127.0.0.1:{_closed_port()}/hook",
        attempts=3,
        backoff_s=0.001,
        max_backoff_s=0.002,
        hold_s=0.2,
        breaker=_breaker(),
    )
    started = time.monotonic()
    AlertFanout([sink]).grant_revoked(RECORD)
    await sink.drain(timeout_s=3)
    assert (sink.delivered, sink.failed) == (0, 1)
    assert time.monotonic() - started < 2
    assert sink.breaker.trips >= 1
    await sink.aclose()


async def test_a_hanging_receiver_never_blocks_the_request() -> None:
    async def hangs(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(204)

    client = httpx.AsyncClient(transport=httpx.MockTransport(hangs))
    sink = WebhookAlertSink(
        "https://hooks.example.test/slow",
        client=client,
        attempts=1,
        hold_s=0,
        breaker=_breaker(call_timeout_s=0.05, failure_threshold=1),
    )
    fanout = AlertFanout([sink])
    started = time.monotonic()
    for _ in range(50):
        fanout.grant_made(RECORD)
    assert time.monotonic() - started < 0.05  # only queued
    await sink.drain(timeout_s=3)
    # The first POST timed out (0.05 s) and opened the breaker; the rest were given up
    # without a request (hold_s=0), so the queue did not wait 5 s per alert.
    assert sink.failed == 50 and sink.delivered == 0
    assert time.monotonic() - started < 1
    await sink.aclose()
    await client.aclose()
