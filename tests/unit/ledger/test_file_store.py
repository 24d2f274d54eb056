"""The embedded file store: durability, torn tails, damage, caches, the one-writer lock."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from phivault.datadir import DataDir
from phivault.ledger.errors import LedgerLocked, LedgerUnavailable
from phivault.ledger.file_store import FileLedgerStore, LedgerDamaged
from phivault.ledger.merkle import leaf_hash


def _leaves(n: int, start: int = 0) -> list[bytes]:
    return [f'{{"n":{i}}}'.encode() for i in range(start, start + n)]


def test_append_read_scan_and_reopen(data_dir: DataDir) -> None:
    store = FileLedgerStore(data_dir.ledger_dir, writable=True)
    hashes = store.append(_leaves(10))
    assert hashes == b"".join(leaf_hash(leaf) for leaf in _leaves(10))
    store.append(_leaves(5, start=10))
    assert store.size() == 15
    assert store.read(3, 6) == _leaves(3, start=3)
    assert list(store.scan(12)) == _leaves(3, start=12)
    store.close()

    reopened = FileLedgerStore(data_dir.ledger_dir, writable=True)
    assert reopened.size() == 15
    assert reopened.recovery is None
    assert reopened.leaf_hashes() == b"".join(leaf_hash(leaf) for leaf in _leaves(15))
    reopened.close()


def test_the_writer_writes_evidence_synchronously(data_dir: DataDir) -> None:
    """The writer's evidence files are open with O_DSYNC: an append is on disk when its
    write returns (one system call per batch, no separate fdatasync); readers' are not."""
    import fcntl

    writer = FileLedgerStore(data_dir.ledger_dir, writable=True)
    reader = FileLedgerStore(data_dir.ledger_dir, writable=False)
    try:
        for store, synchronous in ((writer, True), (reader, False)):
            for file in (store._entries, store._checkpoints_file):
                flags = fcntl.fcntl(file.fd, fcntl.F_GETFL)
                assert bool(flags & os.O_DSYNC) is synchronous, file.path.name
    finally:
        reader.close()
        writer.close()


def test_one_writer_at_a_time_but_readers_alongside(data_dir: DataDir) -> None:
    writer = FileLedgerStore(data_dir.ledger_dir, writable=True)
    writer.append(_leaves(3))
    with pytest.raises(LedgerLocked, match="open for writing by another process"):
        FileLedgerStore(data_dir.ledger_dir, writable=True)
    reader = FileLedgerStore(data_dir.ledger_dir, writable=False)
    assert reader.size() == 3
    with pytest.raises(LedgerUnavailable, match="read-only"):
        reader.append(_leaves(1))
    reader.close()
    writer.close()


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (struct.pack("<II", 100, 0) + b"partial", "incomplete frame"),
        (b"\x07\x00", "incomplete frame header"),
        (bytes(64), "zero bytes"),
        (struct.pack("<II", 4, 12345) + b"abcd", "checksum mismatch"),
    ],
)
def test_a_torn_tail_is_cut_and_reported(data_dir: DataDir, garbage: bytes, reason: str) -> None:
    store = FileLedgerStore(data_dir.ledger_dir, writable=True)
    store.append(_leaves(4))
    store.close()
    with (data_dir.ledger_dir / "entries.log").open("ab") as fh:
        fh.write(garbage)

    reopened = FileLedgerStore(data_dir.ledger_dir, writable=True)
    assert reopened.size() == 4
    assert reopened.recovery is not None
    assert reopened.recovery.entries_kept == 4
    assert reopened.recovery.bytes_cut == len(garbage)
    assert reopened.recovery.reason == reason
    reopened.append(_leaves(1, start=4))
    reopened.close()
    again = FileLedgerStore(data_dir.ledger_dir, writable=True)
    assert again.recovery is None
    assert again.read(0, 5) == _leaves(5)
    again.close()


def test_damage_before_the_tail_is_never_cut(data_dir: DataDir) -> None:
    store = FileLedgerStore(data_dir.ledger_dir, writable=True)
    store.append(_leaves(6))
    store.close()
    path = data_dir.ledger_dir / "entries.log"
    data = bytearray(path.read_bytes())
    data[8 + 8 + 2] ^= 0xFF  # a byte inside the first leaf
    path.write_bytes(bytes(data))
    (data_dir.ledger_dir / "entries.idx").unlink()  # force a full scan

    with pytest.raises(LedgerDamaged, match="damaged at entry 0"):
        FileLedgerStore(data_dir.ledger_dir, writable=True)
    assert path.read_bytes() == bytes(data)  # nothing was cut

    reader = FileLedgerStore(data_dir.ledger_dir, writable=False)
    assert reader.damage == (0, "checksum mismatch")
    frames = list(reader.raw_frames())
    assert frames[0] == (0, None, "checksum mismatch")
    reader.close()


def test_caches_are_rebuilt_when_missing_short_or_wrong(data_dir: DataDir) -> None:
    store = FileLedgerStore(data_dir.ledger_dir, writable=True)
    store.append(_leaves(20))
    expected = store.leaf_hashes()
    store.close()
    idx, hashes = data_dir.ledger_dir / "entries.idx", data_dir.ledger_dir / "leaves.hash"

    hashes.write_bytes(hashes.read_bytes()[: 32 * 7])  # short: a crash before the cache write
    reopened = FileLedgerStore(data_dir.ledger_dir, writable=True)
    assert reopened.leaf_hashes() == expected
    reopened.close()

    hashes.write_bytes(bytes(32 * 20))  # wrong: must not be trusted
    reopened = FileLedgerStore(data_dir.ledger_dir, writable=True)
    assert reopened.leaf_hashes() == expected
    reopened.close()

    idx.unlink()
    hashes.unlink()
    reopened = FileLedgerStore(data_dir.ledger_dir, writable=True)
    assert reopened.leaf_hashes() == expected
    assert reopened.read(19, 20) == _leaves(1, start=19)
    reopened.close()


def test_a_failing_disk_fails_the_append_and_leaves_no_partial_batch(data_dir: DataDir) -> None:
    # A real failure, not a mock: the child may not grow files past a limit (EFBIG).
    size_now = (data_dir.ledger_dir / "entries.log").stat().st_size
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from phivault.ledger.file_store import FileLedgerStore
        from phivault.ledger.errors import LedgerUnavailable
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = FileLedgerStore(Path({str(data_dir.ledger_dir)!r}), writable=True)
        store.append([b'{{"ok":1}}'])
        resource.setrlimit(resource.RLIMIT_FSIZE, ({size_now} + 200, {size_now} + 200))
        try:
            store.append([b'x' * 1000])
        except LedgerUnavailable as exc:
            print("refused:", exc)
        print("size", store.size())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "refused: cannot append to entries.log: disk full" in result.stdout
    assert "size 1" in result.stdout
    reopened = FileLedgerStore(data_dir.ledger_dir, writable=True)
    assert reopened.size() == 1
    assert reopened.recovery is None  # the failed batch was cut back by the store itself
    reopened.close()


def test_a_file_with_a_foreign_header_is_refused(tmp_path: Path) -> None:
    from phivault.ledger.file_store import create_store_files

    create_store_files(tmp_path / "ledger")
    (tmp_path / "ledger" / "entries.log").write_bytes(b"NOTALEDGER")
    with pytest.raises(LedgerDamaged, match="bad file header"):
        FileLedgerStore(tmp_path / "ledger", writable=False)
    assert os.path.exists(tmp_path / "ledger" / "entries.log")
