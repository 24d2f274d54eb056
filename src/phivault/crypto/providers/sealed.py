"""The sealed local keystore: the root key exists only as M-of-N Shamir shares held by people.

Why: the embedded shape has no HSM, and a root key on disk next to the wrapped keys would be no
custody at all. ``phivault init`` creates the root key, splits it, prints the shares once and
keeps only public facts in ``<keys>/root.json``: the split's id, M and N, one SHA-256
commitment per share, and a check value (HMAC of a fixed label under the root key). Unsealing
rebuilds the root key in memory from M shares; sealing forgets it.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phivault.crypto._hazmat import SecretKey, Share, aead, combine, generate_key, split
from phivault.crypto._hazmat import unwrap_key as _unwrap
from phivault.crypto._hazmat import wrap_key as _wrap
from phivault.crypto.errors import InvalidShares, KeyNotFound, Sealed
from phivault.errors import ConfigurationError

__all__ = ["ROOT_FILE", "SealedLocalProvider"]

ROOT_FILE = "root.json"
_CHECK_LABEL = b"phivault.root-check.v1"


def _check_value(root: SecretKey) -> str:
    return hmac.digest(root.reveal(), _CHECK_LABEL, "sha256").hex()


class SealedLocalProvider:
    """Root key provider for the embedded shape. Starts sealed."""

    name = "sealed"

    @property
    def credentials_needed(self) -> int:
        return self._threshold

    def __init__(self, keys_dir: Path) -> None:
        path = keys_dir / ROOT_FILE
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
            self._root_key_id = str(doc["root_key_id"])
            self._set_id = str(doc["set_id"])
            self._threshold = int(doc["threshold"])
            self._shares = int(doc["shares"])
            self._commitments = {int(x): str(c) for x, c in doc["commitments"].items()}
            self._check = str(doc["check"])
        except FileNotFoundError as exc:
            raise KeyNotFound(f"no sealed keystore at {keys_dir} (run `phivault init`)") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"{path} is damaged") from exc
        self._lock = threading.Lock()
        self._root: AESGCM | None = None

    @classmethod
    def initialize(
        cls, keys_dir: Path, *, threshold: int = 3, shares: int = 5
    ) -> tuple[SealedLocalProvider, list[str]]:
        """Create the root key and split it. Returns the provider (sealed) and the shares.

        The shares are returned once and stored nowhere: show them to their holders now.
        """
        if not 2 <= threshold <= shares <= 16:
            raise ConfigurationError("need 2 <= threshold <= shares <= 16 for unseal shares")
        path = keys_dir / ROOT_FILE
        if path.exists():
            raise ConfigurationError(f"{path} exists: this data directory has a root key")
        root = generate_key("root")
        parts = split(root, threshold=threshold, shares=shares)
        doc = {
            "format": 1,
            "provider": "sealed",
            "root_key_id": "root-" + secrets.token_hex(6),
            "set_id": parts[0].set_id,
            "threshold": threshold,
            "shares": shares,
            "commitments": {str(p.x): p.commitment() for p in parts},
            "check": _check_value(root),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        root.wipe()
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return cls(keys_dir), [p.encode() for p in parts]

    @property
    def root_key_id(self) -> str:
        return self._root_key_id

    @property
    def threshold(self) -> int:
        return self._threshold

    @property
    def share_count(self) -> int:
        return self._shares

    @property
    def sealed(self) -> bool:
        return self._root is None

    def verify_shares(self, credentials: Sequence[str]) -> SecretKey:
        """Check shares one by one, then together; return the root key. Raises InvalidShares."""
        parsed: list[Share] = []
        for position, text in enumerate(credentials, start=1):
            share = Share.parse(text, position=position)
            if share.set_id != self._set_id:
                raise InvalidShares(f"share #{position} belongs to another keystore")
            if share.threshold != self._threshold:
                raise InvalidShares(f"share #{position} names the wrong threshold")
            expected = self._commitments.get(share.x)
            if expected is None or not hmac.compare_digest(expected, share.commitment()):
                raise InvalidShares(
                    f"share #{position} (index {share.x}) does not match its commitment: "
                    "it was altered or corrupted"
                )
            if any(p.x == share.x for p in parsed):
                raise InvalidShares(f"share #{position} (index {share.x}) was given twice")
            parsed.append(share)
        if len(parsed) < self._threshold:
            raise InvalidShares(
                f"{len(parsed)} share(s) given; {self._threshold} of {self._shares} are needed"
            )
        root = combine(parsed)
        if not hmac.compare_digest(_check_value(root), self._check):
            root.wipe()
            raise InvalidShares("the shares do not rebuild this keystore's root key")
        return root

    def unseal(self, credentials: Sequence[str]) -> None:
        root = self.verify_shares(credentials)
        with self._lock:
            self._root = aead(root)
        root.wipe()

    def seal(self) -> None:
        with self._lock:
            self._root = None

    def _aead(self) -> AESGCM:
        root = self._root
        if root is None:
            raise Sealed()
        return root

    def wrap(self, key: SecretKey, aad: bytes) -> bytes:
        return _wrap(self._aead(), key, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> SecretKey:
        return _unwrap(self._aead(), blob, aad, label="kek")

    def __repr__(self) -> str:
        state = "sealed" if self.sealed else "unsealed"
        return (
            f"<SealedLocalProvider {self._root_key_id} {self._threshold}-of-{self._shares} {state}>"
        )
