"""Composition of key custody for a data directory: initialize it, open a key ring on it.

Why here: ``phivault init``, the CLI and the server's bootstrap must build the same thing from
settings: the chosen root key provider, the keystore (embedded: SQLite under
``<data-dir>/keys/``; scaled, ``shape.store = postgres``: the schema ``keys.postgres_schema`` of
the records database, shared by every worker), and a :class:`KeyRing` that records to the
ledger. The root key provider is the same in both shapes: its public facts stay in ``keys/``.
Production settings refuse the development unseal file (and a development data directory)
here, failing closed.

The dev unseal file (``keys/dev-unseal.json``, written by ``phivault init --dev``) holds M
shares in clear so that the demo unseals itself. It is custody in name only: it warns loudly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from phivault.crypto.errors import KeyUnavailable, Sealed
from phivault.crypto.invalidation import (
    CacheInvalidation,
    DeferredInvalidation,
    InProcessInvalidation,
    UnreachableInvalidation,
)
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.ports import KeyPurpose, KeyStore, RootKeyProvider
from phivault.crypto.providers.sealed import ROOT_FILE, SealedLocalProvider
from phivault.datadir import DataDir
from phivault.errors import ConfigurationError
from phivault.ledger.ports import AuditSink
from phivault.settings import KeyProviderKind, KeySettings, LedgerKind, Settings, StoreKind

if TYPE_CHECKING:
    from phivault.crypto.providers.pkcs11 import Pkcs11Provider

__all__ = [
    "DEV_UNSEAL_FILE",
    "DEV_UNSEAL_WARNING",
    "KeystoreInit",
    "build_provider",
    "check_keystore_settings",
    "initialize_keystore",
    "open_invalidation",
    "open_keyring",
    "open_keystore",
    "read_dev_unseal_file",
    "shares_key_store",
]

DEV_UNSEAL_FILE = "dev-unseal.json"
PROVIDER_FILE = "provider.json"
DEV_UNSEAL_WARNING = (
    "WARNING: unsealing from the DEVELOPMENT unseal file: the root key's shares sit on disk "
    "next to the keys. Never put real PHI in this data directory."
)


@dataclass(frozen=True)
class KeystoreInit:
    """What ``phivault init`` shows once: the shares are stored nowhere else."""

    provider: str
    root_key_id: str
    threshold: int
    share_count: int
    shares: tuple[str, ...] = field(repr=False)
    dev_unseal_file: Path | None


def _write_json(path: Path, doc: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def check_keystore_settings(settings: KeySettings, *, threshold: int, shares: int) -> None:
    """Refuse, before anything is created, settings that ``initialize_keystore`` would refuse."""
    if settings.provider is KeyProviderKind.SEALED and not 2 <= threshold <= shares <= 16:
        raise ConfigurationError("need 2 <= threshold <= shares <= 16 for unseal shares")
    if settings.provider is KeyProviderKind.PKCS11 and settings.pkcs11_pin is None:
        raise ConfigurationError("keys.pkcs11_pin is required to create the HSM root key")
    if settings.provider is KeyProviderKind.AWSKMS and not settings.awskms_key_id:
        raise ConfigurationError("keys.awskms_key_id is required for the awskms provider")


def open_keystore(data_dir: DataDir, settings: Settings, *, create: bool = False) -> KeyStore:
    """The keystore ``settings`` choose: PostgreSQL when ``shape.store = postgres`` (the records
    database, schema ``keys.postgres_schema``; ``create`` makes the schema if missing), else the
    SQLite file under ``<data-dir>/keys/``."""
    if settings.shape.store is StoreKind.POSTGRES:
        from phivault.crypto.keystore_postgres import PostgresKeyStore

        if not settings.records.store_url:
            raise ConfigurationError(
                "shape.store = postgres needs records.store_url: the keystore lives there"
            )
        return PostgresKeyStore(
            settings.records.store_url, schema=settings.keys.postgres_schema, create=create
        )
    return SqliteKeyStore(data_dir.keys_dir / SqliteKeyStore.FILENAME)


def _roots_in(store: KeyStore) -> set[str]:
    """The root keys that wrap the store's live KEKs (``root:<id>``)."""
    return {r.wrapped_by for r in store.records(purpose=KeyPurpose.KEK, include_destroyed=False)}


def initialize_keystore(
    data_dir: DataDir,
    settings: Settings | KeySettings,
    *,
    threshold: int = 3,
    shares: int = 5,
) -> KeystoreInit:
    """Create the root key (or find it in the HSM/KMS) and the empty keystore.

    ``settings`` as a whole choose the keystore (:func:`open_keystore`); ``KeySettings`` alone
    mean the embedded one. A shared PostgreSQL keystore that already holds keys under another
    root key is refused: a second data directory of the same deployment gets a copy of the
    first one's ``keys/`` folder (or the same HSM/KMS key), never a root key of its own.
    """
    keys = settings.keys if isinstance(settings, Settings) else settings
    check_keystore_settings(keys, threshold=threshold, shares=shares)
    keys_dir = data_dir.keys_dir
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (keys_dir / PROVIDER_FILE).exists():
        raise ConfigurationError(f"{keys_dir} already holds a keystore")
    if isinstance(settings, Settings):
        store = open_keystore(data_dir, settings, create=True)
    else:
        store = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    try:
        roots = _roots_in(store)
        if roots and keys.provider is KeyProviderKind.SEALED:
            raise _other_roots(store, roots)  # a new sealed root key is always another one
        texts: list[str] = []
        dev_file: Path | None = None
        if keys.provider is KeyProviderKind.SEALED:
            provider, texts = SealedLocalProvider.initialize(
                keys_dir, threshold=threshold, shares=shares
            )
            root_key_id = provider.root_key_id
            if data_dir.dev:
                dev_file = keys_dir / DEV_UNSEAL_FILE
                _write_json(dev_file, {"warning": DEV_UNSEAL_WARNING, "shares": texts[:threshold]})
        elif keys.provider is KeyProviderKind.PKCS11:
            hsm = _pkcs11(keys)
            if keys.pkcs11_pin is None:
                raise ConfigurationError("keys.pkcs11_pin is required to create the HSM root key")
            hsm.initialize(keys.pkcs11_pin.get_secret_value())
            root_key_id, threshold, shares = hsm.root_key_id, 0, 0
        else:
            root_key_id, threshold, shares = _kms(keys).root_key_id, 0, 0
        if roots - {f"root:{root_key_id}"}:
            raise _other_roots(store, roots)
    finally:
        store.close()
    _write_json(
        keys_dir / PROVIDER_FILE, {"provider": keys.provider.value, "root_key_id": root_key_id}
    )
    return KeystoreInit(
        provider=keys.provider.value,
        root_key_id=root_key_id,
        threshold=threshold,
        share_count=shares,
        shares=tuple(texts),
        dev_unseal_file=dev_file,
    )


def _other_roots(store: KeyStore, roots: set[str]) -> ConfigurationError:
    return ConfigurationError(
        f"the keystore {store!r} already holds keys wrapped by "
        f"{', '.join(sorted(roots))}; give this data directory a copy of that deployment's "
        "keys/ folder (or the same HSM or KMS key) instead of a new root key"
    )


def _pkcs11(settings: KeySettings) -> Pkcs11Provider:
    from phivault.crypto.providers.pkcs11 import Pkcs11Provider

    return Pkcs11Provider(
        settings.pkcs11_module,
        settings.pkcs11_token_label,
        key_label=settings.pkcs11_key_label,
        pool_size=settings.pkcs11_sessions,
    )


def _kms(settings: KeySettings) -> RootKeyProvider:
    from phivault.crypto.providers.awskms import AwsKmsProvider

    if not settings.awskms_key_id:
        raise ConfigurationError("keys.awskms_key_id is required for the awskms provider")
    return AwsKmsProvider.connect(settings.awskms_key_id, region=settings.awskms_region)


def build_provider(data_dir: DataDir, settings: KeySettings) -> RootKeyProvider:
    """The provider the data directory was initialized with; refuses a mismatch."""
    try:
        recorded = json.loads((data_dir.keys_dir / PROVIDER_FILE).read_text())["provider"]
    except FileNotFoundError as exc:
        raise ConfigurationError(
            f"{data_dir.keys_dir} has no keystore (initialize it with `phivault init`)"
        ) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{data_dir.keys_dir / PROVIDER_FILE} is damaged") from exc
    if recorded != settings.provider.value:
        raise ConfigurationError(
            f"the keystore was created for provider {recorded!r}, settings say "
            f"{settings.provider.value!r}"
        )
    if settings.provider is KeyProviderKind.SEALED:
        if not (data_dir.keys_dir / ROOT_FILE).exists():
            raise ConfigurationError(f"{data_dir.keys_dir / ROOT_FILE} is missing")
        return SealedLocalProvider(data_dir.keys_dir)
    if settings.provider is KeyProviderKind.PKCS11:
        return _pkcs11(settings)
    return _kms(settings)


def read_dev_unseal_file(data_dir: DataDir) -> list[str] | None:
    path = data_dir.keys_dir / DEV_UNSEAL_FILE
    if not path.exists():
        return None
    try:
        return [str(s) for s in json.loads(path.read_text())["shares"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{path} is damaged") from exc


async def _record_root_creation(data_dir: DataDir, ring: KeyRing) -> None:
    path = data_dir.keys_dir / PROVIDER_FILE
    doc = json.loads(path.read_text())
    if doc.get("creation_recorded"):
        return
    await ring.record_root_created(str(doc.get("root_key_id", "root")))
    doc["creation_recorded"] = True
    _write_json(path, doc)


@asynccontextmanager
async def open_keyring(
    data_dir: DataDir,
    settings: Settings,
    audit: AuditSink,
    *,
    credentials: list[str] | None = None,
    operator: str | None = None,
    unseal: bool = True,
    read_only: bool = False,
    serving: bool = False,
) -> AsyncIterator[KeyRing]:
    """A key ring on ``data_dir``, unsealed with ``credentials`` if given (or from the PIN in
    settings, or in development from the dev unseal file), sealed again on exit.
    ``unseal=False`` leaves it sealed (shred and hold need no key); ``read_only=True`` also
    records nothing (inventory, with a sink that refuses events).

    Shreds are announced to every process sharing the key store (:func:`open_invalidation`);
    ``serving=True`` (an API worker) also listens, and uses its cipher cache only while it can
    hear them.

    Production refuses a development data directory and the dev unseal file outright. The
    first key ring opened on a data directory records the root key's creation in the ledger
    (``phivault init`` creates it before the ledger is open).
    """
    dev_shares = read_dev_unseal_file(data_dir)
    if settings.is_production and (data_dir.dev or dev_shares is not None):
        raise ConfigurationError(
            "production settings refuse a development data directory and its dev unseal file"
        )
    keys = settings.keys
    provider = build_provider(data_dir, keys)
    store = open_keystore(data_dir, settings)
    try:
        invalidation = await open_invalidation(
            data_dir, settings, serving=serving and not read_only, announce=not read_only
        )
    except BaseException:
        store.close()
        raise
    ring = KeyRing(
        store=store,
        provider=provider,
        audit=audit,
        observer=data_dir.node_id,
        cache_size=keys.dek_cache_size,
        cache_ttl_s=keys.dek_cache_ttl_s,
        operator=operator,
        invalidation=invalidation,
    )
    try:
        await invalidation.start()
        if not read_only:
            await _record_root_creation(data_dir, ring)
        if not unseal or read_only:
            credentials = None
        elif credentials is None and keys.provider is KeyProviderKind.PKCS11 and keys.pkcs11_pin:
            credentials = [keys.pkcs11_pin.get_secret_value()]
        elif credentials is None and keys.provider is KeyProviderKind.AWSKMS:
            credentials = []
        elif credentials is None and dev_shares is not None:
            print(DEV_UNSEAL_WARNING, file=sys.stderr)
            credentials = dev_shares
        if credentials is not None:
            await ring.unseal(credentials)
        yield ring
    finally:
        try:
            if not ring.sealed:
                await ring.seal()
        except Sealed:
            pass
        finally:
            try:
                await invalidation.aclose()
            finally:
                store.close()


def shares_key_store(settings: Settings) -> bool:
    """Several processes may hold ciphers of the same key store at once: the scaled shape. With
    the embedded ledger (one writer) one process at a time uses a data directory's keys."""
    return (
        settings.shape.store is StoreKind.POSTGRES and settings.shape.ledger is LedgerKind.JETSTREAM
    )


async def open_invalidation(
    data_dir: DataDir, settings: Settings, *, serving: bool, announce: bool = True
) -> CacheInvalidation:
    """How shreds reach the other processes' cipher caches (:mod:`phivault.crypto.invalidation`).

    In-process unless the key store is shared (:func:`shares_key_store`); then NATS, on the
    audit stream's servers. A worker (``serving``) connects at once and does not start without
    NATS (like the audit stream); a tool (the CLI) connects when it first shreds, and if it
    cannot, it still shreds and reports the shred pending propagation.
    """
    if not shares_key_store(settings) or not announce:
        return InProcessInvalidation()
    from phivault.crypto.invalidation_nats import NatsInvalidation

    keys = settings.keys

    async def connect() -> CacheInvalidation:
        try:
            return await NatsInvalidation.connect(
                settings.ledger.nats_urls,
                namespace=keys.postgres_schema,
                name=f"phivault-keys-{data_dir.node_id}",
                serving=serving,
                lease_s=keys.invalidation_lease_s,
                confirm_timeout_s=keys.shred_confirm_timeout_s,
                cache_ttl_s=keys.dek_cache_ttl_s,
                replicas=settings.ledger.stream_replicas,
            )
        except KeyUnavailable as exc:
            if serving:
                raise
            return UnreachableInvalidation(str(exc), bound_s=keys.dek_cache_ttl_s)

    # A worker connects now (and does not start without NATS); a tool when it first shreds.
    return await connect() if serving else DeferredInvalidation(connect)
