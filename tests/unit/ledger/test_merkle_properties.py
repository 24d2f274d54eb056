"""Properties of the Merkle tree: it agrees with a naive transcription of RFC 9162 for every
size and index, every proof it makes verifies, and no single flipped bit gets past a verifier.
"""

from __future__ import annotations

from hashlib import sha256

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.ledger.errors import InvalidProof
from phivault.ledger.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

MAX_LEAVES = 300


# A deliberately naive reference: the RFC's recursive definitions, transcribed.


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = _k(n)
    return node_hash(ref_mth(leaves[:k]), ref_mth(leaves[k:]))


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [ref_mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, leaves[:k], b), ref_mth(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


def ref_consistency(m: int, leaves: list[bytes]) -> list[bytes]:
    return ref_subproof(m, leaves, True)


def _leaves(n: int, salt: int) -> list[bytes]:
    return [leaf_hash(salt.to_bytes(4, "big") + i.to_bytes(4, "big")) for i in range(n)]


def _flip(value: bytes, bit: int) -> bytes:
    bit %= len(value) * 8
    flipped = bytearray(value)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


sizes = st.integers(min_value=1, max_value=MAX_LEAVES)
salts = st.integers(min_value=0, max_value=2**32 - 1)


@given(n=st.integers(min_value=0, max_value=MAX_LEAVES), salt=salts)
def test_roots_match_the_reference_for_every_prefix(n: int, salt: int) -> None:
    leaves = _leaves(n, salt)
    tree = MerkleTree(b"".join(leaves))
    assert tree.size == n
    assert tree.root() == ref_mth(leaves) == root_hash(leaves)
    for size in {0, min(1, n), n // 3, n // 2, max(n - 1, 0), n}:
        assert tree.root(size) == ref_mth(leaves[:size])


@given(data=st.data(), salt=salts)
def test_append_extend_and_constructor_build_the_same_tree(data: st.DataObject, salt: int) -> None:
    n = data.draw(sizes)
    leaves = _leaves(n, salt)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    extended = MerkleTree()
    previous = 0
    for cut in [*cuts, n]:
        extended.extend(b"".join(leaves[previous:cut]))
        previous = cut
    appended = MerkleTree()
    for index, leaf in enumerate(leaves):
        assert appended.append(leaf) == index
    built = MerkleTree(b"".join(leaves))
    for size in range(n + 1):
        assert extended.root(size) == appended.root(size) == built.root(size)
    assert extended.leaf_hashes() == appended.leaf_hashes() == b"".join(leaves)
    assert [built.leaf_hash_at(i) for i in range(n)] == leaves


@given(data=st.data(), salt=salts)
def test_inclusion_proofs_match_the_reference_and_verify(data: st.DataObject, salt: int) -> None:
    n = data.draw(sizes)
    leaves = _leaves(n, salt)
    tree = MerkleTree(b"".join(leaves))
    size = data.draw(st.integers(1, n))
    index = data.draw(st.integers(0, size - 1))
    proof = tree.inclusion_proof(index, size)
    assert proof == ref_path(index, leaves[:size])
    root = tree.root(size)
    verify_inclusion(leaves[index], index, size, proof, root)
    assert root_from_inclusion_proof(leaves[index], index, size, proof) == root


@given(data=st.data(), salt=salts)
def test_consistency_proofs_match_the_reference_and_verify(data: st.DataObject, salt: int) -> None:
    n = data.draw(sizes)
    leaves = _leaves(n, salt)
    tree = MerkleTree(b"".join(leaves))
    new_size = data.draw(st.integers(1, n))
    old_size = data.draw(st.integers(1, new_size))
    proof = tree.consistency_proof(old_size, new_size)
    assert proof == ref_consistency(old_size, leaves[:new_size])
    verify_consistency(old_size, new_size, proof, tree.root(old_size), tree.root(new_size))


@given(data=st.data(), salt=salts, bit=st.integers(min_value=0))
def test_one_flipped_bit_breaks_an_inclusion_proof(
    data: st.DataObject, salt: int, bit: int
) -> None:
    n = data.draw(sizes)
    tree = MerkleTree(b"".join(_leaves(n, salt)))
    size = data.draw(st.integers(1, n))
    index = data.draw(st.integers(0, size - 1))
    leaf, proof, root = tree.leaf_hash_at(index), tree.inclusion_proof(index, size), tree.root(size)
    target = data.draw(st.integers(-2, len(proof) - 1))
    if target == -2:
        leaf = _flip(leaf, bit)
    elif target == -1:
        root = _flip(root, bit)
    else:
        proof[target] = _flip(proof[target], bit)
    with pytest.raises(InvalidProof):
        verify_inclusion(leaf, index, size, proof, root)


@given(data=st.data(), salt=salts, bit=st.integers(min_value=0))
def test_one_flipped_bit_breaks_a_consistency_proof(
    data: st.DataObject, salt: int, bit: int
) -> None:
    n = data.draw(sizes)
    tree = MerkleTree(b"".join(_leaves(n, salt)))
    new_size = data.draw(st.integers(1, n))
    old_size = data.draw(st.integers(1, new_size))
    proof = tree.consistency_proof(old_size, new_size)
    old_root, new_root = tree.root(old_size), tree.root(new_size)
    target = data.draw(st.integers(-2, len(proof) - 1))
    if target == -2:
        old_root = _flip(old_root, bit)
    elif target == -1:
        new_root = _flip(new_root, bit)
    else:
        proof[target] = _flip(proof[target], bit)
    with pytest.raises(InvalidProof):
        verify_consistency(old_size, new_size, proof, old_root, new_root)


@settings(max_examples=50)
@given(data=st.data(), salt=salts)
def test_proofs_do_not_transfer_to_other_positions(data: st.DataObject, salt: int) -> None:
    n = data.draw(st.integers(2, MAX_LEAVES))
    tree = MerkleTree(b"".join(_leaves(n, salt)))
    index = data.draw(st.integers(0, n - 1))
    other = data.draw(st.integers(0, n - 1).filter(lambda i: i != index))
    with pytest.raises(InvalidProof):
        verify_inclusion(
            tree.leaf_hash_at(index), other, n, tree.inclusion_proof(index, n), tree.root()
        )
    old = data.draw(st.integers(1, n - 1))
    with pytest.raises(InvalidProof):
        verify_consistency(old, n, tree.consistency_proof(old, n), tree.root(old + 1), tree.root())


def test_empty_tree() -> None:
    tree = MerkleTree()
    assert tree.size == 0
    assert tree.root() == tree.root(0) == EMPTY_ROOT
    assert tree.leaf_hashes() == b""
    assert tree.consistency_proof(0, 0) == []


def test_trivial_consistency_proofs_are_empty() -> None:
    tree = MerkleTree(b"".join(_leaves(5, 0)))
    assert tree.consistency_proof(0, 5) == []
    assert tree.consistency_proof(5, 5) == []
    assert tree.consistency_proof(3) == tree.consistency_proof(3, 5)


def test_bad_arguments_are_refused_clearly() -> None:
    tree = MerkleTree(b"".join(_leaves(4, 0)))
    with pytest.raises(ValueError, match=r"leaf index must be in \[0, 4\), got 4"):
        tree.inclusion_proof(4)
    with pytest.raises(ValueError, match=r"leaf index must be in \[0, 2\), got 3"):
        tree.inclusion_proof(3, 2)
    with pytest.raises(ValueError, match="size must be between 0 and the tree size 4, got 5"):
        tree.root(5)
    with pytest.raises(ValueError, match="size must be between 0 and the tree size 4, got 5"):
        tree.consistency_proof(1, 5)
    with pytest.raises(ValueError, match="old size must be between 0 and the new size 2, got 3"):
        tree.consistency_proof(3, 2)
    with pytest.raises(ValueError, match="leaf index"):
        tree.leaf_hash_at(-1)
    with pytest.raises(ValueError, match="a leaf hash is 32 bytes, got 31"):
        tree.append(b"\x00" * 31)
    with pytest.raises(ValueError, match="multiple of 32 bytes, got 33"):
        tree.extend(b"\x00" * 33)
    with pytest.raises(ValueError, match="multiple of 32 bytes"):
        MerkleTree(b"\x00" * 40)
    assert tree.size == 4


def test_verifiers_refuse_malformed_input_with_invalid_proof() -> None:
    tree = MerkleTree(b"".join(_leaves(8, 0)))
    leaf, proof, root = tree.leaf_hash_at(3), tree.inclusion_proof(3), tree.root()
    with pytest.raises(InvalidProof, match="outside a tree"):
        verify_inclusion(leaf, -1, 8, proof, root)
    with pytest.raises(InvalidProof, match="not 32"):
        verify_inclusion(leaf[:31], 3, 8, proof, root)
    with pytest.raises(InvalidProof, match="proof hash 1 is 0 bytes"):
        verify_inclusion(leaf, 3, 8, [proof[0], b"", proof[2]], root)
    with pytest.raises(InvalidProof, match="more than any tree needs"):
        verify_inclusion(leaf, 3, 8, proof * 30, root)
    with pytest.raises(InvalidProof, match="longer"):
        verify_inclusion(leaf, 3, 8, [*proof, proof[0]], root)
    with pytest.raises(InvalidProof, match="shorter"):
        verify_inclusion(leaf, 3, 8, proof[:-1], root)
    old = tree.root(3)
    with pytest.raises(InvalidProof, match="empty tree"):
        verify_consistency(0, 8, [], EMPTY_ROOT, root)
    with pytest.raises(InvalidProof, match="not between"):
        verify_consistency(8, 3, tree.consistency_proof(3), root, old)
    with pytest.raises(InvalidProof, match="empty"):
        verify_consistency(3, 8, [], old, root)
    with pytest.raises(InvalidProof, match="must be empty"):
        verify_consistency(8, 8, [root], root, root)
    with pytest.raises(InvalidProof, match="roots differ"):
        verify_consistency(8, 8, [], old, root)
