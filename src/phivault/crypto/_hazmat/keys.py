"""Raw symmetric keys: a container that never shows its bytes, and key wrapping with AES-GCM.

Why: a ``bytes`` object holding a key prints itself in tracebacks, logs and reprs. A
:class:`SecretKey` does not: its repr names only a fingerprint-free label, it refuses pickling,
and it can be wiped (best effort in CPython: the bytearray is zeroed; copies handed to OpenSSL
are owned by the ``AESGCM`` object and dropped with it).
"""

from __future__ import annotations

import hmac
import os
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phivault.crypto.errors import DecryptionFailed

__all__ = [
    "KEY_BYTES",
    "SecretKey",
    "aead",
    "generate_key",
    "rewrap_key",
    "unwrap_key",
    "wrap_key",
]

KEY_BYTES = 32  # AES-256 and HMAC-SHA256 keys alike
NONCE_BYTES = 12


class SecretKey:
    """32 secret bytes that never appear in a repr, str, pickle or exception."""

    __slots__ = ("_bytes", "_label")

    def __init__(self, material: bytes | bytearray, *, label: str = "key") -> None:
        if len(material) != KEY_BYTES:
            raise ValueError(f"a key is {KEY_BYTES} bytes (got {len(material)})")
        self._bytes = bytearray(material)
        self._label = label

    def reveal(self) -> bytes:
        """The raw bytes. Callers outside ``_hazmat`` and the providers are a bug."""
        if not any(self._bytes):
            raise ValueError("this key was wiped")
        return bytes(self._bytes)

    def wipe(self) -> None:
        for i in range(len(self._bytes)):
            self._bytes[i] = 0

    def __repr__(self) -> str:
        return f"<SecretKey {self._label} (redacted)>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretKey):
            return NotImplemented
        return hmac.compare_digest(self._bytes, other._bytes)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretKey cannot be pickled")


def generate_key(label: str = "key") -> SecretKey:
    return SecretKey(os.urandom(KEY_BYTES), label=label)


def aead(key: SecretKey) -> AESGCM:
    """An AES-256-GCM object for ``key`` (holds its own copy of the key inside OpenSSL)."""
    return AESGCM(key.reveal())


def wrap_key(wrapping: AESGCM, key: SecretKey, aad: bytes) -> bytes:
    """``nonce || AES-GCM(key bytes)`` bound to ``aad`` (who the key belongs to)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + wrapping.encrypt(nonce, key.reveal(), aad)


def unwrap_key(wrapping: AESGCM, blob: bytes, aad: bytes, *, label: str = "key") -> SecretKey:
    if len(blob) != NONCE_BYTES + KEY_BYTES + 16:
        raise DecryptionFailed("wrapped key has the wrong length")
    try:
        return SecretKey(wrapping.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad), label=label)
    except InvalidTag:
        raise DecryptionFailed(
            "wrapped key does not authenticate under this wrapping key"
        ) from None


def rewrap_key(old: AESGCM, new: AESGCM, blob: bytes, aad: bytes) -> bytes:
    """Unwrap under ``old`` and wrap under ``new`` without the key leaving this function."""
    if len(blob) != NONCE_BYTES + KEY_BYTES + 16:
        raise DecryptionFailed("wrapped key has the wrong length")
    try:
        material = old.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptionFailed(
            "wrapped key does not authenticate under this wrapping key"
        ) from None
    nonce = os.urandom(NONCE_BYTES)
    return nonce + new.encrypt(nonce, material, aad)
