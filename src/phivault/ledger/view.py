"""A read-only, refreshing view of a ledger that another process writes.

In the scaled shape the ``phivault sequencer`` is the ledger's only writer (a
:class:`~phivault.ledger.service.Ledger` over a writable PostgreSQL store). API workers still
read the ledger: AuditEvent searches, ``$access-report``, reconciliation. A
:class:`LedgerView` gives them the same read API as the embedded ledger
(:class:`~phivault.ledger.ports.LedgerReader`), built on the same code
(:class:`~phivault.ledger.service.LedgerReading`: the tree, patient heads, back-link walks),
over a read-only :class:`~phivault.ledger.ports.RefreshableLedgerStore`.

* :meth:`LedgerView.refresh` loads what was committed since the last refresh (only the new
  rows) and extends the tree and the patient heads. Each new checkpoint is checked against the
  tree (and its signature, given a verifier): a view never serves proofs of a history that
  differs from one already signed; it raises :class:`~phivault.ledger.errors.LedgerTampered`
  from then on.
* :meth:`LedgerView.checkpoint` cannot sign (a view has no key): it waits, bounded, for the
  writer's checkpoint to cover every entry seen at the call, and raises
  :class:`~phivault.ledger.errors.LedgerUnavailable` if none comes in time (the writer is gone).

Store I/O runs off the event loop; refreshes run one at a time in the view's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from phivault.ledger.checkpoint import Checkpoint, open_checkpoint, unverified_checkpoint
from phivault.ledger.errors import (
    InvalidProof,
    LedgerError,
    LedgerTampered,
    LedgerUnavailable,
    TamperKind,
)
from phivault.ledger.note import NoteVerifier
from phivault.ledger.ports import LedgerReader, RefreshableLedgerStore, StoreGrowth
from phivault.ledger.service import LedgerReading, check_matches_checkpoint, patient_heads

__all__ = ["DEFAULT_CHECKPOINT_WAIT_S", "LedgerView", "open_ledger_view"]

#: How long :meth:`LedgerView.checkpoint` waits for the writer (it checkpoints within 1 s).
DEFAULT_CHECKPOINT_WAIT_S: Final = 3.0
_POLL_S: Final = 0.05


class LedgerView(LedgerReading):
    """The ledger as a reader sees it: every read of :class:`~phivault.ledger.service.Ledger`,
    plus :meth:`refresh`; :meth:`checkpoint` waits for the writer's instead of signing.

    Build it with :func:`open_ledger_view` (the constructor reads every leaf: blocking).
    """

    def __init__(
        self,
        store: RefreshableLedgerStore,
        *,
        verifier: NoteVerifier | None = None,
        checkpoint_wait_s: float = DEFAULT_CHECKPOINT_WAIT_S,
        poll_interval_s: float = _POLL_S,
    ) -> None:
        super().__init__(store)
        self._refreshable = store
        self._verifier = verifier
        self._checkpoint_wait_s = checkpoint_wait_s
        self._poll_interval_s = poll_interval_s
        self._notes: list[str] = []
        self._latest: Checkpoint | None = None
        self._tampered: LedgerTampered | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-view")
        self._refresh_lock = asyncio.Lock()
        self._refreshes = 0  # refreshes started so far (see refresh)
        self._last_good_refresh = 0  # the number of the last one that succeeded
        self._closed = False
        self._background: asyncio.Task[None] | None = None
        self.refresh_failure: LedgerError | None = None  # the last background failure
        self._take_notes(store.checkpoints())

    # -- the read API beyond LedgerReading --------------------------------------------------

    @property
    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint this view has loaded (and checked against its tree)."""
        return self._latest

    def checkpoint_notes(self) -> list[str]:
        """Every checkpoint note this view has loaded, oldest first; none covers an entry the
        view cannot see, so its proofs serve the newest one."""
        return list(self._notes)

    # -- staying current --------------------------------------------------------------------

    async def refresh(self) -> None:
        """Load what the writer committed since the last refresh (only the new rows).

        Concurrent callers share refreshes: one that started after a call covers that call.
        Raises :class:`LedgerUnavailable` when the store cannot be read (nothing changes), and
        :class:`LedgerTampered` once a checkpoint does not match the entries.
        """
        if self._closed:
            raise LedgerUnavailable("the ledger view is closed")
        called_after = self._refreshes
        async with self._refresh_lock:
            # A refresh numbered above ``called_after`` started after this call: its snapshot
            # already holds everything committed before the call.
            if self._last_good_refresh > called_after:
                return
            self._refreshes += 1
            number = self._refreshes
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._io, self._refresh_now)
            self._last_good_refresh = number

    def _refresh_now(self) -> None:
        """Runs in the view's thread: read the growth, then publish it."""
        if self._tampered is not None:
            raise self._tampered
        growth = self._refreshable.refresh()
        self._absorb(growth)

    def _absorb(self, growth: StoreGrowth) -> None:
        if growth.first != self._size:
            raise LedgerUnavailable(
                f"the ledger store moved from {self._size} to {growth.first} entries behind "
                "the view; reopen it"
            )
        if growth.leaves:
            self._grow(growth.hashes, patient_heads(growth.leaves, growth.first))
        self._take_notes(growth.notes)

    def _take_notes(self, notes: list[str]) -> None:
        """Check each new checkpoint against the tree, then make it the latest."""
        if self._tampered is not None:
            raise self._tampered
        for note in notes:
            try:
                checkpoint = (
                    unverified_checkpoint(note)
                    if self._verifier is None
                    else open_checkpoint(note, self._verifier)
                )
            except InvalidProof as exc:
                self._tampered = LedgerTampered(
                    0, TamperKind.BAD_SIGNATURE, f"a checkpoint does not verify: {exc}"
                )
                raise self._tampered from exc
            try:
                check_matches_checkpoint(self._tree, self._size, checkpoint)
                if self._latest is not None and checkpoint.size < self._latest.size:
                    raise LedgerTampered(
                        checkpoint.size,
                        TamperKind.FORKED,
                        f"a checkpoint of size {checkpoint.size} follows one of size "
                        f"{self._latest.size}",
                    )
            except LedgerTampered as exc:
                self._tampered = exc
                raise
            self._notes.append(note)
            self._latest = checkpoint

    async def checkpoint(self) -> str:
        """The writer's newest checkpoint note, once it covers every entry committed when this
        was called; waits up to ``checkpoint_wait_s``, polling.

        Raises :class:`LedgerUnavailable` if no such checkpoint comes in time (is the
        sequencer running?) or the store cannot be read.
        """
        await self.refresh()
        target = self._size
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._checkpoint_wait_s
        while True:
            latest = self._latest
            if latest is not None and latest.size >= target:
                return self._notes[-1]
            if loop.time() >= deadline:
                signed = "none" if latest is None else f"size {latest.size}"
                raise LedgerUnavailable(
                    f"no checkpoint covers the ledger's {target} entries after "
                    f"{self._checkpoint_wait_s:g} s (newest: {signed}); is the ledger "
                    "sequencer running?"
                )
            await asyncio.sleep(self._poll_interval_s)
            await self.refresh()

    def refresh_every(self, interval_s: float) -> None:
        """Also refresh in the background every ``interval_s`` (a failure is kept in
        :attr:`refresh_failure` and retried); :meth:`close` stops it."""
        if self._background is not None:
            raise LedgerError("the view already refreshes in the background")

        async def loop() -> None:
            while not self._closed:
                await asyncio.sleep(interval_s)
                try:
                    await self.refresh()
                except LedgerError as exc:
                    self.refresh_failure = exc
                else:
                    self.refresh_failure = None

        self._background = asyncio.create_task(loop())

    # -- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        async with self._refresh_lock:  # let a refresh in flight finish first
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._io, self._refreshable.close)
        self._io.shutdown(wait=True)


@contextlib.asynccontextmanager
async def open_ledger_view(
    open_store: Callable[[], RefreshableLedgerStore],
    *,
    verifier: NoteVerifier | None = None,
    checkpoint_wait_s: float = DEFAULT_CHECKPOINT_WAIT_S,
    poll_interval_s: float = _POLL_S,
    refresh_every_s: float | None = None,
) -> AsyncIterator[LedgerView]:
    """Open a view on a read-only store (opening reads every leaf, off the event loop);
    close it and its store after. ``refresh_every_s`` also refreshes in the background."""
    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(None, open_store)
    try:
        view = await loop.run_in_executor(
            None,
            lambda: LedgerView(
                store,
                verifier=verifier,
                checkpoint_wait_s=checkpoint_wait_s,
                poll_interval_s=poll_interval_s,
            ),
        )
    except BaseException:
        await loop.run_in_executor(None, store.close)
        raise
    try:
        if refresh_every_s is not None:
            view.refresh_every(refresh_every_s)
        yield view
    finally:
        await view.close()


def _conforms(view: LedgerView) -> LedgerReader:
    """Type-checks that the view implements the reader port (mypy fails here if it drifts)."""
    return view
