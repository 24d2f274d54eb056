"""Ciphertext format v1: known answers from a golden file, and every kind of tampering fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.crypto.elements import (
    OVERHEAD_BYTES,
    ElementRef,
    PatientCipher,
    element_aad,
    key_version_of,
)
from phivault.crypto.errors import DecryptionFailed

VECTORS = json.loads((Path(__file__).parent / "vectors" / "ciphertext_v1.json").read_text())


def _cipher(vector: dict[str, Any], extra: dict[int, bytes] | None = None) -> PatientCipher:
    keys = {vector["version"]: AESGCM(bytes.fromhex(vector["key"]))}
    for version, key in (extra or {}).items():
        keys[version] = AESGCM(key)
    return PatientCipher(vector["tenant"], vector["patient"], keys, vector["version"])


def _ref(vector: dict[str, Any]) -> ElementRef:
    return ElementRef(
        vector["tenant"], vector["resource_type"], vector["resource_id"], vector["path"]
    )


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["description"])
def test_known_answers(vector: dict[str, Any]) -> None:
    ref = _ref(vector)
    ciphertext = bytes.fromhex(vector["ciphertext"])
    header = ciphertext[:5]
    assert header == bytes([1]) + vector["version"].to_bytes(4, "big")
    assert element_aad(header, vector["tenant"], vector["patient"], ref).hex() == vector["aad"]
    nonce = bytes.fromhex(vector["nonce"])
    assert ciphertext[5:17] == nonce
    # the format is exactly header || nonce || AES-256-GCM(key, nonce, plaintext, aad)
    again = AESGCM(bytes.fromhex(vector["key"])).encrypt(
        nonce, bytes.fromhex(vector["plaintext"]), bytes.fromhex(vector["aad"])
    )
    assert header + nonce + again == ciphertext
    assert _cipher(vector).open(ref, ciphertext) == bytes.fromhex(vector["plaintext"])
    assert key_version_of(ciphertext) == vector["version"]


def test_aad_layout_matches_the_documentation() -> None:
    vector = VECTORS["vectors"][0]
    header = bytes([1, 0, 0, 0, 1])

    def lp(s: str) -> bytes:
        return len(s.encode()).to_bytes(2, "big") + s.encode()

    expected = b"phivault.element.v1" + header + lp("acme") + lp("p1") + lp("Patient")
    expected += lp("p1") + lp("name[0].family")
    assert expected.hex() == vector["aad"]


V0 = VECTORS["vectors"][0]
GOOD = bytes.fromhex(V0["ciphertext"])


def test_every_flipped_bit_fails() -> None:
    cipher, ref = _cipher(V0), _ref(V0)
    for byte in range(len(GOOD)):
        for bit in range(8):
            tampered = bytearray(GOOD)
            tampered[byte] ^= 1 << bit
            with pytest.raises(DecryptionFailed):
                cipher.open(ref, bytes(tampered))


@pytest.mark.parametrize(
    "field, value",
    [
        ("resource_type", "Observation"),
        ("resource_id", "p2"),
        ("path", "name[0].given[0]"),
        ("path", "name[1].family"),
    ],
)
def test_copied_to_another_record_or_element_fails(field: str, value: str) -> None:
    ref = _ref(V0)
    moved = ref._replace(**{field: value})
    with pytest.raises(DecryptionFailed) as info:
        _cipher(V0).open(moved, GOOD)
    assert str(info.value) == "decryption failed"  # clients learn nothing
    assert "tag" in info.value.diagnostic  # operators learn what failed


def test_copied_to_another_patient_or_tenant_fails() -> None:
    key = {V0["version"]: AESGCM(bytes.fromhex(V0["key"]))}
    other_patient = PatientCipher(V0["tenant"], "p2", key, V0["version"])
    with pytest.raises(DecryptionFailed):
        other_patient.open(_ref(V0), GOOD)
    other_tenant = PatientCipher("globex", V0["patient"], key, V0["version"])
    with pytest.raises(DecryptionFailed):
        other_tenant.open(ElementRef("globex", "Patient", "p1", "name[0].family"), GOOD)


def test_truncated_and_garbage_fail() -> None:
    cipher, ref = _cipher(V0), _ref(V0)
    for cut in (0, 1, 5, 17, OVERHEAD_BYTES - 1, len(GOOD) - 1):
        with pytest.raises(DecryptionFailed):
            cipher.open(ref, GOOD[:cut])
    with pytest.raises(DecryptionFailed, match="decryption failed"):
        cipher.open(ref, bytes([2]) + GOOD[1:])  # unknown format version


def test_relabelled_key_version_fails_even_when_that_version_is_live() -> None:
    cipher = _cipher(V0, extra={2: bytes(range(100, 132))})
    relabelled = bytes([1, 0, 0, 0, 2]) + GOOD[5:]
    with pytest.raises(DecryptionFailed):
        cipher.open(_ref(V0), relabelled)
    unknown = bytes([1, 0, 0, 0, 9]) + GOOD[5:]
    with pytest.raises(DecryptionFailed) as info:
        cipher.open(_ref(V0), unknown)
    assert "not live" in info.value.diagnostic


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048), st.text(min_size=1, max_size=40))
def test_round_trip_any_plaintext_any_path(plaintext: bytes, path: str) -> None:
    cipher = _cipher(V0)
    ref = ElementRef(V0["tenant"], "Patient", "p1", path)
    sealed = cipher.seal(ref, plaintext)
    assert len(sealed) == len(plaintext) + OVERHEAD_BYTES
    assert cipher.open(ref, sealed) == plaintext
    (batch,) = cipher.seal_many([(ref, plaintext)])
    assert batch != sealed  # fresh nonce every time
    assert cipher.open_many([(ref, batch)]) == [plaintext]


def test_open_many_applies_the_same_checks() -> None:
    cipher, ref = _cipher(V0), _ref(V0)
    assert cipher.open_many([(ref, GOOD), (ref, GOOD)]) == [bytes.fromhex(V0["plaintext"])] * 2
    flipped = GOOD[:-1] + bytes([GOOD[-1] ^ 1])
    with pytest.raises(DecryptionFailed):
        cipher.open_many([(ref, GOOD), (ref, flipped)])
    with pytest.raises(DecryptionFailed):
        cipher.open_many([(ref._replace(path="birthDate"), GOOD)])
    with pytest.raises(DecryptionFailed):
        cipher.open_many([(ref, GOOD[:20])])


def test_older_live_versions_open_through_every_path() -> None:
    old_key, new_key = AESGCM(bytes(range(32))), AESGCM(bytes(range(1, 33)))
    ref = ElementRef("acme", "Patient", "p1", "birthDate")
    before = PatientCipher("acme", "p1", {1: old_key}, 1).seal(ref, b"1970")
    during = PatientCipher("acme", "p1", {1: old_key, 2: new_key}, 2)
    after = during.seal(ref, b"1971")  # the element's AAD is now cached for version 2
    assert key_version_of(after) == 2
    assert during.open_many([(ref, before), (ref, after)]) == [b"1970", b"1971"]
    assert during.open(ref, before) == b"1970"


fields = st.text(min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(fields, fields, fields, fields, fields, fields)
def test_any_change_of_context_fails(
    rtype: str, rid: str, path: str, other_rtype: str, other_rid: str, other_path: str
) -> None:
    cipher = _cipher(V0)
    ref = ElementRef(V0["tenant"], rtype, rid, path)
    moved = ElementRef(V0["tenant"], other_rtype, other_rid, other_path)
    sealed = cipher.seal(ref, b"value")
    if moved == ref:
        assert cipher.open(moved, sealed) == b"value"
    else:
        with pytest.raises(DecryptionFailed):
            cipher.open(moved, sealed)
        with pytest.raises(DecryptionFailed):
            cipher.open_many([(moved, sealed)])
