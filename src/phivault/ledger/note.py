"""C2SP signed notes (https://c2sp.org/signed-note) with Ed25519 signatures.

The ledger's checkpoints are signed notes so that standard transparency-log tooling and
witnesses can check them, and so that an auditor holding only our verifier key can check a
checkpoint offline. A note is a text, a blank line, and signature lines::

    <text ending in a newline>

    — <key name> base64(4-byte key id || signature)

Verification follows the spec's rules: signatures from other keys (witness cosignatures, a
rotated key) are ignored, a signature from our key that fails rejects the whole note, and a
note without a good signature from our key is rejected. Every failure raises a precise subclass
of :class:`~phivault.ledger.errors.InvalidProof`; nothing returns a bool.

Only public keys live here. Private signing keys are handled in
:mod:`phivault.crypto.signing`, behind the :class:`NoteSigner` protocol.
"""

from __future__ import annotations

import base64
import binascii
import re
from hashlib import sha256
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from phivault.errors import InvalidInput
from phivault.ledger.errors import InvalidProof

__all__ = [
    "ED25519",
    "BadSignature",
    "MalformedNote",
    "NoteSigner",
    "NoteVerifier",
    "UnknownKey",
    "format_verifier_key",
    "key_id_for",
    "open_note",
    "sign_note",
]

# The signature type byte the spec assigns to Ed25519 (part of the key id and verifier key).
ED25519: Final = 0x01
_KEY_ID_SIZE: Final = 4
_PUBLIC_KEY_SIZE: Final = 32
_SIGNATURE_SIZE: Final = 64
_SIGNATURE_PREFIX: Final = "\u2014 "  # em dash, space
# The spec asks verifiers to cap signatures and to accept at least 16.
_MAX_SIGNATURES: Final = 100
_CONTROL: Final = re.compile("[\x00-\x09\x0b-\x1f]")
_KEY_ID_HEX: Final = re.compile("[0-9a-f]{8}")
_NOT_IN_NAME: Final = re.compile(r"[\s+\x00-\x1f]")  # \s is Unicode whitespace for str


class MalformedNote(InvalidProof):
    """The note is not a well-formed signed note (encoding, layout, a signature line)."""


class UnknownKey(InvalidProof):
    """The note carries no signature from the expected key (name and key id)."""


class BadSignature(InvalidProof):
    """A signature from the expected key does not verify: the note was altered or forged."""


class NoteSigner(Protocol):
    """What signs notes: a key name, its 4-byte key id, and a signing function.

    :class:`phivault.crypto.signing.Ed25519NoteSigner` implements it; an HSM or KMS signer
    can too, without the private key ever being in this process.
    """

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes:
        """The signature of ``message``."""
        ...


def _is_valid_name(name: str) -> bool:
    # The spec: non-empty, no Unicode spaces, no '+'; a note also allows no control characters.
    if not name or _NOT_IN_NAME.search(name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_name(name: str) -> None:
    if not _is_valid_name(name):
        raise ValueError("a key name must be non-empty, without spaces, '+' or control characters")


def _b64decode_strict(text: str) -> bytes:
    # Exactly one encoding per byte string: padding required, no stray or non-zero bits.
    raw = base64.b64decode(text, validate=True)
    if base64.b64encode(raw).decode("ascii") != text:
        raise binascii.Error("not canonical base64")
    return raw


def key_id_for(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x01 || public key)[:4]: the spec's Ed25519 key id."""
    _check_name(name)
    if len(public_key) != _PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {_PUBLIC_KEY_SIZE} bytes")
    digest = sha256(name.encode("utf-8") + b"\n" + bytes([ED25519]) + public_key).digest()
    return digest[:_KEY_ID_SIZE]


def format_verifier_key(name: str, public_key: bytes) -> str:
    """``<name>+<key id hex>+<base64(0x01 || public key)>``, the spec's verifier key text."""
    key_id = key_id_for(name, public_key)
    encoded = base64.b64encode(bytes([ED25519]) + public_key).decode("ascii")
    return f"{name}+{key_id.hex()}+{encoded}"


class NoteVerifier:
    """The public half of a note-signing key: checks signatures made under one key name."""

    __slots__ = ("_key", "_key_id", "_name", "_public_key")

    def __init__(self, name: str, public_key: bytes) -> None:
        self._key_id = key_id_for(name, public_key)
        self._name = name
        self._public_key = bytes(public_key)
        self._key = Ed25519PublicKey.from_public_bytes(self._public_key)

    @classmethod
    def from_verifier_key(cls, text: str) -> NoteVerifier:
        """Parse a verifier key (``name+keyid+key``) strictly.

        Raises :class:`~phivault.errors.InvalidInput` if it is malformed, is not Ed25519, or
        its key id does not belong to its name and key.
        """
        parts = text.split("+", 2)  # base64 may contain '+', the name and key id may not
        if len(parts) != 3:
            raise InvalidInput("verifier key must be <name>+<key id>+<key>")
        name, key_id_hex, encoded = parts
        if not _is_valid_name(name):
            raise InvalidInput("verifier key has an invalid key name")
        if _KEY_ID_HEX.fullmatch(key_id_hex) is None:
            raise InvalidInput("verifier key id must be 8 lower-case hex digits")
        try:
            key = _b64decode_strict(encoded)
        except (binascii.Error, ValueError):
            raise InvalidInput("verifier key is not canonical base64") from None
        if not key or key[0] != ED25519:
            raise InvalidInput("verifier key is not an Ed25519 key (type 0x01)")
        if len(key) != 1 + _PUBLIC_KEY_SIZE:
            raise InvalidInput(f"an Ed25519 verifier key holds {_PUBLIC_KEY_SIZE} key bytes")
        verifier = cls(name, key[1:])
        if verifier.key_id.hex() != key_id_hex:
            raise InvalidInput("verifier key id does not match its name and key")
        return verifier

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._key_id

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def verifier_key(self) -> str:
        return format_verifier_key(self._name, self._public_key)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise :class:`BadSignature` unless ``signature`` is this key's over ``message``."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            raise BadSignature(
                f"signature by {self._name} ({self._key_id.hex()}) does not verify"
            ) from None

    def __repr__(self) -> str:
        return f"NoteVerifier({self.verifier_key!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoteVerifier):
            return NotImplemented
        return (self._name, self._public_key) == (other._name, other._public_key)

    def __hash__(self) -> int:
        return hash((self._name, self._public_key))


def _check_text(text: str) -> bytes:
    if not text or not text.endswith("\n"):
        raise InvalidInput("note text must be non-empty and end with a newline")
    if _CONTROL.search(text):
        raise InvalidInput("note text must not contain control characters other than newline")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("note text is not valid Unicode") from None


def sign_note(text: str, signer: NoteSigner) -> str:
    """Sign ``text`` and return the note: the text, a blank line, and the signature line."""
    message = _check_text(text)
    name, key_id = signer.name, signer.key_id
    if not _is_valid_name(name):
        raise InvalidInput("signer has an invalid key name")
    if len(key_id) != _KEY_ID_SIZE:
        raise InvalidInput(f"signer key id must be {_KEY_ID_SIZE} bytes")
    signature = signer.sign(message)
    encoded = base64.b64encode(key_id + signature).decode("ascii")
    return f"{text}\n{_SIGNATURE_PREFIX}{name} {encoded}\n"


def open_note(note: str, verifier: NoteVerifier) -> str:
    """Verify ``note`` against ``verifier`` and return its text.

    Raises :class:`MalformedNote`, :class:`UnknownKey` (no signature by this key) or
    :class:`BadSignature`. Signatures by other keys are ignored, as the spec requires.
    """
    if _CONTROL.search(note):
        raise MalformedNote("note contains control characters other than newline")
    try:
        note.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedNote("note is not valid Unicode") from None
    split = note.rfind("\n\n")
    if split < 0:
        raise MalformedNote("note has no blank line before its signatures")
    text, signatures = note[: split + 1], note[split + 2 :]
    if not signatures or not signatures.endswith("\n"):
        raise MalformedNote("note signatures must end with a newline")
    lines = signatures[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise MalformedNote(f"note has more than {_MAX_SIGNATURES} signatures")
    message = text.encode("utf-8")
    verified = False
    for number, line in enumerate(lines, start=1):
        if not line.startswith(_SIGNATURE_PREFIX):
            raise MalformedNote(f"signature line {number} does not start with an em dash")
        name, space, encoded = line[len(_SIGNATURE_PREFIX) :].partition(" ")
        if not space or not _is_valid_name(name):
            raise MalformedNote(f"signature line {number} has no valid key name")
        try:
            raw = _b64decode_strict(encoded)
        except (binascii.Error, ValueError):
            raise MalformedNote(f"signature line {number} is not canonical base64") from None
        if len(raw) <= _KEY_ID_SIZE:
            raise MalformedNote(f"signature line {number} is too short")
        if name != verifier.name or raw[:_KEY_ID_SIZE] != verifier.key_id:
            continue  # another key's signature: a witness, or a key we do not know
        if len(raw) != _KEY_ID_SIZE + _SIGNATURE_SIZE:
            raise BadSignature(f"signature by {name} on line {number} has the wrong length")
        verifier.verify(message, raw[_KEY_ID_SIZE:])
        verified = True
    if not verified:
        raise UnknownKey(f"note has no signature by {verifier.name} ({verifier.key_id.hex()})")
    return text
