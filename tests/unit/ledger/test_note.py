"""C2SP signed notes: byte-for-byte agreement with the Go reference, and strict, typed refusals."""

from __future__ import annotations

import base64
from hashlib import sha256

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from phivault.errors import InvalidInput
from phivault.ledger.errors import InvalidProof
from phivault.ledger.note import (
    BadSignature,
    MalformedNote,
    NoteSigner,
    NoteVerifier,
    UnknownKey,
    format_verifier_key,
    key_id_for,
    open_note,
    sign_note,
)

# The example key pair and note of golang.org/x/mod/sumdb/note (its documentation and tests).
GO_VERIFIER_KEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SIGNER_KEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_SIGNATURE_LINE = (
    "— PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
GO_NOTE = GO_TEXT + "\n" + GO_SIGNATURE_LINE


class KeySigner:
    """A minimal NoteSigner for tests (production uses phivault.crypto.signing)."""

    def __init__(self, name: str, key: Ed25519PrivateKey | None = None) -> None:
        self._key = key or Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key().public_bytes_raw()
        self._name = name
        self._key_id = key_id_for(name, self.public_key)

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> bytes:
        return self._key_id

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self._name, self.public_key)


def go_signer() -> KeySigner:
    seed = base64.b64decode(GO_SIGNER_KEY.split("+", 4)[4])
    assert seed[0] == 0x01
    return KeySigner("PeterNeumann", Ed25519PrivateKey.from_private_bytes(seed[1:]))


def test_signer_satisfies_the_protocol() -> None:
    signer: NoteSigner = KeySigner("example.com/log")
    assert len(signer.key_id) == 4


def test_go_reference_verifier_key_round_trips() -> None:
    verifier = NoteVerifier.from_verifier_key(GO_VERIFIER_KEY)
    assert verifier.name == "PeterNeumann"
    assert verifier.key_id == bytes.fromhex("c74f20a3")
    assert verifier.verifier_key == GO_VERIFIER_KEY
    assert format_verifier_key("PeterNeumann", verifier.public_key) == GO_VERIFIER_KEY
    assert key_id_for("PeterNeumann", verifier.public_key) == bytes.fromhex("c74f20a3")


def test_key_id_is_the_spec_hash() -> None:
    public_key = bytes(range(32))
    expected = sha256(b"example.com/log\n\x01" + public_key).digest()[:4]
    assert key_id_for("example.com/log", public_key) == expected


def test_we_sign_exactly_as_the_go_reference_does() -> None:
    # Ed25519 is deterministic, so the same key and text must give the same bytes.
    assert sign_note(GO_TEXT, go_signer()) == GO_NOTE


def test_we_open_the_go_reference_note() -> None:
    assert open_note(GO_NOTE, NoteVerifier.from_verifier_key(GO_VERIFIER_KEY)) == GO_TEXT


def test_a_verifier_key_with_plus_signs_in_its_base64() -> None:
    # sum.golang.org's published key: '+' inside the key material must not confuse the parser.
    key = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
    verifier = NoteVerifier.from_verifier_key(key)
    assert verifier.name == "sum.golang.org"
    assert verifier.verifier_key == key


def test_every_mangled_go_verifier_key_is_refused() -> None:
    key = GO_VERIFIER_KEY
    for start in range(len(key) + 1):
        for stop in range(start + 1, len(key) + 1):
            if (start, stop) != (0, len(key)):
                with pytest.raises(InvalidInput):
                    NoteVerifier.from_verifier_key(key[start:stop])
    for position in range(len(key)):
        mangled = key[:position] + chr(ord(key[position]) + 1) + key[position + 1 :]
        with pytest.raises(InvalidInput):
            NoteVerifier.from_verifier_key(mangled)


@pytest.mark.parametrize(
    "key",
    [
        "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # upper-case id
        "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",  # length
        "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # type 0x65
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # space
        "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # empty name
        " PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW\n",
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TX",  # non-canonical
        "PeterNeumann+c74f20a3",
        "",
    ],
)
def test_malformed_verifier_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidInput):
        NoteVerifier.from_verifier_key(key)


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\tb", "a\u00a0b", "a\u2003b", "a\nb"])
def test_invalid_key_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        key_id_for(name, bytes(32))
    with pytest.raises(ValueError):
        NoteVerifier(name, bytes(32))


def test_public_key_must_be_32_bytes() -> None:
    with pytest.raises(ValueError):
        format_verifier_key("example.com/log", bytes(31))


@given(
    text=st.text(
        st.characters(codec="utf-8", exclude_characters=[chr(c) for c in range(32) if c != 10])
    ).map(lambda t: t + "\n")
)
def test_sign_then_open_round_trips_any_valid_text(text: str) -> None:
    signer = KeySigner("example.com/log")
    note = sign_note(text, signer)
    assert open_note(note, signer.verifier()) == text


def test_texts_with_blank_lines_and_fake_signature_lines_survive() -> None:
    signer = KeySigner("example.com/log")
    text = "first\n\n— example.com/log AAAA\n\nlast\n"
    assert open_note(sign_note(text, signer), signer.verifier()) == text


@pytest.mark.parametrize(
    "text", ["", "no newline", "tab\there\n", "carriage\r\n", "nul\x00\n", "lone \ud800\n"]
)
def test_invalid_texts_are_not_signed(text: str) -> None:
    with pytest.raises(InvalidInput):
        sign_note(text, KeySigner("example.com/log"))


def _cosignature(name: str, size: int = 4 + 8 + 64) -> str:
    # Shaped like a tlog-cosignature witness line: another key, another algorithm.
    return f"— {name} {base64.b64encode(bytes(range(size))).decode()}\n"


def test_other_signatures_are_ignored() -> None:
    signer = KeySigner("example.com/log")
    note = sign_note("hello\n", signer)
    witness = _cosignature("witness.example/w1")
    assert open_note(note + witness, signer.verifier()) == "hello\n"
    before = note.replace("\n\n", "\n\n" + witness)
    assert open_note(before, signer.verifier()) == "hello\n"


def test_a_note_without_our_signature_is_unknown_key() -> None:
    signer = KeySigner("example.com/log")
    other = KeySigner("example.com/log")  # same name, different key: ignored, per the spec
    note = sign_note("hello\n", other)
    with pytest.raises(UnknownKey, match=r"no signature by example\.com/log"):
        open_note(note, signer.verifier())
    with pytest.raises(UnknownKey):
        open_note("hello\n\n" + _cosignature("witness.example/w1"), signer.verifier())


def test_same_key_id_under_another_name_is_ignored() -> None:
    signer = KeySigner("example.com/log")
    note = sign_note("hello\n", signer).replace("example.com/log", "example.com/other")
    with pytest.raises(UnknownKey):
        open_note(note, signer.verifier())


def test_a_changed_text_is_a_bad_signature() -> None:
    signer = KeySigner("example.com/log")
    note = sign_note("size 10\n", signer)
    with pytest.raises(BadSignature):
        open_note(note.replace("size 10", "size 11"), signer.verifier())


def test_a_changed_signature_is_a_bad_signature() -> None:
    signer = KeySigner("example.com/log")
    note = sign_note("hello\n", signer)
    prefix, encoded = note.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(encoded))
    raw[-1] ^= 1
    with pytest.raises(BadSignature):
        open_note(f"{prefix} {base64.b64encode(raw).decode()}\n", signer.verifier())
    short = base64.b64encode(bytes(raw[:-1])).decode()
    with pytest.raises(BadSignature, match="wrong length"):
        open_note(f"{prefix} {short}\n", signer.verifier())


def test_one_bad_signature_from_our_key_rejects_the_note() -> None:
    signer = KeySigner("example.com/log")
    good = sign_note("hello\n", signer)
    forged = sign_note("bye\n", signer).split("\n\n")[1]
    with pytest.raises(BadSignature):
        open_note(good + forged, signer.verifier())


def test_errors_are_invalid_proofs() -> None:
    assert issubclass(MalformedNote, InvalidProof)
    assert issubclass(UnknownKey, InvalidProof)
    assert issubclass(BadSignature, InvalidProof)


@pytest.mark.parametrize(
    "note",
    [
        GO_TEXT + GO_SIGNATURE_LINE,  # no blank line
        GO_NOTE[:-1],  # no final newline
        GO_TEXT + "\n",  # no signatures
        GO_NOTE.replace("—", "-"),  # hyphen for em dash
        GO_NOTE.replace("— ", "—"),  # no space after the dash
        GO_NOTE.replace("PeterNeumann ", "PeterNeumann  "),  # double space
        GO_NOTE.replace("PeterNeumann ", ""),  # no name
        GO_NOTE.replace("PeterNeumann", "Peter+Neumann"),  # '+' in the name
        GO_NOTE.replace("AM=\n", "AM\n"),  # unpadded base64
        GO_NOTE.replace("AM=\n", "AN=\n"),  # non-canonical base64
        GO_NOTE.replace("AM=\n", "AM=\n\n"),  # blank line at the end
        GO_NOTE + "— PeterNeumann AAAA\n",  # a signature line too short for a key id
        GO_NOTE.replace("cryptography", "crypto\x01graphy"),  # control character
        GO_NOTE.replace("\n", "\r\n"),  # CR LF
        GO_NOTE.replace("problem,", "problem \ud800"),  # not UTF-8
        GO_TEXT + "\n" + GO_SIGNATURE_LINE * 101,  # too many signatures
    ],
)
def test_malformed_notes_are_refused(note: str) -> None:
    with pytest.raises(MalformedNote):
        open_note(note, NoteVerifier.from_verifier_key(GO_VERIFIER_KEY))


def test_many_signatures_within_the_limit_are_fine() -> None:
    note = GO_TEXT + "\n" + "".join(_cosignature(f"w{i}.example") for i in range(98))
    note += GO_SIGNATURE_LINE
    assert open_note(note, NoteVerifier.from_verifier_key(GO_VERIFIER_KEY)) == GO_TEXT


def test_verifier_equality_and_repr() -> None:
    a = NoteVerifier.from_verifier_key(GO_VERIFIER_KEY)
    b = NoteVerifier.from_verifier_key(GO_VERIFIER_KEY)
    assert a == b
    assert hash(a) == hash(b)
    assert GO_VERIFIER_KEY in repr(a)
