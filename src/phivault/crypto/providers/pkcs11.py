"""A PKCS#11 HSM as root key provider (tested for real against SoftHSM2).

Why: in the scaled shape the root key must never exist outside tamper-resistant hardware. The
root key is a non-extractable, sensitive AES-256 key object in the token; KEKs are wrapped and
unwrapped *inside* the token with CKM_AES_GCM (associated data bound). Threads borrow sessions
from a small pool (login state is per application in PKCS#11: one session logs in, the rest
share it). python-pkcs11 0.10 calls ``C_Initialize(NULL)``, which promises the library that
no two threads call it at once, so every call into the module is serialized by one
process-wide lock (SoftHSM2 crashes otherwise; see ``docs/decisions/keys-providers.md``):
concurrency across the HSM comes from several worker processes. Sealing closes every session
and logs out. python-pkcs11 exceptions never cross this module: they become :class:`KeyUnavailable`
(device, session, PIN) or :class:`DecryptionFailed` (a wrapped key that does not authenticate).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from phivault.crypto._hazmat import SecretKey
from phivault.crypto.errors import DecryptionFailed, KeyNotFound, KeyUnavailable, Sealed

__all__ = ["Pkcs11Provider"]

# One per process, like the loaded module itself: Cryptoki was initialized without OS locking.
_LIBRARY_LOCK = threading.RLock()

_NONCE = 12
_TAG = 16


def _load(module: Path) -> Any:
    import pkcs11

    try:
        return pkcs11.lib(str(module))
    except Exception as exc:  # the binding raises RuntimeError subclasses and OSError
        raise KeyUnavailable(f"cannot load the PKCS#11 module {module}") from exc


class Pkcs11Provider:
    """Root key in a PKCS#11 token, found by ``token_label`` and ``key_label``."""

    name = "pkcs11"

    @property
    def credentials_needed(self) -> int:
        return 1  # the token PIN

    def __init__(
        self,
        module: Path,
        token_label: str,
        *,
        key_label: str = "phivault-root",
        pool_size: int = 4,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._module = module
        self._token_label = token_label
        self._key_label = key_label
        self._pool_size = pool_size
        self._pool: queue.LifoQueue[tuple[Any, Any]] | None = None
        self._sessions: list[Any] = []
        self._lock = threading.Lock()

    @property
    def root_key_id(self) -> str:
        return f"pkcs11:{self._token_label}/{self._key_label}"

    @property
    def sealed(self) -> bool:
        return self._pool is None

    def _token(self) -> Any:
        from pkcs11.exceptions import PKCS11Error

        try:
            return _load(self._module).get_token(token_label=self._token_label)
        except PKCS11Error as exc:
            raise KeyUnavailable(f"no PKCS#11 token labelled {self._token_label!r}") from exc

    def initialize(self, pin: str) -> None:
        """Create the root key in the token if it is not there (``phivault init``)."""
        from pkcs11 import Attribute, KeyType
        from pkcs11.exceptions import NoSuchKey, PKCS11Error

        try:
            with _LIBRARY_LOCK, self._token().open(rw=True, user_pin=pin) as session:
                try:
                    session.get_key(label=self._key_label, key_type=KeyType.AES)
                    return
                except NoSuchKey:
                    pass
                session.generate_key(
                    KeyType.AES,
                    256,
                    label=self._key_label,
                    store=True,
                    template={
                        Attribute.EXTRACTABLE: False,
                        Attribute.SENSITIVE: True,
                        Attribute.ENCRYPT: True,
                        Attribute.DECRYPT: True,
                        Attribute.WRAP: True,
                        Attribute.UNWRAP: True,
                    },
                )
        except PKCS11Error as exc:
            raise KeyUnavailable(f"cannot create the root key: {type(exc).__name__}") from exc

    def unseal(self, credentials: Sequence[str]) -> None:
        """Log in with the user PIN (``credentials[0]``) and open the session pool."""
        from pkcs11 import KeyType
        from pkcs11.exceptions import NoSuchKey, PKCS11Error

        if len(credentials) != 1:
            raise KeyUnavailable("the PKCS#11 provider is unsealed with exactly one PIN")
        with self._lock, _LIBRARY_LOCK:
            if self._pool is not None:
                return
            token = self._token()
            sessions: list[Any] = []
            try:
                sessions.append(token.open(user_pin=credentials[0]))
                sessions.extend(token.open() for _ in range(self._pool_size - 1))
                pool: queue.LifoQueue[tuple[Any, Any]] = queue.LifoQueue()
                for session in sessions:
                    pool.put(
                        (session, session.get_key(label=self._key_label, key_type=KeyType.AES))
                    )
            except NoSuchKey as exc:
                self._close(sessions)
                raise KeyNotFound(f"no root key {self._key_label!r} in the token") from exc
            except PKCS11Error as exc:
                self._close(sessions)
                raise KeyUnavailable(f"PKCS#11 login failed: {type(exc).__name__}") from exc
            self._sessions = sessions
            self._pool = pool

    @staticmethod
    def _close(sessions: list[Any]) -> None:
        from pkcs11.exceptions import PKCS11Error

        # The logged-in session is first: close it last, its close logs the application out.
        for session in reversed(sessions):
            with suppress(PKCS11Error):
                session.close()

    def seal(self) -> None:
        with self._lock, _LIBRARY_LOCK:
            self._close(self._sessions)
            self._sessions = []
            self._pool = None

    @contextmanager
    def _key(self) -> Iterator[Any]:
        pool = self._pool
        if pool is None:
            raise Sealed()
        session, key = pool.get()
        try:
            with _LIBRARY_LOCK:
                yield key
        finally:
            pool.put((session, key))

    def wrap(self, key: SecretKey, aad: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.exceptions import PKCS11Error
        from pkcs11.mechanisms import GCMParams

        nonce = os.urandom(_NONCE)
        try:
            with self._key() as root:
                sealed = root.encrypt(
                    key.reveal(), mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad)
                )
        except PKCS11Error as exc:
            # from None: the failed call's arguments included key bytes.
            raise KeyUnavailable(f"HSM wrap failed: {type(exc).__name__}") from None
        return nonce + bytes(sealed)

    def unwrap(self, blob: bytes, aad: bytes) -> SecretKey:
        from pkcs11 import Mechanism
        from pkcs11.exceptions import (
            DataLenRange,
            EncryptedDataInvalid,
            EncryptedDataLenRange,
            GeneralError,
            PKCS11Error,
        )
        from pkcs11.mechanisms import GCMParams

        if len(blob) != _NONCE + 32 + _TAG:
            raise DecryptionFailed("wrapped key has the wrong length")
        try:
            with self._key() as root:
                plain = root.decrypt(
                    blob[_NONCE:],
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(blob[:_NONCE], aad),
                )
        except (EncryptedDataInvalid, EncryptedDataLenRange, DataLenRange, GeneralError):
            # SoftHSM2 reports a GCM tag mismatch as CKR_GENERAL_ERROR.
            raise DecryptionFailed("wrapped key does not authenticate in the HSM") from None
        except PKCS11Error as exc:
            raise KeyUnavailable(f"HSM unwrap failed: {type(exc).__name__}") from None
        return SecretKey(bytes(plain), label="kek")

    def __repr__(self) -> str:
        return f"<Pkcs11Provider {self.root_key_id} {'sealed' if self.sealed else 'unsealed'}>"
