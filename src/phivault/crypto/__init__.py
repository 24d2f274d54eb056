"""Key custody and element encryption: the safe public face of phivault's cryptography.

Why this face: the records service needs to seal and open elements, make search tokens and
create, fetch and shred a patient's keys, and nothing else. It gets ciphers and indexers from
a :class:`KeyRing`; raw key bytes stay in ``phivault.crypto._hazmat`` and the providers.
``signing`` (the ledger's Ed25519 checkpoint key) lives here too and is imported on its own.

Names are loaded lazily (PEP 562), so importing ``phivault.crypto.signing`` does not pull in
the key ring and its dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phivault.crypto.blind_index import BlindIndexer, BlindToken, IndexField, Normalization
    from phivault.crypto.custody import initialize_keystore, open_keyring, open_keystore
    from phivault.crypto.element_store import SqliteSealedElementStore
    from phivault.crypto.elements import ElementRef, PatientCipher
    from phivault.crypto.errors import (
        CryptoError,
        DecryptionFailed,
        InvalidShares,
        KeyNotFound,
        KeyUnavailable,
        PatientShredded,
        RetentionHold,
        RotationInProgress,
        Sealed,
    )
    from phivault.crypto.invalidation import CacheInvalidation, Propagation, PropagationStatus
    from phivault.crypto.keyring import Inventory, KeyInfo, KeyRing, RotationReport, ShredOutcome
    from phivault.crypto.keystore import SqliteKeyStore
    from phivault.crypto.keystore_postgres import KeyStoreConflict, PostgresKeyStore
    from phivault.crypto.ports import KeyStore, RootKeyProvider, SealedElement, SealedElementStore
    from phivault.crypto.tokens import LedgerTokenizer

__all__ = [
    "BlindIndexer",
    "BlindToken",
    "CacheInvalidation",
    "CryptoError",
    "DecryptionFailed",
    "ElementRef",
    "IndexField",
    "InvalidShares",
    "Inventory",
    "KeyInfo",
    "KeyNotFound",
    "KeyRing",
    "KeyStore",
    "KeyStoreConflict",
    "KeyUnavailable",
    "LedgerTokenizer",
    "Normalization",
    "PatientCipher",
    "PatientShredded",
    "PostgresKeyStore",
    "Propagation",
    "PropagationStatus",
    "RetentionHold",
    "RootKeyProvider",
    "RotationInProgress",
    "RotationReport",
    "Sealed",
    "SealedElement",
    "SealedElementStore",
    "ShredOutcome",
    "SqliteKeyStore",
    "SqliteSealedElementStore",
    "initialize_keystore",
    "open_keyring",
    "open_keystore",
]

_WHERE = {
    "BlindIndexer": "blind_index",
    "BlindToken": "blind_index",
    "IndexField": "blind_index",
    "Normalization": "blind_index",
    "initialize_keystore": "custody",
    "open_keyring": "custody",
    "open_keystore": "custody",
    "SqliteKeyStore": "keystore",
    "KeyStoreConflict": "keystore_postgres",
    "PostgresKeyStore": "keystore_postgres",
    "SqliteSealedElementStore": "element_store",
    "ElementRef": "elements",
    "PatientCipher": "elements",
    "Inventory": "keyring",
    "KeyInfo": "keyring",
    "KeyRing": "keyring",
    "RotationReport": "keyring",
    "ShredOutcome": "keyring",
    "CacheInvalidation": "invalidation",
    "Propagation": "invalidation",
    "PropagationStatus": "invalidation",
    "KeyStore": "ports",
    "RootKeyProvider": "ports",
    "SealedElement": "ports",
    "SealedElementStore": "ports",
    "LedgerTokenizer": "tokens",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name, "errors" if name in __all__ else None)
    if module is None:
        raise AttributeError(f"module 'phivault.crypto' has no attribute {name!r}")
    return getattr(importlib.import_module(f"phivault.crypto.{module}"), name)
