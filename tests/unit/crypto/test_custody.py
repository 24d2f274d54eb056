"""Composition of key custody on a data directory: init, open, dev unseal file, refusals; the
scaled shape's keystore in PostgreSQL."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from crypto_support import drop_schema, fresh_schema_name, postgres_url

from phivault.crypto.custody import (
    initialize_keystore,
    open_keyring,
    open_keystore,
    read_dev_unseal_file,
)
from phivault.crypto.elements import ElementRef
from phivault.crypto.errors import Sealed
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.keystore_postgres import PostgresKeyStore
from phivault.datadir import DataDir
from phivault.errors import ConfigurationError, StoreUnavailable
from phivault.initialize import initialize_data_dir
from phivault.ledger.testing import InMemoryAuditSink
from phivault.settings import (
    Environment,
    KeyProviderKind,
    KeySettings,
    RecordsSettings,
    Settings,
    ShapeSettings,
    StoreKind,
)


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


# -- the scaled shape: the keystore in PostgreSQL ------------------------------------------


@pytest.fixture
def scaled(postgres: str) -> Iterator[Settings]:
    """Settings of the scaled shape's store, on a fresh keystore schema (dropped after)."""
    schema = fresh_schema_name()
    yield Settings(
        shape=ShapeSettings(store=StoreKind.POSTGRES),
        records=RecordsSettings(store_url=postgres_url(postgres)),
        keys=KeySettings(postgres_schema=schema),
    )
    drop_schema(postgres, schema)


async def test_scaled_shape_keeps_keys_in_postgres_shared_by_every_data_dir(
    tmp_path: Path, scaled: Settings
) -> None:
    first = _data_dir(tmp_path / "host-a", dev=False)
    init = initialize_keystore(first, scaled, threshold=2, shares=3)
    assert not (first.keys_dir / SqliteKeyStore.FILENAME).exists()
    store = open_keystore(first, scaled)
    assert isinstance(store, PostgresKeyStore) and store.schema == scaled.keys.postgres_schema
    store.close()
    # another host of the same deployment: a copy of keys/ (the sealed root), its own node
    second = _data_dir(tmp_path / "host-b", dev=False)
    for item in first.keys_dir.iterdir():
        shutil.copy(item, second.keys_dir / item.name)
    ref = ElementRef("acme", "Patient", "p1", "birthDate")
    shares = list(init.shares[:2])
    async with open_keyring(first, scaled, InMemoryAuditSink(), credentials=shares) as ring:
        sealed = (await ring.patient_cipher("acme", "p1", create=True)).seal(ref, b"1970")
    async with open_keyring(second, scaled, InMemoryAuditSink(), credentials=shares) as ring:
        assert (await ring.patient_cipher("acme", "p1")).open(ref, sealed) == b"1970"
        assert [k.patient for k in ring.inventory(tenant="acme", patient="p1").keys] == ["p1"]


def test_scaled_init_refuses_a_second_root_key_for_the_shared_keystore(
    tmp_path: Path, scaled: Settings
) -> None:
    import asyncio

    first = _data_dir(tmp_path / "a", dev=True)
    initialize_keystore(first, scaled)

    async def create_tenant() -> None:
        async with open_keyring(first, scaled, InMemoryAuditSink()) as ring:
            await ring.ensure_tenant("acme")

    asyncio.run(create_tenant())
    other = _data_dir(tmp_path / "b", dev=False)
    with pytest.raises(ConfigurationError, match="already holds keys wrapped by root:"):
        initialize_keystore(other, scaled)
    assert list(other.keys_dir.iterdir()) == []  # refused before a root key was made


async def test_scaled_keyring_refuses_a_keystore_that_was_never_initialized(
    tmp_path: Path, scaled: Settings
) -> None:
    directory = _data_dir(tmp_path, dev=False)
    initialize_keystore(directory, KeySettings())  # the embedded keystore only
    with pytest.raises(StoreUnavailable, match="not set up"):
        async with open_keyring(directory, scaled, InMemoryAuditSink()):
            pass


def test_scaled_init_creates_the_data_dir_and_the_keystore_schema(
    tmp_path: Path, scaled: Settings, postgres: str
) -> None:
    done = initialize_data_dir(tmp_path / "data", dev=False, settings=scaled, threshold=2, shares=2)
    assert done.keystore.provider == "sealed" and len(done.keystore.shares) == 2
    with psycopg.connect(postgres) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
            (scaled.keys.postgres_schema,),
        ).fetchone()
    assert row is not None and row[0] == 5  # meta, keys, holds, shreds, jobs
