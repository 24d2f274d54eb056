"""An embedded :class:`~phivault.crypto.ports.SealedElementStore` on SQLite.

Why it exists before the records service: DEK and index rotation must be tested against a real
store with real compare-and-swap and crash behaviour, not a mock. The records service
implements the same port over its own tables; this adapter is the reference it can copy the
semantics of (positions strictly increase; ``replace`` swaps only if unchanged; tokens are
idempotent per element, field and version).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from phivault.crypto.blind_index import BlindToken, IndexField, Normalization
from phivault.crypto.elements import ElementRef
from phivault.crypto.ports import SealedElement
from phivault.errors import StoreUnavailable

__all__ = ["SqliteSealedElementStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS elements (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, patient TEXT NOT NULL, resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL, path TEXT NOT NULL, ciphertext BLOB NOT NULL,
    index_field TEXT, index_normalization TEXT,
    UNIQUE (tenant, resource_type, resource_id, path)
);
CREATE INDEX IF NOT EXISTS elements_by_patient ON elements (tenant, patient, position);
CREATE TABLE IF NOT EXISTS tokens (
    tenant TEXT NOT NULL, field TEXT NOT NULL, version INTEGER NOT NULL, token TEXT NOT NULL,
    position INTEGER NOT NULL, patient TEXT NOT NULL,
    PRIMARY KEY (tenant, field, version, position)
);
CREATE INDEX IF NOT EXISTS tokens_lookup ON tokens (tenant, field, token);
"""


class SqliteSealedElementStore:
    """Sealed elements and their blind-index tokens in one SQLite file."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the element store at {path}: {exc}") from exc
        self._lock = threading.RLock()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"element store: {exc}") from exc

    def put(
        self,
        ref: ElementRef,
        patient: str,
        ciphertext: bytes,
        *,
        index: IndexField | None = None,
        tokens: Sequence[BlindToken] = (),
    ) -> int:
        """Insert or overwrite an element (and its tokens); returns its position."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM tokens WHERE position IN (SELECT position FROM elements WHERE "
                "tenant = ? AND resource_type = ? AND resource_id = ? AND path = ?)",
                (ref.tenant, ref.resource_type, ref.resource_id, ref.path),
            )
            db.execute(
                "DELETE FROM elements WHERE tenant = ? AND resource_type = ? "
                "AND resource_id = ? AND path = ?",
                (ref.tenant, ref.resource_type, ref.resource_id, ref.path),
            )
            cursor = db.execute(
                "INSERT INTO elements (tenant, patient, resource_type, resource_id, path, "
                "ciphertext, index_field, index_normalization) VALUES (?,?,?,?,?,?,?,?)",
                (
                    ref.tenant, patient, ref.resource_type, ref.resource_id, ref.path,
                    ciphertext, None if index is None else index.name,
                    None if index is None else index.normalization.value,
                ),
            )  # fmt: skip
            position = int(cursor.lastrowid or 0)
            db.executemany(
                "INSERT OR REPLACE INTO tokens VALUES (?,?,?,?,?,?)",
                [(ref.tenant, t.field, t.version, t.token, position, patient) for t in tokens],
            )
        return position

    def get(self, ref: ElementRef) -> SealedElement | None:
        rows = self._rows(
            "WHERE tenant = ? AND resource_type = ? AND resource_id = ? AND path = ?",
            (ref.tenant, ref.resource_type, ref.resource_id, ref.path),
        )
        return rows[0] if rows else None

    def _rows(self, where: str, params: Sequence[Any]) -> list[SealedElement]:
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT position, tenant, patient, resource_type, resource_id, path, "  # noqa: S608
                    f"ciphertext, index_field, index_normalization FROM elements {where}",
                    params,
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"element store: {exc}") from exc
        return [
            SealedElement(
                position=r[0],
                ref=ElementRef(tenant=r[1], resource_type=r[3], resource_id=r[4], path=r[5]),
                patient=r[2],
                ciphertext=bytes(r[6]),
                index=None if r[7] is None else IndexField(r[7], Normalization(r[8])),
            )
            for r in rows
        ]

    def scan(
        self, tenant: str, *, patient: str | None, after: int, limit: int
    ) -> Sequence[SealedElement]:
        if patient is None:
            return self._rows(
                # "+tenant": walk positions in order (no index-plus-sort per batch)
                "WHERE +tenant = ? AND position > ? ORDER BY position LIMIT ?",
                (tenant, after, limit),
            )
        return self._rows(
            "WHERE tenant = ? AND patient = ? AND position > ? ORDER BY position LIMIT ?",
            (tenant, patient, after, limit),
        )

    def replace(self, element: SealedElement, ciphertext: bytes) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE elements SET ciphertext = ? WHERE position = ? AND ciphertext = ?",
                (ciphertext, element.position, element.ciphertext),
            )
            return cursor.rowcount == 1

    def add_tokens(self, element: SealedElement, tokens: Sequence[BlindToken]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO tokens VALUES (?,?,?,?,?,?)",
                [
                    (element.ref.tenant, t.field, t.version, t.token, element.position,
                     element.patient)
                    for t in tokens
                ],
            )  # fmt: skip

    def find(self, tenant: str, tokens: Sequence[BlindToken]) -> list[SealedElement]:
        """Elements whose tokens match any of ``tokens`` (a blind-index equality search)."""
        if not tokens:
            return []
        clauses = " OR ".join("(field = ? AND version = ? AND token = ?)" for _ in tokens)
        params: list[Any] = [tenant]
        for t in tokens:
            params += [t.field, t.version, t.token]
        with self._lock:
            positions = [
                row[0]
                for row in self._db.execute(
                    f"SELECT DISTINCT position FROM tokens WHERE tenant = ? AND ({clauses})",  # noqa: S608
                    params,
                ).fetchall()
            ]
        if not positions:
            return []
        marks = ",".join("?" * len(positions))
        return self._rows(f"WHERE position IN ({marks}) ORDER BY position", positions)

    def token_versions(self, tenant: str) -> set[int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT version FROM tokens WHERE tenant = ?", (tenant,)
            ).fetchall()
        return {row[0] for row in rows}

    def drop_token_version(self, tenant: str, version: int) -> int:
        with self._tx() as db:
            return db.execute(
                "DELETE FROM tokens WHERE tenant = ? AND version = ?", (tenant, version)
            ).rowcount

    def drop_patient_tokens(self, tenant: str, patient: str) -> int:
        with self._tx() as db:
            return db.execute(
                "DELETE FROM tokens WHERE tenant = ? AND patient = ?", (tenant, patient)
            ).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
