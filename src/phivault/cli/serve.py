"""``phivault serve``: run the API (uvicorn), over HTTPS when given a certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from phivault.cli._common import (
    ConfigOption,
    DataDirOption,
    Output,
    fail,
    load_settings_or_fail,
    open_data_dir,
)
from phivault.datadir import default_data_dir
from phivault.errors import PhivaultError

__all__ = ["serve"]


def serve(
    *,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate chain: serve HTTPS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key.")] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, max=64, help="Worker processes (above 1: the scaled shape only)."
        ),
    ] = 1,
    config: ConfigOption = None,
    data_dir: DataDirOption = default_data_dir(),
) -> None:
    """Serve the phivault API from a data directory."""
    output = Output(json_mode=False)
    from phivault.api.serve import ServeOptions, check_options
    from phivault.api.serve import serve as run

    settings = load_settings_or_fail(output, config)
    options = ServeOptions(
        host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, workers=workers
    )
    try:
        check_options(settings, options)
    except PhivaultError as exc:
        fail(output, str(exc), kind="serve")
    opened = open_data_dir(output, data_dir)
    try:
        run(settings, opened, options, on_ready=lambda url: output.err.print(f"serving {url}"))
    except PhivaultError as exc:
        fail(output, str(exc), kind="serve")
    except KeyboardInterrupt:
        pass
