"""Break-glass alerts: PHI-free payload, a log line, a webhook that retries in the background."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import pytest

from phivault.access.alerts import (
    AlertFanout,
    LogAlertSink,
    WebhookAlertSink,
    alert_payload,
)
from phivault.access.breakglass import BreakGlassReason, GrantRecord

T0 = 1_800_000_000.0
RECORD = GrantRecord(
    tenant="t1",
    grant_id="bg-0123",
    subject="dr-er",
    patient="patient-42",
    reason=BreakGlassReason.EMERGENCY_TREATMENT,
    created_at=T0,
    starts_at=T0,
    expires_at=T0 + 3600,
    justification=b"sealed bytes that must never leave",
)


async def _no_sleep(_: float) -> None:
    return None


def test_the_payload_names_the_grant_not_the_patient() -> None:
    payload = alert_payload("granted", RECORD)
    assert payload == {
        "type": "phivault.break-glass",
        "event": "granted",
        "grant": "bg-0123",
        "tenant": "t1",
        "user": "dr-er",
        "reason": "emergency-treatment",
        "starts": "2027-01-15T08:00:00Z",
        "expires": "2027-01-15T09:00:00Z",
    }
    text = json.dumps(payload)
    assert "patient-42" not in text and "sealed" not in text


def test_the_log_sink_writes_one_json_line() -> None:
    stream = io.StringIO()
    AlertFanout([LogAlertSink(stream)]).grant_made(RECORD)
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "break-glass.alert" and entry["level"] == "warning"
    assert entry["alert"]["grant"] == "bg-0123" and entry["alert"]["event"] == "granted"


def test_a_failing_sink_never_reaches_the_caller() -> None:
    class Broken:
        def send(self, alert: dict[str, Any]) -> None:
            raise RuntimeError("down")

    stream = io.StringIO()
    AlertFanout([Broken(), LogAlertSink(stream)]).grant_revoked(RECORD)
    assert json.loads(stream.getvalue())["alert"]["event"] == "revoked"


async def test_the_webhook_retries_until_delivered() -> None:
    seen: list[dict[str, Any]] = []
    answers = iter([503, 500, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(next(answers))

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    sink = WebhookAlertSink("https://hooks.example.test/bg", client=client, sleep=_no_sleep)
    AlertFanout([sink]).grant_made(RECORD)  # returns at once: only queued
    assert seen == []
    await sink.drain()
    assert sink.delivered == 1 and sink.failed == 0
    assert len(seen) == 3 and all(body["grant"] == "bg-0123" for body in seen)
    await sink.aclose()
    await client.aclose()


async def test_the_webhook_gives_up_on_a_refusal_and_on_persistent_errors() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if request.url.path == "/refuses":
            return httpx.Response(400)
        raise httpx.ConnectError("unreachable")

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    refusing = WebhookAlertSink("https://h.test/refuses", client=client, sleep=_no_sleep)
    refusing.send(alert_payload("granted", RECORD))
    await refusing.drain()
    assert (calls, refusing.failed) == (1, 1)
    down = WebhookAlertSink("https://h.test/down", client=client, attempts=3, sleep=_no_sleep)
    down.send(alert_payload("granted", RECORD))
    await down.drain()
    assert (calls, down.failed, down.delivered) == (4, 1, 0)
    await refusing.aclose()
    await down.aclose()
    await client.aclose()


async def test_a_full_queue_drops_the_oldest() -> None:
    sink = WebhookAlertSink("https://h.test/x", max_queue=2, sleep=_no_sleep)
    sink.start()
    await sink.aclose(timeout_s=0)  # stop the worker, keep the queue
    sink._task = object()  # type: ignore[assignment]  # pretend it runs: nothing consumes
    for number in range(4):
        sink.send({"n": number})
    assert sink.dropped == 2


def test_the_webhook_needs_an_http_url() -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookAlertSink("file:///etc/passwd")
