"""A bounded, expiring cache of unwrapped data keys (as ready ciphers), wiped on seal.

Why: unwrapping a DEK on every element would cost a KEK decryption per read; caching the
patient's cipher makes sealing and opening cost one AES-GCM call. Bounded in size (LRU) and in
lifetime (TTL on a monotonic clock passed in for tests), so that a key lives in memory only as
long as it is in use; :meth:`clear` runs on seal, on rotation and on shred.

The :attr:`epoch` changes on every eviction. A caller that reads a key store and then caches
what it read passes the epoch it saw *before* reading to :meth:`put`: if anything was evicted
meanwhile (a shred's invalidation arrived while the read was in flight), the value may predate
the shred and is not cached.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["KeyCache"]

V = TypeVar("V")


class KeyCache(Generic[V]):
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 0 or ttl_s < 0:
            raise ValueError("cache size and lifetime must not be negative")
        self._max = max_entries
        self._ttl = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, V]] = OrderedDict()
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """Changes whenever an entry is evicted or the cache cleared (not on expiry)."""
        return self._epoch

    def get(self, key: tuple[str, str]) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: tuple[str, str], value: V, *, epoch: int | None = None) -> None:
        """Cache ``value``; with ``epoch``, only if nothing was evicted since that epoch."""
        if self._max == 0 or (epoch is not None and epoch != self._epoch):
            return
        self._entries[key] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def evict(self, key: tuple[str, str]) -> None:
        self._epoch += 1
        self._entries.pop(key, None)

    def evict_tenant(self, tenant: str) -> None:
        self._epoch += 1
        for key in [k for k in self._entries if k[0] == tenant]:
            del self._entries[key]

    def clear(self) -> None:
        self._epoch += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<KeyCache {len(self._entries)}/{self._max} ttl={self._ttl}s>"
