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
    per-version prefix is built once, and each element's associated data under the active
    version is cached (bounded), so a repeated element costs one dictionary lookup.
    """

    __slots__ = (
        "_active",
        "_active_aads",
        "_by_header",
        "_keys",
        "_prefixes",
        "_tails",
        "patient",
        "tenant",
    )

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
        # the whole associated data under the active version, per element (the common case)
        self._active_aads: dict[ElementRef, bytes] = {}

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
                self._active_aads.clear()
            self._tails[ref] = tail
        return tail

    def _active_aad(self, ref: ElementRef) -> bytes:
        aad = self._prefixes[self._active] + self._tail(ref)
        self._active_aads[ref] = aad
        return aad

    def seal(self, ref: ElementRef, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        aad = self._active_aads.get(ref) or self._active_aad(ref)
        return (
            aad[_LABEL_BYTES : _LABEL_BYTES + HEADER_BYTES]
            + nonce
            + self._keys[self._active].encrypt(nonce, plaintext, aad)
        )

    def seal_many(self, items: Iterable[tuple[ElementRef, bytes]]) -> list[bytes]:
        """Seal several elements of this patient (one nonce draw for the batch)."""
        batch = list(items)
        version = self._active
        header = self._prefixes[version][_LABEL_BYTES : _LABEL_BYTES + HEADER_BYTES]
        encrypt = self._keys[version].encrypt
        aads, make_aad = self._active_aads, self._active_aad
        nonces = os.urandom(NONCE_BYTES * len(batch))
        out = []
        start = 0
        for ref, plaintext in batch:
            nonce = nonces[start : start + NONCE_BYTES]
            start += NONCE_BYTES
            aad = aads.get(ref) or make_aad(ref)
            out.append(header + nonce + encrypt(nonce, plaintext, aad))
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
        active_header = self._prefixes[self._active][_LABEL_BYTES : _LABEL_BYTES + HEADER_BYTES]
        decrypt = self._keys[self._active].decrypt
        aads, out = self._active_aads, []
        for ref, ciphertext in items:
            aad = aads.get(ref)
            if (
                aad is None
                or ciphertext[:HEADER_BYTES] != active_header
                or len(ciphertext) < OVERHEAD_BYTES
            ):
                out.append(self.open(ref, ciphertext))  # older version or first sight: slow path
                continue
            try:
                out.append(decrypt(ciphertext[HEADER_BYTES:_BODY], ciphertext[_BODY:], aad))
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
