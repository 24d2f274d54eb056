"""The ledger's signing key: it signs notes, survives a save and load, and never shows itself."""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import stat
import traceback
from pathlib import Path
from typing import Any

import pytest

from phivault.crypto.signing import Ed25519NoteSigner, SigningKeyError
from phivault.errors import PhivaultError
from phivault.ledger.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from phivault.ledger.note import NoteSigner, NoteVerifier, open_note, sign_note

NAME = "phivault.example/ledger"


def _secret_forms(path: Path) -> list[str]:
    """Every way the private key of the file at ``path`` could show up in text."""
    seed = base64.b64decode(json.loads(path.read_text())["private_key"])
    assert len(seed) == 32
    return [
        seed.hex(),
        seed.hex().upper(),
        base64.b64encode(seed).decode(),
        base64.urlsafe_b64encode(seed).decode().rstrip("="),
        repr(seed),
        seed.decode("latin-1"),
        seed[:12].hex(),  # even part of it
    ]


def _everything_said_about(error: BaseException) -> str:
    return "".join(traceback.format_exception(error)) + repr(error) + str(error)


def _assert_no_secret(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Ed25519NoteSigner, Path]:
    signer = Ed25519NoteSigner.generate(NAME)
    path = tmp_path / "signing.key"
    signer.save(path)
    return signer, path


def test_generate_gives_a_note_signer() -> None:
    signer: NoteSigner = Ed25519NoteSigner.generate(NAME)
    assert signer.name == NAME
    assert len(signer.key_id) == 4


def test_the_verifier_key_verifies_what_it_signs() -> None:
    signer = Ed25519NoteSigner.generate(NAME)
    verifier = NoteVerifier.from_verifier_key(signer.verifier_key)
    assert verifier.public_key == signer.public_key
    assert verifier.key_id == signer.key_id
    assert open_note(sign_note("hello\n", signer), verifier) == "hello\n"
    checkpoint = Checkpoint(NAME, 3, bytes(32))
    assert open_checkpoint(sign_checkpoint(checkpoint, signer), verifier, origin=NAME) == checkpoint


def test_save_then_load_is_the_same_key(saved: tuple[Ed25519NoteSigner, Path]) -> None:
    signer, path = saved
    loaded = Ed25519NoteSigner.load(path)
    assert loaded.name == signer.name
    assert loaded.verifier_key == signer.verifier_key
    # Ed25519 is deterministic: the same key signs the same bytes the same way.
    assert loaded.sign(b"message") == signer.sign(b"message")
    assert Ed25519NoteSigner.load(str(path)).verifier_key == signer.verifier_key


def test_the_file_is_private_and_nothing_is_left_behind(
    saved: tuple[Ed25519NoteSigner, Path],
) -> None:
    _, path = saved
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing.key"]


def test_save_is_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        Ed25519NoteSigner.generate(NAME).save(tmp_path / "k")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_save_never_overwrites(saved: tuple[Ed25519NoteSigner, Path]) -> None:
    _, path = saved
    before = path.read_bytes()
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        Ed25519NoteSigner.generate(NAME).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing.key"]


def test_save_into_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="cannot write"):
        Ed25519NoteSigner.generate(NAME).save(tmp_path / "missing" / "signing.key")


def test_load_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="does not exist"):
        Ed25519NoteSigner.load(tmp_path / "nope.key")


def test_load_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="cannot read"):
        Ed25519NoteSigner.load(tmp_path)


def _rewrite(path: Path, change: dict[str, Any]) -> None:
    document = json.loads(path.read_text())
    document.update(change)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"format": "something-else"}, "not a phivault-ledger-signing-key version 1"),
        ({"version": 2}, "version 1"),
        ({"algorithm": "rsa"}, "algorithm is not ed25519"),
        ({"private_key": None}, "missing"),
        ({"name": 5}, "missing"),
        ({"private_key": "!!not base64!!"}, "not base64"),
        ({"private_key": base64.b64encode(bytes(31)).decode()}, "not 32 bytes"),
        ({"private_key": base64.b64encode(bytes(32)).decode()}, "does not match"),
        ({"name": "bad name"}, "key name is invalid"),
        ({"verifier_key": "x+00000000+AQ=="}, "does not match"),
    ],
)
def test_damaged_files_are_refused_without_showing_the_key(
    saved: tuple[Ed25519NoteSigner, Path], change: dict[str, Any], problem: str
) -> None:
    _, path = saved
    secrets = _secret_forms(path)
    _rewrite(path, change)
    with pytest.raises(SigningKeyError, match=problem) as caught:
        Ed25519NoteSigner.load(path)
    assert "is damaged" in str(caught.value)
    _assert_no_secret(_everything_said_about(caught.value), secrets)


@pytest.mark.parametrize(
    "garbage",
    [
        lambda seed: seed + b"\xff\xfe",  # raw key bytes, not UTF-8
        lambda seed: b'{"private_key": "' + seed.hex().encode() + b'"',  # truncated JSON
        lambda seed: b"[" + base64.b64encode(seed) + b"]",  # JSON, but not an object
        lambda seed: b"\x00" * 70_000,  # far too large
    ],
)
def test_garbage_is_refused_without_echoing_it(
    saved: tuple[Ed25519NoteSigner, Path], garbage: Any
) -> None:
    _, path = saved
    secrets = _secret_forms(path)
    seed = base64.b64decode(json.loads(path.read_text())["private_key"])
    path.write_bytes(garbage(seed))
    with pytest.raises(SigningKeyError) as caught:
        Ed25519NoteSigner.load(path)
    # No decoding error rides along as a cause or context: those quote the input.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None
    _assert_no_secret(_everything_said_about(caught.value), secrets)


def test_repr_and_str_show_no_key_material(saved: tuple[Ed25519NoteSigner, Path]) -> None:
    signer, path = saved
    secrets = _secret_forms(path)
    for text in (repr(signer), str(signer), f"{signer}", f"{signer!r}"):
        _assert_no_secret(text, secrets)
        assert signer.key_id.hex() in text
        assert NAME in text


def test_the_signer_cannot_be_pickled_or_copied() -> None:
    signer = Ed25519NoteSigner.generate(NAME)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)
    with pytest.raises(TypeError):
        copy.copy(signer)
    with pytest.raises(TypeError):
        copy.deepcopy(signer)


def test_invalid_names_are_refused() -> None:
    with pytest.raises(ValueError):
        Ed25519NoteSigner.generate("has space")
    with pytest.raises(ValueError):
        Ed25519NoteSigner.generate("")


def test_errors_are_phivault_errors() -> None:
    assert issubclass(SigningKeyError, PhivaultError)
