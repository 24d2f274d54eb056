"""Settling write intents while serving, for the scaled shape's many workers.

The embedded server settles open intents once, at start (nothing can be in flight then). With
several workers a worker can die mid-transaction while the others keep serving, so every
worker runs an :class:`IntentReconciler`: every ``every_s`` seconds, whichever worker takes
the PostgreSQL advisory lock first scans the ledger (a view of the sequencer's) for intents
older than ``settle_after_s`` that have no outcome, checks the store, and records the
outcome through the audit stream. The lock keeps two workers from recording the same outcome
twice; the age keeps a worker from settling a write another worker is most likely still
making, and the intent claims (docs/decisions/records-intent-claims.md) keep the verdict true
for one slower than that: the reconciler waits for its open transaction, or the write fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Engine, text

from phivault.errors import PhivaultError
from phivault.pg_advisory import advisory_key
from phivault.records.repository import IntentScan

if TYPE_CHECKING:
    from phivault.ledger.ports import AuditSink, LedgerReader
    from phivault.records.repository import RecordsRepository
    from phivault.records.results import ReconcileReport

__all__ = ["IntentReconciler", "reconcile_lock"]

_log = structlog.get_logger("phivault.reconciler")


@contextlib.contextmanager
def reconcile_lock(engine: Engine) -> Iterator[bool]:
    """Whether this process may reconcile now: a session advisory lock on PostgreSQL (held
    until the block ends), always on SQLite (one process serves an embedded database)."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        # One reconciler per records schema (deployments may share a database).
        schema = conn.execute(text("SELECT current_schema()")).scalar()
        key = advisory_key(f"phivault.records.reconcile:{schema}")
        acquired = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()
        try:
            yield acquired
        finally:
            if acquired:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


class IntentReconciler:
    """Periodically settles intents that dead workers left open (see the module docstring)."""

    def __init__(
        self,
        repository: RecordsRepository,
        ledger: LedgerReader,
        sink: AuditSink,
        engine: Engine,
        *,
        cursor: Path | None,
        every_s: float = 15.0,
        settle_after_s: float = 120.0,
        keep_claims_s: float = 86_400.0,
    ) -> None:
        self._repository = repository
        self._ledger = ledger
        self._sink = sink
        self._engine = engine
        self._cursor = cursor
        self._every_s = every_s
        self._settle_after_s = settle_after_s
        self._keep_claims_s = keep_claims_s
        # What the passes scanned, so that the next one reads only what came since, not again
        # from the cursor (which stays at the oldest young intent): a cache (IntentScan).
        self._scan = IntentScan()

    async def run_once(self) -> ReconcileReport | None:
        """One pass; None when another worker holds the lock."""
        lock = reconcile_lock(self._engine)
        acquired = await asyncio.to_thread(lock.__enter__)
        try:
            if not acquired:
                return None
            return await self._repository.reconcile(
                self._ledger,
                sink=self._sink,
                cursor=self._cursor,
                settle_after_s=self._settle_after_s,
                keep_claims_s=self._keep_claims_s,
                memo=self._scan,
            )
        finally:
            await asyncio.to_thread(lock.__exit__, None, None, None)

    async def run(self) -> None:
        """Pass after pass until cancelled; a failing dependency is logged and retried."""
        while True:
            try:
                report = await self.run_once()
            except Exception as exc:  # the loop must outlive any one failure
                # The stream, the ledger or the database is down (the lock's own connection
                # fails with the driver's error): the intents stay open and are settled on a
                # later pass (the cursor did not move past them).
                level = _log.warning if isinstance(exc, PhivaultError) else _log.error
                level("reconcile pass failed", error=type(exc).__name__)
            else:
                if report is not None and (report.committed or report.absent):
                    _log.info(
                        "settled open write intents",
                        committed=report.committed,
                        absent=report.absent,
                    )
            await asyncio.sleep(self._every_s)
