"""PostgreSQL advisory lock keys: one derivation for every advisory lock phivault takes.

A key is the first 8 bytes of SHA-256 of a name, read as a signed 64-bit integer (what
``pg_advisory_lock`` and friends take). Names are namespaced by purpose and by schema
(``phivault.ledger.writer:<schema>``), so locks of different purposes, and those of
deployments sharing a database under other schemas, never collide. Operators find a holder
with ``SELECT pid FROM pg_locks WHERE locktype = 'advisory'`` and
``(classid::bigint << 32 | objid::bigint)`` equal to the key read as unsigned 64 bits.

The derivation must never change for an existing name: a process of the previous release
and one of this release must exclude each other during a rolling upgrade.
"""

from __future__ import annotations

import hashlib

__all__ = ["advisory_key"]


def advisory_key(name: str) -> int:
    """The advisory lock key of ``name`` (ASCII)."""
    digest = hashlib.sha256(name.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
