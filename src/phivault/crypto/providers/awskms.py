"""AWS KMS as root key provider: KEKs are wrapped by ``kms:Encrypt`` under a customer key.

Why: in the scaled shape on AWS the root key is a KMS key that never leaves KMS. The associated
data is bound through the encryption context as its SHA-256 (the context is logged in clear by
CloudTrail, so it carries a digest, not tenant names). botocore errors become phivault errors.
Tested with botocore's Stubber (no network); what that does not cover is listed in
``docs/decisions/keys-providers.md``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

from phivault.crypto._hazmat import SecretKey
from phivault.crypto.errors import DecryptionFailed, KeyUnavailable, Sealed

__all__ = ["AwsKmsProvider"]


def _context(aad: bytes) -> dict[str, str]:
    return {"phivault:v": "1", "phivault:aad-sha256": hashlib.sha256(aad).hexdigest()}


class AwsKmsProvider:
    """Root key provider backed by one KMS key. ``client`` is a boto3 KMS client."""

    name = "awskms"

    @property
    def credentials_needed(self) -> int:
        return 0  # the KMS authenticates the caller, not a credential

    def __init__(self, client: Any, key_id: str) -> None:
        self._client = client
        self._key_id = key_id
        self._sealed = True  # like every provider: usable only after an (audited) unseal
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, key_id: str, *, region: str | None = None) -> AwsKmsProvider:
        """A client whose calls end well inside the key ring's 10 s breaker limit: 1 s to
        connect, 3 s to read, two attempts (botocore's standard retries, with jitter, cover
        throttling; the key ring's breaker covers an outage)."""
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=1, read_timeout=3, retries={"mode": "standard", "total_max_attempts": 2}
        )
        try:
            client = boto3.client("kms", region_name=region, config=config)
        except Exception as exc:  # botocore raises several unrelated types here
            raise KeyUnavailable(f"cannot create a KMS client: {type(exc).__name__}") from exc
        return cls(client, key_id)

    @property
    def root_key_id(self) -> str:
        return f"awskms:{self._key_id}"

    @property
    def sealed(self) -> bool:
        return self._sealed

    def unseal(self, credentials: Sequence[str]) -> None:
        # KMS authorizes by IAM; "unsealed" only means this process may use it again.
        with self._lock:
            self._sealed = False

    def seal(self) -> None:
        with self._lock:
            self._sealed = True

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        if self._sealed:
            raise Sealed()
        try:
            result: dict[str, Any] = getattr(self._client, operation)(**params)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "unknown"))
            if code in {"InvalidCiphertextException", "IncorrectKeyException"}:
                raise DecryptionFailed(f"KMS refused the ciphertext ({code})") from None
            raise KeyUnavailable(f"KMS {operation} failed: {code}") from None
        except BotoCoreError as exc:
            raise KeyUnavailable(f"KMS {operation} failed: {type(exc).__name__}") from None
        return result

    def wrap(self, key: SecretKey, aad: bytes) -> bytes:
        result = self._call(
            "encrypt", KeyId=self._key_id, Plaintext=key.reveal(), EncryptionContext=_context(aad)
        )
        return bytes(result["CiphertextBlob"])

    def unwrap(self, blob: bytes, aad: bytes) -> SecretKey:
        result = self._call(
            "decrypt", KeyId=self._key_id, CiphertextBlob=blob, EncryptionContext=_context(aad)
        )
        plaintext = result["Plaintext"]
        try:
            return SecretKey(plaintext, label="kek")
        except ValueError:
            raise DecryptionFailed("KMS returned a key of the wrong length") from None

    def __repr__(self) -> str:
        return f"<AwsKmsProvider {self._key_id}>"
