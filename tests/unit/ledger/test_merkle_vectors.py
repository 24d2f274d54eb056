"""Known-answer tests: our Merkle tree against the shared RFC 6962/9162 vector file.

The file gathers vectors from transparency-dev, certificate-transparency (C++, Go, Python)
and CCTV. Its ``conventions`` key says how to read it; in particular consistency vectors carry
a ``policy`` because verifiers disagree at the edges (old size 0, equal sizes). We follow
transparency-dev there, so we must agree with every ``any`` and ``transparency-dev`` vector,
and with the others wherever every verifier follows RFC 9162 (0 < size1 < size2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

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

STRICT_POLICIES = {"any", "transparency-dev"}
KNOWN_POLICIES = STRICT_POLICIES | {"cctv", "python-ct"}


@pytest.fixture(scope="module")
def vectors(fixtures_dir: Path) -> dict[str, Any]:
    with (fixtures_dir / "merkle" / "merkle_vectors.json").open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


@pytest.fixture(scope="module")
def trees(vectors: dict[str, Any]) -> dict[str, list[bytes]]:
    """Leaf hashes of each named tree, by tree id."""
    return {
        tree["id"]: [leaf_hash(bytes.fromhex(x)) for x in tree["leaf_inputs_hex"]]
        for tree in vectors["trees"]
    }


def _hexes(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


def test_conventions_are_the_ones_we_implement(vectors: dict[str, Any]) -> None:
    conventions = vectors["conventions"]
    assert vectors["schema_version"] == 1
    assert conventions["hash"] == "SHA-256"
    assert conventions["leaf_hash"] == "SHA-256(0x00 || leaf_input)"
    assert conventions["node_hash"] == "SHA-256(0x01 || left || right)"
    assert conventions["empty_tree_root"] == EMPTY_ROOT.hex()
    assert "0-based" in conventions["leaf_index"]


def test_no_vector_is_silently_skipped(vectors: dict[str, Any]) -> None:
    counts = vectors["counts"]
    assert len(vectors["hash_vectors"]) == counts["hash_vectors"]
    assert len(vectors["trees"]) == counts["trees"]
    assert len(vectors["inclusion_proofs"]) == counts["inclusion_proofs"]
    assert len(vectors["consistency_proofs"]) == counts["consistency_proofs"]
    assert {v["policy"] for v in vectors["consistency_proofs"]} <= KNOWN_POLICIES


def test_hash_vectors(vectors: dict[str, Any], subtests: pytest.Subtests) -> None:
    for vector in vectors["hash_vectors"]:
        with subtests.test(msg=vector["id"]):
            expected = bytes.fromhex(vector["expected_hex"])
            if vector["kind"] == "empty_tree":
                assert expected == EMPTY_ROOT
                assert root_hash([]) == expected
                assert MerkleTree().root() == expected
            elif vector["kind"] == "leaf":
                assert leaf_hash(bytes.fromhex(vector["input_hex"])) == expected
            elif vector["kind"] == "node":
                left, right = bytes.fromhex(vector["left_hex"]), bytes.fromhex(vector["right_hex"])
                assert node_hash(left, right) == expected
            else:
                pytest.fail(f"unknown hash vector kind {vector['kind']!r}")


def test_tree_roots_for_every_size(vectors: dict[str, Any], subtests: pytest.Subtests) -> None:
    for tree in vectors["trees"]:
        leaves = [leaf_hash(x) for x in _hexes(tree["leaf_inputs_hex"])]
        if "leaf_hashes_hex" in tree:
            assert leaves == _hexes(tree["leaf_hashes_hex"])
        built = MerkleTree(b"".join(leaves))
        appended = MerkleTree()
        for leaf in leaves:
            appended.append(leaf)
        for entry in tree["roots"]:
            size, expected = entry["tree_size"], bytes.fromhex(entry["root_hex"])
            with subtests.test(msg=f"{tree['id']} root of size {size}"):
                assert root_hash(leaves[:size]) == expected
                assert built.root(size) == expected
                assert appended.root(size) == expected
                assert MerkleTree(b"".join(leaves[:size])).root() == expected


def test_tree_node_hashes(vectors: dict[str, Any], subtests: pytest.Subtests) -> None:
    for tree in vectors["trees"]:
        leaves = [leaf_hash(x) for x in _hexes(tree["leaf_inputs_hex"])]
        for node in tree.get("node_hashes", []):
            level, index = node["level"], node["index"]
            with subtests.test(msg=f"{tree['id']} node {level}/{index}"):
                width = 1 << level
                subtree = leaves[index * width : (index + 1) * width]
                assert len(subtree) == width
                assert root_hash(subtree) == bytes.fromhex(node["hash_hex"])


def _inclusion_leaf(vector: dict[str, Any]) -> bytes:
    from_input = from_hash = None
    if "leaf_input_hex" in vector:
        from_input = leaf_hash(bytes.fromhex(vector["leaf_input_hex"]))
    if "leaf_hash_hex" in vector:
        from_hash = bytes.fromhex(vector["leaf_hash_hex"])
    if from_input is not None and from_hash is not None:
        assert from_input == from_hash, "vector's leaf input and leaf hash disagree"
    result = from_hash if from_hash is not None else from_input
    assert result is not None
    return result


def test_inclusion_proofs(
    vectors: dict[str, Any], trees: dict[str, list[bytes]], subtests: pytest.Subtests
) -> None:
    for vector in vectors["inclusion_proofs"]:
        with subtests.test(msg=vector["id"]):
            leaf = _inclusion_leaf(vector)
            index, size = vector["leaf_index"], vector["tree_size"]
            proof, root = _hexes(vector["proof_hex"]), bytes.fromhex(vector["root_hex"])
            if vector["expected_valid"]:
                verify_inclusion(leaf, index, size, proof, root)
                assert root_from_inclusion_proof(leaf, index, size, proof) == root
            else:
                with pytest.raises(InvalidProof):
                    verify_inclusion(leaf, index, size, proof, root)
            if "tree_id" in vector and vector["expected_valid"]:
                tree = MerkleTree(b"".join(trees[vector["tree_id"]]))
                assert tree.leaf_hash_at(index) == leaf
                assert tree.inclusion_proof(index, size) == proof
                assert tree.root(size) == root


def _check_consistency(vector: dict[str, Any], expected_valid: bool) -> None:
    size1, size2 = vector["size1"], vector["size2"]
    proof = _hexes(vector["proof_hex"])
    root1, root2 = bytes.fromhex(vector["root1_hex"]), bytes.fromhex(vector["root2_hex"])
    if expected_valid:
        verify_consistency(size1, size2, proof, root1, root2)
    else:
        with pytest.raises(InvalidProof):
            verify_consistency(size1, size2, proof, root1, root2)


def test_consistency_proofs(
    vectors: dict[str, Any], trees: dict[str, list[bytes]], subtests: pytest.Subtests
) -> None:
    strict = [v for v in vectors["consistency_proofs"] if v["policy"] in STRICT_POLICIES]
    assert strict
    for vector in strict:
        with subtests.test(msg=vector["id"]):
            _check_consistency(vector, vector["expected_valid"])
            if "tree_id" in vector and vector["expected_valid"]:
                tree = MerkleTree(b"".join(trees[vector["tree_id"]]))
                size1, size2 = vector["size1"], vector["size2"]
                assert tree.consistency_proof(size1, size2) == _hexes(vector["proof_hex"])
                assert tree.root(size1) == bytes.fromhex(vector["root1_hex"])
                assert tree.root(size2) == bytes.fromhex(vector["root2_hex"])


def _transparency_dev_answer(vector: dict[str, Any]) -> bool:
    # Where verifiers disagree, what our (transparency-dev) policy answers.
    size1, size2 = vector["size1"], vector["size2"]
    if size1 == 0 or size1 > size2:
        return False
    if size1 == size2:
        return not vector["proof_hex"] and vector["root1_hex"] == vector["root2_hex"]
    return bool(vector["expected_valid"])


def test_lenient_policy_vectors_get_the_transparency_dev_answer(
    vectors: dict[str, Any], subtests: pytest.Subtests
) -> None:
    others = [v for v in vectors["consistency_proofs"] if v["policy"] not in STRICT_POLICIES]
    assert others
    for vector in others:
        with subtests.test(msg=vector["id"]):
            _check_consistency(vector, _transparency_dev_answer(vector))


def test_real_ct_log_proof_at_depth_22(vectors: dict[str, Any]) -> None:
    # A proof from a production CT log: catches errors that small trees cannot show.
    (vector,) = [
        v for v in vectors["inclusion_proofs"] if v["id"] == "ct-python-real-log-848049-of-3630887"
    ]
    leaf = _inclusion_leaf(vector)
    proof = _hexes(vector["proof_hex"])
    root = bytes.fromhex(vector["root_hex"])
    verify_inclusion(leaf, vector["leaf_index"], vector["tree_size"], proof, root)
    with pytest.raises(InvalidProof):
        verify_inclusion(leaf, vector["leaf_index"] + 1, vector["tree_size"], proof, root)
