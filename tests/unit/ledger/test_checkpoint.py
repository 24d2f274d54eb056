"""C2SP tlog-checkpoints: exact bodies, strict parsing, and real checkpoints from sum.golang.org."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from phivault.ledger.checkpoint import (
    Checkpoint,
    MalformedCheckpoint,
    OriginMismatch,
    open_checkpoint,
    parse_checkpoint,
    sign_checkpoint,
)
from phivault.ledger.errors import InvalidProof
from phivault.ledger.merkle import MerkleTree, leaf_hash
from phivault.ledger.note import (
    BadSignature,
    MalformedNote,
    NoteVerifier,
    UnknownKey,
    key_id_for,
    sign_note,
)

ROOT = base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")

# sum.golang.org's published verifier key and two of its signed tree heads, as its /latest
# and /lookup endpoints serve them: proof that standard tooling's checkpoints open with ours.
SUMDB_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_CHECKPOINTS = [
    (
        "go.sum database tree\n63512409\nF7eHRPqN/cqPtqti14NKdGGaI1Giw8coWP3KxihFZbg=\n\n"
        "— sum.golang.org Az3gri1OBHKT87Xj8UXU8zjoHGy/X+7Nl94f8TZkELVaasolmGApUsWqwVG9vE6hgqYb"
        "/ph/w2vdkLIVRH7bMB/FPQ4=\n",
        63512409,
    ),
    (
        "go.sum database tree\n3784599\n7uvxIZ67TZygcq/AehTD8iHYt81Ih+Zl2Y7vXZbfszQ=\n\n"
        "— sum.golang.org Az3grn972wXskjQrsZhVGc93fTU2uOsmSTiId1Wn1lxDCup5z4ggl1/4gaUqOkMa6cMb"
        "YvjB7hn7yemNr7Zqanol/go=\n",
        3784599,
    ),
]


class KeySigner:
    def __init__(self, name: str) -> None:
        self._key = Ed25519PrivateKey.generate()
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


def test_body_is_the_spec_layout() -> None:
    checkpoint = Checkpoint("example.com/behind-the-sofa", 20852163, ROOT)
    assert checkpoint.body() == (
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )
    with_extensions = Checkpoint("o", 0, ROOT, ("ext one", "ext two"))
    assert with_extensions.body().endswith("\next one\next two\n")


@pytest.mark.parametrize(("note", "size"), SUMDB_CHECKPOINTS)
def test_real_sum_golang_org_checkpoints_open(note: str, size: int) -> None:
    verifier = NoteVerifier.from_verifier_key(SUMDB_KEY)
    checkpoint = open_checkpoint(note, verifier, origin="go.sum database tree")
    assert checkpoint.size == size
    assert len(checkpoint.root_hash) == 32
    assert checkpoint.body() + "\n" == note.split("— ", maxsplit=1)[0]
    with pytest.raises(BadSignature):
        open_checkpoint(note.replace(str(size), str(size + 1)), verifier)


def test_sign_and_open_a_checkpoint_of_a_real_tree() -> None:
    tree = MerkleTree(b"".join(leaf_hash(bytes([i])) for i in range(10)))
    signer = KeySigner("phivault.example/ledger")
    checkpoint = Checkpoint("phivault.example/ledger", tree.size, tree.root())
    note = sign_checkpoint(checkpoint, signer)
    assert note.startswith(checkpoint.body() + "\n— phivault.example/ledger ")
    opened = open_checkpoint(note, signer.verifier(), origin="phivault.example/ledger")
    assert opened == checkpoint


@given(
    origin=st.text(
        st.characters(codec="utf-8", exclude_characters=[chr(c) for c in range(32)]), min_size=1
    ),
    size=st.integers(min_value=0, max_value=2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(
        st.text(
            st.characters(codec="utf-8", exclude_characters=[chr(c) for c in range(32)]),
            min_size=1,
        ),
        max_size=3,
    ),
)
def test_parse_inverts_body(origin: str, size: int, root: bytes, extensions: list[str]) -> None:
    checkpoint = Checkpoint(origin, size, root, tuple(extensions))
    assert parse_checkpoint(checkpoint.body()) == checkpoint


def test_wrong_origin_is_refused() -> None:
    signer = KeySigner("phivault.example/ledger")
    note = sign_checkpoint(Checkpoint("phivault.example/ledger", 1, ROOT), signer)
    with pytest.raises(OriginMismatch):
        open_checkpoint(note, signer.verifier(), origin="phivault.example/other")
    assert issubclass(OriginMismatch, InvalidProof)


def test_signature_errors_pass_through() -> None:
    signer = KeySigner("phivault.example/ledger")
    note = sign_checkpoint(Checkpoint("phivault.example/ledger", 7, ROOT), signer)
    with pytest.raises(UnknownKey):
        open_checkpoint(note, KeySigner("phivault.example/ledger").verifier())
    with pytest.raises(BadSignature):
        open_checkpoint(note.replace("\n7\n", "\n8\n"), signer.verifier())
    with pytest.raises(MalformedNote):
        open_checkpoint(note.replace("\n\n", "\n"), signer.verifier())


def test_a_signed_note_that_is_not_a_checkpoint_is_malformed() -> None:
    signer = KeySigner("phivault.example/ledger")
    note = sign_note(
        "phivault.example/ledger\n007\n" + base64.b64encode(ROOT).decode() + "\n", signer
    )
    with pytest.raises(MalformedCheckpoint):
        open_checkpoint(note, signer.verifier())
    assert issubclass(MalformedCheckpoint, MalformedNote)


GOOD_ROOT = base64.b64encode(ROOT).decode()


@pytest.mark.parametrize(
    "body",
    [
        f"origin\n10\n{GOOD_ROOT}",  # no final newline
        f"origin\n10\n{GOOD_ROOT}\n\n",  # empty extension line
        "origin\n10\n",  # no root
        f"\n10\n{GOOD_ROOT}\n",  # empty origin
        f"origin\n010\n{GOOD_ROOT}\n",  # leading zero
        f"origin\n00\n{GOOD_ROOT}\n",
        f"origin\n-1\n{GOOD_ROOT}\n",
        f"origin\n+1\n{GOOD_ROOT}\n",
        f"origin\n1_000\n{GOOD_ROOT}\n",  # int() would take it
        f"origin\n\u0661\u0660\n{GOOD_ROOT}\n",  # Arabic-Indic digits: int() would take them too
        f"origin\n 10\n{GOOD_ROOT}\n",
        f"origin\n18446744073709551616\n{GOOD_ROOT}\n",  # 2**64
        f"origin\n{'9' * 5000}\n{GOOD_ROOT}\n",
        f"origin\n10\n{GOOD_ROOT[:-1]}\n",  # unpadded
        f"origin\n10\n{base64.b64encode(ROOT[:31]).decode()}\n",  # 31 bytes
        f"origin\n10\n{base64.b64encode(ROOT + b'x').decode()}\n",  # 33 bytes
        f"origin\n10\n{base64.urlsafe_b64encode(bytes([0xFB] * 32)).decode()}\n",  # base64url
        f"origin\n10\n{GOOD_ROOT}\next\ttab\n",  # control character
        f"origin\r\n10\n{GOOD_ROOT}\n",
        f"orig\ud800in\n10\n{GOOD_ROOT}\n",
    ],
)
def test_malformed_bodies_are_refused(body: str) -> None:
    with pytest.raises(MalformedCheckpoint):
        parse_checkpoint(body)


def test_size_bounds_parse() -> None:
    assert parse_checkpoint(f"o\n0\n{GOOD_ROOT}\n").size == 0
    assert parse_checkpoint(f"o\n18446744073709551615\n{GOOD_ROOT}\n").size == 2**64 - 1


def test_checkpoints_cannot_be_built_broken() -> None:
    with pytest.raises(ValueError, match="origin is empty"):
        Checkpoint("", 1, ROOT)
    with pytest.raises(ValueError, match="origin contains a newline"):
        Checkpoint("a\nb", 1, ROOT)
    with pytest.raises(ValueError, match="size"):
        Checkpoint("o", -1, ROOT)
    with pytest.raises(ValueError, match="size"):
        Checkpoint("o", 2**64, ROOT)
    with pytest.raises(TypeError):
        Checkpoint("o", True, ROOT)
    with pytest.raises(ValueError, match="32 bytes"):
        Checkpoint("o", 1, ROOT[:16])
    with pytest.raises(ValueError, match="extension line 2 is empty"):
        Checkpoint("o", 1, ROOT, ("x", ""))
