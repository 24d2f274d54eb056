"""Request and Bundle ids drawn from blocks of OS randomness: well-formed, never repeated,
and not shared with a forked child."""

from __future__ import annotations

import os
import re
import uuid

import pytest

from phivault.api._ids import random_hex, random_uuid_hex


def test_ids_are_well_formed_and_never_repeat() -> None:
    hexes = [random_hex(8) for _ in range(5000)]  # crosses several blocks
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in hexes)
    assert len(set(hexes)) == len(hexes)
    uuids = [random_uuid_hex() for _ in range(2000)]
    assert len(set(uuids)) == len(uuids)
    for text in uuids[:50]:
        parsed = uuid.UUID(hex=text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert len(random_hex(5000)) == 10000  # more than a block at once


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_its_own_ids() -> None:
    random_hex(8)  # the parent holds a block
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, "".join(random_hex(8) for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = "".join(random_hex(8) for _ in range(4))
    assert len(child) == 64 and child != parent
