"""``phivault keys ...``: unseal, inventory, rotate, shred, hold.

Key custody for operators. No command prints key material: the inventory shows ids,
purposes, versions, states, providers, dates and the principals that may use each key.
Commands that need keys (``unseal``, ``rotate``) take the unseal shares from ``--shares-file``
(one per line, ``-`` for standard input), from repeated ``--share``, from a hidden prompt,
or, in a development data directory, from the dev unseal file (with a loud warning). With
PKCS#11 the PIN comes from settings (``PHIVAULT_KEYS__PKCS11_PIN``). Every key operation is an
audit event, recorded before the operation acts, where the shape records (``shape.ledger``):
the data directory's ledger (embedded; commands that write refuse while another process holds
it) or the audit stream the sequencer appends to the ledger (scaled). If it cannot take events
the command fails closed (exit 3) and destroys or rotates nothing.
"""

from __future__ import annotations

import asyncio
import getpass
import re
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from phivault.cli._common import DataDirOption, JsonOption, Output, fail, open_data_dir
from phivault.crypto.errors import CryptoError, RetentionHold, Sealed
from phivault.crypto.invalidation import Propagation
from phivault.datadir import DataDir, default_data_dir
from phivault.errors import PhivaultError
from phivault.ledger.errors import LedgerUnavailable
from phivault.ledger.events import AuditEvent
from phivault.ledger.sinks import AuditPosition, position_of
from phivault.settings import KeyProviderKind, load_settings

__all__ = ["app"]

app = typer.Typer(help="Key custody: unseal, inventory, rotate, shred, hold.", no_args_is_help=True)

TenantOption = Annotated[str, typer.Option(help="The tenant whose keys to use.")]
ShareOption = Annotated[
    list[str] | None,
    typer.Option(
        "--share",
        help="An unseal share (repeat M times). Prefer --shares-file: arguments show in `ps`.",
    ),
]
SharesFileOption = Annotated[
    Path | None,
    typer.Option("--shares-file", help="A file with one unseal share per line ('-': stdin)."),
]
ElementStoreOption = Annotated[
    Path | None,
    typer.Option(
        "--element-store",
        help="The sealed-element store to re-encrypt or re-index (an embedded SQLite element "
        "store) until the records service provides its own.",
    ),
]

T = TypeVar("T")
#: The exit code when the shape's audit ledger (or stream) refuses events: fail closed.
AUDIT_UNAVAILABLE_EXIT = 3
_OPERATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,100}$")


class _RefusingSink:
    """For read-only commands: any attempt to record is a bug, and fails loudly."""

    async def record(self, event: AuditEvent) -> int:
        raise LedgerUnavailable("this command is read-only and records no events")


def _operator() -> str | None:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return None
    return f"os-user:{name}" if _OPERATOR_RE.match(name) else None


def _read_shares(
    output: Output, directory: DataDir, shares: list[str] | None, shares_file: Path | None
) -> list[str] | None:
    """Shares from the options; None means "let the keystore use its own source"."""
    collected = list(shares or [])
    if shares_file is not None:
        try:
            text = sys.stdin.read() if str(shares_file) == "-" else shares_file.read_text()
        except OSError as exc:
            fail(output, f"cannot read {shares_file}: {exc.strerror}", kind="invalid-shares")
        collected += [line.strip() for line in text.splitlines() if line.strip()]
    if collected:
        return collected
    settings = load_settings()
    if settings.keys.provider is not KeyProviderKind.SEALED:
        return None
    from phivault.crypto.custody import read_dev_unseal_file
    from phivault.crypto.providers.sealed import SealedLocalProvider

    if read_dev_unseal_file(directory) is not None or (directory.dev and settings.is_production):
        return None  # open_keyring unseals from it, or refuses it in production
    if not sys.stdin.isatty() or output.json_mode:
        fail(
            output,
            "the keystore is sealed: give the unseal shares with --shares-file or --share",
            kind="sealed",
        )
    needed = SealedLocalProvider(directory.keys_dir).threshold
    return [
        typer.prompt(f"unseal share {i} of {needed}", hide_input=True) for i in range(1, needed + 1)
    ]


@asynccontextmanager
async def _keyring(
    directory: DataDir, *, credentials: list[str] | None, unseal: bool, read_only: bool = False
) -> AsyncIterator[Any]:
    from phivault.crypto.custody import open_keyring
    from phivault.ledger.sinks import open_shape_sink

    settings = load_settings()
    if read_only:
        async with open_keyring(
            directory, settings, _RefusingSink(), read_only=True, operator=_operator()
        ) as ring:
            yield ring
        return
    async with (
        # the shape's ledger: the local one, or the audit stream (never a local file nobody
        # verifies while the sequencer's ledger is the one auditors read)
        open_shape_sink(
            settings, directory, client_name=f"phivault-keys-cli-{directory.node_id}"
        ) as shape,
        open_keyring(
            directory,
            settings,
            shape.sink,
            credentials=credentials,
            unseal=unseal,
            operator=_operator(),
        ) as ring,
    ):
        yield ring


def _run(output: Output, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(work())
    except RetentionHold as exc:
        fail(output, str(exc), kind="retention-hold")
    except LedgerUnavailable as exc:
        # the key ring records before it acts: what it could not record, it did not do
        fail(
            output,
            f"the audit ledger cannot take events ({exc}): nothing was done without its event",
            kind="audit-unavailable",
            code=AUDIT_UNAVAILABLE_EXIT,
        )
    except Sealed as exc:
        fail(output, str(exc), kind="sealed")
    except CryptoError as exc:
        fail(output, str(exc), kind=type(exc).__name__)
    except PhivaultError as exc:
        fail(output, str(exc), kind="keys")


@app.command()
def unseal(
    *,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    share: ShareOption = None,
    shares_file: SharesFileOption = None,
) -> None:
    """Check unseal shares (or the HSM PIN) against this keystore; audited either way.

    The embedded server unseals itself at start from the same sources; a running server's
    unseal endpoint is the operators' way in the scaled shape.
    """
    output = Output(json_mode=json_mode)
    directory = open_data_dir(output, data_dir)
    credentials = _read_shares(output, directory, share, shares_file)

    async def work() -> dict[str, Any]:
        async with _keyring(directory, credentials=credentials, unseal=True) as ring:
            if ring.sealed:
                raise Sealed("no unseal credentials were given")
            inventory = ring.inventory()
            return {
                "ok": True,
                "provider": ring.provider_name,
                "root_key_id": inventory.root.key_id,
            }

    result = _run(output, work)
    if json_mode:
        output.json(result)
    else:
        output.say(
            f"[bold green]unsealed[/] root key {result['root_key_id']} ({result['provider']}): "
            "the shares are valid; sealed again on exit"
        )


@app.command()
def inventory(
    *,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    patient: Annotated[
        str | None, typer.Option(help="List this patient's data keys (needs --tenant).")
    ] = None,
) -> None:
    """Every key: id, purpose, version, state, provider, dates, permitted principals.

    Patient data keys are counted per tenant, state and KEK (there can be millions); name a
    patient to list theirs. Never shows key material.
    """
    output = Output(json_mode=json_mode)
    directory = open_data_dir(output, data_dir)

    async def work() -> Any:
        async with _keyring(directory, credentials=None, unseal=False, read_only=True) as ring:
            return ring.inventory(tenant=tenant, patient=patient)

    result = _run(output, work)
    if json_mode:
        output.json({"ok": True, **result.to_json()})
        return
    table = Table(title="phivault key inventory")
    for column in (
        "key id", "tenant", "purpose", "patient", "v", "state", "provider", "wrapped by",
        "created", "rotated", "principals",
    ):  # fmt: skip
        table.add_column(column)
    for info in (result.root, *result.keys):
        doc = info.to_json()
        table.add_row(
            doc["key_id"], doc["tenant"], doc["purpose"], doc["patient"] or "",
            str(doc["version"]), doc["state"], doc["provider"], doc["wrapped_by"] or "",
            doc["created"] or "", doc["rotated"] or "", ", ".join(doc["principals"]),
        )  # fmt: skip
    output.console.print(table)
    if result.deks:
        deks = Table(title="patient data keys")
        for column in ("tenant", "state", "wrapped by", "count"):
            deks.add_column(column)
        for row in result.deks:
            deks.add_row(row.tenant, row.state, row.wrapped_by, str(row.count))
        output.console.print(deks)


def _records_elements(directory: DataDir) -> tuple[Any, list[Any]]:
    """The data directory's records database, if it has one, and what a DEK rotation must
    re-seal in it: the records' sealed groups, then the break-glass grants' justifications
    and review notes (docs/decisions/keys-rotation.md). Resume with the same options: each
    store keeps its own cursor, by its place in the list."""
    from phivault.access.grant_store import SqlGrantElements
    from phivault.api.serve import records_store_url, records_write_positions
    from phivault.records.store import SqlRecordStore

    settings = load_settings()
    if not settings.records.store_url and not (directory.records_dir / "records.db").exists():
        return None, []
    # With the replicas and the workers' shared write positions: each re-seal pins every
    # session to the primary until the replicas have replayed it (a floor).
    store = SqlRecordStore(
        records_store_url(settings, directory),
        schema=settings.records.store_schema,
        replica_urls=settings.records.replica_urls,
        replica_positions=records_write_positions(settings),
    )
    return store, [store.sealed_elements(), SqlGrantElements(store.engine)]


def _element_store(output: Output, path: Path | None, what: str) -> Any:
    if path is None:
        fail(
            output,
            f"{what} needs the store of sealed elements to re-encrypt; the records service does "
            "not provide one in this data directory yet (pass --element-store)",
            kind="no-element-store",
        )
    from phivault.crypto.element_store import SqliteSealedElementStore

    return SqliteSealedElementStore(path)


@app.command()
def rotate(
    *,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    kek: Annotated[bool, typer.Option("--kek", help="New KEK; rewrap every key.")] = False,
    dek: Annotated[bool, typer.Option("--dek", help="New data keys; re-encrypt.")] = False,
    index: Annotated[bool, typer.Option("--index", help="New blind-index key; re-index.")] = False,
    tenant: TenantOption = "default",
    patient: Annotated[
        str | None, typer.Option(help="With --dek: only this patient's data key.")
    ] = None,
    share: ShareOption = None,
    shares_file: SharesFileOption = None,
    element_store: ElementStoreOption = None,
) -> None:
    """Rotate a tenant's KEK, data keys or blind-index key. Resumes an unfinished rotation."""
    output = Output(json_mode=json_mode)
    if [kek, dek, index].count(True) != 1:
        fail(output, "choose exactly one of --kek, --dek, --index", kind="invalid")
    if patient is not None and not dek:
        fail(output, "--patient goes with --dek", kind="invalid")
    directory = open_data_dir(output, data_dir)
    records, in_records = _records_elements(directory) if dek else (None, [])
    no_file = kek or (bool(in_records) and element_store is None)
    elements = None if no_file else _element_store(output, element_store, "this rotation")
    credentials = _read_shares(output, directory, share, shares_file)
    kind = "kek" if kek else "dek" if dek else "index"

    async def work() -> Any:
        async with _keyring(directory, credentials=credentials, unseal=True) as ring:
            if ring.sealed:
                raise Sealed()
            with output.progress(f"rotating {kind} ({tenant})") as bar:
                last = [0]

                def progress(done: int, total: int | None) -> None:
                    if total is not None:
                        bar.total(total)
                    bar.advance(done - last[0])
                    last[0] = done

                if kek:
                    return await ring.rotate_kek(tenant, progress=progress)
                if dek:
                    stores = [*([elements] if elements is not None else []), *in_records]
                    return await ring.rotate_deks(
                        tenant, stores, patient=patient, progress=progress
                    )
                return await ring.rotate_index(tenant, elements, progress=progress)

    try:
        report = _run(output, work)
    finally:
        if elements is not None:
            elements.close()
        if records is not None:
            records.close()
    result = {
        "ok": True,
        "job_id": report.job_id,
        "kind": kind,
        "tenant": tenant,
        "patient": report.patient,
        "processed": report.processed,
        "new_keys": report.new_keys,
        "retired": list(report.retired),
    }
    if json_mode:
        output.json(result)
    else:
        output.say(
            f"[bold green]rotated[/] {kind} for tenant {tenant}: {report.processed} processed, "
            f"{report.new_keys} new key(s), {len(report.retired)} retired (job {report.job_id})"
        )


@app.command()
def shred(
    *,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    patient: Annotated[str, typer.Option(help="The patient id (FHIR Patient/<id>).")] = "",
    tenant: TenantOption = "default",
    reason: Annotated[
        str, typer.Option(help="A reason code (e.g. erasure-request), never free text.")
    ] = "erasure-request",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    element_store: ElementStoreOption = None,
) -> None:
    """Destroy a patient's data keys (and blind-index tokens): their PHI never decrypts again.

    Refused under a retention hold. Leaves a shred record and a ledger event as evidence.
    In the scaled shape every worker is told to drop the patient's cached keys; if one does
    not confirm in time the shred is done but reported "pending propagation" (run it again).
    """
    output = Output(json_mode=json_mode)
    if not patient:
        fail(output, "--patient is required", kind="invalid")
    directory = open_data_dir(output, data_dir)
    if not yes and (json_mode or not sys.stdin.isatty()):
        fail(output, "shredding cannot be undone: confirm with --yes", kind="invalid")
    if not yes:
        typer.confirm(
            f"Destroy every data key of Patient/{patient} in tenant {tenant}? "
            "This cannot be undone",
            abort=True,
        )
    elements = None
    if element_store is not None:
        from phivault.crypto.element_store import SqliteSealedElementStore

        elements = SqliteSealedElementStore(element_store)

    async def work() -> Any:
        async with _keyring(directory, credentials=None, unseal=False) as ring:
            return await ring.shred_patient(tenant, patient, reason=reason, elements=elements)

    try:
        outcome = _run(output, work)
    finally:
        if elements is not None:
            elements.close()
    record, propagation = outcome.record, outcome.propagation
    # The shred record's number is what the shape's sink returned: a ledger index (embedded),
    # or the audit stream's sequence (scaled: the sequencer assigns the index later).
    position = position_of(load_settings())
    in_ledger = position is AuditPosition.LEDGER_INDEX
    result = {
        "ok": True,
        "tenant": record.tenant,
        "patient": f"Patient/{record.patient}",
        "shredded": record.shredded.isoformat(timespec="seconds"),
        "keys_destroyed": list(record.keys_destroyed),
        "ledger_index": record.ledger_index if in_ledger else None,
        "audit_position": {"kind": position.value, "value": record.ledger_index},
        "propagation": propagation.to_json(),
    }
    if json_mode:
        output.json(result)
    else:
        output.say(
            f"[bold red]shredded[/] Patient/{record.patient}: {len(record.keys_destroyed)} data "
            f"key(s) destroyed; "
            + (
                f"ledger entry {record.ledger_index}"
                if in_ledger
                else f"audit stream sequence {record.ledger_index}"
            )
        )
        if outcome.pending:
            output.say(_pending_message(propagation))


def _pending_message(propagation: Propagation) -> str:
    """What an operator must know when a shred did not reach every worker's cache."""
    workers = ", ".join(propagation.unconfirmed) or "unknown workers"
    bound = (
        f"they stop using cached keys within {propagation.bound_s:.0f} s"
        if propagation.bound_s is not None
        else "their cached keys expire with the cipher cache"
    )
    return (
        f"[bold yellow]pending propagation[/]: {propagation.detail}; not confirmed by: "
        f"{workers}; {bound}. Run the same shred again to retry the announcement."
    )


def _parse_until(output: Output, value: str) -> datetime:
    try:
        if "T" in value:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                raise ValueError("no time zone")
            return parsed
        return datetime.combine(date.fromisoformat(value), time(0, 0), tzinfo=UTC)
    except ValueError:
        fail(
            output,
            "--until must be a date (YYYY-MM-DD, 00:00 UTC) or a date-time with a time zone",
            kind="invalid",
        )


@app.command()
def hold(
    *,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
    patient: Annotated[str, typer.Option(help="The patient id.")] = "",
    until: Annotated[str, typer.Option(help="End of the hold: YYYY-MM-DD or a date-time.")] = "",
    reason: Annotated[str, typer.Option(help="A reason code (e.g. litigation).")] = "",
    tenant: TenantOption = "default",
) -> None:
    """Place a retention hold: shredding this patient's keys is refused until it ends."""
    output = Output(json_mode=json_mode)
    if not patient or not until or not reason:
        fail(output, "--patient, --until and --reason are required", kind="invalid")
    end = _parse_until(output, until)
    directory = open_data_dir(output, data_dir)

    async def work() -> Any:
        async with _keyring(directory, credentials=None, unseal=False) as ring:
            return await ring.place_hold(tenant, patient, until=end, reason=reason)

    placed = _run(output, work)
    result = {
        "ok": True,
        "tenant": placed.tenant,
        "patient": f"Patient/{placed.patient}",
        "until": placed.until.isoformat(timespec="seconds"),
        "reason": placed.reason,
    }
    if json_mode:
        output.json(result)
    else:
        output.say(
            f"[bold yellow]hold placed[/] on Patient/{placed.patient} until "
            f"{result['until']} ({placed.reason}): shredding is refused until then"
        )
