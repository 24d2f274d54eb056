"""The AWS KMS provider without a network: botocore's Stubber checks requests and answers.

Not covered here (see docs/decisions/keys-providers.md): real IAM policies, KMS key states
(disabled, pending deletion), throttling and retries against the live service, regions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phivault.crypto._hazmat import SecretKey
from phivault.crypto.elements import ElementRef
from phivault.crypto.errors import DecryptionFailed, KeyUnavailable, Sealed
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.awskms import AwsKmsProvider
from phivault.ledger.testing import InMemoryAuditSink

KEY_ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


class FakeKms:
    """Answers Encrypt/Decrypt through the Stubber with a local AES-GCM "KMS key"."""

    def __init__(self, stubber: Stubber) -> None:
        self.stubber = stubber
        self.key = AESGCM(bytes(range(32)))

    def expect_encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        blob = b"\x00" * 12 + self.key.encrypt(b"\x00" * 12, plaintext, None)
        self.stubber.add_response(
            "encrypt",
            {"CiphertextBlob": blob, "KeyId": KEY_ARN},
            {"KeyId": KEY_ARN, "Plaintext": plaintext, "EncryptionContext": _context(aad)},
        )
        return blob

    def expect_decrypt(self, blob: bytes, aad: bytes) -> None:
        self.stubber.add_response(
            "decrypt",
            {"Plaintext": self.key.decrypt(blob[:12], blob[12:], None), "KeyId": KEY_ARN},
            {"KeyId": KEY_ARN, "CiphertextBlob": blob, "EncryptionContext": _context(aad)},
        )


def _context(aad: bytes) -> dict[str, str]:
    return {"phivault:v": "1", "phivault:aad-sha256": hashlib.sha256(aad).hexdigest()}


@pytest.fixture
def kms() -> Iterator[tuple[AwsKmsProvider, Stubber]]:
    client: Any = boto3.client(
        "kms", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    with Stubber(client) as stubber:
        provider = AwsKmsProvider(client, KEY_ARN)
        assert provider.sealed
        provider.unseal([])
        yield provider, stubber
        stubber.assert_no_pending_responses()


def test_wrap_and_unwrap_bind_the_context(kms: tuple[AwsKmsProvider, Stubber]) -> None:
    provider, stubber = kms
    fake = FakeKms(stubber)
    secret = SecretKey(bytes(range(1, 33)))
    blob = fake.expect_encrypt(secret.reveal(), b"aad-1")
    assert provider.wrap(secret, b"aad-1") == blob
    fake.expect_decrypt(blob, b"aad-1")
    assert provider.unwrap(blob, b"aad-1") == secret


def test_kms_errors_become_phivault_errors(kms: tuple[AwsKmsProvider, Stubber]) -> None:
    provider, stubber = kms
    stubber.add_client_error("decrypt", service_error_code="InvalidCiphertextException")
    with pytest.raises(DecryptionFailed):
        provider.unwrap(b"x" * 60, b"aad")
    stubber.add_client_error("encrypt", service_error_code="AccessDeniedException")
    with pytest.raises(KeyUnavailable, match="AccessDeniedException") as info:
        provider.wrap(SecretKey(bytes(range(1, 33))), b"aad")
    assert info.value.__cause__ is None  # nothing of the request (key bytes) is chained
    stubber.add_client_error("encrypt", service_error_code="ThrottlingException")
    with pytest.raises(KeyUnavailable):
        provider.wrap(SecretKey(bytes(range(1, 33))), b"aad")


def test_sealed_kms_provider_refuses(kms: tuple[AwsKmsProvider, Stubber]) -> None:
    provider, _ = kms
    provider.seal()
    with pytest.raises(Sealed):
        provider.wrap(SecretKey(bytes(range(1, 33))), b"aad")
    provider.unseal([])
    assert not provider.sealed


async def test_key_ring_on_kms(kms: tuple[AwsKmsProvider, Stubber], tmp_path: Any) -> None:
    provider, stubber = kms
    fake = FakeKms(stubber)
    store = SqliteKeyStore(tmp_path / "ks.sqlite3")
    ring = KeyRing(store=store, provider=provider, audit=InMemoryAuditSink(), observer="node-k")
    await ring.unseal([])
    # The KEK is generated inside the ring: intercept wrap to learn it, then stub with it.
    captured: dict[str, bytes] = {}
    real_wrap = provider.wrap

    def wrap(key: SecretKey, aad: bytes) -> bytes:
        captured["kek"], captured["aad"] = key.reveal(), aad
        captured["blob"] = fake.expect_encrypt(key.reveal(), aad)
        return real_wrap(key, aad)

    provider.wrap = wrap  # type: ignore[method-assign]
    cipher = await ring.patient_cipher("acme", "p1", create=True)
    ref_plain = b"Smith"
    ref = ElementRef("acme", "Patient", "p1", "name[0].family")
    sealed = cipher.seal(ref, ref_plain)
    # a fresh ring must unwrap the KEK through KMS Decrypt
    fresh = KeyRing(store=store, provider=provider, audit=InMemoryAuditSink(), observer="node-k")
    fake.expect_decrypt(captured["blob"], captured["aad"])
    again = await fresh.patient_cipher("acme", "p1")
    assert again.open(ref, sealed) == ref_plain
    store.close()
