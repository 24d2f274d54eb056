"""Blind indexes: equality search over encrypted elements with keyed, truncated HMAC tokens.

Why: the records store must find "family name = Smith" without holding "Smith". A token is
``base64url(HMAC-SHA256(field key, normalize(value))[:16])`` (22 characters). The field key is
derived (HKDF-SHA256) from the tenant's blind-index key of that version and the field name, so
tokens are scoped per tenant and per field: equal values in two fields or two tenants give
unrelated tokens. 128 bits of truncation: see ``docs/decisions/crypto-blind-index.md``.

Normalization (documented, pinned by tests), so that the values people mean alike match:

* ``name``: Unicode NFKD, combining marks dropped, case folded, every run of characters that are
  not letters or digits becomes one space, trimmed ("  O'Brien-Smith " ~ "o brien smith").
* ``identifier``: NFKC, upper case, spaces, hyphens, dots and slashes dropped; the identifier
  system, if given, is part of the value (``system|value``), compared exactly.
* ``phone``: digits only; a leading ``00`` becomes ``+``; without ``+`` and with exactly 10
  digits, the default country code (1) is prepended; result in E.164 style (``+15551234567``).
* ``date``: a FHIR date (``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``) or the date part of a dateTime,
  validated; matched at the precision given.
* ``exact``: NFC only (codes, e-mail local parts where case matters).

During an index-key rotation both versions are live: writes carry tokens of every live version
and lookups ask for all of them, so search keeps working while the store is re-indexed.
"""

from __future__ import annotations

import base64
import hmac
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phivault.crypto.errors import KeyUnavailable
from phivault.errors import InvalidInput

__all__ = [
    "TOKEN_BYTES",
    "BlindIndexer",
    "BlindToken",
    "IndexField",
    "Normalization",
    "normalize",
]

TOKEN_BYTES = 16


class Normalization(StrEnum):
    NAME = "name"
    IDENTIFIER = "identifier"
    PHONE = "phone"
    DATE = "date"
    EXACT = "exact"


_FIELD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._\-]{0,127}$")


@dataclass(frozen=True, slots=True)
class IndexField:
    """A searchable field: its name (e.g. ``Patient.name.family``) and how values normalize."""

    name: str
    normalization: Normalization

    def __post_init__(self) -> None:
        if not _FIELD_RE.match(self.name):
            raise InvalidInput("blind-index field names are letters, digits, . _ -")


@dataclass(frozen=True, slots=True)
class BlindToken:
    """A token of one field's value under one blind-index key version."""

    field: str
    version: int
    token: str


_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T.*)?$")


def _normalize_name(value: str) -> str:
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()
    words = [w for w in re.split(r"[\W_]+", stripped) if w]
    return " ".join(words)


def _normalize_identifier(value: str) -> str:
    return re.sub(r"[\s\-./]+", "", unicodedata.normalize("NFKC", value)).upper()


def _normalize_phone(value: str, default_country: str = "1") -> str:
    text = value.strip()
    digits = re.sub(r"\D", "", text)
    if text.startswith("+"):
        international = True
    elif digits.startswith("00"):
        digits, international = digits[2:], True
    else:
        international = False
    if not international and len(digits) == 10:
        digits = default_country + digits
    if not 7 <= len(digits) <= 15:
        raise InvalidInput("not a phone number (7 to 15 digits expected)")
    return "+" + digits


def _normalize_date(value: str) -> str:
    match = _DATE_RE.match(value.strip())
    if match is None:
        raise InvalidInput("not a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)")
    year, month, day = match.group(1), match.group(2), match.group(3)
    try:
        date(int(year), int(month or 1), int(day or 1))
    except ValueError as exc:
        raise InvalidInput("not a valid calendar date") from exc
    return "-".join(part for part in (year, month, day) if part)


def normalize(normalization: Normalization, value: str) -> str:
    """The canonical form of ``value`` for its kind of field (see the module docstring)."""
    if normalization is Normalization.NAME:
        result = _normalize_name(value)
    elif normalization is Normalization.IDENTIFIER:
        result = _normalize_identifier(value)
    elif normalization is Normalization.PHONE:
        result = _normalize_phone(value)
    elif normalization is Normalization.DATE:
        result = _normalize_date(value)
    else:
        result = unicodedata.normalize("NFC", value)
    if not result:
        raise InvalidInput("value is empty after normalization")
    return result


def derive_field_key(index_key: bytes, tenant: str, field: str, version: int) -> bytes:
    """HKDF-SHA256 of a tenant's index key for one field (domain-separated by tenant/field)."""
    info = f"phivault.blind-index.v1|{tenant}|{field}|{version}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(index_key)


class BlindIndexer:
    """Computes blind-index tokens for one tenant. Obtain it from ``KeyRing.blind_indexer``.

    It holds derived per-field keys (never the tenant's index key itself after derivation is
    done by the key ring) and cannot be printed with them.
    """

    __slots__ = ("_active", "_field_keys", "_index_keys", "tenant")

    def __init__(self, tenant: str, index_keys: Mapping[int, bytes], active: int) -> None:
        if active not in index_keys:
            raise KeyUnavailable("the active blind-index key version is not loaded")
        self.tenant = tenant
        self._index_keys = dict(index_keys)
        self._active = active
        self._field_keys: dict[tuple[str, int], bytes] = {}

    @property
    def active_version(self) -> int:
        return self._active

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._index_keys))

    def _field_key(self, field: str, version: int) -> bytes:
        cached = self._field_keys.get((field, version))
        if cached is None:
            key = self._index_keys.get(version)
            if key is None:
                raise KeyUnavailable(f"blind-index key version {version} is not live")
            cached = derive_field_key(key, self.tenant, field, version)
            self._field_keys[(field, version)] = cached
        return cached

    def _token(self, field: IndexField, normalized: bytes, version: int) -> BlindToken:
        digest = hmac.digest(self._field_key(field.name, version), normalized, "sha256")
        token = base64.urlsafe_b64encode(digest[:TOKEN_BYTES]).rstrip(b"=").decode()
        return BlindToken(field.name, version, token)

    def token(self, field: IndexField, value: str, *, version: int | None = None) -> BlindToken:
        """The token of ``value`` under the active version (or the one given)."""
        normalized = normalize(field.normalization, value).encode()
        return self._token(field, normalized, self._active if version is None else version)

    def tokens(self, field: IndexField, value: str) -> tuple[BlindToken, ...]:
        """Tokens under every live version: store all of them on write, look up by any."""
        normalized = normalize(field.normalization, value).encode()
        return tuple(self._token(field, normalized, v) for v in sorted(self._index_keys))

    def __repr__(self) -> str:
        return f"<BlindIndexer tenant={self.tenant} versions={self.versions}>"
