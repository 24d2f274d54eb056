"""Random ids for requests and Bundles, from the operating system's CSPRNG in blocks.

``os.urandom`` (behind ``secrets.token_hex`` and ``uuid.uuid4``) releases the GIL for its
system call; while storage threads are busy, every request then paid a hand-off of the GIL
to one of them and back. The same bytes are drawn 4 KiB at a time instead and handed out
in order, never twice: ids keep their full randomness. A forked child draws its own block
(the parent's would repeat in it).
"""

from __future__ import annotations

import os
import threading
from typing import Final

__all__ = ["random_hex", "random_uuid_hex"]

_BLOCK: Final = 4096


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._block = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            pid = os.getpid()
            if pid != self._pid or self._at + n > len(self._block):
                self._block = os.urandom(max(_BLOCK, n))
                self._at = 0
                self._pid = pid
            chunk = self._block[self._at : self._at + n]
            self._at += n
            return chunk


_POOL: Final = _Pool()


def random_hex(nbytes: int) -> str:
    """``secrets.token_hex(nbytes)``, from a block drawn ahead."""
    return _POOL.take(nbytes).hex()


def random_uuid_hex() -> str:
    """``uuid.uuid4().hex``: 122 random bits with the version and variant bits set."""
    raw = bytearray(_POOL.take(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()
