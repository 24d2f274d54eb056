"""The composed service exports every dependency's circuit breaker at /metrics: the root key
provider's, and the break-glass webhook's when one is configured."""

from __future__ import annotations

from pathlib import Path

from service_support import served

from phivault.settings import AccessSettings, Settings


async def test_the_breakers_of_the_composed_service_are_at_metrics(tmp_path: Path) -> None:
    settings = Settings(access=AccessSettings(break_glass_webhook_url="http://127.0.0.1:9/alerts"))
    async with served(tmp_path, settings) as service:
        metrics = await service.http.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'phivault_breaker_state{breaker="keys.root-provider"} 0.0' in text
    assert 'breaker="alerts.webhook"' in text
