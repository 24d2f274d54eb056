"""Group commit of SQLite write units (docs/decisions/records-group-commit.md).

Why a module of its own: it is a concurrency protocol, not SQL. SQLite has one writer at a
time, so write units that other threads submit while a group is being written wait in a
:class:`GroupCommit` queue and are committed together, one transaction and one fsync for
all, each in its own savepoint; a unit that fails is rolled back alone, a group whose
transaction breaks (:class:`_SavepointLost`) is written again unit by unit. The store
(:meth:`~phivault.records.store.sql_store.SqlRecordStore.write_unit`) composes one.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Final

from phivault.records.store._driver import _WRITER_WAIT_S
from phivault.records.store.ports import RecordStoreUnavailable

if TYPE_CHECKING:  # the unit imports this module (_SavepointLost)
    from phivault.records.store.unit_of_work import SqlUnitOfWork

_GROUP_MAX: Final = 64  # write units committed together at most


class GroupUnit:
    """A write unit waiting to be committed in a group (:meth:`SqlRecordStore.write_unit`);
    it runs in its submitter's context (context variables), on the group's thread."""

    __slots__ = ("context", "error", "finished", "work")

    def __init__(self, work: Callable[[SqlUnitOfWork], None], context: contextvars.Context):
        self.work = work
        self.context = context
        self.error: BaseException | None = None
        self.finished = False  # under its GroupCommit's _group_turn


class _SavepointLost(Exception):
    """A group's transaction can no longer be trusted: a savepoint could not be rolled back
    or released, or the database ended the transaction on its own."""


class GroupCommit:
    """The group commit of one SQLite store (:meth:`SqlRecordStore.write_unit
    <phivault.records.store.sql_store.SqlRecordStore.write_unit>`): write units submitted
    while a group is being written wait here and go in together as the next group, in one
    transaction of ``unit_of_work`` (the store's own), each unit in its own savepoint."""

    def __init__(self, unit_of_work: Callable[[], AbstractContextManager[SqlUnitOfWork]]) -> None:
        self.unit_of_work = unit_of_work
        self._group_turn = threading.Condition(threading.Lock())
        self._group_writing = False  # a group is being written (by one of the submitters)
        self._group_pending: list[GroupUnit] = []

    def write(self, units: list[GroupUnit]) -> list[BaseException | None]:
        """Queue ``units`` for the next group and wait until each one is written or has
        failed, writing groups on this thread when it is its turn (see the store's
        ``write_unit``)."""
        deadline = time.monotonic() + _WRITER_WAIT_S
        with self._group_turn:
            self._group_pending.extend(units)
        while True:
            with self._group_turn:
                while self._group_writing and not all(u.finished for u in units):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._withdraw(units)
                        if all(u.finished for u in units):
                            break
                    # (once a group has taken a unit, it is being written: wait for that to end)
                    self._group_turn.wait(left if left > 0 else None)
                if all(u.finished for u in units):
                    break
                # This thread writes the next group: the longest waiting units (its own
                # among them, or in a later group it writes too: it leaves only when its
                # own units are finished).
                self._group_writing = True
                batch = self._group_pending[:_GROUP_MAX]
                del self._group_pending[:_GROUP_MAX]
            try:
                self._write_group(batch)
            finally:
                with self._group_turn:
                    for done in batch:
                        done.finished = True
                    self._group_writing = False
                    self._group_turn.notify_all()
        return [u.error for u in units]

    def write_now(self, units: list[GroupUnit]) -> list[BaseException | None]:
        """Write ``units`` at once on this thread, as groups of at most :data:`_GROUP_MAX`
        (PostgreSQL: the write units one batch of an event loop hands over together; writers
        of other threads neither wait for them nor join them). Each one's error, or None."""
        for start in range(0, len(units), _GROUP_MAX):
            self._write_group(units[start : start + _GROUP_MAX])
        return [u.error for u in units]

    def _withdraw(self, units: list[GroupUnit]) -> None:
        """The units no group has taken yet fail closed (their wait is over): no later group
        may write one after its submitter was told it failed. Under ``_group_turn``."""
        for unit in units:
            if unit in self._group_pending:
                self._group_pending.remove(unit)
                unit.error = RecordStoreUnavailable("records store: begin failed (another writer)")
                unit.finished = True

    def _write_group(self, batch: list[GroupUnit]) -> None:
        """Write and commit ``batch`` (see the store's ``write_unit``): each unit's ``error`` says
        how it ended (None: committed)."""
        if len(batch) == 1:
            self._write_alone(batch[0])
            return
        try:
            with self.unit_of_work() as uow:
                # One savepoint, moved on after each unit that succeeds (RELEASE and SAVEPOINT
                # in one round trip on PostgreSQL) and rolled back to after one that fails.
                uow.mark_unit()
                last = len(batch) - 1
                for at, unit in enumerate(batch):
                    try:
                        unit.context.run(unit.work, uow)
                    except _SavepointLost:
                        raise
                    except BaseException as exc:  # this unit alone is rolled back
                        unit.error = exc
                        uow.undo_unit()
                        if at == last:
                            uow.next_unit(last=True)  # (SQLite: the transaction is still on)
                        continue
                    uow.next_unit(last=at == last)
                uow.commit()
        except _SavepointLost:
            for unit in batch:  # nothing of the group was written: one by one
                unit.error = None
                self._write_alone(unit)
        except BaseException as exc:
            for unit in batch:
                if unit.error is None:
                    unit.error = exc

    def _write_alone(self, unit: GroupUnit) -> None:
        try:
            with self.unit_of_work() as uow:
                unit.context.run(unit.work, uow)
                uow.commit()
        except BaseException as exc:
            unit.error = exc
