"""``phivault sequencer``: move audit events from the JetStream stream to the PostgreSQL ledger.

Run two or more (on different machines): one is active, the others stand by and take over
when it dies (see :mod:`phivault.ledger.sequencer`). It runs until SIGTERM or SIGINT, then
appends what it has read, signs a final checkpoint and exits. Progress is logged as JSON lines
on standard error; ``--json`` prints a final summary on standard output.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import MutableMapping
from typing import Annotated, Any

import structlog
import typer

from phivault.cli._common import (
    ConfigOption,
    DataDirOption,
    JsonOption,
    Output,
    fail,
    load_settings_or_fail,
    open_data_dir,
)
from phivault.datadir import default_data_dir
from phivault.errors import PhivaultError

__all__ = ["sequencer"]


def _stamp(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["ts"] = round(time.time(), 3)
    event_dict["level"] = method_name
    return event_dict


def _logger() -> Any:
    # The sequencer logs sequence numbers, sizes and error kinds only: no PHI to scrub.
    return structlog.wrap_logger(
        structlog.WriteLogger(sys.stderr),
        processors=[_stamp, structlog.processors.JSONRenderer(sort_keys=True)],
    )


def sequencer(
    *,
    nats: Annotated[
        list[str] | None,
        typer.Option(
            "--nats",
            metavar="URL",
            help="A NATS server URL (repeat for a cluster). Default: ledger.nats_urls.",
        ),
    ] = None,
    stream: Annotated[
        str | None,
        typer.Option("--stream", metavar="NAME", help="The audit stream. Default: ledger.stream."),
    ] = None,
    ledger_postgres: Annotated[
        str | None,
        typer.Option(
            "--ledger-postgres",
            metavar="CONNINFO",
            help="libpq connection string of the ledger database. Default: ledger.postgres_url.",
        ),
    ] = None,
    ledger_schema: Annotated[
        str | None,
        typer.Option(
            "--ledger-schema",
            metavar="NAME",
            help="The ledger's schema. Default: ledger.postgres_schema.",
        ),
    ] = None,
    batch_max: Annotated[
        int, typer.Option("--batch-max", min=1, max=10_000, help="Events per group commit.")
    ] = 500,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            help="Serve Prometheus metrics (progress, lag, role) on this port.",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address for --metrics-port.")
    ] = "127.0.0.1",
    create_schema: Annotated[
        bool,
        typer.Option(
            "--create-schema",
            help="Create (or update) the ledger schema and the sequencer's cursor table, then "
            "exit. Run it once as the schema's owner, not as the sequencer's role.",
        ),
    ] = False,
    app_role: Annotated[
        str | None,
        typer.Option(
            "--app-role",
            metavar="ROLE",
            help="With --create-schema: the role the sequencer connects as (SELECT, INSERT).",
        ),
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
) -> None:
    """Append the audit stream to the PostgreSQL ledger (one active, others on standby)."""
    output = Output(json_mode=json_mode)
    settings = load_settings_or_fail(output, config)
    ledger_settings = settings.ledger
    urls = list(nats or ledger_settings.nats_urls)
    stream_name = stream or ledger_settings.stream
    conninfo = ledger_postgres or ledger_settings.postgres_url
    schema = ledger_schema or ledger_settings.postgres_schema
    if not conninfo:
        fail(
            output,
            "no ledger database: give --ledger-postgres or set ledger.postgres_url "
            "(PHIVAULT_LEDGER__POSTGRES_URL)",
            kind="usage",
        )
    if create_schema:
        _create_schema(output, conninfo, schema, app_role)
        return
    if not urls:
        fail(output, "no NATS server: give --nats or set ledger.nats_urls", kind="usage")
    opened = open_data_dir(output, data_dir)

    from phivault.crypto.signing import Ed25519NoteSigner
    from phivault.ledger.sequencer import Sequencer
    from phivault.ledger.service import signer_path

    try:
        signer = Ed25519NoteSigner.load(signer_path(opened))
    except (OSError, PhivaultError, ValueError) as exc:
        fail(
            output,
            f"cannot load the checkpoint signing key from {signer_path(opened)}: "
            f"{type(exc).__name__}",
            kind="data-dir",
        )
    log = _logger()
    worker = Sequencer(
        nats_urls=urls,
        stream=stream_name,
        ledger_conninfo=conninfo,
        ledger_schema=schema,
        signer=signer,
        origin=opened.origin,
        settings=ledger_settings,
        batch_max=batch_max,
        client_name=f"phivault-sequencer-{opened.node_id}",
        # Production refuses to write as a role that could change history.
        strict_role=settings.is_production,
        log=log,
    )
    if metrics_port is not None:
        _serve_metrics(output, worker, metrics_host, metrics_port)
    try:
        asyncio.run(_run(worker, replicas=ledger_settings.stream_replicas, log=log))
    except PhivaultError as exc:
        log.error("sequencer.stopped", error=str(exc), **worker.progress.as_dict())
        fail(output, str(exc), kind="sequencer")
    if json_mode:
        output.json({"ok": True, **worker.progress.as_dict()})


def _serve_metrics(output: Output, worker: Any, host: str, port: int) -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    from phivault.ledger.sequencer import SequencerCollector

    registry = CollectorRegistry(auto_describe=True)
    registry.register(SequencerCollector(worker.progress))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        fail(output, f"cannot serve metrics on {host}:{port}: {exc.strerror}", kind="usage")


async def _run(worker: Any, *, replicas: int, log: Any) -> None:
    from phivault.ledger.errors import LedgerUnavailable
    from phivault.ledger.stream import connect_nats, ensure_audit_stream

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # The stream must exist before anyone publishes; creating it here too is idempotent.
    # NATS being down at start is waited out like any later outage; bad settings are not.
    while not stop.is_set():
        try:
            client = await connect_nats(worker.nats_urls, name="phivault-sequencer-setup")
            try:
                await ensure_audit_stream(
                    client.jetstream(),
                    name=worker.stream,
                    subject=worker.subject,
                    replicas=replicas,
                )
            finally:
                await client.close()
            break
        except LedgerUnavailable as exc:
            log.warning("sequencer.nats-unavailable", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    await worker.run(stop)


def _create_schema(output: Output, conninfo: str, schema: str, app_role: str | None) -> None:
    from phivault.ledger.postgres_store import create_ledger_schema
    from phivault.ledger.sequencer import create_cursor_table

    try:
        create_ledger_schema(conninfo, schema=schema, app_role=app_role)
        create_cursor_table(conninfo, schema=schema, app_role=app_role)
    except PhivaultError as exc:
        fail(output, str(exc), kind="schema")
    if output.json_mode:
        output.json({"ok": True, "schema": schema})
    else:
        output.say(f"ledger schema {schema} is ready")
