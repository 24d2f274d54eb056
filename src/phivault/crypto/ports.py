"""The crypto part's ports: small typed interfaces its adapters implement.

* :class:`RootKeyProvider`: where the root key lives and works (sealed local keystore,
  PKCS#11 HSM, AWS KMS). It wraps and unwraps tenant KEKs; the root key never leaves it.
* :class:`KeyStore`: durable metadata and *wrapped* key material (KEKs, DEKs, blind-index and
  ledger-token keys), retention holds, shred records and rotation jobs. Embedded: SQLite under
  ``<data-dir>/keys/``; scaled: a PostgreSQL table set with the same methods.
* :class:`SealedElementStore`: what the records service implements so that DEK and index
  rotation can re-encrypt and re-index its data in batches, with compare-and-swap.

Store methods block (local files or a database) and are short; the key ring calls them
directly. Wrapped material is opaque here and still never printed (``repr=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple, Protocol

from phivault.crypto._hazmat.keys import SecretKey
from phivault.crypto.blind_index import BlindToken, IndexField
from phivault.crypto.elements import ElementRef

__all__ = [
    "Hold",
    "JobKind",
    "KeyPurpose",
    "KeyRecord",
    "KeyState",
    "KeyStore",
    "RootKeyProvider",
    "RotationJob",
    "SealedElement",
    "SealedElementStore",
    "ShredRecord",
    "WrappedKey",
]


class KeyPurpose(StrEnum):
    KEK = "kek"  # per tenant; wraps the tenant's DEKs, index and token keys
    DEK = "dek"  # per patient; encrypts PHI elements
    BLIND_INDEX = "blind-index"  # per tenant; HMAC tokens for equality search
    LEDGER_TOKEN = "ledger-token"  # noqa: S105 (a purpose, not a secret); per tenant; keyed tokens that audit events carry


class KeyState(StrEnum):
    ACTIVE = "active"  # used for new encryption / tokens
    DECRYPT_ONLY = "decrypt-only"  # still opens old data during a rotation
    DESTROYED = "destroyed"  # wrapped material deleted (retired or shredded)


@dataclass(frozen=True)
class KeyRecord:
    """One key version. ``subject`` is the patient id for DEKs, ``""`` otherwise."""

    key_id: str
    tenant: str
    purpose: KeyPurpose
    subject: str
    version: int
    state: KeyState
    wrapped: bytes | None = field(repr=False)
    wrapped_by: str  # the KEK's key id, or "root:<root key id>"
    created: datetime
    rotated: datetime | None = None
    destroyed: datetime | None = None
    job: str | None = None
    seq: int = 0  # the store's ordering, for batched scans


class WrappedKey(NamedTuple):
    """The lean row a KEK rotation rewraps (no dates or states: millions of them)."""

    seq: int
    key_id: str
    purpose: str
    subject: str
    version: int
    wrapped: bytes
    wrapped_by: str

    def __repr__(self) -> str:  # never the wrapped bytes
        return f"WrappedKey({self.key_id}, {self.purpose}, v{self.version})"


@dataclass(frozen=True)
class Hold:
    tenant: str
    patient: str
    until: datetime
    reason: str
    placed_by: str
    placed: datetime


@dataclass(frozen=True)
class ShredRecord:
    """Evidence that a patient's keys were destroyed (kept forever; holds no key material)."""

    tenant: str
    patient: str
    shredded: datetime
    by: str
    reason: str
    keys_destroyed: tuple[str, ...]
    ledger_index: int


class JobKind(StrEnum):
    KEK = "kek"
    DEK = "dek"
    INDEX = "index"


@dataclass(frozen=True)
class RotationJob:
    """A persisted rotation, so that a crash resumes where it stopped."""

    job_id: str
    kind: JobKind
    tenant: str
    patient: str | None
    phase: str
    cursor: int
    started: datetime
    updated: datetime
    done: int = 0


class RootKeyProvider(Protocol):
    """The root of the key hierarchy. Wrapping and unwrapping happen inside the provider."""

    @property
    def name(self) -> str:
        """``sealed``, ``pkcs11`` or ``awskms``."""
        ...

    @property
    def root_key_id(self) -> str: ...

    @property
    def credentials_needed(self) -> int:
        """How many credentials unseal it: M shares, one PIN, or none (KMS)."""
        ...

    @property
    def sealed(self) -> bool: ...

    def unseal(self, credentials: Sequence[str]) -> None:
        """Shares (sealed keystore) or PIN (PKCS#11); KMS ignores them."""
        ...

    def seal(self) -> None: ...

    def wrap(self, key: SecretKey, aad: bytes) -> bytes: ...

    def unwrap(self, blob: bytes, aad: bytes) -> SecretKey: ...


class KeyStore(Protocol):
    """Durable key metadata and wrapped material. Every method is one transaction."""

    def add(self, records: Sequence[KeyRecord], *, demote: Sequence[str] = ()) -> None:
        """Insert ``records`` and set the keys ``demote`` to decrypt-only, atomically."""
        ...

    def get(self, key_id: str) -> KeyRecord: ...

    def live(self, tenant: str, purpose: KeyPurpose, subject: str = "") -> list[KeyRecord]:
        """Live (not destroyed) versions, oldest first."""
        ...

    def live_many(self, tenant: str, subjects: Sequence[str]) -> dict[str, list[KeyRecord]]:
        """Live DEKs of several patients at once."""
        ...

    def records(
        self,
        tenant: str | None = None,
        purpose: KeyPurpose | None = None,
        subject: str | None = None,
        *,
        include_destroyed: bool = True,
    ) -> list[KeyRecord]: ...

    def dek_summary(self) -> dict[tuple[str, str, str], int]:
        """DEK counts by (tenant, state, wrapped_by)."""
        ...

    def tenants(self) -> list[str]: ...

    def scan_wrapped_by(
        self, tenant: str, not_wrapped_by: str, after: int, limit: int
    ) -> list[WrappedKey]:
        """Live keys of ``tenant`` wrapped by a KEK other than ``not_wrapped_by``."""
        ...

    def rewrap(self, updates: Sequence[tuple[int, bytes, bytes, str]], now: datetime) -> int:
        """(seq, expected wrapped, new wrapped, new wrapped_by): compare-and-swap each."""
        ...

    def destroy(self, key_ids: Sequence[str], now: datetime) -> None:
        """Delete the wrapped material of these keys for good (state destroyed)."""
        ...

    def subjects(self, tenant: str, after: str, limit: int) -> list[str]:
        """Patients of ``tenant`` with live DEKs, in id order, after ``after``."""
        ...

    def place_hold(self, hold: Hold) -> None: ...

    def holds(self, tenant: str, patient: str) -> list[Hold]: ...

    def shred(self, record: ShredRecord) -> None:
        """Destroy every DEK of the patient and keep ``record``, atomically."""
        ...

    def shred_record(self, tenant: str, patient: str) -> ShredRecord | None: ...

    def start_job(self, job: RotationJob) -> None: ...

    def open_jobs(self, tenant: str) -> list[RotationJob]: ...

    def update_job(
        self, job_id: str, *, phase: str, cursor: int, done: int, now: datetime
    ) -> None: ...

    def finish_job(self, job_id: str, now: datetime) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SealedElement:
    """An element as the records store holds it: where, whose, the ciphertext, its index."""

    position: int  # strictly increasing within the store: the resume cursor
    ref: ElementRef
    patient: str
    ciphertext: bytes = field(repr=False)
    index: IndexField | None = None


class SealedElementStore(Protocol):
    """Implemented by the records service; used by DEK and blind-index rotation."""

    def scan(
        self, tenant: str, *, patient: str | None, after: int, limit: int
    ) -> Sequence[SealedElement]:
        """Elements with ``position > after``, in position order, at most ``limit``."""
        ...

    def replace(self, element: SealedElement, ciphertext: bytes) -> bool:
        """Swap in ``ciphertext`` if the element still holds ``element.ciphertext``."""
        ...

    def add_tokens(self, element: SealedElement, tokens: Sequence[BlindToken]) -> None:
        """Store blind-index tokens of this element (idempotent)."""
        ...

    def drop_token_version(self, tenant: str, version: int) -> int:
        """Delete every token of a retired blind-index key version; return how many."""
        ...

    def drop_patient_tokens(self, tenant: str, patient: str) -> int:
        """Delete every blind-index token of a patient (shredding); return how many."""
        ...
