"""Conditional writes racing each other, on both engines and across "workers" (two
repositories on one store, as two API workers share one PostgreSQL).

FHIR's If-None-Exist promises at most one resource for its criteria. Checking in the
transaction is not enough on PostgreSQL: under READ COMMITTED two transactions can both see
no match and both insert. The store serializes writers whose criteria are the same
(``RecordUnitOfWork.serialize_lookups``), so the later one sees the earlier one's row."""

from __future__ import annotations

import asyncio
from pathlib import Path

from records_store_support import StoreFactory
from repository_support import loader, open_kit

from phivault.access.decision import compile_policy
from phivault.access.policy import default_policy
from phivault.records.errors import TransactionConflict
from phivault.records.query import parse_search
from phivault.records.repository import RecordsRepository

SYSTEM = "https://phivault.invalid/org"


def organization(value: str) -> dict[str, object]:
    return {
        "resourceType": "Organization",
        "identifier": [{"system": SYSTEM, "value": value}],
        "name": f"Racing clinic {value}",
    }


async def test_concurrent_if_none_exist_creates_make_one_resource(
    stores: StoreFactory, tmp_path: Path
) -> None:
    async with open_kit(stores, tmp_path) as kit:
        # A second worker: its own store (connections) on the same database or file.
        second = RecordsRepository(
            stores.open(), kit.ring, compile_policy(default_policy()), clock=kit.clock
        )
        who = loader(kit.sink)
        for attempt in range(3):  # a race that happens to line up is not proof: try it again
            value = f"race-{attempt}"
            ident = f"{SYSTEM}|{value}"
            body = organization(value)
            results = await asyncio.gather(
                *(
                    (kit.repo if n % 2 else second).create(
                        who, body, if_none_exist=f"identifier={ident}"
                    )
                    for n in range(8)
                ),
                return_exceptions=True,
            )
            for result in results:
                # Each either created it, found it, or was told to retry (409): never an error.
                assert not isinstance(result, BaseException) or isinstance(
                    result, TransactionConflict
                ), result
            created = [r for r in results if not isinstance(r, BaseException) and r.created]
            assert len(created) == 1
            page = await kit.repo.search(who, parse_search("Organization", [("identifier", ident)]))
            assert [m.id for m in page.matches] == [created[0].record.id]
