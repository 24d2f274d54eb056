"""The embedded ledger store: append-only files in ``<data-dir>/ledger/``.

Files (see docs/decisions/ledger-file-store.md for why files and not SQLite)::

    entries.log      header, then one frame per leaf:  u32 length | u32 crc32 | leaf bytes
    checkpoints.log  header, then one frame per signed checkpoint note (UTF-8)
    entries.idx      u64 file offset of each frame      (a cache, rebuilt when short)
    leaves.hash      32-byte RFC 9162 leaf hash of each leaf  (a cache, rebuilt when short)
    LOCK             held (flock) by the one writer

Only ``entries.log`` and ``checkpoints.log`` are evidence; they are written with ``O_DSYNC``
(on disk when the write returns) before an append returns. The two caches are written after,
without fsync, and are recomputed on open from the last frame they cover when a crash left
them short.

**Torn tail.** A crash can leave the last, unacknowledged write incomplete. On open for
writing, an incomplete frame at the end of ``entries.log``, a frame whose checksum fails and
that runs to the end of the file, or trailing zero bytes are cut and reported in
:attr:`FileLedgerStore.recovery`. Damage anywhere *before* the tail is never cut: it is
evidence, and opening refuses with :class:`LedgerDamaged` (``phivault ledger verify`` names it).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from phivault.ledger.errors import LedgerError, LedgerLocked, LedgerUnavailable

__all__ = ["FileLedgerStore", "LedgerDamaged", "TornTailRecovery"]

ENTRIES_MAGIC: Final = b"PVLEDG01"
CHECKPOINTS_MAGIC: Final = b"PVCKPT01"
_FRAME: Final = struct.Struct("<II")
# A frame longer than this is not a leaf we wrote: treat its length field as damage.
MAX_LEAF_BYTES: Final = 1 << 20
_HASH_SIZE: Final = 32
_LEAF_PREFIX: Final = b"\x00"


class LedgerDamaged(LedgerError):
    """A store file is damaged before its tail: refusing to write on top of evidence."""

    def __init__(self, path: Path, index: int, reason: str) -> None:
        super().__init__(
            f"{path.name} is damaged at entry {index} ({reason}); this is not a torn tail, so "
            "nothing was cut. Run `phivault ledger verify` for a diagnosis."
        )
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class TornTailRecovery:
    """What opening cut from the end of ``entries.log`` after a crash."""

    entries_kept: int
    bytes_cut: int
    reason: str


@dataclass(frozen=True)
class _ScanResult:
    offsets: list[int]
    leaves_end: int  # offset just past the last good frame
    bad_reason: str | None  # why scanning stopped before the end of the file, if it did
    trailing_frames_ok: bool  # a good frame follows the bad region (so it is not a tail)


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(_LEAF_PREFIX + leaf).digest()


def _scan_frames(data: memoryview, start: int) -> _ScanResult:
    """Walk frames from ``start``; stop at the end or at the first bad frame."""
    offsets: list[int] = []
    pos = start
    end = len(data)
    header = _FRAME.size
    while pos < end:
        if end - pos < header:
            return _ScanResult(offsets, pos, "incomplete frame header", False)
        length, crc = _FRAME.unpack_from(data, pos)
        if length == 0 and crc == 0:
            reason = "zero bytes"
        elif length > MAX_LEAF_BYTES:
            reason = "impossible frame length"
        elif pos + header + length > end:
            return _ScanResult(offsets, pos, "incomplete frame", False)
        elif zlib.crc32(data[pos + header : pos + header + length]) != crc:
            reason = "checksum mismatch"
        else:
            offsets.append(pos)
            pos += header + length
            continue
        return _ScanResult(offsets, pos, reason, _good_frame_after(data, pos, reason))
    return _ScanResult(offsets, pos, None, False)


def _good_frame_after(data: memoryview, pos: int, reason: str) -> bool:
    # A torn tail is garbage to the end of the file. If the bad region is all zeros, or the
    # bad frame's own length runs to the end, it is a tail. Otherwise, if a well-formed frame
    # can be found after it, the damage sits in the middle of the history.
    rest = bytes(data[pos:])
    if reason == "zero bytes" and rest.count(0) == len(rest):
        return False
    if reason == "checksum mismatch":
        length: int = _FRAME.unpack_from(data, pos)[0]
        return pos + _FRAME.size + length != len(data)
    return len(rest.strip(b"\x00")) > 0


class _AppendFile:
    """An append-only file with a magic header, written with one synchronous write per batch.

    Opened for writing with ``O_DSYNC``: a write returns once its data, and the size it
    adds, are on disk, as a write and an ``fdatasync`` would, in one system call. The writing
    thread gives up the GIL once per batch instead of twice, and each time it takes it back
    it may wait behind a busy event loop (docs/decisions/read-path-cpu.md)."""

    def __init__(self, path: Path, magic: bytes, *, writable: bool) -> None:
        self.path = path
        self.magic = magic
        flags = os.O_RDWR | os.O_DSYNC if writable else os.O_RDONLY
        try:
            self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise LedgerUnavailable(f"{path} does not exist: not a ledger directory") from exc
        except OSError as exc:
            raise LedgerUnavailable(f"cannot open {path}: {exc.strerror}") from exc
        head = os.pread(self.fd, len(magic), 0)
        if head != magic:
            os.close(self.fd)
            raise LedgerDamaged(path, 0, "bad file header")

    def read_all(self) -> bytes:
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0)

    def append_durably(self, data: bytes, expected_end: int) -> None:
        """Write ``data`` at ``expected_end``, durably (``O_DSYNC``); on failure cut back and
        raise."""
        try:
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(self.fd, view[written:], expected_end + written)
        except OSError as exc:
            # Leave no partial batch behind: nothing of it was acknowledged.
            try:
                os.ftruncate(self.fd, expected_end)
                os.fdatasync(self.fd)
            except OSError:
                pass
            reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EFBIG) else exc.strerror
            raise LedgerUnavailable(f"cannot append to {self.path.name}: {reason}") from exc

    def cut(self, end: int) -> None:
        os.ftruncate(self.fd, end)
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def create_store_files(directory: Path) -> None:
    """Lay out an empty ledger store (called once, by ``phivault init``)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, magic in (("entries.log", ENTRIES_MAGIC), ("checkpoints.log", CHECKPOINTS_MAGIC)):
        path = directory / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, magic)
            os.fsync(fd)
        finally:
            os.close(fd)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileLedgerStore:
    """A :class:`~phivault.ledger.ports.LedgerStore` over append-only files.

    Open it ``writable=True`` from exactly one process (a lock enforces it); read-only opens
    (verification, reports, exports) may run beside the writer and see a consistent prefix.
    """

    def __init__(self, directory: Path, *, writable: bool) -> None:
        self.directory = directory
        self.writable = writable
        self.recovery: TornTailRecovery | None = None
        # Read-only opens keep the good prefix and say where damage starts, for verification.
        self.damage: tuple[int, str] | None = None
        self._lock_fd: int | None = None
        if writable:
            self._lock_fd = self._acquire_lock(directory)
        try:
            self._entries = _AppendFile(directory / "entries.log", ENTRIES_MAGIC, writable=writable)
            self._checkpoints_file = _AppendFile(
                directory / "checkpoints.log", CHECKPOINTS_MAGIC, writable=writable
            )
            self._offsets = array("Q")
            self._hashes = bytearray()
            self._end = 0
            self._load_entries()
            self._checkpoint_notes, self._checkpoints_end = self._load_checkpoints()
        except BaseException:
            self._release_lock()
            raise

    # -- opening ----------------------------------------------------------------------------

    @staticmethod
    def _acquire_lock(directory: Path) -> int:
        fd = os.open(directory / "LOCK", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise LedgerLocked(
                f"the ledger in {directory} is open for writing by another process "
                "(is `phivault serve` running?)"
            ) from exc
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load_entries(self) -> None:
        data = memoryview(self._entries.read_all())
        cached_offsets, cached_hashes = self._read_caches(data)
        start = len(ENTRIES_MAGIC)
        if cached_offsets:
            last = cached_offsets[-1]
            (length, _crc) = _FRAME.unpack_from(data, last)
            start = last + _FRAME.size + length
        scan = _scan_frames(data, start)
        offsets = array("Q", cached_offsets)
        offsets.extend(scan.offsets)
        hashes = bytearray(cached_hashes)
        for offset in scan.offsets:
            (length, _crc) = _FRAME.unpack_from(data, offset)
            body = offset + _FRAME.size
            hashes += _leaf_hash(bytes(data[body : body + length]))
        end = scan.leaves_end
        if scan.bad_reason is not None:
            if scan.trailing_frames_ok:
                if self.writable:
                    raise LedgerDamaged(self._entries.path, len(offsets), scan.bad_reason)
                self.damage = (len(offsets), scan.bad_reason)
            elif self.writable:
                self._entries.cut(end)
                self.recovery = TornTailRecovery(len(offsets), len(data) - end, scan.bad_reason)
        self._offsets, self._hashes, self._end = offsets, hashes, end
        if self.writable:
            self._write_caches(len(cached_offsets))

    def _read_caches(self, data: memoryview) -> tuple[array[int], bytes]:
        """The cached offsets and hashes, trimmed to what the entries file confirms."""
        offsets = array("Q")
        try:
            raw = (self.directory / "entries.idx").read_bytes()
            hashes = (self.directory / "leaves.hash").read_bytes()
        except FileNotFoundError:
            return offsets, b""
        count = min(len(raw) // 8, len(hashes) // _HASH_SIZE)
        offsets.frombytes(raw[: count * 8])
        # Trust the caches only as far as they agree with the entries file: check the last one.
        while count:
            off = offsets[count - 1]
            if off + _FRAME.size <= len(data):
                length, crc = _FRAME.unpack_from(data, off)
                body = data[off + _FRAME.size : off + _FRAME.size + length]
                last_hash = hashes[(count - 1) * _HASH_SIZE : count * _HASH_SIZE]
                if (
                    len(body) == length
                    and zlib.crc32(body) == crc
                    and _leaf_hash(bytes(body)) == last_hash
                ):
                    break
            count = 0  # caches disagree with the file: rebuild them from scratch
        del offsets[count:]
        return offsets, hashes[: count * _HASH_SIZE]

    def _write_caches(self, already: int) -> None:
        # Rewrite the caches when they were short or wrong; cheap appends otherwise.
        idx_path, hash_path = self.directory / "entries.idx", self.directory / "leaves.hash"
        mode = "r+b" if already else "wb"
        for path, payload, width in (
            (idx_path, self._offsets.tobytes(), 8),
            (hash_path, bytes(self._hashes), _HASH_SIZE),
        ):
            with open(path, mode if path.exists() else "wb") as fh:
                fh.seek(already * width)
                fh.write(payload[already * width :])
                fh.truncate()
        self._idx_fh = open(idx_path, "ab")  # noqa: SIM115 - held open for the store's life
        self._hash_fh = open(hash_path, "ab")  # noqa: SIM115

    def _load_checkpoints(self) -> tuple[list[str], int]:
        data = memoryview(self._checkpoints_file.read_all())
        scan = _scan_frames(data, len(CHECKPOINTS_MAGIC))
        if scan.bad_reason is not None:
            if scan.trailing_frames_ok and self.writable:
                raise LedgerDamaged(self._checkpoints_file.path, len(scan.offsets), scan.bad_reason)
            if self.writable:
                self._checkpoints_file.cut(scan.leaves_end)
        notes = []
        for offset in scan.offsets:
            (length, _crc) = _FRAME.unpack_from(data, offset)
            raw = bytes(data[offset + _FRAME.size : offset + _FRAME.size + length])
            notes.append(raw.decode("utf-8", errors="replace"))
        return notes, scan.leaves_end

    # -- the LedgerStore port ---------------------------------------------------------------

    def size(self) -> int:
        return len(self._offsets)

    def append(self, leaves: Sequence[bytes]) -> bytes:
        """Append durably; return the concatenated leaf hashes of ``leaves``."""
        if not self.writable:
            raise LedgerUnavailable("the ledger store is open read-only")
        frames = []
        offsets = []
        hashes = bytearray()
        pos = self._end
        for leaf in leaves:
            if len(leaf) > MAX_LEAF_BYTES:
                raise LedgerUnavailable(f"a leaf of {len(leaf)} bytes exceeds {MAX_LEAF_BYTES}")
            frame = _frame(leaf)
            frames.append(frame)
            offsets.append(pos)
            pos += len(frame)
            hashes += _leaf_hash(leaf)
        self._entries.append_durably(b"".join(frames), self._end)
        self._end = pos
        self._offsets.extend(offsets)
        self._hashes += hashes
        # Caches: buffered, never fsync'd; rebuilt on open if a crash left them short.
        self._idx_fh.write(array("Q", offsets).tobytes())
        self._hash_fh.write(hashes)
        return bytes(hashes)

    def read(self, start: int, stop: int) -> list[bytes]:
        if not 0 <= start <= stop <= len(self._offsets):
            raise IndexError(f"entries {start}..{stop} are outside 0..{len(self._offsets)}")
        if start == stop:
            return []
        first = self._offsets[start]
        last_end = self._offsets[stop] if stop < len(self._offsets) else self._end
        blob = os.pread(self._entries.fd, last_end - first, first)
        out = []
        pos = 0
        for _ in range(start, stop):
            length, _crc = _FRAME.unpack_from(blob, pos)
            out.append(blob[pos + _FRAME.size : pos + _FRAME.size + length])
            pos += _FRAME.size + length
        return out

    def scan(self, start: int = 0) -> Iterator[bytes]:
        """Every leaf from ``start``, read and checksummed from the file (for verification)."""
        chunk = 4096
        for first in range(start, len(self._offsets), chunk):
            yield from self.read(first, min(first + chunk, len(self._offsets)))

    def leaf_hashes(self) -> bytes:
        return bytes(self._hashes)

    def checkpoints(self) -> list[str]:
        return list(self._checkpoint_notes)

    def add_checkpoint(self, note: str) -> None:
        if not self.writable:
            raise LedgerUnavailable("the ledger store is open read-only")
        frame = _frame(note.encode("utf-8"))
        self._checkpoints_file.append_durably(frame, self._checkpoints_end)
        self._checkpoints_end += len(frame)
        self._checkpoint_notes.append(note)

    def flush_caches(self) -> None:
        if self.writable:
            self._idx_fh.flush()
            self._hash_fh.flush()

    def close(self) -> None:
        if self.writable:
            self.flush_caches()
            self._idx_fh.close()
            self._hash_fh.close()
        self._entries.close()
        self._checkpoints_file.close()
        self._release_lock()

    # -- raw access for verification of the files themselves -------------------------------

    def raw_frames(self) -> Iterator[tuple[int, bytes | None, str | None]]:
        """(index, leaf or None, damage reason or None) for every frame in ``entries.log``.

        Unlike :meth:`scan`, this reads the whole file regardless of the caches and reports
        damaged frames instead of stopping, so a verifier can name the first bad index.
        """
        data = memoryview(self._entries.read_all())
        pos = len(ENTRIES_MAGIC)
        index = 0
        while pos < len(data):
            scan = _scan_frames(data, pos)
            for offset in scan.offsets:
                (length, _crc) = _FRAME.unpack_from(data, offset)
                yield index, bytes(data[offset + _FRAME.size : offset + _FRAME.size + length]), None
                index += 1
            if scan.bad_reason is None:
                return
            yield index, None, scan.bad_reason
            return
