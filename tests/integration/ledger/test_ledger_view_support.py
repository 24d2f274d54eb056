"""Helpers for the LedgerView tests (this module holds no tests).

* :func:`writer`: the sequencer's side, a :class:`Ledger` over a writable PostgreSQL store;
* :class:`CountingStore`: a real read-only store that also records what each refresh loaded;
* :func:`superuser_change`: a superuser bypassing the append-only trigger to change one leaf;
* ``python test_ledger_view_support.py CONNINFO SCHEMA SIGNER_FILE N``: a writer process that
  appends N events, prints ``appended N``, and waits (for the test to kill it).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator

import psycopg
from psycopg import sql
from test_postgres_support import PgLedger

from phivault.crypto.signing import Ed25519NoteSigner
from phivault.ledger.file_store import TornTailRecovery
from phivault.ledger.merkle import leaf_hash
from phivault.ledger.ports import StoreGrowth
from phivault.ledger.postgres_store import PostgresLedgerStore
from phivault.ledger.service import Ledger, open_ledger_on
from phivault.ledger.testing import sample_event
from phivault.settings import LedgerSettings

ORIGIN = "phivault.test/ledger-view"


def writer(
    pg: PgLedger, signer: Ed25519NoteSigner, settings: LedgerSettings
) -> contextlib.AbstractAsyncContextManager[Ledger]:
    """The ledger's only writer, as the sequencer opens it."""
    return open_ledger_on(pg.store, signer, ORIGIN, settings)


class CountingStore:
    """A read-only PostgreSQL store that records (first, leaves, notes) of every refresh."""

    def __init__(self, store: PostgresLedgerStore) -> None:
        self.store = store
        self.growths: list[tuple[int, int, int]] = []

    @property
    def recovery(self) -> TornTailRecovery | None:
        return None

    def refresh(self) -> StoreGrowth:
        growth = self.store.refresh()
        self.growths.append((growth.first, len(growth.leaves), len(growth.notes)))
        return growth

    def size(self) -> int:
        return self.store.size()

    def append(self, leaves: list[bytes]) -> bytes:
        return self.store.append(leaves)

    def read(self, start: int, stop: int) -> list[bytes]:
        return self.store.read(start, stop)

    def scan(self, start: int = 0) -> Iterator[bytes]:
        return self.store.scan(start)

    def leaf_hashes(self) -> bytes:
        return self.store.leaf_hashes()

    def checkpoints(self) -> list[str]:
        return self.store.checkpoints()

    def add_checkpoint(self, note: str) -> None:
        self.store.add_checkpoint(note)

    def close(self) -> None:
        self.store.close()


def superuser_change(
    pg: PgLedger, index: int, old: bytes, new: bytes, *, hash_too: bool = True
) -> None:
    """A superuser disables the append-only trigger and changes one leaf in place (with its
    stored hash, or without it after dropping the hash constraint)."""
    schema = sql.Identifier(pg.schema)
    with psycopg.connect(pg.admin, autocommit=True) as conn, conn.transaction():
        conn.execute(
            sql.SQL("ALTER TABLE {}.leaves DISABLE TRIGGER leaves_append_only").format(schema)
        )
        if not hash_too:
            conn.execute(
                sql.SQL("ALTER TABLE {}.leaves DROP CONSTRAINT leaf_hash_is_rfc9162").format(schema)
            )
        row = conn.execute(
            sql.SQL("SELECT leaf FROM {}.leaves WHERE idx = %s").format(schema), (index,)
        ).fetchone()
        assert row is not None
        changed = bytes(row[0]).replace(old, new)
        conn.execute(
            sql.SQL("UPDATE {}.leaves SET leaf = %s, leaf_hash = %s WHERE idx = %s").format(schema),
            (changed, leaf_hash(changed) if hash_too else leaf_hash(bytes(row[0])), index),
        )
        conn.execute(
            sql.SQL("ALTER TABLE {}.leaves ENABLE ALWAYS TRIGGER leaves_append_only").format(schema)
        )


async def _append_and_wait(conninfo: str, schema: str, signer_file: str, count: int) -> None:
    signer = Ed25519NoteSigner.load(signer_file)
    settings = LedgerSettings(checkpoint_interval_s=60)  # no checkpoint before it is killed

    def open_store() -> PostgresLedgerStore:
        return PostgresLedgerStore(conninfo, schema=schema, writable=True)

    async with open_ledger_on(open_store, signer, ORIGIN, settings) as ledger:
        for i in range(count):
            await ledger.record(sample_event(i, patient=f"Patient/p-{i % 3}"))
        print(f"appended {count}", flush=True)
        with contextlib.suppress(EOFError):
            await asyncio.to_thread(sys.stdin.readline)
            await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(_append_and_wait(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
