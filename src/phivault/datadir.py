"""The data directory: where an embedded phivault keeps everything it owns.

Layout (each part owns its folder and nothing else)::

    <data-dir>/phivault.json   manifest: format, dev or production, origin, node id
    <data-dir>/ledger/         the audit ledger (entries, leaf hashes, checkpoints, signing key)
    <data-dir>/keys/           key custody (sealed keystore)
    <data-dir>/identity/       the development identity provider (dev data dirs only)
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from phivault.errors import ConfigurationError, PhivaultError

__all__ = ["DataDir", "DataDirExists", "DataDirMissing", "default_data_dir"]

MANIFEST = "phivault.json"
FORMAT = 1
ENV_VAR = "PHIVAULT_DATA_DIR"


def default_data_dir() -> Path:
    return Path(os.environ.get(ENV_VAR, "./phivault-data"))


class DataDirMissing(PhivaultError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"no phivault data directory at {path} (create one with `phivault init`)")
        self.path = path


class DataDirExists(PhivaultError):
    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} already holds a phivault data directory; refusing to overwrite it"
        )
        self.path = path


@dataclass(frozen=True)
class DataDir:
    path: Path
    dev: bool
    origin: str
    node_id: str
    created: str

    @property
    def ledger_dir(self) -> Path:
        return self.path / "ledger"

    @property
    def keys_dir(self) -> Path:
        return self.path / "keys"

    @property
    def identity_dir(self) -> Path:
        return self.path / "identity"

    @property
    def records_dir(self) -> Path:
        """The embedded records database (SQLite, WAL): ciphertext and index entries only."""
        return self.path / "records"

    @classmethod
    def create(cls, path: Path, *, dev: bool, origin: str | None = None) -> DataDir:
        """Create a new data directory. Refuses an existing one or a non-empty folder."""
        if (path / MANIFEST).exists():
            raise DataDirExists(path)
        if path.exists() and any(path.iterdir()):
            raise DataDirExists(path)
        node_id = "node-" + secrets.token_hex(4)
        origin = origin or f"phivault.local/{node_id}"
        if not origin or "\n" in origin or origin.strip() != origin:
            raise ConfigurationError("origin must be one line with no surrounding spaces")
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        data_dir = cls(
            path=path,
            dev=dev,
            origin=origin,
            node_id=node_id,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        for folder in (data_dir.ledger_dir, data_dir.keys_dir):
            folder.mkdir(mode=0o700)
        # Write the manifest last: its presence means "initialized".
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(data_dir._manifest(), indent=2) + "\n")
        os.replace(tmp, path / MANIFEST)
        return data_dir

    @classmethod
    def open(cls, path: Path) -> DataDir:
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise DataDirMissing(path)
        try:
            doc: dict[str, Any] = json.loads(manifest_path.read_text())
            if doc.get("format") != FORMAT:
                raise ConfigurationError(
                    f"{manifest_path}: unsupported format {doc.get('format')!r} (expected {FORMAT})"
                )
            return cls(
                path=path,
                dev=bool(doc["dev"]),
                origin=str(doc["origin"]),
                node_id=str(doc["node_id"]),
                created=str(doc["created"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"{manifest_path} is damaged: {exc}") from exc

    def _manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "dev": self.dev,
            "origin": self.origin,
            "node_id": self.node_id,
            "created": self.created,
        }
