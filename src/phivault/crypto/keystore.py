"""The embedded :class:`~phivault.crypto.ports.KeyStore`: one SQLite file under ``keys/``.

Why SQLite rather than JSON files: a million wrapped DEKs, compare-and-swap rewraps and atomic
shred (destroy keys + keep the shred record) need transactions; SQLite gives them with no
server. ``secure_delete`` is on, so destroyed wrapped keys are overwritten in the file rather
than left in free pages, and a shred ends with a WAL checkpoint (TRUNCATE) so that no old
frame keeps them either. The scaled shape implements the same port on PostgreSQL
(``docs/decisions/keys-keystore-sqlite.md``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from phivault.crypto.errors import KeyNotFound
from phivault.crypto.ports import (
    Hold,
    JobKind,
    KeyPurpose,
    KeyRecord,
    KeyState,
    RotationJob,
    ShredRecord,
    WrappedKey,
)
from phivault.errors import StoreUnavailable

__all__ = ["SqliteKeyStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    purpose TEXT NOT NULL,
    subject TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    wrapped BLOB,
    wrapped_by TEXT NOT NULL,
    created TEXT NOT NULL,
    rotated TEXT,
    destroyed TEXT,
    job TEXT,
    UNIQUE (tenant, purpose, subject, version)
);
CREATE INDEX IF NOT EXISTS keys_by_tenant ON keys (tenant, purpose, subject, state);
CREATE TABLE IF NOT EXISTS holds (
    tenant TEXT NOT NULL, patient TEXT NOT NULL, until TEXT NOT NULL, reason TEXT NOT NULL,
    placed_by TEXT NOT NULL, placed TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS shreds (
    tenant TEXT NOT NULL, patient TEXT NOT NULL, shredded TEXT NOT NULL, by TEXT NOT NULL,
    reason TEXT NOT NULL, keys_destroyed TEXT NOT NULL, ledger_index INTEGER NOT NULL,
    PRIMARY KEY (tenant, patient)
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, tenant TEXT NOT NULL, patient TEXT,
    phase TEXT NOT NULL, cursor INTEGER NOT NULL, done INTEGER NOT NULL,
    started TEXT NOT NULL, updated TEXT NOT NULL, finished TEXT
);
"""

_COLUMNS = (
    "key_id, tenant, purpose, subject, version, state, wrapped, wrapped_by, created, rotated, "
    "destroyed, job, seq"
)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _record(row: Sequence[Any]) -> KeyRecord:
    created = datetime.fromisoformat(row[8])
    return KeyRecord(
        key_id=row[0],
        tenant=row[1],
        purpose=KeyPurpose(row[2]),
        subject=row[3],
        version=row[4],
        state=KeyState(row[5]),
        wrapped=row[6],
        wrapped_by=row[7],
        created=created,
        rotated=_dt(row[9]),
        destroyed=_dt(row[10]),
        job=row[11],
        seq=row[12],
    )


class SqliteKeyStore:
    """Key metadata and wrapped keys in ``<keys dir>/keystore.sqlite3``."""

    FILENAME = "keystore.sqlite3"

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the keystore at {path}: {exc}") from exc
        self._lock = threading.RLock()
        self.path = path

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
                raise StoreUnavailable(f"keystore: {exc}") from exc

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"keystore: {exc}") from exc

    # keys -------------------------------------------------------------------------------

    def add(self, records: Sequence[KeyRecord], *, demote: Sequence[str] = ()) -> None:
        rows = [
            (
                r.key_id, r.tenant, r.purpose.value, r.subject, r.version, r.state.value,
                r.wrapped, r.wrapped_by, _ts(r.created), _ts(r.rotated), _ts(r.destroyed), r.job,
            )
            for r in records
        ]  # fmt: skip
        with self._tx() as db:
            db.executemany(
                "INSERT INTO keys (key_id, tenant, purpose, subject, version, state, wrapped, "
                "wrapped_by, created, rotated, destroyed, job) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            if demote:
                now = _ts(records[0].created) if records else None
                db.executemany(
                    "UPDATE keys SET state = 'decrypt-only', rotated = ? "
                    "WHERE key_id = ? AND state = 'active'",
                    [(now, key_id) for key_id in demote],
                )

    def get(self, key_id: str) -> KeyRecord:
        rows = self._query(f"SELECT {_COLUMNS} FROM keys WHERE key_id = ?", (key_id,))  # noqa: S608
        if not rows:
            raise KeyNotFound(f"no key {key_id}")
        return _record(rows[0])

    def live(self, tenant: str, purpose: KeyPurpose, subject: str = "") -> list[KeyRecord]:
        rows = self._query(
            f"SELECT {_COLUMNS} FROM keys WHERE tenant = ? AND purpose = ? AND subject = ? "  # noqa: S608
            "AND state != 'destroyed' ORDER BY version",
            (tenant, purpose.value, subject),
        )
        return [_record(row) for row in rows]

    def live_many(self, tenant: str, subjects: Sequence[str]) -> dict[str, list[KeyRecord]]:
        result: dict[str, list[KeyRecord]] = {subject: [] for subject in subjects}
        for start in range(0, len(subjects), 500):
            chunk = list(subjects[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._query(
                f"SELECT {_COLUMNS} FROM keys WHERE tenant = ? AND purpose = 'dek' "  # noqa: S608
                f"AND subject IN ({marks}) AND state != 'destroyed' ORDER BY version",
                [tenant, *chunk],
            )
            for row in rows:
                result[row[3]].append(_record(row))
        return result

    def records(
        self,
        tenant: str | None = None,
        purpose: KeyPurpose | None = None,
        subject: str | None = None,
        *,
        include_destroyed: bool = True,
    ) -> list[KeyRecord]:
        clauses, params = [], []
        for column, value in (
            ("tenant", tenant),
            ("purpose", None if purpose is None else purpose.value),
            ("subject", subject),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if not include_destroyed:
            clauses.append("state != 'destroyed'")
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM keys {where} ORDER BY tenant, purpose, subject, version",  # noqa: S608
            params,
        )
        return [_record(row) for row in rows]

    def dek_summary(self) -> dict[tuple[str, str, str], int]:
        rows = self._query(
            "SELECT tenant, state, wrapped_by, count(*) FROM keys WHERE purpose = 'dek' "
            "GROUP BY tenant, state, wrapped_by"
        )
        return {(row[0], row[1], row[2]): row[3] for row in rows}

    def tenants(self) -> list[str]:
        return [row[0] for row in self._query("SELECT DISTINCT tenant FROM keys ORDER BY tenant")]

    def scan_wrapped_by(
        self, tenant: str, not_wrapped_by: str, after: int, limit: int
    ) -> list[WrappedKey]:
        rows = self._query(
            "SELECT seq, key_id, purpose, subject, version, wrapped, wrapped_by FROM keys "
            # "+tenant": walk the rowid (seq) order, never the tenant index plus a sort, so that
            # each batch costs its own size and a million-key rotation stays linear.
            "WHERE seq > ? AND +tenant = ? AND purpose != 'kek' AND state != 'destroyed' "
            "AND wrapped_by != ? ORDER BY seq LIMIT ?",
            (after, tenant, not_wrapped_by, limit),
        )
        return [WrappedKey._make(row) for row in rows]

    def rewrap(self, updates: Sequence[tuple[int, bytes, bytes, str]], now: datetime) -> int:
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE keys SET wrapped = ?, wrapped_by = ? WHERE seq = ? AND wrapped = ?",
                [(new, by, seq, old) for seq, old, new, by in updates],
            )
            return db.total_changes - before

    def destroy(self, key_ids: Sequence[str], now: datetime) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE keys SET wrapped = NULL, state = 'destroyed', destroyed = ? "
                "WHERE key_id = ?",
                [(_ts(now), key_id) for key_id in key_ids],
            )
        self._checkpoint()

    def subjects(self, tenant: str, after: str, limit: int) -> list[str]:
        rows = self._query(
            "SELECT DISTINCT subject FROM keys WHERE tenant = ? AND purpose = 'dek' "
            "AND state != 'destroyed' AND subject > ? ORDER BY subject LIMIT ?",
            (tenant, after, limit),
        )
        return [row[0] for row in rows]

    # holds and shreds ---------------------------------------------------------------------

    def place_hold(self, hold: Hold) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO holds VALUES (?,?,?,?,?,?)",
                (
                    hold.tenant, hold.patient, _ts(hold.until), hold.reason, hold.placed_by,
                    _ts(hold.placed),
                ),
            )  # fmt: skip

    def holds(self, tenant: str, patient: str) -> list[Hold]:
        rows = self._query(
            "SELECT tenant, patient, until, reason, placed_by, placed FROM holds "
            "WHERE tenant = ? AND patient = ? ORDER BY until",
            (tenant, patient),
        )
        return [
            Hold(
                tenant=r[0],
                patient=r[1],
                until=datetime.fromisoformat(r[2]),
                reason=r[3],
                placed_by=r[4],
                placed=datetime.fromisoformat(r[5]),
            )
            for r in rows
        ]

    def shred(self, record: ShredRecord) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE keys SET wrapped = NULL, state = 'destroyed', destroyed = ? "
                "WHERE tenant = ? AND purpose = 'dek' AND subject = ?",
                (_ts(record.shredded), record.tenant, record.patient),
            )
            db.execute(
                "INSERT INTO shreds VALUES (?,?,?,?,?,?,?)",
                (
                    record.tenant, record.patient, _ts(record.shredded), record.by,
                    record.reason, json.dumps(list(record.keys_destroyed)), record.ledger_index,
                ),
            )  # fmt: skip
        self._checkpoint()

    def shred_record(self, tenant: str, patient: str) -> ShredRecord | None:
        rows = self._query(
            "SELECT tenant, patient, shredded, by, reason, keys_destroyed, ledger_index "
            "FROM shreds WHERE tenant = ? AND patient = ?",
            (tenant, patient),
        )
        if not rows:
            return None
        r = rows[0]
        return ShredRecord(
            tenant=r[0],
            patient=r[1],
            shredded=datetime.fromisoformat(r[2]),
            by=r[3],
            reason=r[4],
            keys_destroyed=tuple(json.loads(r[5])),
            ledger_index=r[6],
        )

    def _checkpoint(self) -> None:
        # Destroyed material must not survive in WAL frames either.
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"keystore: {exc}") from exc

    # rotation jobs -----------------------------------------------------------------------

    def start_job(self, job: RotationJob) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,NULL)",
                (
                    job.job_id, job.kind.value, job.tenant, job.patient, job.phase, job.cursor,
                    job.done, _ts(job.started), _ts(job.updated),
                ),
            )  # fmt: skip

    def open_jobs(self, tenant: str) -> list[RotationJob]:
        rows = self._query(
            "SELECT job_id, kind, tenant, patient, phase, cursor, done, started, updated "
            "FROM jobs WHERE tenant = ? AND finished IS NULL ORDER BY started",
            (tenant,),
        )
        return [
            RotationJob(
                job_id=r[0],
                kind=JobKind(r[1]),
                tenant=r[2],
                patient=r[3],
                phase=r[4],
                cursor=r[5],
                done=r[6],
                started=datetime.fromisoformat(r[7]),
                updated=datetime.fromisoformat(r[8]),
            )
            for r in rows
        ]

    def update_job(self, job_id: str, *, phase: str, cursor: int, done: int, now: datetime) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET phase = ?, cursor = ?, done = ?, updated = ? WHERE job_id = ?",
                (phase, cursor, done, _ts(now), job_id),
            )

    def finish_job(self, job_id: str, now: datetime) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET phase = 'done', finished = ?, updated = ? WHERE job_id = ?",
                (_ts(now), _ts(now), job_id),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
