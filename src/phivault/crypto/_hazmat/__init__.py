"""HAZARDOUS MATERIALS: raw key bytes live here and nowhere else.

Why a fenced package: the rest of phivault must be unable to touch key bytes by accident
(STYLE.md habit 2). Only key management inside :mod:`phivault.crypto` imports this package
(the key ring, the root key providers, the keystore); records, API and CLI code use the safe
face, :mod:`phivault.crypto`. A test checks that no module outside ``phivault.crypto`` imports
it. Nothing here logs, and no repr, str or exception message carries key bytes.
"""

from phivault.crypto._hazmat.keys import (
    SecretKey,
    aead,
    generate_key,
    rewrap_key,
    unwrap_key,
    wrap_key,
)
from phivault.crypto._hazmat.shamir import Share, combine, split

__all__ = [
    "SecretKey",
    "Share",
    "aead",
    "combine",
    "generate_key",
    "rewrap_key",
    "split",
    "unwrap_key",
    "wrap_key",
]
