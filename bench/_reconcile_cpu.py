"""Micro-benchmark: the CPU one intent-reconciler pass costs over a read-heavy ledger.

An embedded ledger (file store) in a fresh data directory gets ``--reads`` read events shaped
like the API's (agent, patient, versioned resource, purpose of use, request id), with
``--writes`` write intents among them, each followed by its ``committed`` outcome, and
``--open`` young intents without one near the end (they stay open: ``settle_after_s`` is 120,
so a pass settles nothing and the ledger does not change between passes). Then
``RecordsRepository.reconcile`` runs ``--passes`` times over the whole ledger (no cursor, as a
worker whose cursor is far behind), with a real SQLite records store and key ring. Process CPU
time (every thread) divided by the passes is the figure.

    python bench/_reconcile_cpu.py [--reads 20000] [--writes 200] [--open 3] [--passes 5]
                                   [--periodic 1000]

``--periodic K``: as a scaled worker's reconciler runs. The young open intents come first, so
they hold the cursor file at the start of the ledger; each pass follows ``K`` more reads (not
timed), and passes one :class:`IntentScan` memo to every pass when the tree has one (else
each pass reads again from the cursor, as before it existed, or with ``--no-memo``).

The last line is JSON: ``entries``, ``cpu_ms_per_pass``, ``us_per_entry``, ``resume``, ``phivault``
(the source the run imported, so an A/B run can show which tree it measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path


async def main(args: argparse.Namespace) -> dict[str, object]:
    import phivault
    from phivault.access.decision import compile_policy
    from phivault.access.policy import default_policy
    from phivault.crypto.keyring import KeyRing
    from phivault.crypto.keystore import SqliteKeyStore
    from phivault.crypto.providers.sealed import SealedLocalProvider
    from phivault.datadir import DataDir
    from phivault.ledger.events import Action, Agent, AuditEvent, Entity, EventKind, Source
    from phivault.ledger.service import initialize_ledger, open_ledger
    from phivault.ledger.testing import InMemoryAuditSink
    from phivault.records import repository
    from phivault.records.repository import RecordsRepository
    from phivault.records.results import RecordControls
    from phivault.records.store import SqlRecordStore

    now = 1_800_000_000.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = DataDir.create(root / "data", dev=True)
        initialize_ledger(data_dir)
        keys = root / "keys"
        _, shares = SealedLocalProvider.initialize(keys, threshold=2, shares=2)
        keystore = SqliteKeyStore(keys / SqliteKeyStore.FILENAME)
        ring = KeyRing(
            store=keystore, provider=SealedLocalProvider(keys), audit=InMemoryAuditSink(),
            observer="bench",
        )  # fmt: skip
        await ring.unseal(shares)
        store = SqlRecordStore(f"sqlite:///{root / 'records.db'}", schema=None, migrate=True)
        repo = RecordsRepository(
            store, ring, compile_policy(default_policy()), clock=lambda: now,
            controls=RecordControls(),
        )  # fmt: skip

        def event(i: int, *, reason: str | None = None, when: float = now - 600) -> AuditEvent:
            write = reason is not None
            return AuditEvent(
                kind=EventKind.REST,
                subtype="create" if write else "read",
                action=Action.CREATE if write else Action.READ,
                recorded=datetime.fromtimestamp(when, UTC),
                outcome_reason=reason,
                tenant="t1",
                patient=f"Patient/p{i % 500}",
                agents=(
                    Agent(
                        who=f"Practitioner/dr{i % 50}",
                        roles=("clinician",),
                        client_id="client-app",
                        network_address="10.0.0.7",
                        purpose_of_use=("TREAT",),
                    ),
                ),
                source=Source(observer="node-bench"),
                entities=(Entity(what=f"Observation/o{i}/_history/1"),),
                purpose_of_use=("TREAT",),
                request_id=f"req-{i}",
            )

        writes_every = max(1, args.reads // max(1, args.writes))
        young = [event(20_000_000 + k, reason="intent", when=now) for k in range(args.open)]
        async with open_ledger(data_dir) as ledger:
            batch: list[AuditEvent] = young if args.periodic else []
            for i in range(args.reads):
                batch.append(event(i))
                if args.writes and i % writes_every == 0:
                    batch.append(event(10_000_000 + i, reason="intent"))
                    batch.append(event(10_000_000 + i, reason="committed"))
                if len(batch) >= 500:
                    await asyncio.gather(*(ledger.record(e) for e in batch))
                    batch = []
            if not args.periodic:
                batch.extend(young)
            await asyncio.gather(*(ledger.record(e) for e in batch))
            entries = ledger.size

            options: dict[str, object] = {"settle_after_s": 120}
            if args.periodic:
                options["cursor"] = root / "reconcile.cursor"
                if hasattr(repository, "IntentScan") and not args.no_memo:
                    options["memo"] = repository.IntentScan()
            report = await repo.reconcile(ledger, sink=ledger, **options)  # type: ignore[arg-type]
            cpu = wall = 0.0
            for _ in range(args.passes):
                if args.periodic:
                    more = [event(i) for i in range(args.periodic)]
                    await asyncio.gather(*(ledger.record(e) for e in more))
                    entries = ledger.size
                cpu0, wall0 = time.process_time(), time.perf_counter()
                report = await repo.reconcile(ledger, sink=ledger, **options)  # type: ignore[arg-type]
                cpu += time.process_time() - cpu0
                wall += time.perf_counter() - wall0
        store.close()
        keystore.close()
    per_pass = cpu / args.passes
    return {
        "entries": entries,
        "passes": args.passes,
        "cpu_ms_per_pass": round(per_pass * 1000, 2),
        "wall_ms_per_pass": round(wall / args.passes * 1000, 2),
        "us_per_entry": round(per_pass / entries * 1e6, 3),
        "periodic": args.periodic,
        "memo": "memo" in options,
        "resume": report.scanned_to,
        "settled": report.committed + report.absent,
        "phivault": str(Path(phivault.__file__).parent),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--open", type=int, default=3)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--periodic", type=int, default=0)
    parser.add_argument("--no-memo", action="store_true", help="--periodic without the memo")
    result = asyncio.run(main(parser.parse_args()))
    sys.stdout.write(json.dumps(result) + "\n")
