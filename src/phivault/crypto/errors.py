"""Precise, typed failures of key custody and element encryption.

Why a tree of its own: the API maps every :class:`CryptoError` to an opaque error (clients learn
nothing from a decryption failure), while operators get the full, specific message from the CLI.
No message ever carries key bytes or PHI values: only ids, versions and field names.
"""

from __future__ import annotations

from datetime import datetime

from phivault.errors import InvalidInput, PhivaultError, StoreUnavailable

__all__ = [
    "CryptoError",
    "DecryptionFailed",
    "InvalidShares",
    "KeyNotFound",
    "KeyStoreConflict",
    "KeyUnavailable",
    "PatientShredded",
    "RetentionHold",
    "RotationInProgress",
    "Sealed",
]


class CryptoError(PhivaultError):
    """Base class for key custody and encryption errors."""


class Sealed(CryptoError):
    """The keystore is sealed: present the unseal shares (or PIN) before using keys."""

    def __init__(self, message: str = "the keystore is sealed; unseal it first") -> None:
        super().__init__(message)


class KeyUnavailable(CryptoError):
    """A key exists in principle but cannot be used now (provider down, retired, unwrap failed)."""


class KeyNotFound(KeyUnavailable):
    """No key with that id, tenant, purpose or patient exists."""


class PatientShredded(KeyUnavailable):
    """The patient's data keys were destroyed on purpose: their data is gone for good."""

    def __init__(self, tenant: str, patient: str) -> None:
        super().__init__(f"the keys of Patient/{patient} (tenant {tenant}) were shredded")
        self.tenant = tenant
        self.patient = patient


class RetentionHold(CryptoError):
    """A retention hold forbids shredding this patient's keys until ``until``."""

    def __init__(self, patient: str, until: datetime, reason: str) -> None:
        super().__init__(
            f"Patient/{patient} is under a retention hold until "
            f"{until.isoformat(timespec='seconds')} (reason: {reason}); shredding refused"
        )
        self.patient = patient
        self.until = until
        self.reason = reason


class DecryptionFailed(CryptoError):
    """A ciphertext did not authenticate under the key and context given.

    ``str(exc)`` is deliberately uninformative (safe for API clients); ``diagnostic`` says which
    check failed (format, version, tag) for operators, never with key bytes or plaintext.
    """

    def __init__(self, diagnostic: str) -> None:
        super().__init__("decryption failed")
        self.diagnostic = diagnostic


class InvalidShares(CryptoError, InvalidInput):
    """Unseal shares were malformed, from another keystore, too few, or corrupted."""


class RotationInProgress(CryptoError):
    """Another rotation of a different kind is unfinished for this tenant; finish it first."""


class KeyStoreConflict(StoreUnavailable):
    """Another worker wrote the same key version, unfinished rotation or shred record first.

    Nothing of this call was written. Reading the store again shows the other worker's row;
    retrying the operation (the key ring's creates are idempotent) returns it.
    """
