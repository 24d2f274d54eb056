"""Where a loaded resource's server CPU goes: ``_read_cpu.py --load`` with each named part of
the bundle path timed in the CPU of the thread that runs it.

Why not py-spy alone: ``--py-spy`` samples the thread holding the GIL, and SQLite runs
without it, so the store's share of a transaction (a third of the CPU, measured) is missing
from its stacks; cProfile sees the event loop's thread only, and planning and the commit run
in worker threads. Each part here is a synchronous function, wrapped to add up
``time.thread_time()`` across its calls once the warm-up is over; an ``async`` part would
also count whatever other tasks ran while it awaited, so none is wrapped. Parts nest
(``a > b`` is part of ``a``), so they do not add up to the total.

    python bench/_load_parts.py [--load 6] [--load-concurrency 4]

The last line is JSON: ``cpu_us_per_resource`` (as ``_read_cpu.py`` reports it, in µs) and
``parts``, each part's µs per loaded resource and its calls, largest first.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_cpu: Counter[str] = Counter()
_calls: Counter[str] = Counter()
_counting: list[bool] = [False]  # set once the warm-up is over


def _timed(owner: Any, name: str, label: str) -> None:
    """Replace ``owner.name`` (a module's function or a class's method) by a timed one."""
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if not _counting[0]:
            return original(*args, **kwargs)
        started = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            _cpu[label] += time.thread_time() - started
            _calls[label] += 1

    setattr(owner, name, timed)


def _instrument() -> None:
    import phivault.api.fhir._routes as routes
    import phivault.api.serve as serve
    import phivault.crypto.elements as elements
    import phivault.records.repository as repository
    import phivault.records.store._statements as store_statements
    import phivault.records.store.unit_of_work as unit_of_work

    repo = repository.RecordsRepository
    unit = unit_of_work.SqlUnitOfWork
    for owner, name, label in (
        (repository, "plan_transaction", "plan_transaction (worker thread)"),
        (repo, "_resolve", "conditional lookups (planning and the commit's re-check)"),
        (repository, "_patients_touched", "_patients_touched"),
        (repository, "_check_auditable", "_check_auditable"),
        (repo, "_subject_of", "_subject_of"),
        (repo, "_decide", "_decide"),
        (repository, "split", "split"),
        (elements.PatientCipher, "seal_many", "seal_many"),
        (repository, "index_entries", "index_entries"),
        (repo, "_event_parts", "_event_parts"),
        (repo, "_write_events", "_write_events"),
        (unit, "create_many", "_commit: > create_many"),
        (unit_of_work._IndexRows, "insert", "_commit: > create_many > index rows"),
        (unit_of_work._IndexRows, "add", "_commit: > create_many > index rows as tuples"),
        (unit_of_work, "_on_driver", "_commit: > statements on the driver (SQLite's own work)"),
        (store_statements, "_on_driver", "_commit: > statements on the driver (SQLite's own work)"),
        (unit, "commit", "COMMIT (after the write unit)"),
        (routes, "transaction_response", "transaction_response"),
    ):
        _timed(owner, name, label)
    bulk = unit_of_work._bulk_insert_tuples

    def timed_bulk(conn: Any, table: Any, *args: Any, **kwargs: Any) -> Any:
        if table is not unit_of_work.groups or not _counting[0]:
            return bulk(conn, table, *args, **kwargs)
        started = time.thread_time()
        try:
            return bulk(conn, table, *args, **kwargs)
        finally:
            _cpu["_commit: > create_many > group rows"] += time.thread_time() - started
            _calls["_commit: > create_many > group rows"] += 1

    unit_of_work._bulk_insert_tuples = timed_bulk  # type: ignore[assignment]
    for name in ("_create_heads", "_create_heads_sqlite"):  # where the tree has them
        if hasattr(unit, name):
            _timed(unit, name, "_commit: > create_many > heads and versions")

    from sqlalchemy.engine import Connection

    statements = {
        id(store_statements._TAKEN): "_commit: > create_many > existence check",
        id(store_statements._INSERT_HEADS): "_commit: > create_many > heads insert",
        id(store_statements._INSERT_VERSIONS): "_commit: > create_many > versions insert",
    }
    execute = Connection.execute

    def timed_execute(self: Connection, statement: Any, *args: Any, **kwargs: Any) -> Any:
        label = statements.get(id(statement))
        if label is None or not _counting[0]:
            return execute(self, statement, *args, **kwargs)
        started = time.thread_time()
        try:
            return execute(self, statement, *args, **kwargs)
        finally:
            _cpu[label] += time.thread_time() - started
            _calls[label] += 1

    Connection.execute = timed_execute  # type: ignore[assignment]

    make_unit = repo._commit_unit

    def timed_unit(*args: Any, **kwargs: Any) -> Any:
        unit = make_unit(*args, **kwargs)

        def run(uow: Any) -> None:
            if not _counting[0]:
                return unit(uow)
            started = time.thread_time()
            try:
                return unit(uow)
            finally:
                _cpu["_commit: the write unit (worker thread)"] += time.thread_time() - started
                _calls["_commit: the write unit (worker thread)"] += 1

        return run

    repo._commit_unit = timed_unit  # type: ignore[method-assign]

    warm_up_over = serve.tune_for_serving

    def tune_then_count() -> None:  # _read_cpu.py calls it once the warm-up loads are done
        warm_up_over()
        _counting[0] = True

    serve.tune_for_serving = tune_then_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=int, default=6)
    parser.add_argument("--load-concurrency", type=int, default=4)
    given = parser.parse_args()
    _instrument()
    import _read_cpu

    args = argparse.Namespace(
        load=given.load,
        load_concurrency=given.load_concurrency,
        reads=0,
        concurrency=1,
        profile=None,
        py_spy=None,
        search=False,
        whoami=False,
        create=False,
    )
    result = asyncio.run(_read_cpu.main(args))
    resources = result["resources"]
    parts = {
        label: {"us": round(seconds / resources * 1e6, 1), "calls": _calls[label]}
        for label, seconds in _cpu.most_common()
    }
    total = round(result["cpu_ms_per_resource"] * 1000, 1)
    print(json.dumps({"cpu_us_per_resource": total, "parts": parts}))


if __name__ == "__main__":
    main()
