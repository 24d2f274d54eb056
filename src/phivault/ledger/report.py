"""A patient's access history, found by following back-links, with an inclusion proof.

The newest event of the patient is proven included in the latest checkpoint; every older event
is tied to it by the back-link chain (each leaf names the index of the previous event of the
same patient), so the whole history is checkable from the report and the checkpoint.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol, runtime_checkable

from phivault.ledger.checkpoint import Checkpoint, unverified_checkpoint
from phivault.ledger.errors import LedgerTampered, TamperKind
from phivault.ledger.events import format_instant
from phivault.ledger.merkle import MerkleTree
from phivault.ledger.ports import LedgerStore

__all__ = [
    "PatientReport",
    "ReportEvent",
    "find_patient_head",
    "patient_reference",
    "patient_report",
    "walk_patient_chain",
]

_SCAN_CHUNK = 4096


def patient_reference(value: str) -> str:
    """Accept ``123`` or ``Patient/123``; return ``Patient/123``."""
    return value if value.startswith("Patient/") else f"Patient/{value}"


@dataclass(frozen=True)
class ReportEvent:
    index: int
    document: dict[str, Any]
    leaf: bytes


@dataclass
class PatientReport:
    patient: str
    since: datetime | None
    until: datetime | None
    events: list[ReportEvent] = field(default_factory=list)  # newest first
    chain: list[int] = field(default_factory=list)  # every back-linked index, newest first
    checkpoint_note: str | None = None
    proof: list[bytes] | None = None  # inclusion proof of chain[0] in the checkpoint

    def to_json(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "from": format_instant(self.since) if self.since else None,
            "to": format_instant(self.until) if self.until else None,
            "events": [
                {"index": e.index, "leaf": base64.b64encode(e.leaf).decode(), "event": e.document}
                for e in self.events
            ],
            "back_link_chain": self.chain,
            "newest": (
                None
                if not self.chain
                else {
                    "index": self.chain[0],
                    "checkpoint": self.checkpoint_note,
                    "inclusion_proof": None
                    if self.proof is None
                    else [base64.b64encode(h).decode() for h in self.proof],
                }
            ),
        }


def find_patient_head(store: LedgerStore, patient: str) -> int | None:
    """The index of the patient's newest event, scanning backwards from the end."""
    needle = b'"patient":' + json.dumps(patient).encode()
    end = store.size()
    while end > 0:
        start = max(0, end - _SCAN_CHUNK)
        leaves = store.read(start, end)
        for offset in range(len(leaves) - 1, -1, -1):
            if needle in leaves[offset]:
                return start + offset
        end = start
    return None


@runtime_checkable
class BackLinkReader(Protocol):
    """A store that can follow back-links itself (PostgreSQL: one round trip per batch
    instead of one per link)."""

    def read_back_links(self, head: int, limit: int) -> list[tuple[int, bytes]]: ...


_BACK_LINK_BATCH: Final = 256


def _leaves_down(store: LedgerStore, head: int) -> Iterator[tuple[int, bytes]]:
    """``(index, leaf)`` from ``head`` down the links as stored, newest first: batched where
    the store can follow links, else one read per link. Nothing here is trusted: the walk
    checks that each index is the one the previous entry's link names."""
    if isinstance(store, BackLinkReader):
        index: int | None = head
        while index is not None:
            batch = store.read_back_links(index, _BACK_LINK_BATCH)
            yield from batch
            if len(batch) < _BACK_LINK_BATCH:
                return
            prev = json.loads(batch[-1][1]).get("patient_prev")
            index = prev if isinstance(prev, int) and 0 <= prev < batch[-1][0] else None
        return
    index = head
    while index is not None:
        (leaf,) = store.read(index, index + 1)
        yield index, leaf
        prev = json.loads(leaf).get("patient_prev")
        index = prev if isinstance(prev, int) and 0 <= prev < index else None


def walk_patient_chain(store: LedgerStore, head: int | None, patient: str) -> Iterator[ReportEvent]:
    """The patient's events from ``head`` back, newest first, checking every back-link."""
    if head is None:
        return
    expected: int | None = head
    for index, leaf in _leaves_down(store, head):
        if index != expected:
            raise LedgerTampered(
                expected if expected is not None else index,
                TamperKind.MODIFIED,
                "a back-link leads to an entry that is not there",
            )
        document = json.loads(leaf)
        if document.get("patient") != patient:
            raise LedgerTampered(index, TamperKind.MODIFIED, "a back-link leads to another patient")
        yield ReportEvent(index=index, document=document, leaf=leaf)
        prev = document.get("patient_prev")
        if prev is not None and (not isinstance(prev, int) or prev >= index or prev < 0):
            raise LedgerTampered(index, TamperKind.MODIFIED, "a back-link does not point back")
        expected = prev
    if expected is not None:
        # The stored links ended (the database found no entry there) before the chain did.
        raise LedgerTampered(expected, TamperKind.MODIFIED, "a back-link leads nowhere")


def patient_report(
    store: LedgerStore,
    patient: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    head: int | None = None,
) -> PatientReport:
    """Every event of ``patient`` recorded within [since, until], newest first."""
    report = PatientReport(patient=patient, since=since, until=until)
    head = head if head is not None else find_patient_head(store, patient)
    low = format_instant(since) if since else None
    high = format_instant(until) if until else None
    for event in walk_patient_chain(store, head, patient):
        report.chain.append(event.index)
        recorded = str(event.document.get("recorded", ""))
        # Instants share one fixed-width UTC format, so string order is time order.
        if (low is None or recorded >= low) and (high is None or recorded <= high):
            report.events.append(event)
    notes = store.checkpoints()
    if report.chain and notes:
        note = notes[-1]
        checkpoint: Checkpoint = unverified_checkpoint(note)
        report.checkpoint_note = note
        if report.chain[0] < checkpoint.size:
            tree = MerkleTree(store.leaf_hashes()[: checkpoint.size * 32])
            report.proof = tree.inclusion_proof(report.chain[0], checkpoint.size)
    return report
