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
from typing import NamedTuple, NoReturn

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
_LABEL_BYTES = len(_AAD_LABEL)
_BODY = HEADER_BYTES + NONCE_BYTES
_MAX_FIELD = 0xFFFF


class ElementRef(NamedTuple):
    """Where an element lives: the context its ciphertext is bound to.

    ``path`` is the element's path inside the resource, with indexes (``name[0].family``).
    A named tuple (hashed in C) because every seal and open looks it up.
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
    The hot path is kept to one AES-GCM call plus two concatenations: the associated data's
    per-version prefix is built once, and each element's tail is cached (bounded).
    """

    __slots__ = ("_active", "_by_header", "_keys", "_prefixes", "_tails", "patient", "tenant")

    _MAX_TAILS = 4096

    def __init__(self, tenant: str, patient: str, keys: Mapping[int, AESGCM], active: int) -> None:
        if active not in keys:
            raise KeyUnavailable("the active data key version is not loaded")
        self.tenant = tenant
        self.patient = patient
        self._keys = dict(keys)
        self._active = active
        base = _lp(tenant) + _lp(patient)
        # header bytes -> (key, associated-data prefix); the header is the key's identity
        self._by_header = {
            _header(version): (key, _AAD_LABEL + _header(version) + base)
            for version, key in keys.items()
        }
        self._prefixes = {version: _AAD_LABEL + _header(version) + base for version in keys}
        self._tails: dict[ElementRef, bytes] = {}

    @property
    def active_version(self) -> int:
        return self._active

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._keys))

    def _tail(self, ref: ElementRef) -> bytes:
        tail = self._tails.get(ref)
        if tail is None:
            if ref.tenant != self.tenant:
                raise InvalidInput("element belongs to another tenant than this cipher")
            tail = _lp(ref.resource_type) + _lp(ref.resource_id) + _lp(ref.path)
            if len(self._tails) >= self._MAX_TAILS:
                self._tails.clear()
            self._tails[ref] = tail
        return tail

    def seal(self, ref: ElementRef, plaintext: bytes) -> bytes:
        version = self._active
        nonce = os.urandom(NONCE_BYTES)
        aad = self._prefixes[version] + self._tail(ref)
        return b"".join(
            (aad[_LABEL_BYTES : _LABEL_BYTES + HEADER_BYTES], nonce,
             self._keys[version].encrypt(nonce, plaintext, aad))
        )  # fmt: skip

    def seal_many(self, items: Iterable[tuple[ElementRef, bytes]]) -> list[bytes]:
        """Seal several elements of this patient (one nonce draw for the batch)."""
        batch = list(items)
        version = self._active
        prefix = self._prefixes[version]
        header = prefix[_LABEL_BYTES : _LABEL_BYTES + HEADER_BYTES]
        encrypt = self._keys[version].encrypt
        tail = self._tail
        nonces = os.urandom(NONCE_BYTES * len(batch))
        out = []
        for i, (ref, plaintext) in enumerate(batch):
            nonce = nonces[i * NONCE_BYTES : (i + 1) * NONCE_BYTES]
            out.append(b"".join((header, nonce, encrypt(nonce, plaintext, prefix + tail(ref)))))
        return out

    def open(self, ref: ElementRef, ciphertext: bytes) -> bytes:
        entry = self._by_header.get(ciphertext[:HEADER_BYTES])
        if entry is None or len(ciphertext) < OVERHEAD_BYTES:
            if len(ciphertext) < OVERHEAD_BYTES or ciphertext[0] != FORMAT_V1:
                _fail("not a phivault v1 ciphertext (format byte or length)")
            _fail("names a data key version that is not live (retired, shredded or unknown)")
        key, prefix = entry
        tail = self._tails.get(ref) or self._tail(ref)
        try:
            return key.decrypt(ciphertext[HEADER_BYTES:_BODY], ciphertext[_BODY:], prefix + tail)
        except InvalidTag:
            _fail("tag mismatch: altered ciphertext, or moved to another context")

    def open_many(self, items: Iterable[tuple[ElementRef, bytes]]) -> list[bytes]:
        """Open several elements of this patient (the same checks as :meth:`open`)."""
        by_header, tails, out = self._by_header, self._tails, []
        for ref, ciphertext in items:
            entry = by_header.get(ciphertext[:HEADER_BYTES])
            tail = tails.get(ref)
            if entry is None or tail is None or len(ciphertext) < OVERHEAD_BYTES:
                out.append(self.open(ref, ciphertext))
                continue
            try:
                out.append(
                    entry[0].decrypt(
                        ciphertext[HEADER_BYTES:_BODY], ciphertext[_BODY:], entry[1] + tail
                    )
                )
            except InvalidTag:
                _fail("tag mismatch: altered ciphertext, or moved to another context")
        return out

    def __repr__(self) -> str:
        return (
            f"<PatientCipher tenant={self.tenant} Patient/{self.patient} "
            f"versions={self.versions} active={self._active}>"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("PatientCipher cannot be pickled")


def _fail(diagnostic: str) -> NoReturn:
    raise DecryptionFailed(diagnostic)
