"""``phivault ledger ...``: append, checkpoint, verify, export, prove, report, key.

Commands that write (append, checkpoint) open the ledger for writing and refuse while another
process (the server) holds it. The others read beside a running writer.

``verify``, ``export``, ``prove`` and ``report`` read either ledger: the data directory's files
(the embedded shape),
or the scaled shape's PostgreSQL tables that the sequencer writes (``--postgres CONNINFO``
``--schema NAME``, or the settings: ``shape.ledger = jetstream`` with ``ledger.postgres_url``
and ``ledger.postgres_schema``). Both go through the same store port, so they check and
export exactly the same way; a bundle exported from either verifies offline alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from phivault.cli._common import (
    ConfigOption,
    DataDirOption,
    JsonOption,
    Output,
    fail,
    load_settings_or_fail,
    open_data_dir,
)
from phivault.datadir import DataDir, default_data_dir
from phivault.errors import InvalidInput, PhivaultError
from phivault.ledger.access_report import AccessReportInvalid, verify_access_report
from phivault.ledger.bundle import read_bundle, verify_bundle, write_bundle
from phivault.ledger.checkpoint import unverified_checkpoint
from phivault.ledger.errors import LedgerTampered, LedgerUnavailable
from phivault.ledger.events import AuditEvent
from phivault.ledger.file_store import FileLedgerStore
from phivault.ledger.merkle import MerkleTree
from phivault.ledger.note import NoteVerifier
from phivault.ledger.ports import LedgerStore, VerifiableStore
from phivault.ledger.report import patient_reference, patient_report
from phivault.ledger.service import (
    open_ledger,
    verifier_key_of,
)
from phivault.ledger.verify import VerificationReport, verify_store

app = typer.Typer(help="The tamper-evident audit ledger.", no_args_is_help=True)

# Exit codes: 0 verified / done, 1 usage or input error, 2 tampering found.
EXIT_TAMPERED = 2

PostgresOption = Annotated[
    str | None,
    typer.Option(
        "--postgres",
        metavar="CONNINFO",
        help="Read the scaled shape's ledger from this PostgreSQL (libpq connection string or "
        "URL) instead of the data directory. Default: the settings' ledger.postgres_url when "
        "shape.ledger = jetstream.",
        show_default=False,
    ),
]
SchemaOption = Annotated[
    str | None,
    typer.Option(
        "--schema",
        metavar="NAME",
        help="The ledger's PostgreSQL schema (default: the settings' ledger.postgres_schema).",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class _Source:
    """Where a reading command finds the ledger."""

    name: str  # for people: the data directory, or the PostgreSQL schema (never a conninfo)
    open_store: Callable[[], VerifiableStore]
    directory: DataDir | None  # the embedded ledger's data directory


def _ledger_source(
    output: Output,
    *,
    data_dir: Path,
    config: Path | None,
    postgres: str | None,
    schema: str | None,
) -> _Source:
    """The PostgreSQL ledger that ``--postgres`` or the settings name, else the embedded
    ledger of ``data_dir``."""
    if postgres is None:
        from phivault.settings import LedgerKind

        settings = load_settings_or_fail(output, config)
        if settings.shape.ledger is LedgerKind.JETSTREAM:
            postgres = settings.ledger.postgres_url
            schema = schema or settings.ledger.postgres_schema
        elif schema is not None:
            fail(output, "--schema needs --postgres (or shape.ledger = jetstream)", kind="invalid")
    if postgres is None:
        directory = open_data_dir(output, data_dir)
        return _Source(
            str(directory.path),
            lambda: FileLedgerStore(directory.ledger_dir, writable=False),
            directory,
        )
    from phivault.ledger.postgres_store import DEFAULT_SCHEMA, PostgresLedgerStore

    conninfo, schema_name = postgres, schema or DEFAULT_SCHEMA
    return _Source(
        f"PostgreSQL schema {schema_name}",
        lambda: PostgresLedgerStore(conninfo, schema=schema_name, writable=False),
        None,
    )


def _key_and_origin(
    output: Output, source: _Source, data_dir: Path, trusted_key: str | None
) -> tuple[str, str]:
    """The verifier key to check ``source`` with (``trusted_key``, else the data
    directory's) and the checkpoints' origin (the data directory's, else the key's name)."""
    if trusted_key is not None:
        key = trusted_key
    else:
        directory = source.directory
        if directory is None:
            if not data_dir.is_dir():
                fail(
                    output,
                    "give --key: the verifier key of the ledger in PostgreSQL (no data "
                    f"directory at {data_dir} to take it from)",
                    kind="invalid",
                )
            directory = open_data_dir(output, data_dir)
        try:
            key = verifier_key_of(directory)
        except PhivaultError as exc:
            fail(output, str(exc), kind="ledger")
    try:
        named = NoteVerifier.from_verifier_key(key).name
    except (PhivaultError, ValueError) as exc:
        fail(output, str(exc), kind="invalid")
    return key, source.directory.origin if source.directory is not None else named


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@app.command()
def append(
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    tenant: Annotated[
        str | None,
        typer.Option(help="Tenant for events that do not carry a phivault tenant tag."),
    ] = None,
) -> None:
    """Append FHIR AuditEvents (R4, IHE BALP), one JSON per line on standard input.

    Every line is validated first; if any is bad, nothing is appended.
    """
    from phivault.ledger.fhir import audit_event_from_fhir

    output = Output(json_mode=json_mode)
    directory = open_data_dir(output, data_dir)
    events: list[AuditEvent] = []
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            resource = json.loads(line)
        except ValueError:
            fail(output, f"line {number}: not valid JSON; nothing was appended", kind="invalid")
        if not isinstance(resource, dict):
            fail(output, f"line {number}: not a JSON object; nothing was appended", kind="invalid")
        try:
            events.append(audit_event_from_fhir(resource, tenant=tenant))
        except InvalidInput as exc:
            fail(output, f"line {number}: {exc}; nothing was appended", kind="invalid")
    if not events:
        fail(output, "no events on standard input", kind="invalid")

    async def run() -> list[int]:
        async with open_ledger(directory) as ledger:
            return list(await asyncio.gather(*(ledger.record(e) for e in events)))

    try:
        indexes = asyncio.run(run())
    except PhivaultError as exc:
        fail(output, str(exc), kind="ledger")
    if json_mode:
        output.json({"ok": True, "indexes": indexes})
    else:
        for index in indexes:
            output.console.print(index)


@app.command()
def checkpoint(data_dir: DataDirOption = default_data_dir(), json_mode: JsonOption = False) -> None:
    """Issue a signed checkpoint (C2SP tlog-checkpoint) covering every entry, and print it."""
    output = Output(json_mode=json_mode)
    directory = open_data_dir(output, data_dir)

    async def run() -> str:
        async with open_ledger(directory) as ledger:
            return await ledger.checkpoint()

    try:
        note = asyncio.run(run())
    except PhivaultError as exc:
        fail(output, str(exc), kind="ledger")
    cp = unverified_checkpoint(note)
    if json_mode:
        output.json({"ok": True, "size": cp.size, "root_hash": _b64(cp.root_hash), "note": note})
    else:
        sys.stdout.write(note)


@app.command()
def key(data_dir: DataDirOption = default_data_dir(), json_mode: JsonOption = False) -> None:
    """Print the ledger's verifier key (C2SP note verifier key form)."""
    output = Output(json_mode=json_mode)
    directory = open_data_dir(output, data_dir)
    try:
        verifier_key = verifier_key_of(directory)
    except PhivaultError as exc:
        fail(output, str(exc), kind="ledger")
    if json_mode:
        output.json({"ok": True, "verifier_key": verifier_key})
    else:
        print(verifier_key)


def _report_verified(output: Output, report: VerificationReport, what: str) -> None:
    result = {
        "ok": True,
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "covered": report.covered,
        "uncovered": report.uncovered,
        "root_hash": _b64(report.root_hash),
    }
    if output.json_mode:
        output.json(result)
        return
    output.say(
        f"[bold green]verified[/] {what}: {report.entries} entries, "
        f"{report.checkpoints} signed checkpoints"
    )
    if report.uncovered:
        output.say(
            f"[yellow]{report.uncovered} newest entries are not yet covered by a "
            "checkpoint[/] (one is issued within a second while the ledger is open)"
        )


def _tampered(output: Output, exc: LedgerTampered) -> None:
    if output.json_mode:
        output.json(
            {
                "ok": False,
                "error": "tampered",
                "kind": exc.kind.value,
                "index": exc.index,
                "message": str(exc),
            }
        )
    else:
        output.err.print(f"[bold red]FAILED[/] {exc}")
    raise typer.Exit(EXIT_TAMPERED)


@app.command()
def verify(
    *,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    bundle: Annotated[
        Path | None, typer.Option(help="Verify an exported evidence bundle instead.")
    ] = None,
    trusted_key: Annotated[
        str | None,
        typer.Option("--key", help="The verifier key you trust (required with --bundle)."),
    ] = None,
    trusted_checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="A checkpoint note seen earlier (e.g. from a witness): detects rollback."
        ),
    ] = None,
    thorough: Annotated[
        bool,
        typer.Option(
            "--thorough",
            help="Also check every entry's seq, chain link and form, not only those no "
            "checkpoint covers yet (slower; shows that what was signed is well-formed).",
        ),
    ] = False,
    postgres: PostgresOption = None,
    schema: SchemaOption = None,
    config: ConfigOption = None,
) -> None:
    """Re-hash every entry, rebuild the tree, check every checkpoint signature and consistency.

    The data directory's ledger, or the scaled shape's in PostgreSQL (--postgres, or the
    settings). Exits 0 only if everything holds; 2 naming the first bad index and the kind of
    failure.
    """
    output = Output(json_mode=json_mode)
    trusted_note = None
    if trusted_checkpoint is not None:
        try:
            trusted_note = trusted_checkpoint.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            fail(output, f"cannot read {trusted_checkpoint}: {exc}", kind="invalid")
    try:
        if bundle is not None:
            if trusted_key is None:
                fail(output, "--bundle needs --key: the verifier key you trust", kind="invalid")
            loaded = read_bundle(bundle)
            with output.progress("verifying bundle", total=len(loaded.entries)) as bar:
                report = verify_bundle(
                    loaded,
                    trusted_key,
                    trusted_checkpoint=trusted_note,
                    progress=bar.reporter(),
                    thorough=thorough,
                )
            _report_verified(output, report, str(bundle))
            return
        source = _ledger_source(
            output, data_dir=data_dir, config=config, postgres=postgres, schema=schema
        )
        key, origin = _key_and_origin(output, source, data_dir, trusted_key)
        report = _verify_source(output, source, key, origin, trusted_note, thorough=thorough)
        _report_verified(output, report, source.name)
    except LedgerTampered as exc:
        _tampered(output, exc)
    except LedgerUnavailable as exc:
        fail(output, str(exc), kind="unavailable")
    except PhivaultError as exc:
        fail(output, str(exc), kind="invalid")


def _verify_source(
    output: Output,
    source: _Source,
    key: str,
    origin: str,
    trusted_note: str | None,
    *,
    thorough: bool,
) -> VerificationReport:
    verifier = NoteVerifier.from_verifier_key(key)
    with (
        contextlib.closing(source.open_store()) as store,
        output.progress("verifying ledger", total=store.size()) as bar,
    ):
        return verify_store(
            store,
            verifier,
            origin=origin,
            trusted_checkpoint=trusted_note,
            progress=bar.reporter(),
            thorough=thorough,
        )


@app.command()
def export(
    *,
    out: Annotated[Path, typer.Option("--out", help="Where to write (refuses to overwrite).")],
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    fmt: Annotated[
        str,
        typer.Option("--format", help="bundle: offline evidence bundle; fhir: AuditEvent NDJSON."),
    ] = "bundle",
    postgres: PostgresOption = None,
    schema: SchemaOption = None,
    config: ConfigOption = None,
    trusted_key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="The ledger's verifier key, written into the bundle (default: the data "
            "directory's). Needed with --postgres when there is no data directory.",
        ),
    ] = None,
) -> None:
    """Export the ledger: an offline evidence bundle, or FHIR AuditEvents as NDJSON.

    The data directory's ledger, or the scaled shape's in PostgreSQL (--postgres, or the
    settings); a bundle holds what the newest signed checkpoint covers.
    """
    output = Output(json_mode=json_mode)
    if fmt not in ("bundle", "fhir"):
        fail(output, f"--format must be 'bundle' or 'fhir', not {fmt!r}", kind="invalid")
    source = _ledger_source(
        output, data_dir=data_dir, config=config, postgres=postgres, schema=schema
    )
    key, origin = _key_and_origin(output, source, data_dir, trusted_key)
    if out.exists():
        fail(output, f"{out} exists; refusing to overwrite it", kind="invalid")
    if source.directory is not None:
        _checkpoint_if_idle(source.directory)
    # In PostgreSQL the sequencer is the only writer (and signer): export what it signed.
    tmp = out.with_name(out.name + ".partial")
    try:
        with (
            contextlib.closing(source.open_store()) as store,
            tmp.open("w", encoding="utf-8") as fh,
            output.progress(f"exporting ({fmt})", total=store.size()) as bar,
        ):
            if fmt == "bundle":
                count = write_bundle(
                    fh,
                    store,
                    origin=origin,
                    verifier_key=key,
                    progress=bar.reporter(),
                )
            else:
                count = _write_fhir(fh, store, bar.reporter())
        tmp.replace(out)
    except PhivaultError as exc:
        tmp.unlink(missing_ok=True)
        fail(output, str(exc), kind="export")
    if json_mode:
        output.json({"ok": True, "out": str(out), "format": fmt, "entries": count})
    else:
        output.say(f"[bold green]exported[/] {count} entries to {out} ({fmt})")


def _checkpoint_if_idle(directory: DataDir) -> None:
    # An export should reach the newest entry: sign a checkpoint if no server holds the ledger.
    from phivault.ledger.errors import LedgerLocked

    async def run() -> None:
        async with open_ledger(directory) as ledger:
            await ledger.checkpoint()

    # If the server holds the ledger, it checkpoints within a second: export what is signed.
    with contextlib.suppress(LedgerLocked):
        asyncio.run(run())


def _write_fhir(fh: Any, store: LedgerStore, progress: Any) -> int:
    from phivault.ledger.fhir import audit_event_to_fhir
    from phivault.ledger.service import LedgerEntry

    size = store.size()
    for start in range(0, size, 4096):
        leaves = store.read(start, min(start + 4096, size))
        for offset, leaf in enumerate(leaves):
            entry = LedgerEntry(index=start + offset, leaf=leaf, document=json.loads(leaf))
            resource = audit_event_to_fhir(
                entry.event, index=entry.index, patient_prev=entry.patient_prev
            )
            fh.write(json.dumps(resource, separators=(",", ":"), ensure_ascii=False) + "\n")
        progress(start + len(leaves))
    return size


@app.command()
def prove(
    *,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    index: Annotated[int | None, typer.Option(help="Inclusion proof of this entry.")] = None,
    size: Annotated[
        int | None, typer.Option(help="Tree size to prove against (default: latest checkpoint).")
    ] = None,
    from_size: Annotated[int | None, typer.Option("--from", help="Consistency: old size.")] = None,
    to_size: Annotated[int | None, typer.Option("--to", help="Consistency: new size.")] = None,
    postgres: PostgresOption = None,
    schema: SchemaOption = None,
    config: ConfigOption = None,
) -> None:
    """Inclusion proof (--index I [--size N]) or consistency proof (--from N1 --to N2), as JSON.

    The data directory's ledger, or the scaled shape's in PostgreSQL (--postgres, or the
    settings)."""
    output = Output(json_mode=True)
    inclusion = index is not None
    consistency = from_size is not None or to_size is not None
    if inclusion == consistency:
        fail(output, "give either --index [--size] or --from and --to", kind="invalid")
    source = _ledger_source(
        output, data_dir=data_dir, config=config, postgres=postgres, schema=schema
    )
    try:
        with contextlib.closing(source.open_store()) as store:
            tree = MerkleTree(store.leaf_hashes())
            notes = store.checkpoints()
    except PhivaultError as exc:
        fail(output, str(exc), kind="ledger")
    signed = unverified_checkpoint(notes[-1]).size if notes else None
    try:
        if index is not None:
            target = size if size is not None else signed if signed is not None else tree.size
            proof = tree.inclusion_proof(index, target)
            result: dict[str, Any] = {
                "type": "inclusion",
                "index": index,
                "tree_size": target,
                "leaf_hash": _b64(tree.leaf_hash_at(index)),
                "root_hash": _b64(tree.root(target)),
                "proof": [_b64(h) for h in proof],
            }
        else:
            if from_size is None or to_size is None:
                fail(output, "a consistency proof needs both --from and --to", kind="invalid")
            proof = tree.consistency_proof(from_size, to_size)
            result = {
                "type": "consistency",
                "old_size": from_size,
                "new_size": to_size,
                "old_root_hash": _b64(tree.root(from_size)),
                "new_root_hash": _b64(tree.root(to_size)),
                "proof": [_b64(h) for h in proof],
            }
    except ValueError as exc:
        fail(output, str(exc), kind="invalid")
    if signed is not None:
        result["checkpoint"] = notes[-1]
    output.json(result)


def _parse_date(value: str | None, *, end: bool) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 date or date-time") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if end and len(value) == 10:  # a bare date as --to means the whole day
        parsed = parsed.replace(hour=23, minute=59, second=59, microsecond=999000)
    return parsed


@app.command()
def report(
    *,
    patient: Annotated[str, typer.Option(help="Patient id (123 or Patient/123).")],
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    since: Annotated[str | None, typer.Option("--from", help="Start (ISO 8601 date/time).")] = None,
    until: Annotated[str | None, typer.Option("--to", help="End (ISO 8601 date/time).")] = None,
    postgres: PostgresOption = None,
    schema: SchemaOption = None,
    config: ConfigOption = None,
) -> None:
    """Every event of a patient in the window, via back-links, with the newest's proof.

    The data directory's ledger, or the scaled shape's in PostgreSQL (--postgres, or the
    settings)."""
    output = Output(json_mode=json_mode)
    source = _ledger_source(
        output, data_dir=data_dir, config=config, postgres=postgres, schema=schema
    )
    low, high = _parse_date(since, end=False), _parse_date(until, end=True)
    reference = patient_reference(patient)
    try:
        with contextlib.closing(source.open_store()) as store:
            result = patient_report(store, reference, since=low, until=high)
    except (PhivaultError, ValueError) as exc:
        fail(output, str(exc), kind="report")
    if json_mode:
        output.json(result.to_json())
        return
    table = Table(title=f"Audit events of {reference}")
    for column in ("index", "recorded", "kind", "subtype", "who", "purpose", "outcome"):
        table.add_column(column)
    for event in result.events:
        doc = event.document
        agents = doc.get("agents", [])
        requestor = next(
            (a for a in agents if a.get("requestor", True)), agents[0] if agents else {}
        )
        purpose = ",".join(doc.get("purpose_of_use", requestor.get("purpose_of_use", [])))
        table.add_row(
            str(event.index),
            str(doc.get("recorded")),
            str(doc.get("kind")),
            str(doc.get("subtype")),
            str(requestor.get("who", "")),
            purpose,
            str(doc.get("outcome")),
        )
    output.console.print(table)
    if not result.chain:
        output.say("no events for this patient")
    elif result.proof is None:
        output.say("the newest event is not yet covered by a checkpoint")
    else:
        signed = unverified_checkpoint(result.checkpoint_note or "").size
        output.say(
            f"newest event {result.chain[0]} is included in the checkpoint of size {signed}"
            f" (proof: {len(result.proof)} hashes; --json carries it)"
        )


@app.command("verify-report")
def verify_report(
    report_file: Annotated[
        Path, typer.Argument(help="A $access-report Bundle (JSON) saved from the API.")
    ],
    *,
    trusted_key: Annotated[
        str | None,
        typer.Option("--key", help="The verifier key you trust (default: the data directory's)."),
    ] = None,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
) -> None:
    """Check a patient's access report offline: signed checkpoint, every event's inclusion,
    the back-link chain down past the window, and the events shown. Exits 0 only if all hold;
    2 naming the check that failed."""
    output = Output(json_mode=json_mode)
    try:
        text = report_file.read_bytes()
    except OSError as exc:
        fail(output, f"cannot read {report_file.name}: {exc.strerror}", kind="invalid", code=2)
    try:
        document = json.loads(text)
    except ValueError:
        fail(output, f"{report_file.name} is not JSON", kind="invalid", code=2)
    try:
        key = trusted_key or verifier_key_of(open_data_dir(output, data_dir))
        verified = verify_access_report(document, NoteVerifier.from_verifier_key(key))
    except AccessReportInvalid as exc:
        fail(output, str(exc), kind=exc.failure.value, code=2)
    except PhivaultError as exc:
        fail(output, str(exc), kind="invalid", code=2)
    summary = {
        "verified": True,
        "patient": verified.patient,
        "checkpoint_size": verified.checkpoint.size,
        "events": [index for index, _ in verified.events],
    }
    if json_mode:
        output.json(summary)
        return
    output.say(
        f"verified: {len(verified.events)} events of {verified.patient}, each included in the "
        f"signed checkpoint of size {verified.checkpoint.size}, none missing from the window"
    )
