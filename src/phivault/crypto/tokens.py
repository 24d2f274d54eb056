"""Keyed tokens for audit events: HMAC of an identifier instead of the identifier.

Why: audit events must be searchable by, say, an MRN or a query without carrying it
(DESIGN.md invariant 4). A token is ``base64url(HMAC-SHA256(k, kind | value)[:16])``, 22
characters, which fits the ledger's ``KeyedToken`` grammar. The key is the tenant's
ledger-token key (versioned like every key); ``kind`` separates domains (``mrn``, ``query``).
"""

from __future__ import annotations

import base64
import hmac
import re

from phivault.errors import InvalidInput

__all__ = ["LedgerTokenizer"]

_KIND = re.compile(r"^[a-z][a-z0-9\-]{0,31}$")


class LedgerTokenizer:
    """Tokens under a tenant's active ledger-token key. Obtain it from the key ring."""

    __slots__ = ("_key", "tenant", "version")

    def __init__(self, tenant: str, key: bytes, version: int) -> None:
        self.tenant = tenant
        self.version = version
        self._key = key

    def token(self, kind: str, value: str) -> str:
        if not _KIND.match(kind):
            raise InvalidInput("token kinds are lower-case words joined by hyphens")
        message = f"phivault.ledger-token.v1|{kind}|".encode() + value.encode()
        digest = hmac.digest(self._key, message, "sha256")[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def __repr__(self) -> str:
        return f"<LedgerTokenizer tenant={self.tenant} version={self.version}>"
