"""The audit ledger's Ed25519 checkpoint-signing key: generate, save, load, sign.

This module is the only place in phivault that handles raw private signing-key bytes. They
exist only while a key file is written or read; afterwards the key lives in a
``cryptography`` key object, and nothing here returns, prints or raises them: ``repr`` and
``str`` show the key name and id, error messages name the file and what is wrong with it, and
the signer refuses to be pickled or copied.

The key file is JSON (the key name travels with the key, which a bare PEM could not carry),
written atomically with mode 0600 and never over an existing file, because replacing the
ledger's key silently would orphan every checkpoint signed with it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Final, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from phivault.errors import PhivaultError
from phivault.ledger.note import format_verifier_key, key_id_for

__all__ = ["Ed25519NoteSigner", "SigningKeyError"]

_FORMAT: Final = "phivault-ledger-signing-key"
_VERSION: Final = 1
_ALGORITHM: Final = "ed25519"
_SEED_SIZE: Final = 32
# A key file is a few hundred bytes; refuse to read anything much larger.
_MAX_FILE_SIZE: Final = 64 * 1024


class SigningKeyError(PhivaultError):
    """The signing key file is missing, unreadable, damaged, or would be overwritten.

    Messages name the file and the problem, never key bytes.
    """


class Ed25519NoteSigner:
    """An Ed25519 key that signs C2SP notes (checkpoints) under a key name.

    Implements :class:`phivault.ledger.note.NoteSigner`.
    """

    __slots__ = ("_key", "_key_id", "_name", "_public_key")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._public_key = private_key.public_key().public_bytes_raw()
        self._key_id = key_id_for(name, self._public_key)  # also checks the name
        self._name = name

    @classmethod
    def generate(cls, name: str) -> Ed25519NoteSigner:
        """A new random key for ``name`` (the ledger's origin, e.g. ``example.org/ledger``)."""
        return cls(name, Ed25519PrivateKey.generate())

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
        """The public verifier key text (``name+keyid+key``) that auditors pin."""
        return format_verifier_key(self._name, self._public_key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Ed25519NoteSigner(name={self._name!r}, key_id={self._key_id.hex()!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling would write the private key wherever the pickle goes (a cache, a queue).
        raise TypeError("Ed25519NoteSigner cannot be pickled or copied")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key to a new file at ``path``, atomically, readable by the owner only.

        Raises :class:`SigningKeyError` if ``path`` exists (it is never overwritten) or cannot
        be written.
        """
        target = Path(path)
        seed = self._key.private_bytes_raw()
        document = {
            "format": _FORMAT,
            "version": _VERSION,
            "algorithm": _ALGORITHM,
            "name": self._name,
            "private_key": base64.b64encode(seed).decode("ascii"),
            "verifier_key": self.verifier_key,
        }
        content = (json.dumps(document, indent=2) + "\n").encode("utf-8")
        directory = target.parent
        try:
            # mkstemp creates the file with mode 0600 and O_EXCL, in the same directory so
            # that the final link is atomic.
            handle, temporary = tempfile.mkstemp(prefix=".signing-key-", dir=directory)
        except OSError as exc:
            raise SigningKeyError(
                f"cannot write the signing key in {directory}: {exc.strerror}"
            ) from None
        try:
            with os.fdopen(handle, "wb") as file:
                os.fchmod(file.fileno(), 0o600)
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            # link() fails if the target exists: no window where a second writer wins silently.
            os.link(temporary, target)
        except FileExistsError:
            raise SigningKeyError(
                f"{target} already exists; refusing to overwrite a signing key"
            ) from None
        except OSError as exc:
            raise SigningKeyError(
                f"cannot write the signing key {target}: {exc.strerror}"
            ) from None
        finally:
            os.unlink(temporary)
        _fsync_directory(directory)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Ed25519NoteSigner:
        """Read a key written by :meth:`save`. Raises :class:`SigningKeyError` if it cannot."""
        source = Path(path)
        try:
            with source.open("rb") as file:
                content = file.read(_MAX_FILE_SIZE + 1)
        except FileNotFoundError:
            raise SigningKeyError(f"signing key file {source} does not exist") from None
        except OSError as exc:
            raise SigningKeyError(
                f"cannot read signing key file {source}: {exc.strerror}"
            ) from None
        # Every check below raises outside of any ``except`` block: a decoding error, even as a
        # suppressed __context__, can quote bytes of the file, and those are the key.
        signer, problem = _parse(content)
        if signer is None:
            raise SigningKeyError(f"signing key file {source} is damaged: {problem}")
        return signer


def _parse(content: bytes) -> tuple[Ed25519NoteSigner | None, str]:
    if len(content) > _MAX_FILE_SIZE:
        return None, "it is far too large"
    document: Any = None
    with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
        document = json.loads(content)
    if not isinstance(document, dict):
        return None, "it is not a JSON object"
    if document.get("format") != _FORMAT or document.get("version") != _VERSION:
        return None, f"it is not a {_FORMAT} version {_VERSION} file"
    if document.get("algorithm") != _ALGORITHM:
        return None, f"its algorithm is not {_ALGORITHM}"
    name, encoded = document.get("name"), document.get("private_key")
    if not isinstance(name, str) or not isinstance(encoded, str):
        return None, "its name or private key is missing"
    seed = b""
    try:
        seed = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None, "its private key is not base64"
    if len(seed) != _SEED_SIZE:
        return None, f"its private key is not {_SEED_SIZE} bytes"
    signer = None
    with contextlib.suppress(ValueError):
        signer = Ed25519NoteSigner(name, Ed25519PrivateKey.from_private_bytes(seed))
    if signer is None:
        return None, "its key name is invalid"
    if document.get("verifier_key") != signer.verifier_key:
        return None, "its private key does not match its verifier key"
    return signer, ""


def _fsync_directory(directory: Path) -> None:
    # Makes the new directory entry durable; some platforms cannot open directories.
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
