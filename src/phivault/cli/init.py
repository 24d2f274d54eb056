"""``phivault init``: create a data directory, and what each part needs in it."""

from __future__ import annotations

from typing import Annotated

import typer

from phivault.cli._common import (
    ConfigOption,
    DataDirOption,
    JsonOption,
    Output,
    fail,
    load_settings_or_fail,
)
from phivault.datadir import default_data_dir
from phivault.errors import PhivaultError
from phivault.settings import StoreKind


def init(
    *,
    data_dir: DataDirOption = default_data_dir(),
    config: ConfigOption = None,
    json_mode: JsonOption = False,
    dev: Annotated[
        bool,
        typer.Option(
            "--dev",
            help="Development and demo data directory: enables dev-only conveniences "
            "(dev unseal file, dev identity provider). Production settings refuse it.",
        ),
    ] = False,
    origin: Annotated[
        str | None,
        typer.Option(help="The ledger's origin line in checkpoints (default: from the node id)."),
    ] = None,
    shares: Annotated[
        int, typer.Option("--shares", help="How many unseal shares to split the root key into.")
    ] = 5,
    threshold: Annotated[
        int, typer.Option("--threshold", help="How many shares unseal the keystore.")
    ] = 3,
) -> None:
    """Create a new data directory (ledger and its signing key, the keystore). Refuses to
    overwrite one. With the scaled shape (``shape.store = postgres``) the keystore's tables are
    made in the records database, schema ``keys.postgres_schema``."""
    output = Output(json_mode=json_mode)
    settings = load_settings_or_fail(output, config)
    from phivault.initialize import initialize_data_dir

    try:
        done = initialize_data_dir(
            data_dir,
            dev=dev,
            settings=settings,
            origin=origin,
            threshold=threshold,
            shares=shares,
        )
    except PhivaultError as exc:
        fail(output, f"{exc}; nothing was created", kind="init")
    created, keystore = done.data_dir, done.keystore
    if settings.shape.store is StoreKind.POSTGRES:
        # where every worker of the scaled shape finds the wrapped keys (never the URL: it may
        # carry a password)
        keystore_at = f"postgresql schema {settings.keys.postgres_schema}"
    else:
        from phivault.crypto.keystore import SqliteKeyStore

        keystore_at = str(created.keys_dir / SqliteKeyStore.FILENAME)
    verifier_key, dev_issuer = done.ledger_verifier_key, done.dev_identity_issuer
    result = {
        "ok": True,
        "data_dir": str(created.path),
        "dev": created.dev,
        "origin": created.origin,
        "ledger_verifier_key": verifier_key,
        "dev_identity_issuer": dev_issuer,
        "keys": {
            "provider": keystore.provider,
            "root_key_id": keystore.root_key_id,
            "keystore": keystore_at,
            # Printed once, stored nowhere: hand each share to a different custodian.
            "unseal_threshold": keystore.threshold,
            "unseal_shares": list(keystore.shares),
            "dev_unseal_file": None
            if keystore.dev_unseal_file is None
            else str(keystore.dev_unseal_file),
        },
    }
    if json_mode:
        output.json(result)
        return
    output.say(
        f"[bold green]initialized[/] {created.path} ({'development' if dev else 'production'})"
    )
    output.say(f"ledger origin:       {created.origin}")
    output.say(f"ledger verifier key: {verifier_key}")
    output.say(f"root key:            {keystore.root_key_id} ({keystore.provider})")
    output.say(f"keystore:            {keystore_at}")
    if keystore.shares:
        output.say(
            f"[bold]unseal shares[/] (any {keystore.threshold} of {keystore.share_count} unseal "
            "the keystore). They are shown ONCE and stored nowhere: give each to a different "
            "custodian now."
        )
        for number, share in enumerate(keystore.shares, start=1):
            output.console.print(f"  share {number}: {share}", markup=False)
    if keystore.dev_unseal_file is not None:
        output.say(
            f"[yellow]dev unseal file written to {keystore.dev_unseal_file}: the server will "
            "unseal itself from it (development only; production refuses it)[/]"
        )
    if dev:
        output.say("[yellow]this is a DEVELOPMENT data directory: never put real PHI in it[/]")
