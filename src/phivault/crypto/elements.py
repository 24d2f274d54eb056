"""Sealing and opening PHI elements: AES-256-GCM under a patient's data key, bound to context.

Why this shape: the records repository encrypts many small elements per resource, so the hot
path is one :class:`PatientCipher` per patient (fetched once from the key ring, cached) and a
plain method call per element. The cipher holds ready AES-GCM objects, never exposes them,
and cannot be pickled or printed with its keys.

Ciphertext format v1 (see ``docs/decisions/crypto-ciphertext-format.md``)::

    0      1              5                 17
    | 0x01 | DEK version  | nonce (96 bits) | AES-256-GCM ciphertext || tag (128 bits) |
           (u32, big-endian)

Associated data (never stored, rebuilt from context)::

    "phivault.element.v1" || header (5 bytes) || lp(tenant) || lp(patient)
        || lp(resource type) || lp(resource id) || lp(element path)

where ``lp(s)`` is the UTF-8 bytes of ``s`` prefixed by their length (u16, big-endian), so no
two contexts encode alike. The DEK version in the header is the key id within the patient's
key series; it is covered by the tag through the associated data. Ciphertext copied to another
tenant, patient, resource, element, or relabelled with another key version fails to open.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phivault.crypto.errors import DecryptionFailed, KeyUnavailable
from phivault.errors import InvalidInput

__all__ = [
    "FORMAT_V1",
    "HEADER_BYTES",
    "OVERHEAD_BYTES",
    "ElementRef",
    "PatientCipher",
    "element_aad",
    "key_version_of",
]

FORMAT_V1 = 1
HEADER_BYTES = 5
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD_BYTES = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
_AAD_LABEL = b"phivault.element.v1"
_MAX_FIELD = 0xFFFF


@dataclass(frozen=True, slots=True)
class ElementRef:
    """Where an element lives: the context its ciphertext is bound to.

    ``path`` is the element's path inside the resource, with indexes (``name[0].family``).
    """

    tenant: str
    resource_type: str
    resource_id: str
    path: str


def _lp(value: str) -> bytes:
    data = value.encode()
    if len(data) > _MAX_FIELD:
        raise InvalidInput("context field too long for associated data")
    return len(data).to_bytes(2, "big") + data


def _header(version: int) -> bytes:
    return bytes((FORMAT_V1,)) + version.to_bytes(4, "big")


def element_aad(header: bytes, tenant: str, patient: str, ref: ElementRef) -> bytes:
    """The associated data for ``ref`` (public so known-answer tests can pin it)."""
    return (
        _AAD_LABEL
        + header
        + _lp(tenant)
        + _lp(patient)
        + _lp(ref.resource_type)
        + _lp(ref.resource_id)
        + _lp(ref.path)
    )


def key_version_of(ciphertext: bytes) -> int:
    """The DEK version a v1 ciphertext names (for rotation bookkeeping; not authenticated)."""
    if len(ciphertext) < OVERHEAD_BYTES or ciphertext[0] != FORMAT_V1:
        raise DecryptionFailed("not a phivault v1 ciphertext")
    return int.from_bytes(ciphertext[1:HEADER_BYTES], "big")


class PatientCipher:
    """Seals and opens one patient's elements. Obtain it from ``KeyRing.patient_cipher``.

    New ciphertext uses the active DEK version; ciphertext under any live older version still
    opens (rotation keeps them until re-encryption is done and the minimum version is raised).
    """

    __slots__ = ("_active", "_headers", "_keys", "_prefix", "patient", "tenant")

    def __init__(self, tenant: str, patient: str, keys: Mapping[int, AESGCM], active: int) -> None:
        if active not in keys:
            raise KeyUnavailable("the active data key version is not loaded")
        self.tenant = tenant
        self.patient = patient
        self._keys = dict(keys)
        self._active = active
        self._headers = {version: _header(version) for version in keys}
        self._prefix = _lp(tenant) + _lp(patient)

    @property
    def active_version(self) -> int:
        return self._active

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys))

    def _aad(self, header: bytes, ref: ElementRef) -> bytes:
        if ref.tenant != self.tenant:
            raise InvalidInput("element belongs to another tenant than this cipher")
        return (
            _AAD_LABEL
            + header
            + self._prefix
            + _lp(ref.resource_type)
            + _lp(ref.resource_id)
            + _lp(ref.path)
        )

    def seal(self, ref: ElementRef, plaintext: bytes) -> bytes:
        header = self._headers[self._active]
        nonce = os.urandom(NONCE_BYTES)
        return (
            header
            + nonce
            + self._keys[self._active].encrypt(nonce, plaintext, self._aad(header, ref))
        )

    def seal_many(self, items: Iterable[tuple[ElementRef, bytes]]) -> list[bytes]:
        """Seal several elements of this patient (one nonce draw for the batch)."""
        batch = list(items)
        header = self._headers[self._active]
        key = self._keys[self._active]
        nonces = os.urandom(NONCE_BYTES * len(batch))
        out = []
        for i, (ref, plaintext) in enumerate(batch):
            nonce = nonces[i * NONCE_BYTES : (i + 1) * NONCE_BYTES]
            out.append(header + nonce + key.encrypt(nonce, plaintext, self._aad(header, ref)))
        return out

    def open(self, ref: ElementRef, ciphertext: bytes) -> bytes:
        if len(ciphertext) < OVERHEAD_BYTES or ciphertext[0] != FORMAT_V1:
            _fail("not a phivault v1 ciphertext (format byte or length)")
        header = ciphertext[:HEADER_BYTES]
        key = self._keys.get(int.from_bytes(header[1:], "big"))
        if key is None:
            _fail("names a data key version that is not live (retired, shredded or unknown)")
        try:
            return key.decrypt(
                ciphertext[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES],
                ciphertext[HEADER_BYTES + NONCE_BYTES :],
                self._aad(header, ref),
            )
        except InvalidTag:
            _fail("tag mismatch: altered ciphertext, or moved to another context")

    def open_many(self, items: Iterable[tuple[ElementRef, bytes]]) -> list[bytes]:
        return [self.open(ref, ciphertext) for ref, ciphertext in items]

    def __repr__(self) -> str:
        return (
            f"<PatientCipher tenant={self.tenant} Patient/{self.patient} "
            f"versions={self.versions} active={self._active}>"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("PatientCipher cannot be pickled")


def _fail(diagnostic: str) -> NoReturn:
    raise DecryptionFailed(diagnostic)
