"""``make demo``: a guided tour of the audit ledger on sample patients.

Creates a development data directory, records a realistic stream of audit events for
patients taken from the Synthea fixtures (their ids only: events never carry PHI), then runs
the real ``phivault ledger`` commands to show a checkpoint, a proof, a patient's report, a
verification, and what happens when someone edits the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from phivault.datadir import DataDir
from phivault.ledger.events import (
    Action,
    Agent,
    AuditEvent,
    Entity,
    EntityRole,
    EntityType,
    EventKind,
    Outcome,
    Source,
)
from phivault.ledger.service import open_ledger
from phivault.settings import LedgerSettings

console = Console(highlight=False, soft_wrap=True)
# The repository is checked out beside ../shared (as in CI); PHIVAULT_SHARED overrides.
FIXTURES = (
    Path(os.environ.get("PHIVAULT_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    / "fixtures"
    / "synthea"
)

STAFF = [
    ("Practitioner/dr-okafor", "clinician", "ehr-web", "TREAT"),
    ("Practitioner/rn-lindqvist", "nurse", "ehr-web", "TREAT"),
    ("user:frontdesk-2", "front-desk", "scheduling-app", "HOPERAT"),
    ("user:billing-7", "billing", "claims-service", "HPAYMT"),
]


def sample_patients(limit: int = 4) -> list[tuple[str, list[str]]]:
    """(Patient id, some resource references) from the Synthea bundles: ids only, no PHI."""
    patients: list[tuple[str, list[str]]] = []
    for path in sorted(FIXTURES.glob("sof2019_*.json")):
        if "Information" in path.name:
            continue
        bundle = json.loads(path.read_text())
        patient_id = None
        resources = []
        for entry in bundle.get("entry", []):
            resource = entry.get("resource", {})
            kind, rid = resource.get("resourceType"), resource.get("id")
            if not rid:
                continue
            if kind == "Patient":
                patient_id = rid
            elif kind in ("Observation", "Condition", "Encounter", "MedicationRequest"):
                resources.append(f"{kind}/{rid}")
        if patient_id:
            patients.append((patient_id, resources[:40]))
        if len(patients) == limit:
            break
    if not patients:  # no fixtures beside the checkout: generate opaque ids instead
        patients = [
            (f"demo-{n}", [f"Observation/demo-{n}-{i}" for i in range(20)]) for n in range(limit)
        ]
    return patients


def build_stream(patients: list[tuple[str, list[str]]], node: str) -> list[AuditEvent]:
    rng = random.Random(2026)
    when = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    events: list[AuditEvent] = []

    def event(
        who: tuple[str, str, str, str],
        patient: str,
        subtype: str,
        action: Action,
        what: str | None,
        *,
        kind: EventKind = EventKind.REST,
        outcome: Outcome = Outcome.SUCCESS,
        reason: str | None = None,
        grant: str | None = None,
        purpose: str | None = None,
        labels: tuple[str, ...] = (),
    ) -> None:
        nonlocal when
        when += timedelta(minutes=rng.randint(1, 40))
        agent_id, role, client, default_purpose = who
        purpose_code = purpose or default_purpose
        entities = [
            Entity(what=f"Patient/{patient}", type=EntityType.PERSON, role=EntityRole.PATIENT)
        ]
        if what:
            entities.append(Entity(what=what, security_labels=labels))
        events.append(
            AuditEvent(
                kind=kind,
                subtype=subtype,
                action=action,
                recorded=when,
                outcome=outcome,
                outcome_reason=reason,
                tenant="st-elsewhere",
                patient=f"Patient/{patient}",
                agents=(
                    Agent(
                        who=agent_id,
                        roles=(role,),
                        client_id=client,
                        network_address=f"10.20.0.{rng.randint(2, 250)}",
                        purpose_of_use=(purpose_code,),
                    ),
                ),
                source=Source(observer=node),
                entities=tuple(entities),
                purpose_of_use=(purpose_code,),
                request_id=f"req-{len(events):05d}",
                break_glass_grant=grant,
            )
        )

    doctor, nurse, desk, billing = STAFF
    for patient, resources in patients:
        event(desk, patient, "read", Action.READ, f"Patient/{patient}/_history/1")
        event(doctor, patient, "search-type", Action.EXECUTE, None)
        for reference in rng.sample(resources, min(6, len(resources))):
            event(
                rng.choice([doctor, nurse]), patient, "read", Action.READ, f"{reference}/_history/1"
            )
        event(doctor, patient, "create", Action.CREATE, f"Observation/new-{patient[:8]}/_history/1")
        event(nurse, patient, "update", Action.UPDATE, f"Observation/new-{patient[:8]}/_history/2")
        # Billing may not read clinical notes: the request is denied, and the denial is recorded.
        event(
            billing,
            patient,
            "read",
            Action.READ,
            resources[0] + "/_history/1" if resources else None,
            outcome=Outcome.MINOR_FAILURE,
            reason="forbidden",
        )
    # An emergency: a clinician without a care relationship breaks the glass for one patient.
    patient, resources = patients[-1]
    er_doctor = ("Practitioner/dr-er-night", "clinician", "ehr-web", "ETREAT")
    event(
        er_doctor,
        patient,
        "read",
        Action.READ,
        f"Patient/{patient}/_history/1",
        outcome=Outcome.MINOR_FAILURE,
        reason="no-care-relationship",
    )
    event(
        er_doctor,
        patient,
        "grant",
        Action.EXECUTE,
        None,
        kind=EventKind.BREAK_GLASS,
        grant="bg-0001",
        purpose="ETREAT",
    )
    for reference in resources[:3]:
        event(
            er_doctor,
            patient,
            "read",
            Action.READ,
            f"{reference}/_history/1",
            grant="bg-0001",
            purpose="ETREAT",
            labels=("BTG",),
        )
    return events


def run_cli(data_dir: Path, *args: str, show: bool = True) -> str:
    command = ["phivault", *args, "--data-dir", str(data_dir)]
    if show:
        console.print(f"[bold cyan]$ {' '.join(command)}[/]")
    result = subprocess.run(
        [sys.executable, "-m", "phivault.cli.main", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    if show:
        console.print(output.rstrip(), markup=False)
        console.print()
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("./phivault-data-demo"))
    args = parser.parse_args()
    data_dir: Path = args.data_dir

    if data_dir.exists():
        try:
            existing = DataDir.open(data_dir)
        except Exception:
            existing = None
        if existing is None or not existing.dev:
            sys.exit(f"{data_dir} exists and is not a phivault dev data directory; not touching it")
        shutil.rmtree(data_dir)

    console.print(
        Panel.fit(
            "[bold]phivault demo: the tamper-evident audit ledger[/]\n"
            "Every access to a patient's record is written here [italic]before[/] data moves.",
            border_style="cyan",
        )
    )
    run_cli(data_dir, "init", "--dev")
    directory = DataDir.open(data_dir)

    patients = sample_patients()
    events = build_stream(patients, directory.node_id)

    async def record() -> None:
        async with open_ledger(directory, LedgerSettings(checkpoint_interval_s=0.2)) as ledger:
            await asyncio.gather(*(ledger.record(e) for e in events))

    asyncio.run(record())
    console.print(
        f"Recorded [bold]{len(events)}[/] audit events for {len(patients)} Synthea patients: "
        "reads, searches, writes, two denials and a break-glass.\n"
        "Each is one leaf of an RFC 9162 Merkle tree (RFC 8785 canonical JSON; ids only, no PHI).\n"
    )

    console.print(
        "[bold]1. A signed checkpoint[/] (C2SP tlog-checkpoint, Ed25519 signed note): "
        "origin, tree size, root hash, signature."
    )
    run_cli(data_dir, "ledger", "checkpoint")

    patient = patients[-1][0]
    console.print(
        f"[bold]2. Who saw patient {patient}?[/] Found by following each event's "
        "back-link to the previous event of the same patient."
    )
    run_cli(data_dir, "ledger", "report", "--patient", patient)

    console.print(
        "[bold]3. An inclusion proof[/]: that event 5 is in the signed tree, "
        "checkable by anyone with the checkpoint."
    )
    run_cli(data_dir, "ledger", "prove", "--index", "5")

    console.print(
        "[bold]4. Verify everything[/]: re-hash every entry, rebuild the tree, check "
        "every signature and the consistency between checkpoints."
    )
    run_cli(data_dir, "ledger", "verify")

    console.print(
        "[bold]5. An offline evidence bundle[/] for an auditor, verified against the "
        "key they pinned, with nothing else."
    )
    bundle = data_dir / "evidence.json"
    run_cli(data_dir, "ledger", "export", "--out", str(bundle))
    key = run_cli(data_dir, "ledger", "key", show=False).strip()
    run_cli(data_dir, "ledger", "verify", "--bundle", str(bundle), "--key", key)

    console.print(
        "[bold]6. Someone edits the ledger[/]: an insider changes who read a record "
        "(entry 12) in the bundle. Verification names the entry."
    )
    doc = json.loads(bundle.read_text())
    leaf = (
        base64.b64decode(doc["entries"][12]["leaf"])
        .replace(b"dr-okafor", b"dr-okafoR")
        .replace(b"rn-lindqvist", b"rn-lindqviSt")
    )
    doc["entries"][12]["leaf"] = base64.b64encode(leaf).decode()
    tampered = data_dir / "evidence-tampered.json"
    tampered.write_text(json.dumps(doc))
    run_cli(data_dir, "ledger", "verify", "--bundle", str(tampered), "--key", key)

    console.print(
        Panel.fit(
            f"Data directory: {data_dir}\n"
            f"Try: .venv/bin/phivault ledger report --patient {patient} "
            f"--data-dir {data_dir} --json\n"
            f"     .venv/bin/phivault ledger export --format fhir --out audit.ndjson "
            f"--data-dir {data_dir}",
            title="explore",
            border_style="green",
        )
    )


if __name__ == "__main__":
    main()
