"""Break-glass alerts: a webhook and the log, with a PHI-free payload, never blocking a request.

The payload (:func:`alert_payload`) holds the event (``granted`` / ``revoked``), the grant id,
tenant, the user (the token's subject), the coded reason and the grant's period. Never a name,
never the free-text justification, and **no patient id**:

* a webhook usually ends in a chat room, a pager or a SIEM, outside the envelope's custody;
  "patient X needed emergency access" is itself a disclosure about patient X, and a FHIR
  logical id joins back to the record for anyone with other access;
* the grant id is enough to act on: the review queue (``GET /admin/break-glass/{id}``)
  resolves it to the patient, for privacy officers only, and that look is itself audited.

The log sink writes the same payload (one JSON line, ``{"event": "break-glass.alert",
"level": "warning", "ts": ..., "alert": {...}}``). The webhook sink queues alerts in
memory and POSTs them from a background task, so a request never waits for the receiver:
bounded retries (tenacity: exponential back-off with full jitter) through a circuit breaker.
While the receiver is down the breaker is open and the alert at the head of the queue waits
(up to ``hold_s``) instead of burning its attempts; one POST per reset timeout probes the
receiver. A full queue drops the oldest alert and counts it (the grant's ledger event,
recorded before the grant took effect, is the durable record; alerts are the prompt).
Delivery is at least once: a retried POST whose first reply was lost arrives twice, so
receivers deduplicate on ``(grant, event)``. :meth:`WebhookAlertSink.aclose` drains what it
can on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

import httpx

from phivault.access.breakglass import GrantRecord
from phivault.errors import StoreUnavailable
from phivault.resilience import Breaker, CallTimedOut, CircuitOpen, call_with_retries

__all__ = [
    "Alert",
    "AlertFanout",
    "AlertSink",
    "LogAlertSink",
    "WebhookAlertSink",
    "alert_payload",
]

Alert = dict[str, Any]


def _instant(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="seconds") + "Z"


def alert_payload(event: str, record: GrantRecord) -> Alert:
    """The PHI-free alert for ``record`` (see the module docstring for what is left out)."""
    payload: Alert = {
        "type": "phivault.break-glass",
        "event": event,
        "grant": record.grant_id,
        "tenant": record.tenant,
        "user": record.subject,
        "reason": record.reason.value,
        "starts": _instant(record.starts_at),
        "expires": _instant(record.expires_at),
    }
    if record.revoked_at is not None:
        payload["revoked"] = _instant(record.revoked_at)
    return payload


class AlertSink(Protocol):
    """Takes an alert without blocking and without raising."""

    def send(self, alert: Alert) -> None: ...


class LogAlertSink:
    """One JSON line per alert on ``stream`` (standard error by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def send(self, alert: Alert) -> None:
        stream = self._stream or sys.stderr
        entry = {
            "event": "break-glass.alert",
            "level": "warning",
            "ts": time.time(),
            "alert": alert,
        }
        line = json.dumps(entry, sort_keys=True)
        with contextlib.suppress(Exception):  # an alert never fails the request
            stream.write(line + "\n")
            stream.flush()


class _ReceiverDown(StoreUnavailable):
    """The webhook did not take the alert (transport error, 5xx, 408, 429): retry later."""


class _ReceiverRefused(Exception):
    """The webhook answered 4xx: it will not take this alert, retrying will not help."""


class WebhookAlertSink:
    """POST each alert as JSON to ``url``, in the background, with retries and a breaker.

    ``send`` only enqueues. Call :meth:`start` inside the running loop (the app's lifespan or
    the first ``send`` does it) and :meth:`aclose` on shutdown. ``delivered``, ``dropped`` and
    ``failed`` count outcomes (tests and metrics read them); ``breaker`` can be exported with
    the process's other breakers.
    """

    def __init__(
        self,
        url: str,
        *,
        client: httpx.AsyncClient | None = None,
        headers: dict[str, str] | None = None,
        max_queue: int = 1000,
        attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 5.0,
        hold_s: float = 3600.0,
        breaker: Breaker | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError("the alert webhook needs an http(s) URL")
        self.url = url
        self._client = client
        self._owns_client = client is None
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._queue: asyncio.Queue[Alert] | None = None
        self._max_queue = max_queue
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._timeout_s = timeout_s
        self._hold_s = hold_s
        self.breaker = breaker or Breaker(
            "alerts.webhook",
            failure_threshold=5,
            reset_timeout_s=30.0,
            call_timeout_s=timeout_s,
        )
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.dropped = 0
        self.failed = 0

    def start(self) -> None:
        if self._task is not None:
            return
        self._queue = asyncio.Queue(self._max_queue)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=False)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, alert: Alert) -> None:
        try:
            self.start()
        except RuntimeError:  # no running loop: nothing can deliver it
            self.dropped += 1
            return
        queue = self._queue
        if queue is None:
            return
        while True:
            try:
                queue.put_nowait(alert)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                    queue.task_done()
                    self.dropped += 1

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait until every queued alert was delivered or given up (tests, shutdown)."""
        if self._queue is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        await self.drain(timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        queue = self._queue
        if queue is None:
            return
        while True:
            alert = await queue.get()
            try:
                await self._deliver(alert)
            except Exception:  # counted: the worker must outlive any one alert
                self.failed += 1
            finally:
                queue.task_done()

    async def _deliver(self, alert: Alert) -> None:
        body = json.dumps(alert, sort_keys=True).encode()
        held = 0.0  # seconds this alert waited for an open breaker (counted, not measured)
        while True:
            try:
                # A POST is not idempotent in general; alerts are, by (grant, event): see
                # the module docstring.
                await call_with_retries(
                    lambda: self.breaker.call(lambda: self._post(body)),
                    attempts=self._attempts,
                    initial_backoff_s=self._backoff_s,
                    max_backoff_s=self._max_backoff_s,
                    deadline_s=(self._timeout_s + self._max_backoff_s) * self._attempts,
                    retry_on=(_ReceiverDown, CallTimedOut),
                    sleep=self._wait,
                )
            except CircuitOpen as exc:
                if held >= self._hold_s:
                    break
                pause = max(0.05, min(exc.retry_after_s, self._hold_s - held))
                await self._wait(pause)
                held += pause
                continue
            except (_ReceiverDown, CallTimedOut, _ReceiverRefused):
                break
            self.delivered += 1
            return
        self.failed += 1

    async def _wait(self, seconds: float) -> None:
        await self._sleep(seconds)

    async def _post(self, body: bytes) -> None:
        client = self._client
        if client is None:
            raise _ReceiverDown("the alert sink is closed")
        try:
            response = await client.post(self.url, content=body, headers=self._headers)
        except httpx.HTTPError as exc:
            # The type only: a webhook URL can carry a secret, and httpx messages name it.
            raise _ReceiverDown(
                f"the alert webhook is unreachable ({type(exc).__name__})"
            ) from None
        status = response.status_code
        if status < 300:
            return
        if 400 <= status < 500 and status not in (408, 429):
            raise _ReceiverRefused(f"the alert webhook refused the alert ({status})")
        raise _ReceiverDown(f"the alert webhook answered {status}")


class AlertFanout:
    """The :class:`~phivault.access.breakglass.AlertPublisher` the service uses: every grant
    and revocation goes to each sink; a sink's failure never reaches the request."""

    def __init__(self, sinks: Sequence[AlertSink]) -> None:
        self._sinks = tuple(sinks)

    def grant_made(self, record: GrantRecord) -> None:
        self._publish(alert_payload("granted", record))

    def grant_revoked(self, record: GrantRecord) -> None:
        self._publish(alert_payload("revoked", record))

    def _publish(self, alert: Alert) -> None:
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                sink.send(dict(alert))
