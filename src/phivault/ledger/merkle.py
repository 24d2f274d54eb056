"""The RFC 9162 Merkle tree over the ledger's leaves: hashes, proofs, and their verification.

This is what makes history tamper-evident (DESIGN.md invariant 5): a signed checkpoint commits
to a root hash, an inclusion proof shows an entry is under that root, and a consistency proof
shows a later tree extends an earlier one without rewriting it. The hashing and proof shapes
follow RFC 9162 (identical to RFC 6962 for SHA-256), so standard transparency-log tools and
witnesses can check our proofs.

:class:`MerkleTree` keeps, per level, the hashes of every complete aligned subtree (level 0 is
the leaf hashes) in flat bytearrays. Every subtree a proof or a past root needs is then either
one lookup or a fold of O(log n) lookups, so ``root(size)``, ``inclusion_proof`` and
``consistency_proof`` cost O(log² n) for any size up to the current one, at the price of about
two hashes (64 bytes) of memory per leaf.

Verification never returns a bool: it returns nothing or raises
:class:`~phivault.ledger.errors.InvalidProof`.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from hashlib import sha256
from typing import Final

from phivault.ledger.errors import InvalidProof

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleTree",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion_proof",
    "root_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
# The root of the empty tree: MTH({}) = SHA-256().
EMPTY_ROOT: Final = sha256(b"").digest()
# Proofs have at most one hash per level; sizes are uint64 in RFC 9162.
_MAX_PROOF_LENGTH: Final = 64


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the hash of one leaf."""
    return sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an interior node."""
    return sha256(_NODE_PREFIX + left + right).digest()


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over ``leaf_hashes`` (RFC 9162 §2.1.1), without building a :class:`MerkleTree`."""
    level = list(leaf_hashes)
    if not level:
        return EMPTY_ROOT
    # Pairing neighbours and promoting a lone last node unchanged gives exactly the RFC's
    # "split at the largest power of two smaller than n" shape, without recursion.
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _split(n: int) -> int:
    # The largest power of two strictly smaller than n (n >= 2).
    return 1 << ((n - 1).bit_length() - 1)


def _hash_pairs(level: bytes | bytearray, start: int, stop: int) -> bytes:
    # Parents of the sibling pairs in level[start:stop]; a flat loop, not per-leaf recursion,
    # because building a million-leaf tree is dominated by interpreter overhead per hash.
    prefix = sha256(_NODE_PREFIX)
    parents = []
    with memoryview(level) as view:
        for offset in range(start, stop, 2 * HASH_SIZE):
            h = prefix.copy()
            h.update(view[offset : offset + 2 * HASH_SIZE])
            parents.append(h.digest())
    return b"".join(parents)


class MerkleTree:
    """An in-memory RFC 9162 tree over 32-byte leaf hashes that only grows.

    ``MerkleTree(leaf_hashes)`` takes the concatenated leaf hashes (for example what
    :meth:`~phivault.ledger.ports.LedgerStore.leaf_hashes` returns) and builds every level.
    """

    __slots__ = ("_levels", "_size")

    def __init__(self, leaf_hashes: bytes = b"") -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        if leaf_hashes:
            self.extend(leaf_hashes)

    def __repr__(self) -> str:
        return f"MerkleTree(size={self._size})"

    @property
    def size(self) -> int:
        """The number of leaves."""
        return self._size

    def append(self, leaf_hash: bytes) -> int:
        """Add one leaf hash; return its index."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, got {len(leaf_hash)}")
        index = self._size
        self._levels[0] += leaf_hash
        self._size += 1
        # Each trailing 1 bit of the new index closes one complete subtree.
        level, position = 0, index
        while position & 1:
            below = self._levels[level]
            if level + 1 == len(self._levels):
                self._levels.append(bytearray())
            self._levels[level + 1] += node_hash(
                bytes(below[-2 * HASH_SIZE : -HASH_SIZE]), bytes(below[-HASH_SIZE:])
            )
            level += 1
            position >>= 1
        return index

    def extend(self, leaf_hashes: bytes) -> None:
        """Add many concatenated 32-byte leaf hashes at once (level by level, in bulk)."""
        if len(leaf_hashes) % HASH_SIZE:
            raise ValueError(
                f"leaf hashes must be a multiple of {HASH_SIZE} bytes, got {len(leaf_hashes)}"
            )
        if not leaf_hashes:
            return
        self._levels[0] += leaf_hashes
        self._size += len(leaf_hashes) // HASH_SIZE
        level = 0
        while True:
            below = self._levels[level]
            pairs = len(below) // (2 * HASH_SIZE)
            if level + 1 == len(self._levels):
                if pairs == 0:
                    return
                self._levels.append(bytearray())
            above = self._levels[level + 1]
            done = len(above) // HASH_SIZE
            if done == pairs:
                # Nothing new closed at this level, so nothing new can close above it.
                return
            above += _hash_pairs(below, done * 2 * HASH_SIZE, pairs * 2 * HASH_SIZE)
            level += 1

    def leaf_hash_at(self, index: int) -> bytes:
        """The hash of leaf ``index``."""
        self._check_index(index, self._size)
        return self._node(0, index)

    def leaf_hashes(self) -> bytes:
        """Every leaf hash, concatenated (the form the constructor takes)."""
        return bytes(self._levels[0])

    def root(self, size: int | None = None) -> bytes:
        """The root hash of the tree's first ``size`` leaves (default: all of them)."""
        if size is None:
            size = self._size
        self._check_size(size)
        return self._range_hash(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 9162 §2.1.3.1).

        Hashes are ordered from the leaf up, as :func:`verify_inclusion` expects.
        """
        if size is None:
            size = self._size
        self._check_size(size)
        self._check_index(index, size)
        proof: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                proof.append(self._range_hash(start + k, end))
                end = start + k
            else:
                proof.append(self._range_hash(start, start + k))
                start += k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The proof that the tree of ``new_size`` extends that of ``old_size`` (§2.1.4.1).

        Empty when ``old_size`` is 0 or equal to ``new_size``: there is nothing to prove.
        """
        if new_size is None:
            new_size = self._size
        self._check_size(new_size)
        if not 0 <= old_size <= new_size:
            raise ValueError(
                f"old size must be between 0 and the new size {new_size}, got {old_size}"
            )
        if old_size in (0, new_size):
            return []
        proof: list[bytes] = []
        start, end = 0, new_size
        complete = True  # SUBPROOF's flag b: is the current subtree a prefix of the old tree?
        while old_size != end:
            k = _split(end - start)
            if old_size - start <= k:
                proof.append(self._range_hash(start + k, end))
                end = start + k
            else:
                proof.append(self._range_hash(start, start + k))
                start += k
                complete = False
        if not complete:
            proof.append(self._range_hash(start, end))
        proof.reverse()
        return proof

    def _node(self, level: int, index: int) -> bytes:
        offset = index * HASH_SIZE
        return bytes(self._levels[level][offset : offset + HASH_SIZE])

    def _range_hash(self, start: int, end: int) -> bytes:
        # MTH(D[start:end]) for the ranges proofs and roots ask for: ``start`` is a multiple of
        # a power of two at least end - start, so the range splits into complete aligned
        # subtrees of decreasing size, whose stored hashes fold right to left.
        if start == end:
            return EMPTY_ROOT
        pieces = []
        offset, remaining = start, end - start
        while remaining:
            level = remaining.bit_length() - 1
            pieces.append(self._node(level, offset >> level))
            offset += 1 << level
            remaining -= 1 << level
        result = pieces.pop()
        while pieces:
            result = node_hash(pieces.pop(), result)
        return result

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self._size:
            raise ValueError(f"size must be between 0 and the tree size {self._size}, got {size}")

    @staticmethod
    def _check_index(index: int, size: int) -> None:
        if not 0 <= index < size:
            raise ValueError(f"leaf index must be in [0, {size}), got {index}")


def _check_hashes(proof: Sequence[bytes]) -> None:
    if len(proof) > _MAX_PROOF_LENGTH:
        raise InvalidProof(f"proof has {len(proof)} hashes, more than any tree needs")
    for position, element in enumerate(proof):
        if len(element) != HASH_SIZE:
            raise InvalidProof(f"proof hash {position} is {len(element)} bytes, not {HASH_SIZE}")


def root_from_inclusion_proof(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]
) -> bytes:
    """The root that ``proof`` puts leaf ``index`` under in a tree of ``size`` (§2.1.3.2).

    Raises :class:`InvalidProof` if the proof cannot belong to that index and size.
    """
    if not 0 <= index < size:
        raise InvalidProof(f"leaf index {index} is outside a tree of size {size}")
    if len(leaf_hash) != HASH_SIZE:
        raise InvalidProof(f"leaf hash is {len(leaf_hash)} bytes, not {HASH_SIZE}")
    _check_hashes(proof)
    fn, sn = index, size - 1
    result = leaf_hash
    for element in proof:
        if sn == 0:
            raise InvalidProof("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            result = node_hash(element, result)
            # On the right edge, climb past levels where this node has no right sibling.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            result = node_hash(result, element)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("inclusion proof is shorter than the tree is deep")
    return result


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that leaf ``index`` with ``leaf_hash`` is in the tree of ``size`` with ``root``.

    Returns nothing; raises :class:`InvalidProof` if it is not proven.
    """
    computed = root_from_inclusion_proof(leaf_hash, index, size, proof)
    if not hmac.compare_digest(computed, root):
        raise InvalidProof(f"inclusion proof for leaf {index} does not lead to the root")


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> None:
    """Check that the tree (``new_size``, ``new_root``) extends (``old_size``, ``old_root``).

    RFC 9162 §2.1.4.2, with the transparency-dev policy at the edges: an old size of 0 is
    refused, even against another empty tree (it proves nothing; a verifier that starts from an
    empty tree must handle that case itself), and equal sizes need an empty proof and equal
    roots. Raises :class:`InvalidProof`.
    """
    if not 0 <= old_size <= new_size:
        raise InvalidProof(f"old size {old_size} is not between 0 and new size {new_size}")
    if old_size == 0:
        raise InvalidProof("a consistency proof from the empty tree proves nothing")
    if old_size == new_size:
        if proof:
            raise InvalidProof("a consistency proof between equal sizes must be empty")
        if not hmac.compare_digest(old_root, new_root):
            raise InvalidProof(f"roots differ for the same size {old_size}")
        return
    if not proof:
        raise InvalidProof("consistency proof is empty")
    _check_hashes(proof)
    path = list(proof)
    # When the old tree is a complete subtree its root is the proof's implicit first hash.
    if (old_size & (old_size - 1)) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    old_result = new_result = path[0]
    for element in path[1:]:
        if sn == 0:
            raise InvalidProof("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            old_result = node_hash(element, old_result)
            new_result = node_hash(element, new_result)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            new_result = node_hash(new_result, element)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("consistency proof is shorter than the tree is deep")
    if not hmac.compare_digest(old_result, old_root):
        raise InvalidProof(f"consistency proof does not lead to the root of size {old_size}")
    if not hmac.compare_digest(new_result, new_root):
        raise InvalidProof(f"consistency proof does not lead to the root of size {new_size}")
