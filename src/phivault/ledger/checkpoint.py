"""C2SP transparency-log checkpoints (https://c2sp.org/tlog-checkpoint): signed tree heads.

A checkpoint commits the ledger to its size and root hash under the ledger's key. Auditors and
witnesses keep them; any later checkpoint must be consistent with every earlier one, which is
what turns "the ledger was rewritten" into a verifiable fact. The body is::

    <origin>
    <tree size in decimal>
    <base64 root hash>
    [<extension line>...]

signed as a note (:mod:`phivault.ledger.note`). Parsing is strict, so that one checkpoint has
exactly one text and therefore one signature to check.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

from phivault.ledger.errors import InvalidProof
from phivault.ledger.merkle import HASH_SIZE
from phivault.ledger.note import MalformedNote, NoteSigner, NoteVerifier, open_note, sign_note

__all__ = [
    "Checkpoint",
    "MalformedCheckpoint",
    "OriginMismatch",
    "open_checkpoint",
    "parse_checkpoint",
    "sign_checkpoint",
    "unverified_checkpoint",
]

_MAX_SIZE: Final = 2**64 - 1  # tree sizes are uint64 in RFC 9162
_SIZE: Final = re.compile("0|[1-9][0-9]{0,19}")  # ASCII digits only, unlike int()
_BAD_LINE: Final = re.compile("[\x00-\x1f]")


class MalformedCheckpoint(MalformedNote):
    """The note verified, but its text is not a well-formed checkpoint."""


class OriginMismatch(InvalidProof):
    """The checkpoint is for another log than the one expected."""


def _line_problem(line: str) -> str | None:
    if not line:
        return "is empty"
    if _BAD_LINE.search(line):
        return "contains a newline or control character"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode"
    return None


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: which log (``origin``), how many leaves, and their root hash."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = _line_problem(self.origin)
        if problem:
            raise ValueError(f"checkpoint origin {problem}")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise TypeError("checkpoint size must be an int")
        if not 0 <= self.size <= _MAX_SIZE:
            raise ValueError(f"checkpoint size must be between 0 and 2**64 - 1, got {self.size}")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise ValueError(f"checkpoint root hash must be {HASH_SIZE} bytes")
        for number, line in enumerate(self.extensions, start=1):
            problem = _line_problem(line)
            if problem:
                raise ValueError(f"checkpoint extension line {number} {problem}")

    def body(self) -> str:
        """The note text: origin, size, base64 root, extension lines, each ending in newline."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        return "".join(
            f"{line}\n" for line in (self.origin, str(self.size), root, *self.extensions)
        )


def parse_checkpoint(body: str) -> Checkpoint:
    """Parse a checkpoint body strictly; raise :class:`MalformedCheckpoint` if it is not one."""
    if not body.endswith("\n"):
        raise MalformedCheckpoint("checkpoint must end with a newline")
    lines = body[:-1].split("\n")
    if len(lines) < 3:
        raise MalformedCheckpoint("checkpoint needs an origin, a size and a root hash")
    for number, line in enumerate(lines, start=1):
        problem = _line_problem(line)
        if problem:
            raise MalformedCheckpoint(f"checkpoint line {number} {problem}")
    origin, size_text, root_text, *extensions = lines
    if _SIZE.fullmatch(size_text) is None or int(size_text) > _MAX_SIZE:
        raise MalformedCheckpoint("checkpoint size must be a decimal uint64 without leading zeros")
    try:
        root_hash = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedCheckpoint("checkpoint root hash is not base64") from None
    if len(root_hash) != HASH_SIZE or base64.b64encode(root_hash).decode("ascii") != root_text:
        raise MalformedCheckpoint(f"checkpoint root hash must be {HASH_SIZE} bytes, in base64")
    return Checkpoint(origin, int(size_text), root_hash, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> str:
    """The signed note of ``checkpoint``."""
    return sign_note(checkpoint.body(), signer)


def open_checkpoint(note: str, verifier: NoteVerifier, *, origin: str | None = None) -> Checkpoint:
    """Verify a checkpoint note's signature (and origin, if given) and parse it.

    Raises :class:`~phivault.ledger.note.MalformedNote`, :class:`~phivault.ledger.note.UnknownKey`,
    :class:`~phivault.ledger.note.BadSignature`, :class:`MalformedCheckpoint` or
    :class:`OriginMismatch`, all of them :class:`~phivault.ledger.errors.InvalidProof`.
    """
    checkpoint = parse_checkpoint(open_note(note, verifier))
    if origin is not None and checkpoint.origin != origin:
        raise OriginMismatch(f"checkpoint is for origin {checkpoint.origin!r}, not {origin!r}")
    return checkpoint


def unverified_checkpoint(note: str) -> Checkpoint:
    """The checkpoint inside a signed note, for display and sizes: the signature is NOT checked.

    Use :func:`open_checkpoint` wherever trust matters (verification, anything from outside).
    """
    # Signatures follow the note's last blank line (C2SP signed-note).
    text, separator, _signatures = note.rpartition("\n\n")
    if not separator:
        raise MalformedCheckpoint("not a signed note: no blank line before signatures")
    return parse_checkpoint(text + "\n")
