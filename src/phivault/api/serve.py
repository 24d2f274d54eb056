"""Running the API with uvicorn: the composition root for ``phivault serve``.

It opens the data directory's audit ledger, builds the app with :func:`create_app` around it,
and serves it. With a certificate it serves HTTPS only, TLS 1.2 at least (TLS 1.3 is
negotiated whenever the client supports it). The embedded ledger has exactly one writer per
data directory, so ``--workers`` above 1 is refused in the embedded shape rather than having
workers fight over the ledger lock.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from phivault.datadir import DataDir
from phivault.errors import ConfigurationError
from phivault.settings import Settings

__all__ = ["ServeOptions", "serve", "tls_context"]


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    workers: int = 1


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context: TLS 1.2 minimum, 1.3 preferred, no compression, no renegotiation."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError("the TLS certificate or key cannot be loaded") from exc
    return context


def _check(options: ServeOptions) -> None:
    if options.workers != 1:
        raise ConfigurationError(
            "the embedded ledger has a single writer: run one worker per data directory "
            "(several workers need the scaled shape's audit stream)"
        )
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together")


def serve(
    settings: Settings,
    data_dir: DataDir,
    options: ServeOptions,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until interrupted. Raises ConfigurationError for settings it refuses."""
    _check(options)
    context = None
    if options.tls_cert is not None and options.tls_key is not None:
        context = tls_context(options.tls_cert, options.tls_key)
    asyncio.run(_serve(settings, data_dir, options, context, on_ready))


async def _serve(
    settings: Settings,
    data_dir: DataDir,
    options: ServeOptions,
    context: ssl.SSLContext | None,
    on_ready: Callable[[str], None] | None,
) -> None:
    from phivault.api.app import create_app
    from phivault.api.context import MountedRouter
    from phivault.api.keys import UnsealState, keys_router, require_unsealed
    from phivault.crypto import open_keyring
    from phivault.ledger.service import open_ledger

    async with (
        open_ledger(data_dir, settings.ledger) as ledger,
        # Sealed unless it can unseal itself (HSM PIN, KMS, or the dev unseal file); operators
        # then unseal it at /admin/keys/unseal, and /readyz says "not ready" until they do.
        open_keyring(data_dir, settings, ledger) as ring,
    ):
        unseal = UnsealState(ring)

        async def keys_unsealed() -> None:
            await require_unsealed(unseal)

        app = create_app(
            settings,
            audit_sink=ledger,
            data_dir=data_dir,
            routers=[MountedRouter(keys_router(), prefix="/admin/keys")],
            state={"unseal": unseal},
            readiness_checks=[keys_unsealed],
        )
        config = uvicorn.Config(
            app,
            host=options.host,
            port=options.port,
            access_log=False,  # the front door logs each request, scrubbed
            server_header=False,
            log_level="warning",
            lifespan="on",
            ssl_certfile=str(options.tls_cert) if context is not None else None,
            ssl_context_factory=(lambda _config, _default: context)
            if context is not None
            else None,
        )
        server = uvicorn.Server(config)
        if on_ready is not None:
            scheme = "https" if context is not None else "http"
            on_ready(f"{scheme}://{options.host}:{options.port}")
        await server.serve()
