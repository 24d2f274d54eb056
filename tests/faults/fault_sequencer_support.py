"""``phivault sequencer`` processes for the fault tests, and the ledger they write.

Each sequencer is the real command in its own process group (so SIGKILL takes it whole),
with its JSON log in the harness's log book and its Prometheus metrics on a free loopback
port: the tests learn who is active the way an operator does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fault_stream_support import StreamMessage
from fault_support import Harness, ManagedProcess, free_port

from phivault.crypto.signing import Ed25519NoteSigner
from phivault.datadir import DataDir
from phivault.ledger.events import LEDGER_FIELDS
from phivault.ledger.note import NoteVerifier
from phivault.ledger.postgres_store import PostgresLedgerStore
from phivault.ledger.service import initialize_ledger, signer_path
from phivault.ledger.verify import VerificationReport, verify_ledger

__all__ = ["SequencerProcess", "SequencerSetup", "check_ledger_matches_stream"]

PHIVAULT = str(Path(sys.executable).with_name("phivault"))


@dataclass
class SequencerProcess:
    process: ManagedProcess
    metrics_port: int

    def metrics(self) -> dict[str, float]:
        response = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1.0)
        response.raise_for_status()
        values: dict[str, float] = {}
        for line in response.text.splitlines():
            if line.startswith("phivault_sequencer_"):
                name, _, value = line.partition(" ")
                values[name] = float(value)
        return values

    def active(self) -> bool:
        return self.metrics().get("phivault_sequencer_active") == 1.0

    def standing_by(self) -> bool:
        return self.metrics().get("phivault_sequencer_active") == 0.0

    def last_applied(self) -> int:
        return int(self.metrics().get("phivault_sequencer_last_applied_seq", 0))


@dataclass
class SequencerSetup:
    """One ledger (a schema of a PostgreSQL) fed from one stream, and the data directory whose
    signing key and origin the sequencers sign checkpoints with."""

    harness: Harness
    nats_urls: Sequence[str]
    stream: str
    replicas: int
    conninfo: str
    schema: str
    data_dir: DataDir

    @classmethod
    def create(
        cls,
        harness: Harness,
        *,
        nats_urls: Sequence[str],
        stream: str,
        replicas: int,
        conninfo: str,
        schema: str = "pv_fault_ledger",
    ) -> SequencerSetup:
        data_dir = DataDir.create(harness.tmpdir("pv-fault-seqdata-") / "data", dev=True)
        initialize_ledger(data_dir)
        setup = cls(harness, nats_urls, stream, replicas, conninfo, schema, data_dir)
        done = subprocess.run(
            [PHIVAULT, "sequencer", "--create-schema", *setup._ledger_args()],
            capture_output=True,
            text=True,
            timeout=60,
            env=setup.env(),
            check=False,
        )
        assert done.returncode == 0, f"--create-schema failed: {done.stderr or done.stdout}"
        return setup

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PHIVAULT_")}
        # The sequencer brings the stream to ledger.stream_replicas when it starts.
        env["PHIVAULT_LEDGER__STREAM_REPLICAS"] = str(self.replicas)
        return env

    def _ledger_args(self) -> list[str]:
        return ["--ledger-postgres", self.conninfo, "--ledger-schema", self.schema]

    def start(self, name: str) -> SequencerProcess:
        port = free_port()
        argv = [PHIVAULT, "sequencer", *self._ledger_args(), "--stream", self.stream]
        for url in self.nats_urls:
            argv += ["--nats", url]
        argv += ["--data-dir", str(self.data_dir.path), "--metrics-port", str(port)]
        argv += ["--batch-max", "50"]  # several group commits under the test's load
        return SequencerProcess(self.harness.process(name, argv, env=self.env()), port)

    def open_reader(self) -> PostgresLedgerStore:
        return PostgresLedgerStore(self.conninfo, schema=self.schema, writable=False)

    def verifier(self) -> NoteVerifier:
        signer = Ed25519NoteSigner.load(signer_path(self.data_dir))
        return NoteVerifier.from_verifier_key(signer.verifier_key)


def check_ledger_matches_stream(
    setup: SequencerSetup,
    messages: list[StreamMessage],
    acked: dict[str, int],
    *,
    grouped: bool = False,
) -> VerificationReport:
    """The ledger holds the stream's events (one per single-event message, several per batch
    message) one for one, in stream order (no gap, no duplicate), so every acknowledged event
    is in it exactly once at its place; and the ledger verifies against its signed checkpoints.

    ``acked`` maps request ids to acknowledged stream sequences (keyed or not, an event may
    share its message with others)."""
    store = setup.open_reader()
    try:
        leaves = list(store.scan())
        checkpoints = store.checkpoints()
    finally:
        store.close()
    # Canonical JSON holds no raw newline: a batch payload splits into its events exactly.
    events = [(m, part) for m in messages for part in m.data.split(b"\n")]
    assert len(leaves) == len(events), (
        f"the ledger holds {len(leaves)} entries, the stream {len(events)} events"
    )
    for index, (leaf, (message, part)) in enumerate(zip(leaves, events, strict=True)):
        document: dict[str, Any] = json.loads(leaf)
        assert document["seq"] == index
        event = {k: v for k, v in document.items() if k not in LEDGER_FIELDS}
        assert event == json.loads(part), f"entry {index} is not in message {message.seq}"
    request_ids = [json.loads(leaf).get("request_id") for leaf in leaves]
    assert len(set(request_ids)) == len(request_ids), "an event is in the ledger twice"
    by_seq = {m.seq: m for m in messages}
    for key, seq in acked.items():  # the acknowledged event is in the message its ack named
        parts = [json.loads(part) for part in by_seq[seq].data.split(b"\n")]
        assert any(p.get("request_id") == key for p in parts), f"{key} not in {seq}"
    if not grouped:  # keyed: a retried message is stored once (same id, dropped as a copy)
        ids = [m.msg_id for m in messages]
        assert len(set(ids)) == len(ids), "a keyed message is in the stream twice"
    return verify_ledger(leaves, checkpoints, setup.verifier(), origin=setup.data_dir.origin)
