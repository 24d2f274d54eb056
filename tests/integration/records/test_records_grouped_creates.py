"""Which writes share a transaction on PostgreSQL (docs/decisions/records-group-commit.md,
"grouped creates"): the plain creates (POST, an id the server chose, no lookup) of one turn
of the event loop go to the store together; an update (a row lock) and a conditional create
(an advisory lock) next to them keep a transaction of their own, so no lock is held for a
whole group and two groups never wait for each other. Everything is written either way."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from records_store_support import StoreFactory
from repository_support import loader, open_kit


async def test_only_plain_creates_share_a_transaction_and_the_others_keep_their_own(
    stores: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if stores.engine != "postgresql":
        pytest.skip("SQLite groups every write unit (one writer at a time anyway)")
    async with open_kit(stores, tmp_path) as kit:
        me = loader(kit.sink)
        org = (await kit.repo.create(me, {"resourceType": "Organization", "name": "A"})).record
        store: Any = kit.repo._store
        grouped: list[int] = []  # units per write_units call
        alone: list[int] = []  # one per write_unit call
        real_units, real_unit = store.write_units, store.write_unit

        def spy_units(works: Any, **kw: Any) -> Any:
            grouped.append(len(works))
            return real_units(works, **kw)

        def spy_unit(work: Any, **kw: Any) -> Any:
            alone.append(1)
            return real_unit(work, **kw)

        monkeypatch.setattr(store, "write_units", spy_units)
        monkeypatch.setattr(store, "write_unit", spy_unit)
        plain = [
            kit.repo.create(me, {"resourceType": "Organization", "name": f"plain-{n}"})
            for n in range(3)
        ]
        update = kit.repo.update(
            me, "Organization", org.id, {"resourceType": "Organization", "id": org.id, "name": "B"}
        )
        conditional = kit.repo.create(
            me, {"resourceType": "Organization", "name": "C"}, if_none_exist="name=nobody-has-it"
        )
        results = await asyncio.gather(*plain, update, conditional)
        assert sum(grouped) == 3, grouped  # the three POSTs, in one or more groups
        assert len(alone) == 2  # the update and the conditional create, each its own
        assert [r.created for r in results] == [True, True, True, False, True]
        monkeypatch.undo()
        names = set()
        for result in results:
            got = await kit.repo.read(me, "Organization", result.record.id)
            assert got.resource is not None
            names.add(got.resource["name"])
        assert names == {"plain-0", "plain-1", "plain-2", "B", "C"}
