"""Running the API with uvicorn: the composition root for ``phivault serve``.

:func:`open_service` opens the adapters that ``settings.shape`` picks -- the audit sink and
reader (the data directory's ledger, or the JetStream stream and a view of the sequencer's
PostgreSQL ledger), the key ring, the records store (SQLite, or PostgreSQL with replicas) --
and the repository (settling write intents a crash left open: at start, or while serving when
there are several workers), and builds the app with :func:`create_app` around them: the FHIR
routes at ``/fhir``, key custody, care assignments and break-glass. :func:`serve` runs that
app with uvicorn; the benchmark opens the same service with production settings. Everything
is closed again, in reverse order, on exit.

With a certificate it serves HTTPS only, TLS 1.2 at least (TLS 1.3 is negotiated whenever the
client supports it). The embedded ledger has exactly one writer per data directory, so
``--workers`` above 1 is refused in the embedded shape rather than having workers fight over
the ledger lock; the scaled shape runs N workers (:mod:`phivault.api.workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from phivault.datadir import DataDir
from phivault.errors import ConfigurationError
from phivault.settings import KeyProviderKind, LedgerKind, Settings, SharedStateKind

if TYPE_CHECKING:
    from fastapi import FastAPI

    from phivault.access.policy import Policy
    from phivault.identity.jwks import KeySource
    from phivault.ledger.ports import AuditSink, LedgerReader
    from phivault.ledger.service import Ledger
    from phivault.records.store import SqlRecordStore
    from phivault.records.store.write_positions import WritePositions
    from phivault.resilience import Breakers

__all__ = [
    "RECONCILE_CURSOR",
    "ServeOptions",
    "check_options",
    "open_service",
    "records_store_url",
    "run_server",
    "serve",
    "serve_on_socket",
    "tls_context",
    "tune_for_serving",
]

#: In the data directory's records folder: the ledger index reconciliation has scanned up to.
RECONCILE_CURSOR = "reconcile.cursor"


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


def check_options(settings: Settings, options: ServeOptions) -> None:
    """Refuse options the settings cannot serve (before anything is opened)."""
    if options.workers != 1 and not settings.shape.scaled:
        raise ConfigurationError(
            "several workers need the scaled shape (shape.store = postgres, shape.ledger = "
            "jetstream, shape.shared_state = redis): the embedded ledger has a single writer "
            "and per-process rate limits, replay cache and sessions"
        )
    if (
        options.workers != 1
        and settings.is_production
        and settings.shape.keys is KeyProviderKind.SEALED
    ):
        # Unseal shares posted to /admin/keys/unseal reach one worker; the others would stay
        # sealed (and not ready) until each got its own quorum.
        raise ConfigurationError(
            "several production workers need a root key provider that unseals itself "
            "(shape.keys = pkcs11 or awskms), not the sealed local keystore"
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
    check_options(settings, options)
    context = _context_of(options)  # a bad certificate fails here, before any worker starts
    if options.workers > 1:
        from phivault.api.workers import run_workers

        run_workers(settings, data_dir.path, options, on_ready=on_ready)
        return
    run_server(_serve(settings, data_dir, options, context, on_ready))


def serve_on_socket(
    settings: Settings,
    data_dir: DataDir,
    options: ServeOptions,
    listener: socket.socket,
    *,
    worker: int,
    metrics_dir: Path,
) -> None:
    """Worker number ``worker`` of several: serve on a socket the supervisor bound (until
    SIGTERM), with ``/metrics`` answering for all the workers through ``metrics_dir``."""
    run_server(
        _serve(
            settings,
            data_dir,
            options,
            _context_of(options),
            None,
            listener=listener,
            worker=(worker, metrics_dir),
        )
    )


def run_server(main: Coroutine[Any, Any, None]) -> None:
    """Run a server's main coroutine on uvloop (a faster event loop, measured by
    bench/fhir_bench.py) where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a pinned dependency; kept optional for porters
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _context_of(options: ServeOptions) -> ssl.SSLContext | None:
    if options.tls_cert is not None and options.tls_key is not None:
        return tls_context(options.tls_cert, options.tls_key)
    return None


def records_store_url(settings: Settings, data_dir: DataDir) -> str:
    """The records database: the configured URL, else SQLite in the data directory."""
    if settings.records.store_url:
        return settings.records.store_url
    return f"sqlite:///{data_dir.records_dir}/records.db"


def records_write_positions(settings: Settings) -> WritePositions | None:
    """Read-your-writes across workers (docs/decisions/replica-routing.md): with replicas and
    Redis for shared state, each session's write positions in Redis; else None (one worker's
    router keeps what it wrote)."""
    if (
        not settings.records.replica_urls
        or settings.shape.shared_state is not SharedStateKind.REDIS
    ):
        return None
    from phivault.records.store.write_positions import RedisWritePositions

    return RedisWritePositions.from_url(
        settings.api.redis_url, prefix=settings.api.redis_key_prefix
    )


def _open_store(settings: Settings, data_dir: DataDir, breakers: Breakers) -> SqlRecordStore:
    from phivault.records.store import SqlRecordStore
    from phivault.records.store.routing import BreakerHealth

    # The folder holds the embedded database and, in every shape, the reconcile cursor.
    data_dir.records_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    records = settings.records
    return SqlRecordStore(
        records_store_url(settings, data_dir),
        schema=records.store_schema,
        replica_urls=records.replica_urls,
        replica_positions=records_write_positions(settings),
        replica_max_lag_s=records.replica_max_lag_ms / 1000,
        pool_size=records.pool_size,
        # A replica that fails is skipped (the primary serves) until its breaker lets a
        # read try it again; the breakers' states are exported at /metrics.
        replica_health=lambda name: BreakerHealth(
            breakers.breaker(
                f"records.{name}", failure_threshold=1, reset_timeout_s=1.0, call_timeout_s=None
            )
        ),
    )


@dataclass(slots=True)
class _Audit:
    """Where audit events go and where they are read back, per shape."""

    sink: AuditSink
    reader: LedgerReader
    embedded: Ledger | None  # the local ledger (sink and reader in one), if that is the shape


@asynccontextmanager
async def _open_audit(
    settings: Settings, data_dir: DataDir, breakers: Breakers
) -> AsyncIterator[_Audit]:
    """The embedded ledger; or (shape.ledger = jetstream) the audit stream to publish to and
    a refreshing view of the ledger the sequencer writes from it, in PostgreSQL."""
    from phivault.ledger.sinks import open_shape_sink

    ledger_settings = settings.ledger
    # Fail closed, fast: once the stream has failed a few times in a row, PHI interactions
    # answer 503 at once instead of each waiting out the publish timeout.
    breaker = (
        None
        if settings.shape.ledger is LedgerKind.LOCAL
        else breakers.breaker(
            "audit.stream",
            failure_threshold=5,
            reset_timeout_s=2.0,
            call_timeout_s=max(
                ledger_settings.publish_timeout_s, ledger_settings.leader_election_wait_s
            )
            + 1.0,
        )
    )
    async with open_shape_sink(
        settings, data_dir, client_name=f"phivault-api-{data_dir.node_id}", breaker=breaker
    ) as shape:
        if shape.embedded is not None:
            yield _Audit(shape.embedded, shape.embedded, shape.embedded)
            return
        from phivault.ledger.note import NoteVerifier
        from phivault.ledger.postgres_store import PostgresLedgerStore
        from phivault.ledger.service import verifier_key_of
        from phivault.ledger.view import open_ledger_view

        conninfo = ledger_settings.postgres_url
        if conninfo is None:  # the settings refuse this; here for the type checker
            raise ConfigurationError("shape.ledger = jetstream needs ledger.postgres_url")
        async with open_ledger_view(
            lambda: PostgresLedgerStore(
                conninfo, schema=ledger_settings.postgres_schema, writable=False
            ),
            # checkpoints are checked against the sequencer's key, pinned in the data dir
            verifier=NoteVerifier.from_verifier_key(verifier_key_of(data_dir)),
        ) as view:
            yield _Audit(shape.sink, view, None)


@asynccontextmanager
async def open_service(
    settings: Settings,
    data_dir: DataDir,
    *,
    key_sources: Mapping[str, KeySource] | None = None,
    unseal_shares: Sequence[str] | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[FastAPI]:
    """The whole service on ``data_dir``, ready to serve, closed on exit.

    ``key_sources`` adds trusted token issuers (the benchmark's); ``unseal_shares`` unseals
    the key ring (otherwise it unseals itself where it can, or waits for operators at
    ``/admin/keys/unseal``, and ``/readyz`` says "not ready" until then).
    """
    from phivault.access.decision import compile_policy
    from phivault.api.app import create_app
    from phivault.api.breakglass import wire_break_glass
    from phivault.api.care_assignments import care_assignments_router
    from phivault.api.context import MountedRouter
    from phivault.api.fhir import FHIR_PREFIX, fhir_router
    from phivault.api.keys import UnsealState, keys_router, require_unsealed
    from phivault.crypto import open_keyring
    from phivault.records.audit_events import AuditEventReader
    from phivault.records.reconciler import IntentReconciler
    from phivault.records.repository import RecordsRepository
    from phivault.records.results import RecordControls
    from phivault.resilience import Breakers

    records = settings.records
    credentials = list(unseal_shares) if unseal_shares is not None else None
    breakers = Breakers()  # every dependency's breaker, exported at /metrics
    async with (
        _open_audit(settings, data_dir, breakers) as audit,
        # serving: the ring hears other workers' shreds (scaled shape) before using its cache
        open_keyring(data_dir, settings, audit.sink, credentials=credentials, serving=True) as ring,
    ):
        store = await asyncio.to_thread(_open_store, settings, data_dir, breakers)
        reconciling: asyncio.Task[None] | None = None
        try:
            policy = compile_policy(_load_policy(settings))
            repository = RecordsRepository(
                store,
                ring,
                policy,
                clock=clock,
                controls=RecordControls(
                    audit=not records.bench_audit_off,
                    encryption=not records.bench_encryption_off,
                    policy=not records.bench_policy_off,
                ),
                max_bundle_entries=records.max_bundle_entries,
                observer=data_dir.node_id,
            )
            cursor = data_dir.records_dir / RECONCILE_CURSOR
            if audit.embedded is not None:
                # One process: settle every intent a crash left open before serving anything;
                # the cursor file remembers how far the ledger was scanned.
                await repository.reconcile(audit.embedded, sink=audit.embedded, cursor=cursor)
            else:
                # Several workers: a worker may die mid-write while others serve on, so
                # intents are settled while serving, once old enough (records.reconciler).
                reconciler = IntentReconciler(
                    repository,
                    audit.reader,
                    audit.sink,
                    store.engine,
                    cursor=cursor,
                    every_s=records.reconcile_every_s,
                    settle_after_s=records.settle_intents_after_s,
                )
                reconciling = asyncio.create_task(reconciler.run(), name="reconcile-intents")
            unseal = UnsealState(ring)

            async def keys_unsealed() -> None:
                await require_unsealed(unseal)

            break_glass = wire_break_glass(
                settings,
                engine=store.engine,
                ciphers=ring,
                policy=policy,
                clock=clock,
                webhook_url=settings.access.break_glass_webhook_url,
            )

            breakers.add(ring.breaker)  # the root key provider's, at /metrics with the rest
            for breaker in break_glass.breakers:
                breakers.add(breaker)

            yield create_app(
                settings,
                audit_sink=audit.sink,
                breakers=breakers,
                data_dir=data_dir,
                key_sources=key_sources,
                # FHIR first: nearly every request is one, and routes are tried in order
                # (about a fifth of a read's CPU went to failing the other routers' paths).
                # No other router's path matches a FHIR route's.
                routers=[
                    MountedRouter(
                        fhir_router(
                            default_count=records.default_count,
                            max_bundle_entries=records.max_bundle_entries,
                        ),
                        prefix=FHIR_PREFIX,
                    ),
                    MountedRouter(keys_router(), prefix="/admin/keys"),
                    MountedRouter(care_assignments_router(), prefix="/admin/care-assignments"),
                    *break_glass.routers,
                ],
                state={
                    "unseal": unseal,
                    "records": repository,
                    "audit_events": AuditEventReader(audit.reader, policy, clock=clock),
                    "break_glass": break_glass.service,
                    "sealed_elements": store.sealed_elements(),  # a shred drops search tokens
                },
                on_shutdown=break_glass.on_shutdown,
                readiness_checks=[keys_unsealed],
                clock=clock,
            )
        finally:
            if reconciling is not None:
                reconciling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reconciling
            store.close()


def _load_policy(settings: Settings) -> Policy:
    """The operator's policy file if one is set (validated: an invalid policy stops the
    start with every problem listed), else the shipped default."""
    from phivault.access.policy import default_policy, load_policy

    path = settings.access.policy_file
    if path is None:
        return default_policy()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"the access policy file {path.name} cannot be read ({exc.strerror})"
        ) from None
    return load_policy(text, source=str(path))


def tune_for_serving() -> None:
    """Process settings for a long-running server (``phivault serve`` and the benchmark).

    Everything built at start (the app, policy tables, classification, caches) is moved out
    of the garbage collector's sight (``gc.freeze``), and young collections run every 50,000
    allocations instead of 700: a request allocates thousands of short-lived objects, and
    under load a full collection stalled every request in flight for hundreds of
    milliseconds (measured by bench/fhir_bench.py; 8-14% less CPU per read with these).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1_000)


@asynccontextmanager
async def _metrics_across_workers(
    app: FastAPI, worker: tuple[int, Path] | None
) -> AsyncIterator[None]:
    """As one worker of several, publish this worker's metrics beside the others' and
    answer ``/metrics`` for all of them (:mod:`phivault.api.worker_metrics`)."""
    if worker is None:
        yield
        return
    from phivault.api.worker_metrics import WorkerMetrics

    number, directory = worker
    metrics = app.state.front_door.metrics
    exchange = WorkerMetrics(directory, number, metrics.render_own)
    exchange.publish()
    metrics.render_across_workers(exchange.render)
    publishing = asyncio.create_task(exchange.run())
    try:
        yield
    finally:
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        exchange.close()


async def _serve(
    settings: Settings,
    data_dir: DataDir,
    options: ServeOptions,
    context: ssl.SSLContext | None,
    on_ready: Callable[[str], None] | None,
    *,
    listener: socket.socket | None = None,
    worker: tuple[int, Path] | None = None,
) -> None:
    async with open_service(settings, data_dir) as app, _metrics_across_workers(app, worker):
        tune_for_serving()
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
        await server.serve(sockets=None if listener is None else [listener])
