"""Micro-benchmark: CPU of the care-relationship look-up a clinician's read or search makes.

On a fresh PostgreSQL schema (``--pg URL``) or SQLite file, with a CareTeam, an Encounter, a
general practitioner and an explicit assignment for a few patients, it times, in one
read-only unit each: ``care_related`` for one patient after a point read (a read), for a
page's patients (a search), and, for comparison, the former way (one statement per kind of
link, :func:`linked_patients` built per call). The last line is JSON, microseconds per call.

    python bench/_care_related_cpu.py [--pg postgresql+psycopg://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from phivault.crypto.blind_index import BlindIndexer
from phivault.records.search_params import index_entries
from phivault.records.store.ports import NewVersion, ResourceKey
from phivault.records.store.search import linked_patients
from phivault.records.store.sql_store import SqlRecordStore

DOCTOR = ("Practitioner", "doc-1")
INDEXER = BlindIndexer("t1", {1: bytes(range(32))}, 1)


def put(store: SqlRecordStore, resource: dict[str, Any]) -> None:
    rtype, rid = str(resource["resourceType"]), str(resource["id"])
    subject = rid if rtype == "Patient" else str(resource["subject"]["reference"]).split("/")[1]
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    entries = index_entries(resource, INDEXER.tokens)
    with store.unit_of_work() as uow:
        key = ResourceKey("t1", rtype, rid)
        uow.write(NewVersion(key, 1, stamp, subject, {"clinical": b"c"}, entries), previous=None)
        uow.commit()


def former(uow: Any, patients: list[str]) -> set[str]:
    conn = uow._authority()
    found: set[str] = set()
    for query in linked_patients("t1", *DOCTOR):
        column = query.selected_columns[0]
        found.update(str(r[0]) for r in conn.execute(query.where(column.in_(patients)).distinct()))
    return found


def main(args: argparse.Namespace) -> dict[str, float]:
    schema = None
    if args.pg:
        schema = f"pv_care_{uuid.uuid4().hex[:8]}"
        admin = SqlRecordStore(args.pg, migrate=False)
        with admin.engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = args.pg
    else:
        url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'records.db'}"
    store = SqlRecordStore(url, schema=schema)
    try:
        patients = [f"p{i}" for i in range(20)]
        for p in patients:
            put(store, {"resourceType": "Patient", "id": p})
        put(store, {"resourceType": "CareTeam", "id": "ct", "status": "active",
                    "subject": {"reference": "Patient/p0"},
                    "participant": [{"member": {"reference": "Practitioner/doc-1"}}]})  # fmt: skip
        doctor = {"reference": "Practitioner/doc-1"}
        put(store, {"resourceType": "Encounter", "id": "e", "status": "finished",
                    "subject": {"reference": "Patient/p1"},
                    "participant": [{"individual": doctor}]})  # fmt: skip
        with store.unit_of_work() as uow:
            uow.assign_care("t1", DOCTOR, "p2", by="admin", at=0)
            uow.commit()
        key = ResourceKey("t1", "Patient", "p0")
        figures: dict[str, float] = {}
        cases = {
            "read_one_statement_us": lambda uow: uow.care_related("t1", DOCTOR, ["p0"]),
            "read_former_us": lambda uow: former(uow, ["p0"]),
            "page_one_statement_us": lambda uow: uow.care_related("t1", DOCTOR, patients),
            "page_former_us": lambda uow: former(uow, patients),
        }
        for _ in range(2):  # warm, then measured
            for name, run in cases.items():
                cpu = 0.0
                for _ in range(args.n):
                    with store.unit_of_work(read_only=True) as uow:
                        uow.read(key)
                        t0 = time.process_time()
                        run(uow)
                        cpu += time.process_time() - t0
                figures[name] = round(1e6 * cpu / args.n, 1)
        figures["engine"] = 1.0 if args.pg else 0.0
        return figures
    finally:
        store.close()
        if schema is not None:
            with admin.engine.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", help="a PostgreSQL URL (else SQLite in a temporary file)")
    parser.add_argument("-n", type=int, default=500)
    print(json.dumps(main(parser.parse_args())))
