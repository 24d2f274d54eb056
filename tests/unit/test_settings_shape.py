"""The [shape] section and settings files: one place picks every adapter, the environment
overrides the file, and every problem is named (section.key) without echoing a value."""

from __future__ import annotations

from pathlib import Path

import pytest

from phivault.errors import ConfigurationError
from phivault.settings import (
    KeyProviderKind,
    LedgerKind,
    Settings,
    SharedStateKind,
    StoreKind,
    load_settings,
)

SCALED = """
[shape]
store = "postgres"
ledger = "jetstream"
shared_state = "redis"
keys = "pkcs11"

[records]
store_url = "postgresql+psycopg://postgres@127.0.0.1/test"
replica_urls = ["postgresql+psycopg://postgres@127.0.0.1:5433/test"]

[ledger]
postgres_url = "host=127.0.0.1 dbname=test user=postgres"
nats_urls = ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
"""


@pytest.fixture(autouse=True)
def _no_phivault_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PHIVAULT_"):
            monkeypatch.delenv(name)


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "phivault.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_default_shape_is_embedded() -> None:
    shape = Settings().shape
    assert (shape.store, shape.ledger, shape.shared_state, shape.keys) == (
        StoreKind.SQLITE, LedgerKind.LOCAL, SharedStateKind.MEMORY, KeyProviderKind.SEALED,
    )  # fmt: skip
    assert not shape.scaled


def test_a_settings_file_selects_the_scaled_shape(tmp_path: Path) -> None:
    settings = load_settings(_file(tmp_path, SCALED))
    assert settings.shape.scaled
    assert settings.shape.keys is KeyProviderKind.PKCS11
    # the detailed sections follow the shape (one source of truth)
    assert settings.api.shared_state == "redis"
    assert settings.keys.provider is KeyProviderKind.PKCS11
    assert settings.ledger.nats_urls[1].endswith(":4223")
    assert settings.records.replica_urls


def test_the_environment_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHIVAULT_SHAPE__SHARED_STATE", "memory")
    monkeypatch.setenv("PHIVAULT_LEDGER__STREAM", "OTHER")
    settings = load_settings(_file(tmp_path, SCALED))
    assert settings.shape.shared_state is SharedStateKind.MEMORY
    assert settings.ledger.stream == "OTHER"
    assert settings.records.store_url is not None  # the rest still comes from the file


def test_the_older_switches_are_still_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIVAULT_API__SHARED_STATE", "redis")
    assert Settings().shape.shared_state is SharedStateKind.REDIS


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[shape]\nstore = "postgres"\n', "records.store_url"),
        ('[shape]\nledger = "jetstream"\n', "ledger.postgres_url"),
        ('[records]\nstore_url = "postgresql://x/y"\n', "shape.store = postgres"),
        ('[records]\nreplica_urls = ["postgresql://r/y"]\n', "replica_urls"),
        ('[shape]\nstoer = "postgres"\n', "shape.stoer"),
        ('[shape]\nstore = "oracle"\n', "shape.store"),
        ('[ledger]\nstream = "no spaces allowed"\n', "ledger.stream"),
    ],
)
def test_every_problem_is_named(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid settings") as caught:
        load_settings(_file(tmp_path, text))
    assert named in str(caught.value)


def test_values_are_never_echoed(tmp_path: Path) -> None:
    secret = "s3cr3t-pin-value"
    text = f'[keys]\npkcs11_pin = "{secret}"\npkcs11_sessions = "{secret}"\n'
    with pytest.raises(ConfigurationError) as caught:
        load_settings(_file(tmp_path, text))
    assert "keys.pkcs11_sessions" in str(caught.value)
    assert secret not in str(caught.value)


def test_production_keeps_three_stream_replicas(tmp_path: Path) -> None:
    text = SCALED.replace("[shape]", 'environment = "production"\n[shape]')
    with pytest.raises(ConfigurationError, match="stream_replicas"):
        load_settings(_file(tmp_path, text))
    ok = text.replace("[ledger]", "[ledger]\nstream_replicas = 3")
    assert load_settings(_file(tmp_path, ok)).ledger.stream_replicas == 3


def test_unreadable_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_settings(_file(tmp_path, "[shape\nstore="))


def test_several_production_workers_need_a_provider_that_unseals_itself(tmp_path: Path) -> None:
    from phivault.api.serve import ServeOptions, check_options

    text = SCALED.replace("[shape]", 'environment = "production"\n[shape]')
    text = text.replace('keys = "pkcs11"', 'keys = "sealed"').replace(
        "[ledger]", "[ledger]\nstream_replicas = 3"
    )
    settings = load_settings(_file(tmp_path, text))
    with pytest.raises(ConfigurationError, match="unseals itself"):
        check_options(settings, ServeOptions(workers=2))
    check_options(settings, ServeOptions(workers=1))  # one worker is unsealed by its operator


def test_the_scaled_shape_caches_patient_keys_briefly(tmp_path: Path) -> None:
    """Another worker may shred a patient meanwhile: a shared key store means a short cache
    lifetime by default (the window in which a cached cipher outlives a shred)."""
    assert Settings().keys.dek_cache_ttl_s == 300.0
    assert load_settings(_file(tmp_path, SCALED)).keys.dek_cache_ttl_s == 30.0
    chosen = SCALED.replace("[ledger]", "[keys]\ndek_cache_ttl_s = 5\n\n[ledger]")
    assert load_settings(_file(tmp_path, chosen)).keys.dek_cache_ttl_s == 5.0
