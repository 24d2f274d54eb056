"""SIGKILL a real ``phivault serve`` in the middle of a large transaction; restart; nothing is
half-written and no write intent is left open (invariant 1: "a crash in between is reconciled
on restart, never lost").

One ``--dev`` data directory; the wasee11 companions the patient refers to are loaded first
(a batch). Then, round after round, the largest wasee11 patient bundle (~900 entries) is posted
as a transaction and the server is killed with SIGKILL:

* once as soon as the transaction's *intent* event is in the ledger file (the window
  between intent and outcome, where reconciliation has work to do), watched from outside by
  reading the tail of ``entries.log``;
* once as soon as the transaction is visible in the database (usually before its outcome
  event is: then reconciliation finds it committed);
* then after random delays (seeded; the seed is in the failure message) spread over the time a
  transaction takes, and once right after the server answered (an acknowledged transaction
  survives the kill).

After each kill the server is started again on the same data directory (``open_service``
reconciles before serving), and:

* the store holds all of that round's resources or none (rows per resource type, counted in
  the SQLite file, grew by exactly the bundle's counts or not at all);
* every intent event in the ledger has an outcome for the same request and versions
  (``committed``, ``rolled-back``, ``reconciled-committed`` or ``reconciled-absent``), and an
  intent that was open at the kill got a ``reconciled-*`` one that matches the store;
* ``phivault ledger verify --thorough`` passes (a torn tail from the kill included).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fhir_resilience_support import (
    PHIVAULT,
    Tokens,
    init_dev_data_dir,
    ledger_events,
    open_intents,
    service_caller,
    verify_ledger,
)

from phivault.api.serve import open_service
from phivault.cli.load import LOADER_PURPOSE, LOADER_SCOPES
from phivault.datadir import DataDir
from phivault.ledger.service import Ledger
from phivault.settings import Settings
from ports_support import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::phivault.identity.dev_provider.DevProviderWarning"),
]

PATIENT = "wasee11_Tiffaney302_Shavonne800_Vandervort697.json"
COMPANIONS = ("wasee11_hospitalInformation.json", "wasee11_practitionerInformation.json")
INTENT = b'"outcome_reason":"intent"'
RANDOM_ROUNDS = 2


@dataclass
class Server:
    data_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "PHIVAULT_API__RATE_LIMIT_PER_ADDRESS": "1000000/minute",
            "PHIVAULT_API__RATE_LIMIT_PER_PRINCIPAL": "1000000/minute",
        }
        self.process = subprocess.Popen(
            [PHIVAULT, "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("phivault serve did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def resource_counts(data_dir: Path) -> Counter[str]:
    """Current resources per type in the records database, read from the file."""
    db = data_dir / "records" / "records.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        rows = conn.execute("SELECT resource_type, count(*) FROM rec_resources GROUP BY 1")
        return Counter({kind: n for kind, n in rows})


def companions_for(patient: dict[str, Any], fixtures_dir: Path) -> dict[str, Any]:
    """One batch of the companion entries the patient refers to (by identifier)."""
    text = orjson.dumps(patient).decode()
    entries = []
    for name in COMPANIONS:
        doc = orjson.loads((fixtures_dir / "synthea" / name).read_bytes())
        for entry in doc["entry"]:
            identifiers = entry["resource"].get("identifier", [])
            if any(f"identifier={i['system']}|{i['value']}" in text for i in identifiers):
                entries.append(entry)
    return {"resourceType": "Bundle", "type": "batch", "entry": entries}


class Poster(threading.Thread):
    """Posts the transaction; the kill ends it with a transport error (or it completes)."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.headers = url, body, headers
        self.status: int | None = None

    def run(self) -> None:
        try:
            response = httpx.post(
                f"{self.url}/fhir", content=self.body, headers=self.headers, timeout=120
            )
            self.status = response.status_code
        except httpx.TransportError:
            self.status = None


def wait_for_intent(entries_log: Path, start: int, deadline: float) -> bool:
    """Poll the ledger's tail until an intent event is in it (durable: it was fsync'd)."""
    with entries_log.open("rb") as fh:
        while time.monotonic() < deadline:
            fh.seek(start)
            if INTENT in fh.read():
                return True
            time.sleep(0.001)
    return False


def wait_for_commit(data_dir: Path, before: Counter[str], deadline: float) -> bool:
    """Poll the records database until more Patients are in it than ``before``."""
    db = data_dir / "records" / "records.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        while time.monotonic() < deadline:
            (patients,) = conn.execute(
                "SELECT count(*) FROM rec_resources WHERE resource_type = 'Patient'"
            ).fetchone()
            if patients > before["Patient"]:
                return True
            time.sleep(0.001)
    return False


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(init_dev_data_dir(tmp_path / "data"))
    try:
        yield server
    finally:
        server.stop()
        server.kill()


def test_sigkill_mid_transaction_leaves_all_or_nothing_and_every_intent_settled(
    server: Server, fixtures_dir: Path
) -> None:
    data_dir = server.data_dir
    bundle: dict[str, Any] = orjson.loads((fixtures_dir / "synthea" / PATIENT).read_bytes())
    body = orjson.dumps(bundle)
    expected = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
    tokens = Tokens(data_dir)
    loader = tokens.loader()
    server.start()
    companions = httpx.post(
        f"{server.url}/fhir", content=orjson.dumps(companions_for(bundle, fixtures_dir)),
        headers=loader, timeout=120,
    )  # fmt: skip
    assert companions.status_code == 200, companions.text
    # how long a transaction takes here (it also gives the random delays their range)
    before = resource_counts(data_dir)
    started = time.monotonic()
    full = httpx.post(f"{server.url}/fhir", content=body, headers=loader, timeout=120)
    took = time.monotonic() - started
    assert full.status_code == 200, full.text
    assert resource_counts(data_dir) - before == expected

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # "intent": as soon as the intent is in the ledger; "commit": as soon as the database
    # transaction is visible (the outcome event may or may not be in yet)
    delays: list[float | str] = ["intent", "commit"]
    delays += sorted(rng.uniform(0.05, 1.0) * took for _ in range(RANDOM_ROUNDS))
    delays.append("answered")  # killed right after the answer: an acknowledged commit holds
    outcomes: list[str] = []
    for delay in delays:
        where = f"seed={seed} delay={delay} took={took:.2f}s"
        before = resource_counts(data_dir)
        entries_log = data_dir / "ledger" / "entries.log"
        tail = entries_log.stat().st_size
        poster = Poster(server.url, body, loader)
        poster.start()
        if delay == "intent":
            assert wait_for_intent(entries_log, tail, time.monotonic() + 60), where
        elif delay == "commit":
            assert wait_for_commit(data_dir, before, time.monotonic() + 60), where
        elif delay == "answered":
            poster.join(timeout=120)
            assert poster.status == 200, where
        else:
            assert isinstance(delay, float)
            time.sleep(delay)
        server.kill()
        poster.join(timeout=60)
        at_kill = ledger_events(data_dir)
        left_open = open_intents(at_kill)
        server.start()  # reconciles before serving

        grown = resource_counts(data_dir) - before
        assert grown in (Counter(), expected), f"{where}: a partial transaction: {grown}"
        committed = grown == expected
        if poster.status is not None:  # it answered before the kill: that answer holds
            assert poster.status == 200 and committed, where
        events = ledger_events(data_dir)
        assert open_intents(events) == [], where
        settled = [
            e
            for e in events[len(at_kill) :]
            if str(e.get("outcome_reason", "")).startswith("reconciled-")
        ]
        assert len(settled) == len(left_open), where
        for event in settled:
            assert event["outcome_reason"] == (
                "reconciled-committed" if committed else "reconciled-absent"
            ), where
        if delay == "intent":
            assert left_open, f"{where}: the kill came after the outcome"
        outcomes.append(
            f"{delay if isinstance(delay, str) else f'{delay:.2f}s'}: "
            f"{'all' if committed else 'nothing'}"
            f"{', ' + settled[0]['outcome_reason'] if settled else ''}"
        )
    verified = verify_ledger(data_dir)
    assert verified.returncode == 0, f"seed={seed}: {verified.stdout}{verified.stderr}"
    server.stop()
    verified = verify_ledger(data_dir)
    assert verified.returncode == 0, f"seed={seed}: {verified.stdout}{verified.stderr}"
    print(f"seed={seed} took={took:.2f}s rounds: {'; '.join(outcomes)}")


# --- a request cancelled between intent and outcome -------------------------------------


def test_a_cancelled_write_is_not_recorded_as_rolled_back_when_it_commits(
    tmp_path: Path, fixtures_dir: Path
) -> None:
    """Cancelling the request's task (a client gone, a shutdown, a request timeout) while the
    database transaction runs: the ledger's outcome must say what the store holds."""
    data_dir = init_dev_data_dir(tmp_path / "data")
    bundle: dict[str, Any] = orjson.loads((fixtures_dir / "synthea" / PATIENT).read_bytes())
    expected = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
    before: Counter[str] = Counter()

    async def scenario() -> None:
        async with open_service(Settings(), DataDir.open(data_dir)) as app:
            ledger: Ledger = app.state.front_door.audit_sink
            loader = service_caller(
                ledger, scopes=" ".join(LOADER_SCOPES), purpose=LOADER_PURPOSE,
                request_id="req-cancelled",
            )  # fmt: skip
            companions = companions_for(bundle, fixtures_dir)
            first = service_caller(ledger, scopes=" ".join(LOADER_SCOPES), purpose=LOADER_PURPOSE)
            await app.state.records.batch(first, companions)
            before.update(resource_counts(data_dir))
            start = ledger.size
            task = asyncio.create_task(app.state.records.transaction(loader, bundle))
            while not any(
                ledger.read(i).event.outcome_reason == "intent" for i in range(start, ledger.size)
            ):
                await asyncio.sleep(0.001)
            # cancel once the database transaction is under way (pages reach the WAL)
            wal = data_dir / "records" / "records.db-wal"
            size = wal.stat().st_size
            while wal.stat().st_size == size and not task.done():
                await asyncio.sleep(0.001)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(3)  # the worker thread's commit, if it goes on, is done

    asyncio.run(scenario())
    events = ledger_events(data_dir)
    outcomes = [
        e["outcome_reason"]
        for e in events
        if e.get("request_id") == "req-cancelled" and e.get("outcome_reason") != "intent"
    ]
    committed = resource_counts(data_dir) - before
    assert committed in (Counter(), expected)
    assert outcomes
    if committed == expected:
        assert "rolled-back" not in outcomes, f"committed, but the ledger says {outcomes}"
    else:
        assert set(outcomes) == {"rolled-back"}
