"""The DEK cache: bounded in size (LRU) and lifetime (TTL on an injected clock)."""

from __future__ import annotations

from phivault.crypto.cache import KeyCache


def test_lru_bound_and_ttl() -> None:
    now = [0.0]
    cache: KeyCache[int] = KeyCache(2, 10.0, clock=lambda: now[0])
    cache.put(("t", "a"), 1)
    cache.put(("t", "b"), 2)
    assert cache.get(("t", "a")) == 1  # a is now most recently used
    cache.put(("t", "c"), 3)
    assert cache.get(("t", "b")) is None and len(cache) == 2
    now[0] = 10.0
    assert cache.get(("t", "a")) is None and cache.get(("t", "c")) is None


def test_zero_size_caches_nothing_and_clear_wipes() -> None:
    assert len(KeyCache[int](0, 1.0)) == 0
    cache: KeyCache[int] = KeyCache(5, 60.0)
    cache.put(("t", "a"), 1)
    cache.put(("u", "b"), 2)
    cache.evict_tenant("t")
    assert cache.get(("t", "a")) is None and cache.get(("u", "b")) == 2
    cache.clear()
    assert len(cache) == 0


def test_a_value_read_before_an_eviction_is_not_cached() -> None:
    # A cache miss reads the key store; a shred's invalidation arrives while the read is in
    # flight (the read may predate the shred): what it read must not be cached.
    cache: KeyCache[int] = KeyCache(5, 60.0)
    seen = cache.epoch
    cache.evict(("t", "a"))
    cache.put(("t", "a"), 1, epoch=seen)
    assert cache.get(("t", "a")) is None
    seen = cache.epoch
    cache.put(("t", "a"), 2, epoch=seen)
    assert cache.get(("t", "a")) == 2
    cache.clear()
    cache.put(("t", "b"), 3, epoch=seen)  # clear() counts as an eviction
    assert cache.get(("t", "b")) is None
