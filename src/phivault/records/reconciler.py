"""Settling write intents while serving, for the scaled shape's many workers.

The embedded server settles open intents once, at start (nothing can be in flight then). With
several workers a worker can die mid-transaction while the others keep serving, so every
worker runs an :class:`IntentReconciler`: every ``every_s`` seconds, the worker holding
the PostgreSQL advisory lock scans the ledger (a view of the sequencer's) for intents
older than ``settle_after_s`` that have no outcome, checks the store, and records the
outcome through the audit stream. The worker that takes the lock
keeps it while it lives (:class:`ReconcileLeadership`), so the ledger is scanned by one
worker, not by each in turn. The lock keeps two workers from recording the same outcome
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
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from phivault.errors import PhivaultError
from phivault.pg_advisory import advisory_key
from phivault.records.repository import IntentScan

if TYPE_CHECKING:
    from phivault.ledger.ports import AuditSink, LedgerReader
    from phivault.records.repository import RecordsRepository
    from phivault.records.results import ReconcileReport

__all__ = ["IntentReconciler", "ReconcileLeadership", "reconcile_lock"]

_log = structlog.get_logger("phivault.reconciler")


@contextlib.contextmanager
def reconcile_lock(engine: Engine) -> Iterator[bool]:
    """Whether this process may reconcile now, for one block: :class:`ReconcileLeadership`
    taken and given back around it (always on SQLite)."""
    leadership = ReconcileLeadership(engine)
    try:
        yield leadership.try_lead()
    finally:
        leadership.close()


class ReconcileLeadership:
    """Which worker reconciles: the one holding a PostgreSQL session advisory lock, kept
    **across passes** on a connection of its own (always this process on SQLite, where one
    process serves the embedded database).

    Held across passes, not per pass: each worker remembers what its passes scanned
    (``IntentScan``), so a lock taken afresh every pass had every worker read and parse the
    whole ledger in turn (with two workers, twice the work: about a tenth of a worker's CPU in
    the scaled create benchmark). Now one worker scans everything once and the others only
    try the lock. A worker that dies, or loses the connection, releases the lock with its
    session; another takes it at its next try and starts from the cursor.

    Blocking (call it off the event loop). Not thread-safe: one reconciler uses it.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        # Its own connection, outside the records pools (it lives as long as the lead).
        self._lock_engine: Engine | None = (
            create_engine(engine.url, poolclass=NullPool) if self._postgres else None
        )
        self._key: int | None = None
        self._holder: Connection | None = None

    def try_lead(self) -> bool:
        """True if this process holds the lead now: kept if still held (its connection
        answers), else taken if free. Database errors propagate (the pass fails and is
        retried); a lost connection first gives the lead up."""
        if self._lock_engine is None:
            return True
        if self._holder is not None:
            try:
                self._holder.execute(text("SELECT 1"))
                self._holder.commit()
                return True
            except SQLAlchemyError:
                # Our session is gone, and the lock with it: another worker may lead now.
                self._give_up()
        key = self._lock_key()
        conn = self._lock_engine.connect()
        try:
            taken = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()
        except BaseException:
            conn.close()
            raise
        if taken:
            self._holder = conn
        else:
            conn.close()
        return taken

    @property
    def leading(self) -> bool:
        """Whether this process held the lead at its last try (on PostgreSQL)."""
        return self._lock_engine is None or self._holder is not None

    def _lock_key(self) -> int:
        if self._key is None:
            with self._engine.connect() as conn:
                # One reconciler per records schema (deployments may share a database).
                schema = conn.execute(text("SELECT current_schema()")).scalar()
            self._key = advisory_key(f"phivault.records.reconcile:{schema}")
        return self._key

    def _give_up(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            with contextlib.suppress(SQLAlchemyError):
                holder.invalidate()
            with contextlib.suppress(SQLAlchemyError):
                holder.close()

    def close(self) -> None:
        """Give the lead up (closing the session releases the lock) and close the engine."""
        holder, self._holder = self._holder, None
        if holder is not None:
            with contextlib.suppress(SQLAlchemyError):
                holder.close()
        if self._lock_engine is not None:
            self._lock_engine.dispose()


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
        self._leadership = ReconcileLeadership(engine)

    async def run_once(self) -> ReconcileReport | None:
        """One pass; None when another worker leads (holds the lock)."""
        if not await asyncio.to_thread(self._leadership.try_lead):
            # Whatever this worker scanned while it led is stale once another leads.
            self._scan = IntentScan()
            return None
        return await self._repository.reconcile(
            self._ledger,
            sink=self._sink,
            cursor=self._cursor,
            settle_after_s=self._settle_after_s,
            keep_claims_s=self._keep_claims_s,
            memo=self._scan,
        )

    async def close(self) -> None:
        """Give the lead up (another worker takes it at its next pass)."""
        await asyncio.to_thread(self._leadership.close)

    async def run(self) -> None:
        """Pass after pass until cancelled (the lead is given up then); a failing dependency
        is logged and retried."""
        try:
            await self._passes()
        finally:
            await asyncio.shield(self.close())

    async def _passes(self) -> None:
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
