"""SIGKILL the writer at random moments: no acknowledged event is ever lost, and the ledger
always verifies (torn tails are cut and reported on the next open)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phivault.datadir import DataDir
from phivault.ledger.note import NoteVerifier
from phivault.ledger.service import (
    initialize_ledger,
    open_ledger,
    open_ledger_readonly,
    verifier_key_of,
)
from phivault.ledger.verify import Damaged, verify_ledger

pytestmark = pytest.mark.integration

KILLS = 25
WRITER = Path(__file__).with_name("crash_writer.py")


def _run_and_kill(data_dir: Path, start: int, rng: random.Random) -> dict[int, str]:
    """Start the writer, let it append for a random while, SIGKILL it; return its acks."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = subprocess.Popen(
        [sys.executable, str(WRITER), str(data_dir), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    while line.startswith(b"recovered"):
        line = child.stdout.readline()
    assert line == b"ready\n", child.stderr.read() if child.stderr else line
    time.sleep(rng.uniform(0.02, 0.4))
    child.send_signal(signal.SIGKILL)
    out, _err = child.communicate(timeout=30)
    acks: dict[int, str] = {}
    for raw in out.decode().splitlines():
        parts = raw.split()
        if len(parts) == 3 and parts[0] == "ack":  # a line cut by the kill is not an ack
            acks[int(parts[1])] = parts[2]
    return acks


def _verify(directory: DataDir) -> int:
    verifier = NoteVerifier.from_verifier_key(verifier_key_of(directory))
    with open_ledger_readonly(directory) as store:

        def leaves() -> Iterator[bytes | Damaged]:
            for _index, leaf, reason in store.raw_frames():
                yield leaf if leaf is not None else Damaged(reason or "damaged")

        return verify_ledger(leaves, store.checkpoints(), verifier, thorough=True).entries


def test_sigkill_under_load_loses_no_acknowledged_event(tmp_path: Path) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    directory = DataDir.create(tmp_path / "data", dev=True, origin="phivault.test/crash")
    initialize_ledger(directory)
    acknowledged: dict[int, str] = {}
    start = 0
    for _round in range(KILLS):
        acks = _run_and_kill(directory.path, start, rng)
        start += 1_000_000  # request ids never repeat across rounds
        overlap = set(acks) & set(acknowledged)
        assert not overlap, f"indexes acknowledged twice: {sorted(overlap)[:5]}"
        acknowledged.update(acks)

        # Opening for writing cuts a torn tail, then everything acknowledged must be there.
        async def check(acks: dict[int, str]) -> int:
            async with open_ledger(directory) as ledger:
                for index, request_id in acks.items():
                    assert ledger.read(index).document["request_id"] == request_id
                return ledger.size

        size = asyncio.run(check(acks))
        assert size >= len(acknowledged)
        assert _verify(directory) == size
    assert len(acknowledged) > KILLS  # the writer really was under load when killed
    # Every acknowledged event, from every round, is still where it was acknowledged.
    with open_ledger_readonly(directory) as store:
        for index, request_id in acknowledged.items():
            (leaf,) = store.read(index, index + 1)
            assert json.loads(leaf)["request_id"] == request_id
