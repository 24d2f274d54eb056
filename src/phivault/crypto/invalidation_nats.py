"""The scaled shape's :class:`~phivault.crypto.invalidation.CacheInvalidation`: NATS.

How it works and what it guarantees: :mod:`phivault.crypto.invalidation` and
``docs/decisions/keys-keystore-postgres.md``. In short: a serving worker subscribes to the
invalidation subject, then holds a lease (its entry in a JetStream key-value bucket whose TTL is
the lease, renewed by compare-and-swap); it uses its cipher cache only while the lease is held
and its connection has stayed up since. A shredder lists the leases, publishes the
invalidation with a reply inbox, waits (bounded) for each listed worker's confirmation, and
revokes (overwrites) the lease of every worker that did not confirm.

No nats exception crosses the port: connecting raises :class:`KeyUnavailable`, announcing
returns a pending :class:`Propagation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import nats.errors
import nats.js.errors
from nats.js import api

from phivault.crypto.errors import KeyUnavailable
from phivault.crypto.invalidation import CacheListener, Propagation, PropagationStatus
from phivault.errors import ConfigurationError, PhivaultError

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js.kv import KeyValue

__all__ = [
    "DEFAULT_CONFIRM_TIMEOUT_S",
    "DEFAULT_LEASE_S",
    "NatsInvalidation",
    "invalidation_bucket",
    "invalidation_subject",
]

DEFAULT_LEASE_S: Final = 10.0
DEFAULT_CONFIRM_TIMEOUT_S: Final = 2.0
# A lease is trusted locally for this share of its length from the moment its renewal was
# sent: the bucket keeps the entry a full lease from when it *stored* it, later still, so a
# worker always stops trusting its lease before the shredder could miss its entry (the rest
# absorbs clock-rate differences between hosts).
_LEASE_SHARE: Final = 0.8
_RENEW_SHARE: Final = 0.25  # renew four times per lease: three renewals may fail in a row
_MAX_ID_CHARS: Final = 128
_WORKER_ID_RE: Final = re.compile(r"^[A-Za-z0-9_\-=.]{1,128}$")
_NAMESPACE_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_NATS_ERRORS: Final = (nats.errors.Error, OSError, TimeoutError)
_REVOKED: Final = b'{"revoked": true}'
# Listings of the leases taken before a short one is believed (see _live_workers).
_LISTING_TRIES: Final = 3
_log = logging.getLogger("phivault.crypto.invalidation")


class IncompleteListing(Exception):
    """The lease listing missed a lease known to exist: it cannot be trusted."""


def invalidation_subject(namespace: str) -> str:
    """The subject of a key store's invalidations (``namespace``: its schema)."""
    return f"phivault.keys.{namespace}.invalidate"


def invalidation_bucket(namespace: str) -> str:
    """The key-value bucket of the workers' leases for a key store (``namespace``: its schema)."""
    return f"PHIVAULT_KEY_WORKERS_{namespace}"


def _whole_s(seconds: float) -> int:
    # nats-py's flush takes whole seconds; at least one.
    return max(1, round(seconds))


def _payload(tenant: str, patient: str) -> bytes:
    return json.dumps({"v": 1, "tenant": tenant, "patient": patient}).encode()


def _parse(data: bytes) -> tuple[str, str] | None:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        return None
    tenant, patient = doc.get("tenant"), doc.get("patient")
    if not isinstance(tenant, str) or not isinstance(patient, str):
        return None
    if not tenant or not patient or len(tenant) > _MAX_ID_CHARS or len(patient) > _MAX_ID_CHARS:
        return None
    return tenant, patient


def _worker_id(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_\-]", "-", name)[:64] or "worker"
    return f"{safe}-{secrets.token_hex(6)}"


class NatsInvalidation:
    """The scaled shape's invalidation over NATS (see the module docstring).

    ``serving=True`` makes this process a worker: it subscribes, takes a lease and renews it
    in the background; :meth:`cache_usable` is true only while both hold. ``serving=False``
    (a CLI shred) only announces; its own cache is trusted as in-process (it serves no PHI).
    Build it with :meth:`connect`; close it with :meth:`aclose`.
    """

    def __init__(
        self,
        client: NatsClient,
        kv: KeyValue,
        *,
        namespace: str,
        name: str,
        serving: bool,
        lease_s: float,
        confirm_timeout_s: float = DEFAULT_CONFIRM_TIMEOUT_S,
        cache_ttl_s: float | None = None,
        owns_client: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_s <= 0 or confirm_timeout_s <= 0:
            raise ConfigurationError("the invalidation lease and timeout must be positive")
        self._client = client
        self._kv = kv
        self.subject = invalidation_subject(namespace)
        self.worker_id = _worker_id(name)
        self.serving = serving
        self.lease_s = lease_s
        self.confirm_timeout_s = confirm_timeout_s
        self._cache_ttl_s = cache_ttl_s
        self._owns_client = owns_client
        self._clock = clock
        self._listener: CacheListener | None = None
        self._sub: Subscription | None = None
        self._renewing: asyncio.Task[None] | None = None
        self._trusted = False
        self._lease_until = 0.0
        self._revision = 0
        self._reconnects = 0
        self._closed = False

    @classmethod
    async def connect(
        cls,
        urls: Sequence[str],
        *,
        namespace: str,
        name: str,
        serving: bool,
        lease_s: float = DEFAULT_LEASE_S,
        confirm_timeout_s: float = DEFAULT_CONFIRM_TIMEOUT_S,
        cache_ttl_s: float | None = None,
        replicas: int = 1,
        connect_timeout_s: float = 5.0,
    ) -> NatsInvalidation:
        """Connect (as :func:`phivault.ledger.stream.connect_nats` does) and open the lease
        bucket, creating it if missing. An existing bucket's TTL is the lease (every worker
        must trust its lease no longer than the bucket keeps it). Raises
        :class:`KeyUnavailable` when NATS cannot be reached."""
        from phivault.ledger.stream import connect_nats

        if not _NAMESPACE_RE.match(namespace):
            raise ConfigurationError(f"invalid invalidation namespace {namespace!r}")
        try:
            client = await connect_nats(urls, name=name, connect_timeout_s=connect_timeout_s)
        except PhivaultError as exc:
            if isinstance(exc, ConfigurationError):
                raise
            raise KeyUnavailable(f"cannot announce key invalidations: {exc}") from exc
        try:
            kv = await _open_bucket(client, invalidation_bucket(namespace), lease_s, replicas)
            status = await kv.status()
            lease_s = status.ttl or lease_s
        except _NATS_ERRORS as exc:
            await client.close()
            raise KeyUnavailable(
                f"cannot open the key workers' lease bucket: {type(exc).__name__}"
            ) from exc
        except BaseException:
            await client.close()
            raise
        self = cls(
            client,
            kv,
            namespace=namespace,
            name=name,
            serving=serving,
            lease_s=lease_s,
            confirm_timeout_s=confirm_timeout_s,
            cache_ttl_s=cache_ttl_s,
            owns_client=True,
        )
        return self

    # -- the worker's side ------------------------------------------------------------------

    def attach(self, listener: CacheListener) -> None:
        self._listener = listener

    async def start(self) -> None:
        """Subscribe, then take the lease (in that order: a worker listed by a shredder already
        hears its invalidations), then renew it in the background."""
        if not self.serving or self._sub is not None:
            return
        try:
            self._sub = await self._client.subscribe(self.subject, cb=self._on_invalidation)
            await self._client.flush(timeout=_whole_s(self.confirm_timeout_s))
        except _NATS_ERRORS as exc:
            raise KeyUnavailable(
                f"cannot subscribe to key invalidations: {type(exc).__name__}"
            ) from exc
        await self._renew()  # best effort: without a lease the cache is simply not used
        self._renewing = asyncio.create_task(self._renew_loop(), name="key-invalidation-lease")

    def cache_usable(self) -> bool:
        if not self.serving:
            return True
        if self._trusted and (
            not self._client.is_connected
            or self._client.stats["reconnects"] != self._reconnects
            or self._clock() >= self._lease_until
        ):
            # Disconnected (invalidations may be missed), reconnected (some may have been), or
            # the lease lapsed (a shredder may no longer list this worker): forget every cipher.
            self._lose_trust()
        return self._trusted

    def _lose_trust(self) -> None:
        self._trusted = False
        self._lease_until = 0.0
        self._drop_all()

    def _drop_all(self) -> None:
        if self._listener is not None:
            self._listener.drop_all()

    async def _renew(self) -> None:
        """Renew the lease (compare-and-swap: a revoked or expired lease is not renewed), or,
        with the cache already wiped, take a fresh one."""
        self.cache_usable()  # notice a disconnect or a lapse first
        sent = self._clock()
        reconnects = self._client.stats["reconnects"]
        value = json.dumps({"worker": self.worker_id}).encode()
        try:
            if self._trusted:
                revision = await self._kv.update(self.worker_id, value, last=self._revision)
            else:
                self._drop_all()  # nothing cached before the lease may outlive its start
                revision = await self._kv.put(self.worker_id, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            _log.warning("key invalidation lease revoked or expired: cipher cache wiped")
            self._lose_trust()
            return
        except _NATS_ERRORS as exc:
            _log.warning("key invalidation lease not renewed: %s", type(exc).__name__)
            return
        if reconnects != self._client.stats["reconnects"] or not self._client.is_connected:
            return  # the connection dropped meanwhile: invalidations may have been missed
        was_trusted = self._trusted
        self._revision = revision
        self._reconnects = reconnects
        self._lease_until = sent + self.lease_s * _LEASE_SHARE
        self._trusted = True
        if not was_trusted:
            self._drop_all()  # reads in flight while untrusted must not be cached (epoch)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s * _RENEW_SHARE)
            try:
                await self._renew()
            except Exception:
                # Not a NATS failure (those are handled): keep renewing. Until a renewal
                # succeeds the lease lapses and the cache is not used: safe, only slower.
                _log.exception("key invalidation lease renewal failed")

    async def _on_invalidation(self, msg: Msg) -> None:
        parsed = _parse(msg.data)
        if parsed is None:
            # Not one of ours: drop everything (costs only store reads), confirm nothing.
            self._drop_all()
            return
        if self._listener is not None:
            self._listener.drop_patient(*parsed)
        if msg.reply:
            with contextlib.suppress(*_NATS_ERRORS):
                # Sent only after the cipher is gone: the confirmation is the shredder's proof.
                await self._client.publish(msg.reply, self.worker_id.encode())

    # -- the shredder's side -----------------------------------------------------------------

    async def _live_workers(self) -> set[str]:
        """The workers holding (or lately holding) a lease. nats-py's ``KeyValue.keys()`` can
        answer before the entries it was sent have reached it (its "no more" marker goes
        first when the consumer reports nothing pending ahead of the delivery callback): a
        short listing would call a shred complete without waiting for workers that still
        cache the key. So a listing that is empty, or lacks this worker while it holds a
        lease, is taken again (the union of the tries: listing a worker too many only makes
        the shred wait for it); if this worker is still missing, the listing is refused."""
        holding = self.serving and self._trusted and self._clock() < self._lease_until
        live: set[str] = set()
        for _try in range(_LISTING_TRIES):
            try:
                keys = await self._kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            live.update(k for k in keys if _WORKER_ID_RE.match(k))
            if live and (not holding or self.worker_id in live):
                return live
        if holding:
            raise IncompleteListing("the lease listing did not include this worker's own lease")
        return live

    async def announce(self, tenant: str, patient: str) -> Propagation:
        if self._listener is not None:
            self._listener.drop_patient(tenant, patient)
        deadline = self._clock() + self.confirm_timeout_s
        try:
            live = await asyncio.wait_for(self._live_workers(), self.confirm_timeout_s)
        except (*_NATS_ERRORS, IncompleteListing) as exc:
            return self._pending(
                (), (), f"the live workers could not be listed ({type(exc).__name__})", False
            )
        confirmed: set[str] = set()
        inbox = self._client.new_inbox()
        failure = ""
        try:
            sub = await self._client.subscribe(inbox)
            try:
                await self._client.publish(self.subject, _payload(tenant, patient), reply=inbox)
                await self._client.flush(timeout=_whole_s(deadline - self._clock()))
                while not live <= confirmed:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    try:
                        msg = await sub.next_msg(timeout=remaining)
                    except nats.errors.TimeoutError:
                        break
                    confirmed.add(msg.data.decode(errors="replace"))
            finally:
                with contextlib.suppress(*_NATS_ERRORS):
                    await sub.unsubscribe()
        except _NATS_ERRORS as exc:
            failure = f"the invalidation could not be published ({type(exc).__name__})"
        missing = live - confirmed
        done = tuple(sorted(live & confirmed))
        if not missing and not failure:
            return Propagation(PropagationStatus.COMPLETE, confirmed=done)
        revoked = await self._revoke(missing) if not failure else False
        detail = failure or (
            f"{len(missing)} live worker(s) did not confirm within {self.confirm_timeout_s} s"
        )
        return self._pending(done, tuple(sorted(missing)), detail, revoked)

    async def _revoke(self, workers: set[str]) -> bool:
        """Overwrite the unconfirmed workers' leases with a revocation: none can renew (its
        compare-and-swap fails), so each stops using its cache within one lease. The entry
        stays listed for a whole lease (not deleted): a shred in that time still waits for
        the worker, which may still trust its current lease. True if every lease was revoked."""
        ok = True
        for worker in sorted(workers):
            try:
                await asyncio.wait_for(self._kv.put(worker, _REVOKED), self.confirm_timeout_s)
            except _NATS_ERRORS:
                ok = False
        return ok

    def _pending(
        self, confirmed: tuple[str, ...], missing: tuple[str, ...], detail: str, revoked: bool
    ) -> Propagation:
        bound = self.lease_s if revoked else self._cache_ttl_s
        return Propagation(
            PropagationStatus.PENDING,
            confirmed=confirmed,
            unconfirmed=missing,
            detail=detail,
            bound_s=bound,
        )

    # -- closing ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop renewing, give the lease back (a shredder need not wait for a stopped worker),
        close the connection if owned."""
        if self._closed:
            return
        self._closed = True
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        if self.serving:
            self._lose_trust()
            with contextlib.suppress(*_NATS_ERRORS):
                await asyncio.wait_for(self._kv.delete(self.worker_id), self.confirm_timeout_s)
        if self._sub is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._sub.unsubscribe()
        if self._owns_client and not self._client.is_closed:
            try:
                await self._client.drain()
            except _NATS_ERRORS:
                await self._client.close()


async def _open_bucket(client: NatsClient, bucket: str, lease_s: float, replicas: int) -> KeyValue:
    js = client.jetstream()
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            bucket=bucket,
            ttl=lease_s,
            history=1,
            replicas=replicas,
            storage=api.StorageType.FILE,
        )
    except nats.js.errors.BadRequestError:
        return await js.key_value(bucket)  # another worker created it first
