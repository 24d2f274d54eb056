"""SIGKILL the writer at random moments: no acknowledged event is ever lost, and the ledger
always verifies (torn tails are cut and reported on the next open)."""

from __future__ import annotations

import asyncio
import contextlib
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


class _Writers:
    """The writer's fork server (crash_writer.py --fork-server): every round's writer is
    forked from one process that imported phivault once. Starting an interpreter per round
    cost about 0.4 s of CPU in imports, 10 s over the rounds; the writer, its load and the
    SIGKILL are the same."""

    def __init__(self, errors: Path) -> None:
        self.errors = errors
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.pid: int | None = None  # the writer of the current round
        with errors.open("wb") as stderr:
            self.server = subprocess.Popen(
                [sys.executable, str(WRITER), "--fork-server"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
            )

    def line(self) -> bytes:
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        assert line, f"the fork server exited: {self.errors.read_text()[-2000:]}"
        return line

    def start(self, data_dir: Path, start: int) -> tuple[int, list[bytes]]:
        """Fork a writer; return its pid once it is ready, and what it printed so far."""
        assert self.server.stdin is not None
        self.server.stdin.write(f"{data_dir} {start}\n".encode())
        self.server.stdin.flush()
        pid, ready, lines = None, False, []
        while pid is None or not ready:
            line = self.line()
            if line.startswith(b"forked "):
                pid = self.pid = int(line.split()[1])
            elif line == b"ready\n":
                ready = True
            elif not line.startswith(b"recovered"):
                assert ready, f"{line!r}: {self.errors.read_text()[-2000:]}"
                lines.append(line)
        return pid, lines

    def until_exited(self) -> list[bytes]:
        """What the writer printed until it was gone."""
        lines = []
        while not (line := self.line()).startswith(b"exited "):
            lines.append(line)
        self.pid = None
        return lines

    def close(self) -> None:
        """Stop the fork server, and a writer a failed round left running."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.server.stdin is not None:
            self.server.stdin.close()
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()


def _run_and_kill(
    writers: _Writers, data_dir: Path, start: int, rng: random.Random
) -> dict[int, str]:
    """Start the writer, let it append for a random while, SIGKILL it; return its acks."""
    pid, early = writers.start(data_dir, start)
    time.sleep(rng.uniform(0.02, 0.4))
    os.kill(pid, signal.SIGKILL)
    acks: dict[int, str] = {}
    for raw in [*early, *writers.until_exited()]:
        parts = raw.decode().split()
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


@pytest.mark.slow  # a crash loop: 25 rounds of start, load, SIGKILL, recover, verify
def test_sigkill_under_load_loses_no_acknowledged_event(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    directory = DataDir.create(tmp_path / "data", dev=True, origin="phivault.test/crash")
    initialize_ledger(directory)
    acknowledged: dict[int, str] = {}
    start = 0
    writers = _Writers(tmp_path / "writer-errors.log")
    request.addfinalizer(writers.close)
    for _round in range(KILLS):
        acks = _run_and_kill(writers, directory.path, start, rng)
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
