"""The deployment examples under docs/deploy/ are things an operator can actually use.

The example settings file loads as production settings in the scaled shape, documents every
setting and holds no secret; (the manifests and unit files are checked below).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import BaseModel

from phivault.settings import Environment, KeyProviderKind, Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
EXAMPLE_TOML = DEPLOY / "phivault.toml"


@pytest.fixture(autouse=True)
def _no_phivault_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PHIVAULT_"):
            monkeypatch.delenv(name)


def _example() -> dict[str, Any]:
    with EXAMPLE_TOML.open("rb") as handle:
        return tomllib.load(handle)


# -- the example settings file --------------------------------------------------------------


def test_the_example_settings_load_as_production_in_the_scaled_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The secrets the file leaves to the environment, as an operator's secret store sets them.
    monkeypatch.setenv("PHIVAULT_KEYS__PKCS11_PIN", "example-pin")
    monkeypatch.setenv("PHIVAULT_API__REDIS_URL", "rediss://phivault:example@redis.example:6379/0")

    settings = load_settings(EXAMPLE_TOML)

    assert settings.environment is Environment.PRODUCTION
    assert settings.shape.scaled
    assert settings.shape.keys is KeyProviderKind.PKCS11
    assert settings.keys.provider is KeyProviderKind.PKCS11
    assert settings.keys.pkcs11_pin is not None
    assert settings.keys.pkcs11_pin.get_secret_value() == "example-pin"
    assert settings.api.redis_url.startswith("rediss://phivault:")
    assert settings.ledger.stream_replicas == 3
    assert len(settings.ledger.nats_urls) == 3
    assert len(settings.records.replica_urls) == 3
    assert not settings.records.controls_off
    assert settings.identity.issuers, "production needs a real identity provider"
    # TOML cannot write None: the default table (no idle timeout for machine clients) stays.
    assert settings.identity.idle_timeout_s == Settings().identity.idle_timeout_s


def test_every_connection_in_the_example_is_tls() -> None:
    settings = load_settings(EXAMPLE_TOML)
    for url in (settings.records.store_url or "", *settings.records.replica_urls):
        assert "sslmode=verify-full" in url, "records URLs verify the server certificate"
    assert "sslmode=verify-full" in (settings.ledger.postgres_url or "")
    assert all(url.startswith("tls://") for url in settings.ledger.nats_urls)
    assert settings.api.redis_url.startswith("rediss://")
    assert (settings.api.public_url or "").startswith("https://")
    assert (settings.access.break_glass_webhook_url or "").startswith("https://")
    for issuer in settings.identity.issuers:
        assert issuer.issuer.startswith("https://")


def test_the_example_holds_no_secret() -> None:
    text = EXAMPLE_TOML.read_text(encoding="utf-8")
    urls = re.findall(r"[a-z+]+://[^\s\"']+", text)
    assert urls
    for url in urls:
        assert urlsplit(url).password is None, f"a password in an example URL: {url}"
    assert "password=" not in text
    settings = load_settings(EXAMPLE_TOML)
    assert settings.keys.pkcs11_pin is None, "the HSM PIN belongs in the environment"


def _sections() -> dict[str, type[BaseModel]]:
    sections: dict[str, type[BaseModel]] = {}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections[name] = annotation
    return sections


# Settings an operator must never set: benchmark switches, and old spellings of [shape].
NOT_FOR_OPERATORS = {
    "records": {"bench_audit_off", "bench_encryption_off", "bench_policy_off"},
    "api": {"shared_state"},
    "keys": {"provider"},
}


def test_the_example_documents_every_setting() -> None:
    """A setting added to phivault.settings must be added to the example (set, or named in a
    comment with why it stays at its default)."""
    example = _example()
    comments = "\n".join(
        line for line in EXAMPLE_TOML.read_text(encoding="utf-8").splitlines() if "#" in line
    )
    missing = []
    for name in Settings.model_fields:
        if name not in _sections() and name not in example:
            missing.append(name)
    for section, model in _sections().items():
        written = example.get(section, {})
        for key in model.model_fields:
            if key in written:
                assert key not in NOT_FOR_OPERATORS.get(section, set()), f"{section}.{key}"
                continue
            if not re.search(rf"\b{re.escape(key)}\b", comments):
                missing.append(f"{section}.{key}")
    assert not missing, f"settings missing from docs/deploy/phivault.toml: {missing}"
