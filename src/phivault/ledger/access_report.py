"""A patient's accounting of disclosures, checkable offline (HIPAA §164.528, "who saw my record").

The report is a FHIR Bundle (type ``collection``): one ``Parameters`` entry with the proof
material, then the AuditEvents of the patient in the window, newest first. The proof material:

* the signed checkpoint the report is built against (the ledger signs a new one first, so
  every event up to the request is covered);
* the patient's **back-link chain** from their newest event at that checkpoint down to the
  first event older than the window (or the first event of all): for each link its ledger
  index, its exact leaf bytes, and an inclusion proof against the checkpoint.

:func:`verify_access_report` checks, with nothing but the ledger's public verifier key: the
checkpoint's signature, each leaf's inclusion, that every link names the same patient and
points back to the next one, that the walk reaches below the window, and that the
AuditEvents shown are exactly the in-window links, each equal to what its leaf says. A server
cannot drop, add or alter an event of the window without failing one of these. (What it
cannot prove offline is that the chain's start is the patient's newest event at that size:
that needs the ledger; ``phivault ledger verify`` checks the back-links of every entry.)
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from phivault.errors import InvalidInput
from phivault.ledger.checkpoint import Checkpoint, open_checkpoint, unverified_checkpoint
from phivault.ledger.errors import InvalidProof
from phivault.ledger.events import LEDGER_FIELDS, AuditEvent, format_instant
from phivault.ledger.fhir import audit_event_to_fhir
from phivault.ledger.merkle import leaf_hash, verify_inclusion
from phivault.ledger.note import NoteVerifier
from phivault.ledger.report import ReportEvent

__all__ = [
    "REPORT_PROFILE",
    "AccessReportInvalid",
    "ReportFailure",
    "VerifiedAccessReport",
    "build_access_report",
    "verify_access_report",
]

REPORT_PROFILE: Final = "https://phivault.dev/fhir/StructureDefinition/access-report"


class ReportFailure(StrEnum):
    """Why a report does not verify (precise, for tools and people)."""

    MALFORMED = "malformed"
    CHECKPOINT = "checkpoint-signature"
    INCLUSION = "inclusion-proof"
    WRONG_PATIENT = "wrong-patient"
    BROKEN_CHAIN = "broken-chain"
    INCOMPLETE = "incomplete-window"
    EVENT_MISMATCH = "event-mismatch"


class AccessReportInvalid(InvalidProof):
    """The report does not verify; ``failure`` says which check failed, ``index`` where."""

    def __init__(self, failure: ReportFailure, message: str, *, index: int | None = None) -> None:
        super().__init__(message if index is None else f"ledger entry {index}: {message}")
        self.failure = failure
        self.index = index


@dataclass(frozen=True, slots=True)
class VerifiedAccessReport:
    """What a verified report proves: these are the patient's events in the window."""

    patient: str
    start: datetime | None
    end: datetime | None
    checkpoint: Checkpoint
    events: tuple[tuple[int, AuditEvent], ...]


def build_access_report(
    chain: list[ReportEvent],
    *,
    patient: str,
    tenant: str,
    checkpoint_note: str,
    proof_of: Callable[[int, int], list[bytes]],
    start: datetime | None,
    end: datetime | None,
) -> dict[str, Any]:
    """The report Bundle from the patient's chain (newest first, as the ledger walks it).

    ``proof_of(index, size)`` is the ledger's inclusion proof. Links newer than the
    checkpoint are left out (the caller signs a checkpoint first, so there are none).
    """
    size = unverified_checkpoint(checkpoint_note).size
    low = format_instant(start) if start else None
    high = format_instant(end) if end else None
    links: list[dict[str, Any]] = []
    shown: list[dict[str, Any]] = []
    for item in chain:
        if item.index >= size:
            continue
        recorded = str(item.document.get("recorded", ""))
        links.append(
            {
                "name": "link",
                "part": [
                    {"name": "index", "valueInteger": item.index},
                    {"name": "leaf", "valueBase64Binary": base64.b64encode(item.leaf).decode()},
                    {
                        "name": "proof",
                        "valueString": ",".join(
                            base64.b64encode(h).decode() for h in proof_of(item.index, size)
                        ),
                    },
                ],
            }
        )
        if low is not None and recorded < low:
            break  # the first link below the window proves where the window ends
        if high is not None and recorded > high:
            continue
        if item.document.get("tenant") != tenant:
            continue
        event = _event_of(item.document)
        shown.append(
            {
                "fullUrl": f"AuditEvent/ledger-{item.index}",
                "resource": audit_event_to_fhir(
                    event, index=item.index, patient_prev=item.document.get("patient_prev")
                ),
            }
        )
    parameters: list[dict[str, Any]] = [
        {"name": "patient", "valueString": patient},
        {"name": "tenant", "valueString": tenant},
        {"name": "checkpoint", "valueString": checkpoint_note},
    ]
    if low is not None:
        parameters.append({"name": "start", "valueInstant": low})
    if high is not None:
        parameters.append({"name": "end", "valueInstant": high})
    return {
        "resourceType": "Bundle",
        "meta": {"profile": [REPORT_PROFILE]},
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:phivault:access-report:proof",
             "resource": {"resourceType": "Parameters", "parameter": parameters + links}},
            *shown,
        ],
    }  # fmt: skip


def verify_access_report(
    report: Mapping[str, Any], verifier: NoteVerifier, *, origin: str | None = None
) -> VerifiedAccessReport:
    """Check a report offline; raise :class:`AccessReportInvalid` (or the checkpoint's own
    :class:`InvalidProof`) naming the first check that fails."""
    proof, shown = _parts(report)
    values = {p.get("name"): p for p in proof if p.get("name") != "link"}
    patient = _string(values, "patient")
    tenant = _string(values, "tenant")
    start = _instant(values, "start")
    end = _instant(values, "end")
    try:
        checkpoint = open_checkpoint(_string(values, "checkpoint"), verifier, origin=origin)
    except InvalidProof as exc:
        raise AccessReportInvalid(ReportFailure.CHECKPOINT, str(exc)) from None
    low = format_instant(start) if start else None
    high = format_instant(end) if end else None
    expected: list[tuple[int, AuditEvent, dict[str, Any]]] = []
    previous_link: int | None = None
    reached_bottom = False
    links = [p for p in proof if p.get("name") == "link"]
    if not links:
        reached_bottom = True
    for link in links:
        index, leaf, hashes = _link(link)
        try:
            verify_inclusion(leaf_hash(leaf), index, checkpoint.size, hashes, checkpoint.root_hash)
        except InvalidProof as exc:
            raise AccessReportInvalid(ReportFailure.INCLUSION, str(exc), index=index) from None
        try:
            document = json.loads(leaf)
        except ValueError:
            raise AccessReportInvalid(
                ReportFailure.MALFORMED, "leaf is not JSON", index=index
            ) from None
        if document.get("patient") != patient:
            raise AccessReportInvalid(
                ReportFailure.WRONG_PATIENT, "the leaf is about another patient", index=index
            )
        if previous_link is not None and previous_link != index:
            raise AccessReportInvalid(
                ReportFailure.BROKEN_CHAIN,
                f"the previous link points to {previous_link}, not here",
                index=index,
            )
        prev = document.get("patient_prev")
        previous_link = prev if isinstance(prev, int) else None
        recorded = str(document.get("recorded", ""))
        if low is not None and recorded < low:
            reached_bottom = True
            break
        if previous_link is None:
            reached_bottom = True
        if (high is None or recorded <= high) and document.get("tenant") == tenant:
            event = _event_of(document)
            resource = audit_event_to_fhir(event, index=index, patient_prev=previous_link)
            expected.append((index, event, resource))
    if not reached_bottom:
        raise AccessReportInvalid(
            ReportFailure.INCOMPLETE, "the chain stops before the start of the window"
        )
    if len(shown) != len(expected) or any(
        resource != want for resource, (_, _, want) in zip(shown, expected, strict=False)
    ):
        raise AccessReportInvalid(
            ReportFailure.EVENT_MISMATCH,
            "the AuditEvents shown are not exactly the proven events of the window",
        )
    return VerifiedAccessReport(
        patient, start, end, checkpoint, tuple((i, e) for i, e, _ in expected)
    )


# --- parsing ----------------------------------------------------------------------------


def _event_of(document: Mapping[str, Any]) -> AuditEvent:
    return AuditEvent.from_document({k: v for k, v in document.items() if k not in LEDGER_FIELDS})


def _parts(report: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not isinstance(report, Mapping) or report.get("resourceType") != "Bundle":
        raise AccessReportInvalid(ReportFailure.MALFORMED, "not a Bundle")
    entries = report.get("entry")
    if not isinstance(entries, list) or not entries:
        raise AccessReportInvalid(ReportFailure.MALFORMED, "the Bundle has no entries")
    resources = [e.get("resource") if isinstance(e, Mapping) else None for e in entries]
    head = resources[0]
    if not isinstance(head, Mapping) or head.get("resourceType") != "Parameters":
        raise AccessReportInvalid(ReportFailure.MALFORMED, "the first entry is not the proof")
    parameters = head.get("parameter")
    if not isinstance(parameters, list) or not all(isinstance(p, dict) for p in parameters):
        raise AccessReportInvalid(ReportFailure.MALFORMED, "the proof has no parameters")
    shown = [r for r in resources[1:] if isinstance(r, dict)]
    if len(shown) != len(resources) - 1 or any(
        r.get("resourceType") != "AuditEvent" for r in shown
    ):
        raise AccessReportInvalid(ReportFailure.MALFORMED, "an entry is not an AuditEvent")
    return parameters, shown


def _string(values: Mapping[Any, Any], name: str) -> str:
    value = values.get(name, {}).get("valueString")
    if not isinstance(value, str) or not value:
        raise AccessReportInvalid(ReportFailure.MALFORMED, f"the proof has no {name}")
    return value


def _instant(values: Mapping[Any, Any], name: str) -> datetime | None:
    if name not in values:
        return None
    text = values[name].get("valueInstant")
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise AccessReportInvalid(ReportFailure.MALFORMED, f"{name} is not an instant") from None


def _link(link: Mapping[str, Any]) -> tuple[int, bytes, list[bytes]]:
    parts = {p.get("name"): p for p in link.get("part", []) if isinstance(p, dict)}
    index = parts.get("index", {}).get("valueInteger")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise AccessReportInvalid(ReportFailure.MALFORMED, "a link has no ledger index")
    try:
        leaf = base64.b64decode(parts["leaf"]["valueBase64Binary"], validate=True)
        text = parts["proof"]["valueString"]
        hashes = [base64.b64decode(h, validate=True) for h in text.split(",")] if text else []
    except (KeyError, TypeError, binascii.Error, InvalidInput):
        raise AccessReportInvalid(
            ReportFailure.MALFORMED, "a link's leaf or proof is malformed", index=index
        ) from None
    return index, leaf, hashes
