"""Where a write committed on the primary, for the replicas' read-your-writes.

Why a module of its own: both the store (migrations, write units:
:mod:`~phivault.records.store.sql_store`) and the key ring's view of the tables (re-seals:
:mod:`~phivault.records.store.sealed_elements`) tell the replica router about their commits
(docs/decisions/replica-routing.md): :func:`_writing_everyone` pins every session to the
primary around a write all of them must see, :func:`_written_lsn` reads a commit's WAL
position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from phivault.records.store.ports import RecordStoreUnavailable
from phivault.records.store.routing import ReplicaRouter
from phivault.records.store.write_positions import WritePositionsUnavailable


@contextmanager
def _writing_everyone(
    router: ReplicaRouter | None, *, required: bool = True
) -> Iterator[Callable[[Connection], None]]:
    """Around a write every session must see (a migration, a re-seal): with shared write
    positions, every session is pinned to the primary first; if that cannot be shared, the
    write is refused (nothing is written) unless not ``required``. Call the yielded function
    with the connection once the write committed; if the block ends without that, it may
    have committed at an unknown position, and is settled so."""
    settled = router is None
    pinned = False

    def committed(conn: Connection) -> None:
        nonlocal settled
        if router is not None and not settled:
            settled = True
            router.end_write_everyone(committed=True, lsn=_written_lsn(conn), pinned=pinned)

    if router is not None:
        try:
            router.begin_write_everyone()
            pinned = router.shared is not None
        except WritePositionsUnavailable as exc:
            if required:
                raise RecordStoreUnavailable(
                    "records store: begin failed (write positions)"
                ) from exc
    try:
        yield committed
    finally:
        if router is not None and not settled:
            router.end_write_everyone(committed=None, pinned=pinned)


def _written_lsn(conn: Connection) -> int | None:
    """The primary's WAL insert position after a commit: at or past the commit's record, so
    a replica that has replayed it has the write (None if it cannot be read: the session
    then stays on the primary for a while)."""
    try:
        lsn = conn.exec_driver_sql("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").scalar()
        conn.rollback()
    except SQLAlchemyError:
        return None
    return None if lsn is None else int(lsn)
