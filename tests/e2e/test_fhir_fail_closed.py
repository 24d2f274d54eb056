"""The disk under the ledger fills up: PHI interactions fail closed; nothing else goes down.

The whole service as ``phivault serve`` composes it (``open_service`` on a ``phivault init
--dev`` data directory: the real file ledger, key ring, SQLite records store, repository and
front door), served by uvicorn over loopback HTTP. The fault is a real one, from the kernel:
the ledger's evidence files (``entries.log``, ``checkpoints.log``) are swapped, under the open
file descriptors, for ``/dev/full``, so every append gets ``ENOSPC`` exactly as on a full disk.
Nothing in phivault is patched or told.

While the disk is full, read, vread, search, create and transaction answer 503 with an
OperationOutcome that discloses nothing (writes for a new patient are refused when the key ring
records the new data key; writes for a known patient at their intent event), the store and the
ledger do not change, and
``/healthz`` and ``/fhir/metadata`` answer 200. Once space is back, the same requests succeed,
the repository finds none of what was refused, every intent has its outcome, and ``phivault
ledger verify`` passes.

The tokens are used once before the fault, so their session-start events are already in the
ledger: the 503s come from the records repository's own audit events (disclosure, write
intent), not from the front door's login event.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from fhir_resilience_support import (
    Tokens,
    init_dev_data_dir,
    ledger_events,
    open_intents,
    service_caller,
    verify_ledger,
)

from phivault.api.serve import open_service
from phivault.datadir import DataDir
from phivault.ledger.service import Ledger
from phivault.records.query import parse_search
from phivault.records.repository import RecordsRepository
from phivault.settings import ApiSettings, Settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::phivault.identity.dev_provider.DevProviderWarning"),
]

BUNDLE = "sof2019_Clemente_Kreiger.json"  # inline directory resources: no companions needed
EVIDENCE = ("entries.log", "checkpoints.log")


def _settings() -> Settings:
    return Settings(
        api=ApiSettings(
            rate_limit_per_address="100000/minute", rate_limit_per_principal="100000/minute"
        )
    )


class Service:
    """``open_service`` and uvicorn on one event loop, in a background thread."""

    def __init__(self, data_dir: Path, settings: Settings) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app: FastAPI | None = None
        self.server: uvicorn.Server | None = None
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start() / stop()
            self.failure = exc

    async def _main(self) -> None:
        async with open_service(self.settings, DataDir.open(self.data_dir)) as app:
            config = uvicorn.Config(
                app, log_level="warning", access_log=False, server_header=False, lifespan="on"
            )
            self.server = uvicorn.Server(config)
            self.app = app
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.server is None or not self.server.started:
            if self.failure is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not start") from self.failure
            time.sleep(0.02)
        ready = httpx.get(f"{self.url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text  # the dev key ring unsealed itself

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        if self.failure is not None:
            raise self.failure

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the service's loop (the ledger's futures live there)."""
        assert self.loop is not None
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=60)

    @property
    def repository(self) -> RecordsRepository:
        assert self.app is not None
        repo: RecordsRepository = self.app.state.records
        return repo

    @property
    def ledger(self) -> Ledger:
        assert self.app is not None
        ledger: Ledger = self.app.state.front_door.audit_sink
        return ledger


@contextmanager
def full_disk(ledger_dir: Path) -> Iterator[None]:
    """Swap the ledger's open evidence files for /dev/full (ENOSPC on every write); swap them
    back after. The files themselves are untouched."""
    targets = {os.path.realpath(ledger_dir / name) for name in EVIDENCE}
    fds = [
        int(fd)
        for fd in os.listdir("/proc/self/fd")
        if _link(fd) in targets and os.fstat(int(fd)).st_mode & 0o200
    ]
    assert len(fds) == len(EVIDENCE), f"the ledger's writable files are not open: {fds}"
    saved = [os.dup(fd) for fd in fds]
    full = os.open("/dev/full", os.O_RDWR)
    try:
        for fd in fds:
            os.dup2(full, fd)
        yield
    finally:
        for fd, original in zip(fds, saved, strict=True):
            os.dup2(original, fd)
            os.close(original)
        os.close(full)


def _link(fd: str) -> str | None:
    try:
        return os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def row_counts(db: Path) -> dict[str, int]:
    """Rows per table of the records database (what a refused write must leave unchanged)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        tables = [
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


# --- the test ----------------------------------------------------------------------------


def _outcome(response: httpx.Response, *secrets: str) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"] and body["issue"][0]["severity"] in ("error", "fatal")
    for secret in secrets:
        assert secret not in response.text


def observation(subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{subject}"},
        "valueString": "Quietly-Leaked",
    }


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    data_dir = init_dev_data_dir(tmp_path / "data")
    service = Service(data_dir, _settings())
    service.start()
    try:
        yield service
    finally:
        service.stop()


def test_a_full_ledger_disk_fails_phi_closed_and_keeps_the_rest_up(
    service: Service, fixtures_dir: Path
) -> None:
    data_dir = service.data_dir
    tokens = Tokens(data_dir, service.settings)
    loader = tokens.loader()
    bundle: dict[str, Any] = orjson.loads((fixtures_dir / "synthea" / BUNDLE).read_bytes())
    source = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    ssn = next(i["value"] for i in source["identifier"] if i["system"].endswith("us-ssn"))
    family = source["name"][0]["family"]
    newcomer = {
        "resourceType": "Patient",
        "name": [{"family": "Vandersloot", "given": ["Ottoline"]}],
        "birthDate": "1961-07-30",
        "identifier": [{"system": "urn:mrn", "value": "mrn-vandersloot-1961"}],
    }
    with httpx.Client(base_url=service.url, timeout=60) as http:
        # a patient and their record exist; every token has been used once (its session start
        # is in the ledger before the fault)
        first = http.post("/fhir", content=orjson.dumps(bundle), headers=loader)
        assert first.status_code == 200, first.text
        pid = next(
            e["response"]["location"].split("/")[1]
            for e in first.json()["entry"]
            if e["response"]["location"].startswith("Patient/")
        )
        patient = tokens.patient(pid)
        obs = observation(pid)
        assert http.get(f"/fhir/Patient/{pid}", headers=patient).status_code == 200
        observations = http.get(
            f"/fhir/Observation?patient={pid}&_count=5&_total=accurate", headers=patient
        )
        assert observations.status_code == 200
        assert http.get("/fhir/Organization?_count=1", headers=loader).status_code == 200
        db = data_dir / "records" / "records.db"
        rows, ledger_size = row_counts(db), service.ledger.size
        assert service.ledger.size == len(ledger_events(data_dir))

        with full_disk(data_dir / "ledger"):
            read = http.get(f"/fhir/Patient/{pid}", headers=patient)
            _outcome(read, family, ssn)
            vread = http.get(f"/fhir/Patient/{pid}/_history/1", headers=patient)
            _outcome(vread, family, ssn)
            search = http.get(f"/fhir/Observation?patient={pid}", headers=patient)
            _outcome(search, family, pid)
            create = http.post("/fhir/Patient", content=orjson.dumps(newcomer), headers=loader)
            _outcome(create, "Vandersloot")
            # a write for a patient whose data key exists: refused at its intent event
            note = http.post("/fhir/Observation", content=orjson.dumps(obs), headers=loader)
            _outcome(note, "Quietly-Leaked")
            # a new patient's transaction (refused when the key ring records the new data key)
            transaction = http.post("/fhir", content=orjson.dumps(bundle), headers=loader)
            _outcome(transaction, family, ssn)
            # a transaction for a known patient (refused at its intent event)
            more = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {"resource": obs, "request": {"method": "POST", "url": "Observation"}},
                    {"resource": obs, "request": {"method": "POST", "url": "Observation"}},
                ],
            }
            transaction = http.post("/fhir", content=orjson.dumps(more), headers=loader)
            _outcome(transaction, "Quietly-Leaked")
            # PHI-free endpoints stay up
            assert http.get("/healthz").status_code == 200
            metadata = http.get("/fhir/metadata")
            assert metadata.status_code == 200
            assert metadata.json()["resourceType"] == "CapabilityStatement"
            # nothing changed: no row, no ledger entry (not even half of one)
            assert row_counts(db) == rows
            assert service.ledger.size == ledger_size
            assert (data_dir / "ledger" / "entries.log").stat().st_size > 0

        # space is back: the same requests are served again
        assert service.ledger.size == len(ledger_events(data_dir)) == ledger_size
        assert http.get(f"/fhir/Patient/{pid}", headers=patient).status_code == 200
        again = http.get(
            f"/fhir/Observation?patient={pid}&_count=5&_total=accurate", headers=patient
        )
        assert again.status_code == 200
        assert again.json()["total"] == observations.json()["total"]

    # through the repository: the refused create and transaction wrote nothing
    repo = service.repository
    caller = service_caller(service.ledger, scopes="system/Patient.rs", purpose="PUBHLTH")
    for query, expected in (
        ("identifier=mrn-vandersloot-1961", 0),
        (f"identifier=http://hl7.org/fhir/sid/us-ssn|{ssn}", 1),
        ("family=vandersloot", 0),
        (f"family:exact={family}", 1),
    ):
        result = service.run(repo.search(caller, parse_search("Patient", query)))
        assert len(result.matches) == expected, query
    assert row_counts(db) == rows
    service.stop()
    events = ledger_events(data_dir)
    assert open_intents(events) == []
    assert any(e.get("outcome_reason") == "committed" for e in events)
    verified = verify_ledger(data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_disk_that_fills_between_intent_and_outcome_is_settled_on_restart(
    tmp_path: Path, fixtures_dir: Path
) -> None:
    """The intent is durable, the database commits, then the outcome cannot be written: the
    client is not told it worked; the outcome is recorded as committed once the ledger takes
    events again (by the running server's retry, or at the next start by reconcile)."""
    data_dir = init_dev_data_dir(tmp_path / "data")
    service = Service(data_dir, _settings())
    service.start()
    tokens = Tokens(data_dir, service.settings)
    loader = tokens.loader()
    bundle = orjson.loads((fixtures_dir / "synthea" / "sof2019_Micaela_Romero.json").read_bytes())
    db = data_dir / "records" / "records.db"
    try:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            warm = http.get("/fhir/Organization?_count=1", headers=loader)  # session start
            assert warm.status_code == 200
            rows, start = row_counts(db), service.ledger.size
            answer: list[httpx.Response] = []
            poster = threading.Thread(
                target=lambda: answer.append(
                    http.post("/fhir", content=orjson.dumps(bundle), headers=loader)
                )
            )
            poster.start()
            # the intent acknowledged (the ledger's size counts only what was fsync'd)
            deadline = time.monotonic() + 60
            while (
                not any(
                    e.get("outcome_reason") == "intent" for e in ledger_events(data_dir)[start:]
                )
                or service.ledger.size <= start
            ):
                assert time.monotonic() < deadline and poster.is_alive()
                time.sleep(0.002)
            with full_disk(data_dir / "ledger"):
                poster.join(timeout=60)
            (response,) = answer
    finally:
        service.stop()
    committed = row_counts(db) != rows
    assert committed  # the database did not need the ledger's disk
    # what the client was told must not claim success without an outcome in the ledger
    assert response.status_code == 503, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    events = ledger_events(data_dir)
    intents = [e for e in events[start:] if e.get("outcome_reason") == "intent"]
    assert intents  # one intent per patient, and one for the directory resources
    # the next start settles whatever the running server's retry had not, by the store
    service = Service(data_dir, _settings())
    service.start()
    service.stop()
    events = ledger_events(data_dir)
    assert open_intents(events) == []
    outcomes = [
        e["outcome_reason"]
        for e in events[start:]
        if e.get("outcome_reason") in ("committed", "reconciled-committed", "rolled-back",
                                       "reconciled-absent")
    ]  # fmt: skip
    assert len(outcomes) == len(intents)
    assert set(outcomes) <= {"committed", "reconciled-committed"}
    verified = verify_ledger(data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
