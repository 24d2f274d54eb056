"""The access section of the settings: what production refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from phivault.settings import Settings


def test_production_sends_break_glass_alerts_over_https_only() -> None:
    with pytest.raises(ValidationError, match="HTTPS only"):
        Settings(environment="production", access={"break_glass_webhook_url": "http://alerts"})
    ok = Settings(environment="production", access={"break_glass_webhook_url": "https://alerts"})
    assert ok.access.break_glass_webhook_url == "https://alerts"
    assert Settings().access.break_glass_webhook_url is None  # the log only


def test_production_refuses_the_benchmark_switches() -> None:
    for switch in ("bench_audit_off", "bench_encryption_off", "bench_policy_off"):
        with pytest.raises(ValidationError, match="benchmark-only"):
            Settings(environment="production", records={switch: True})
        assert Settings(records={switch: True}).records.controls_off
