"""Composition of key custody on a data directory: init, open, dev unseal file, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from phivault.crypto.custody import initialize_keystore, open_keyring, read_dev_unseal_file
from phivault.crypto.errors import Sealed
from phivault.datadir import DataDir
from phivault.errors import ConfigurationError
from phivault.ledger.testing import InMemoryAuditSink
from phivault.settings import Environment, KeyProviderKind, KeySettings, Settings


def _data_dir(tmp_path: Path, *, dev: bool) -> DataDir:
    return DataDir.create(tmp_path / "data", dev=dev)


async def test_dev_data_dir_unseals_itself_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _data_dir(tmp_path, dev=True)
    init = initialize_keystore(directory, KeySettings())
    assert init.dev_unseal_file is not None and len(init.shares) == 5
    assert read_dev_unseal_file(directory) == list(init.shares[:3])
    assert "shares" not in repr(init) or init.shares[0] not in repr(init)
    sink = InMemoryAuditSink()
    async with open_keyring(directory, Settings(), sink) as ring:
        assert not ring.sealed
        await ring.create_patient_key("acme", "p1")
    assert ring.sealed  # sealed again on exit
    assert "DEVELOPMENT unseal file" in capsys.readouterr().err
    subtypes = [(e.subtype, e.outcome_reason) for e in sink.events]
    assert subtypes[0] == ("create", "root-key") and subtypes[-1] == ("seal", None)
    async with open_keyring(directory, Settings(), sink):
        pass
    assert [e.outcome_reason for e in sink.events].count("root-key") == 1  # recorded once


async def test_production_refuses_the_dev_unseal_file(tmp_path: Path) -> None:
    directory = _data_dir(tmp_path, dev=True)
    initialize_keystore(directory, KeySettings())
    production = Settings(environment=Environment.PRODUCTION)
    with pytest.raises(ConfigurationError, match="production settings refuse"):
        async with open_keyring(directory, production, InMemoryAuditSink()):
            pass


async def test_production_data_dir_starts_sealed(tmp_path: Path) -> None:
    directory = _data_dir(tmp_path, dev=False)
    init = initialize_keystore(directory, KeySettings(), threshold=2, shares=3)
    assert init.dev_unseal_file is None
    production = Settings(environment=Environment.PRODUCTION)
    async with open_keyring(directory, production, InMemoryAuditSink()) as ring:
        assert ring.sealed
        with pytest.raises(Sealed):
            await ring.patient_cipher("acme", "p1", create=True)
    async with open_keyring(
        directory, production, InMemoryAuditSink(), credentials=list(init.shares[1:])
    ) as ring:
        assert not ring.sealed


def test_keystore_refuses_reinitialization_and_provider_mismatch(tmp_path: Path) -> None:
    directory = _data_dir(tmp_path, dev=False)
    initialize_keystore(directory, KeySettings())
    with pytest.raises(ConfigurationError, match="already holds a keystore"):
        initialize_keystore(directory, KeySettings())
    from phivault.crypto.custody import build_provider

    with pytest.raises(ConfigurationError, match="created for provider 'sealed'"):
        build_provider(directory, KeySettings(provider=KeyProviderKind.PKCS11))
    with pytest.raises(ConfigurationError, match="threshold"):
        initialize_keystore(_data_dir(tmp_path / "b", dev=False), KeySettings(), threshold=1)


async def test_kms_keystore_opens_read_only_without_calling_kms(tmp_path: Path) -> None:
    keys = KeySettings(
        provider=KeyProviderKind.AWSKMS, awskms_key_id="alias/phivault", awskms_region="eu-west-1"
    )
    directory = _data_dir(tmp_path, dev=False)
    init = initialize_keystore(directory, keys)
    assert init.root_key_id == "awskms:alias/phivault" and init.shares == ()
    sink = InMemoryAuditSink()
    async with open_keyring(directory, Settings(keys=keys), sink, read_only=True) as ring:
        assert ring.sealed
        assert ring.inventory().root.provider == "awskms"
    assert sink.events == []
    with pytest.raises(ConfigurationError, match="awskms_key_id"):
        initialize_keystore(
            _data_dir(tmp_path / "b", dev=False), KeySettings(provider=KeyProviderKind.AWSKMS)
        )
