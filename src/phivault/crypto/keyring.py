"""The key ring: the one service that manages keys and hands out safe ciphers.

Why one place: key custody is only auditable if every key operation goes through a single
door that checks state (sealed, held, shredded), writes the ledger event and never lets key
bytes out. The records service asks it for a :class:`PatientCipher` (seal/open elements), a
:class:`BlindIndexer` (search tokens) and a :class:`LedgerTokenizer`; operators drive
rotation, shredding, holds and inventory through it (``phivault keys ...``).

Hierarchy: root key (in its provider) -> per-tenant KEK (versioned, wrapped by the root)
-> per-patient DEKs, per-tenant blind-index and ledger-token keys (versioned, wrapped by the
tenant's KEK). Every wrapped key is bound by associated data to its tenant, purpose, subject,
version and key id, so a wrapped key moved to another row does not unwrap.

Availability: every wrap and unwrap by the root key provider (HSM, KMS) runs in a worker
thread through a circuit breaker with a time limit (:mod:`phivault.resilience`). The ring
fails closed: a provider that is down, slow, or behind an open breaker raises
:class:`KeyUnavailable`, which PHI interactions answer with 503; nothing is served without
its key. Provider calls are not retried here (botocore already retries KMS throttling; an HSM
error is not transient), and once the breaker is open a request costs nothing until its
reset timeout lets one call try the provider again.

Audit: create, rotate, unseal, seal, shred, hold and every failed unwrap are ``key-operation``
events. Destructive operations (shred, hold) record their event *before* the change, so an
unavailable ledger refuses them (fail closed).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from phivault.crypto._hazmat import SecretKey, aead, generate_key, rewrap_key, unwrap_key, wrap_key
from phivault.crypto.blind_index import BlindIndexer
from phivault.crypto.cache import KeyCache
from phivault.crypto.elements import PatientCipher, key_version_of
from phivault.crypto.errors import (
    DecryptionFailed,
    KeyNotFound,
    KeyStoreConflict,
    KeyUnavailable,
    PatientShredded,
    RetentionHold,
    RotationInProgress,
    Sealed,
)
from phivault.crypto.invalidation import CacheInvalidation, InProcessInvalidation, Propagation
from phivault.crypto.ports import (
    Hold,
    JobKind,
    KeyPurpose,
    KeyRecord,
    KeyState,
    KeyStore,
    RootKeyProvider,
    RotationJob,
    SealedElement,
    SealedElementStore,
    ShredRecord,
)
from phivault.crypto.tokens import LedgerTokenizer
from phivault.errors import InvalidInput
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
from phivault.ledger.ports import AuditSink
from phivault.resilience import Breaker, CallTimedOut, CircuitOpen

__all__ = [
    "PRINCIPALS",
    "PROVIDER_BREAKER",
    "SERVICE_PRINCIPAL",
    "SYSTEM_TENANT",
    "DekSummary",
    "Inventory",
    "KeyInfo",
    "KeyRing",
    "Progress",
    "RotationReport",
    "ShredOutcome",
    "key_aad",
    "provider_breaker",
]

_T = TypeVar("_T")

SERVICE_PRINCIPAL: Final = "service:phivault-keys"
PROVIDER_BREAKER: Final = "keys.root-provider"  # the breaker's name in metrics
SYSTEM_TENANT: Final = "system"  # the tenant of events about the whole keystore (unseal, seal)

# Which service principals may use each kind of key: the custody statement of the inventory.
PRINCIPALS: Final[dict[str, tuple[str, ...]]] = {
    "root": (SERVICE_PRINCIPAL,),
    KeyPurpose.KEK.value: (SERVICE_PRINCIPAL,),
    KeyPurpose.DEK.value: ("service:phivault-records",),
    KeyPurpose.BLIND_INDEX.value: ("service:phivault-records",),
    KeyPurpose.LEDGER_TOKEN.value: ("service:phivault-api", "service:phivault-records"),
}

_KEY_PREFIX = {
    KeyPurpose.KEK: "kek",
    KeyPurpose.DEK: "dek",
    KeyPurpose.BLIND_INDEX: "bix",
    KeyPurpose.LEDGER_TOKEN: "ltk",
}
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,127}$")
_PATIENT_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
#: Re-reads of an element whose compare-and-swap keeps losing before the rotation stops
#: (unfinished, resumable) rather than destroy a key that element may still need.
_RESEAL_TRIES: Final = 5

Progress = Callable[[int, int | None], None]


def provider_breaker(
    *,
    failure_threshold: int = 5,
    reset_timeout_s: float = 30.0,
    call_timeout_s: float = 10.0,
) -> Breaker:
    """The breaker of the root key provider: opens after ``failure_threshold`` straight
    failures for ``reset_timeout_s``; each wrap or unwrap may take ``call_timeout_s``."""
    return Breaker(
        PROVIDER_BREAKER,
        failure_threshold=failure_threshold,
        reset_timeout_s=reset_timeout_s,
        call_timeout_s=call_timeout_s,
        # Provider down or slow. Not Sealed (an operator's state) nor DecryptionFailed (the
        # provider answered: that wrapped key does not authenticate).
        failure_types=(KeyUnavailable, OSError, TimeoutError),
    )


def _lp(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def key_aad(tenant: str, purpose: KeyPurpose, subject: str, version: int, key_id: str) -> bytes:
    """Associated data of a wrapped key: whose, what for, which version, which row."""
    return (
        b"phivault.key.v1"
        + _lp(tenant)
        + _lp(purpose.value)
        + _lp(subject)
        + version.to_bytes(4, "big")
        + _lp(key_id)
    )


def _aad_of(record: KeyRecord) -> bytes:
    return key_aad(record.tenant, record.purpose, record.subject, record.version, record.key_id)


def _check_tenant(tenant: str) -> None:
    if not _TENANT_RE.match(tenant):
        raise InvalidInput("tenant ids are letters, digits and . _ : @ - (at most 128)")


def _check_patient(patient: str) -> None:
    if not _PATIENT_RE.match(patient):
        raise InvalidInput("patient ids are FHIR ids: letters, digits, - and . (at most 64)")


def _check_code(value: str, what: str) -> None:
    if not _CODE_RE.match(value):
        raise InvalidInput(
            f"{what} must be a code (letters, digits, . _ -; at most 64), never free text"
        )


@dataclass(frozen=True)
class KeyInfo:
    """One key as the inventory shows it: custody facts, never material."""

    key_id: str
    tenant: str
    purpose: str
    patient: str | None
    version: int
    state: str
    provider: str
    wrapped_by: str | None
    created: datetime | None
    rotated: datetime | None
    destroyed: datetime | None
    principals: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        def ts(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat(timespec="seconds")

        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "purpose": self.purpose,
            "patient": self.patient,
            "version": self.version,
            "state": self.state,
            "provider": self.provider,
            "wrapped_by": self.wrapped_by,
            "created": ts(self.created),
            "rotated": ts(self.rotated),
            "destroyed": ts(self.destroyed),
            "principals": list(self.principals),
        }


@dataclass(frozen=True)
class DekSummary:
    """Patient data keys counted by tenant, state and wrapping KEK (there can be millions)."""

    tenant: str
    state: str
    wrapped_by: str
    count: int


@dataclass(frozen=True)
class Inventory:
    root: KeyInfo
    keys: tuple[KeyInfo, ...]
    deks: tuple[DekSummary, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root.to_json(),
            "keys": [k.to_json() for k in self.keys],
            "dek_summary": [
                {"tenant": d.tenant, "state": d.state, "wrapped_by": d.wrapped_by, "count": d.count}
                for d in self.deks
            ],
        }


@dataclass(frozen=True)
class ShredOutcome:
    """A shred: its record (done in the key store) and how far the cache invalidation got."""

    record: ShredRecord
    propagation: Propagation

    @property
    def pending(self) -> bool:
        """Destroyed in the store, but some worker did not confirm dropping its cipher."""
        return not self.propagation.complete


@dataclass(frozen=True)
class RotationReport:
    job_id: str
    kind: JobKind
    tenant: str
    patient: str | None
    processed: int  # keys rewrapped, elements re-encrypted or re-indexed
    new_keys: int
    retired: tuple[str, ...]  # key ids destroyed at the end


class KeyRing:
    """Key custody for one deployment. Build one per process (``open_keyring`` does)."""

    def __init__(
        self,
        *,
        store: KeyStore,
        provider: RootKeyProvider,
        audit: AuditSink,
        observer: str,
        clock: Callable[[], datetime] | None = None,
        cache_size: int = 10_000,
        cache_ttl_s: float = 300.0,
        operator: str | None = None,
        breaker: Breaker | None = None,
        invalidation: CacheInvalidation | None = None,
    ) -> None:
        """``breaker`` guards the root key provider's wrap and unwrap (default:
        :func:`provider_breaker`); export it with the process's other breakers.
        ``invalidation`` announces shreds to the other workers sharing the key store and says
        when this one may use its cipher cache (default: in-process, one process only)."""
        self._store = store
        self._provider = provider
        self.breaker = breaker or provider_breaker()
        self._audit = audit
        self._observer = observer
        self._clock = clock or (lambda: datetime.now(UTC))
        self._operator = operator
        self._keks: dict[str, AESGCM] = {}
        self._ciphers: KeyCache[PatientCipher] = KeyCache(cache_size, cache_ttl_s)
        # Same bounded lifetime as data keys: another worker's rotation becomes visible here
        # within one cache lifetime (rotations with settle_s wait that long).
        self._indexers: KeyCache[BlindIndexer] = KeyCache(1024, cache_ttl_s)
        self._tokenizers: KeyCache[LedgerTokenizer] = KeyCache(1024, cache_ttl_s)
        self._create_lock = asyncio.Lock()
        self._invalidation: CacheInvalidation = invalidation or InProcessInvalidation()
        self._invalidation.attach(self)

    # state -------------------------------------------------------------------------------

    @property
    def sealed(self) -> bool:
        return self._provider.sealed

    @property
    def provider_name(self) -> str:
        return self._provider.name

    @property
    def credentials_needed(self) -> int:
        """How many credentials :meth:`unseal` needs: M shares, one PIN, or none."""
        return self._provider.credentials_needed

    @property
    def cached_ciphers(self) -> int:
        return len(self._ciphers)

    async def _io(self, operation: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """One key store call in a worker thread: on PostgreSQL (the scaled shape) each is a
        network round trip, and a database that stopped answering must not stall the event
        loop (every other request of the worker) until the statement timeout."""
        return await asyncio.to_thread(operation, *args, **kwargs)

    async def _root(self, operation: Callable[..., _T], *args: Any) -> _T:
        """One wrap or unwrap by the root key provider: in a worker thread (providers block),
        through the breaker. A timed-out call's thread finishes on its own; its result is
        dropped."""
        try:
            return await self.breaker.call(lambda: asyncio.to_thread(operation, *args))
        except CircuitOpen as exc:
            raise KeyUnavailable(
                f"the root key provider ({self._provider.name}) is unavailable; "
                f"retry in {exc.retry_after_s:.0f} s"
            ) from exc
        except CallTimedOut as exc:
            raise KeyUnavailable(
                f"the root key provider ({self._provider.name}) did not answer in {exc.timeout_s} s"
            ) from exc

    def _require_unsealed(self) -> None:
        if self._provider.sealed:
            raise Sealed()

    async def unseal(self, credentials: Sequence[str]) -> None:
        """Unseal with M shares (sealed keystore) or the PIN (PKCS#11). Audited either way."""
        try:
            await asyncio.to_thread(self._provider.unseal, list(credentials))
        except (InvalidInput, KeyUnavailable) as exc:
            await self._record(
                self._event(
                    "unseal",
                    Action.EXECUTE,
                    tenant=SYSTEM_TENANT,
                    outcome=Outcome.MINOR_FAILURE,
                    reason="invalid-credentials",
                )
            )
            raise exc from None
        try:
            await self._record(self._event("unseal", Action.EXECUTE, tenant=SYSTEM_TENANT))
        except BaseException:
            # No effect without a record: an unseal the ledger did not take is undone.
            self._provider.seal()
            self._forget()
            raise

    async def seal(self) -> None:
        """Forget the root key and every unwrapped key (caches wiped)."""
        self._provider.seal()
        self._forget()
        await self._record(self._event("seal", Action.EXECUTE, tenant=SYSTEM_TENANT))

    async def record_root_created(self, root_key_id: str) -> None:
        """The ledger event for the root key's creation (recorded once per data directory)."""
        safe = re.sub(r"[^A-Za-z0-9\-.]", "-", root_key_id)[:64]
        await self._record(
            self._event(
                "create", Action.CREATE, tenant=SYSTEM_TENANT, reason="root-key", key_ids=(safe,)
            )
        )

    def drop_patient(self, tenant: str, patient: str) -> None:
        """Forget the patient's cached cipher (a shred's invalidation, from any worker)."""
        self._ciphers.evict((tenant, patient))

    def drop_all(self) -> None:
        """Forget every cached cipher (this worker may have missed invalidations)."""
        self._ciphers.clear()

    def _forget(self) -> None:
        self._keks.clear()
        self._ciphers.clear()
        self._indexers.clear()
        self._tokenizers.clear()

    # audit -------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self._clock()

    def _event(
        self,
        subtype: str,
        action: Action,
        *,
        tenant: str,
        outcome: Outcome = Outcome.SUCCESS,
        reason: str | None = None,
        patient: str | None = None,
        key_ids: Sequence[str] = (),
        operator: str | None = None,
    ) -> AuditEvent:
        operator = operator or self._operator
        agents = [Agent(who=SERVICE_PRINCIPAL, requestor=operator is None)]
        if operator is not None:
            agents.insert(0, Agent(who=operator, requestor=True))
        entities = [
            Entity(
                what=f"CryptoKey/{key_id}",
                type=EntityType.SYSTEM_OBJECT,
                role=EntityRole.SECURITY_RESOURCE,
            )
            for key_id in key_ids
        ]
        if patient is not None:
            entities.append(
                Entity(what=f"Patient/{patient}", type=EntityType.PERSON, role=EntityRole.PATIENT)
            )
        return AuditEvent(
            kind=EventKind.KEY_OPERATION,
            subtype=subtype,
            action=action,
            recorded=self._now(),
            outcome=outcome,
            outcome_reason=reason,
            tenant=tenant,
            patient=None if patient is None else f"Patient/{patient}",
            agents=tuple(agents),
            source=Source(observer=self._observer),
            entities=tuple(entities),
        )

    async def _record(self, event: AuditEvent) -> int:
        return await self._audit.record(event)

    async def _unwrap_failed(self, record: KeyRecord, diagnostic: str) -> KeyUnavailable:
        await self._record(
            self._event(
                "unwrap",
                Action.EXECUTE,
                tenant=record.tenant,
                outcome=Outcome.SERIOUS_FAILURE,
                reason="unwrap-failed",
                patient=record.subject or None,
                key_ids=(record.key_id,),
            )
        )
        return KeyUnavailable(f"key {record.key_id} did not unwrap ({diagnostic})")

    # key creation and loading -----------------------------------------------------------

    def _new_record(
        self,
        tenant: str,
        *,
        purpose: KeyPurpose,
        subject: str,
        version: int,
        wrapped_by: str,
        job: str | None,
    ) -> tuple[KeyRecord, bytes]:
        key_id = f"{_KEY_PREFIX[purpose]}-{secrets.token_hex(8)}"
        record = KeyRecord(
            key_id=key_id,
            tenant=tenant,
            purpose=purpose,
            subject=subject,
            version=version,
            state=KeyState.ACTIVE,
            wrapped=None,
            wrapped_by=wrapped_by,
            created=self._now(),
            job=job,
        )
        return record, _aad_of(record)

    async def _next_version(self, tenant: str, purpose: KeyPurpose, subject: str) -> int:
        versions = [
            r.version for r in await self._io(self._store.records, tenant, purpose, subject)
        ]
        return max(versions, default=0) + 1

    async def _create_kek(self, tenant: str, job: str | None) -> KeyRecord:
        version = await self._next_version(tenant, KeyPurpose.KEK, "")
        record, aad = self._new_record(
            tenant,
            purpose=KeyPurpose.KEK,
            subject="",
            version=version,
            wrapped_by=f"root:{self._provider.root_key_id}",
            job=job,
        )
        secret = generate_key("kek")
        try:
            wrapped = await self._root(self._provider.wrap, secret, aad)
            self._keks[record.key_id] = aead(secret)
        finally:
            secret.wipe()
        return _with_wrapped(record, wrapped)

    async def _kek(self, key_id: str) -> AESGCM:
        cached = self._keks.get(key_id)
        if cached is not None:
            return cached
        self._require_unsealed()
        record = await self._io(self._store.get, key_id)
        if record.wrapped is None or record.purpose is not KeyPurpose.KEK:
            raise KeyUnavailable(f"key-encryption key {key_id} is {record.state.value}")
        try:
            secret = await self._root(self._provider.unwrap, record.wrapped, _aad_of(record))
        except DecryptionFailed as exc:
            raise await self._unwrap_failed(record, exc.diagnostic) from None
        try:
            cipher = aead(secret)
        finally:
            secret.wipe()
        self._keks[key_id] = cipher
        return cipher

    def _active(self, records: Sequence[KeyRecord]) -> KeyRecord | None:
        active = [r for r in records if r.state is KeyState.ACTIVE]
        return active[-1] if active else None

    async def ensure_tenant(self, tenant: str) -> KeyRecord:
        """The tenant's active KEK, creating its KEK, blind-index and token keys if missing."""
        _check_tenant(tenant)
        self._require_unsealed()
        kek = self._active(await self._io(self._store.live, tenant, KeyPurpose.KEK))
        if kek is not None:
            return kek
        async with self._create_lock:
            kek = self._active(await self._io(self._store.live, tenant, KeyPurpose.KEK))
            if kek is not None:
                return kek
            kek = await self._create_kek(tenant, None)
            kek_aead = self._keks[kek.key_id]
            records = [kek]
            for purpose in (KeyPurpose.BLIND_INDEX, KeyPurpose.LEDGER_TOKEN):
                if not await self._io(self._store.live, tenant, purpose):
                    records.append(
                        self._wrapped_new(
                            tenant,
                            purpose=purpose,
                            subject="",
                            version=1,
                            kek=kek,
                            kek_aead=kek_aead,
                            job=None,
                        )
                    )
            await self._record(
                self._event(
                    "create",
                    Action.CREATE,
                    tenant=tenant,
                    reason="tenant-keys",
                    key_ids=[r.key_id for r in records],
                )
            )
            try:
                await self._io(self._store.add, records)
            except KeyStoreConflict:
                # Another worker created the tenant's keys first: theirs are the keys.
                winner = self._active(await self._io(self._store.live, tenant, KeyPurpose.KEK))
                if winner is None:
                    raise
                return winner
            return kek

    def _wrapped_new(
        self,
        tenant: str,
        *,
        purpose: KeyPurpose,
        subject: str,
        version: int,
        kek: KeyRecord,
        kek_aead: AESGCM,
        job: str | None,
    ) -> KeyRecord:
        record, aad = self._new_record(
            tenant,
            purpose=purpose,
            subject=subject,
            version=version,
            wrapped_by=kek.key_id,
            job=job,
        )
        secret = generate_key(purpose.value)
        try:
            return _with_wrapped(record, wrap_key(kek_aead, secret, aad))
        finally:
            secret.wipe()

    async def create_patient_key(self, tenant: str, patient: str) -> KeyInfo:
        """Create the patient's data key (idempotent: returns the active one if it exists)."""
        _check_tenant(tenant)
        _check_patient(patient)
        self._require_unsealed()
        if await self._io(self._store.shred_record, tenant, patient) is not None:
            raise PatientShredded(tenant, patient)
        existing = self._active(await self._io(self._store.live, tenant, KeyPurpose.DEK, patient))
        if existing is not None:
            return self._info(existing)
        kek = await self.ensure_tenant(tenant)
        kek_aead = await self._kek(kek.key_id)
        async with self._create_lock:
            existing = self._active(
                await self._io(self._store.live, tenant, KeyPurpose.DEK, patient)
            )
            if existing is not None:
                return self._info(existing)
            version = await self._next_version(tenant, KeyPurpose.DEK, patient)
            record = self._wrapped_new(
                tenant,
                purpose=KeyPurpose.DEK,
                subject=patient,
                version=version,
                kek=kek,
                kek_aead=kek_aead,
                job=None,
            )
            await self._record(
                self._event(
                    "create",
                    Action.CREATE,
                    tenant=tenant,
                    patient=patient,
                    key_ids=(record.key_id,),
                )
            )
            try:
                await self._io(self._store.add, [record])
            except KeyStoreConflict:
                # Another worker created this patient's key first: theirs is the key.
                winner = self._active(
                    await self._io(self._store.live, tenant, KeyPurpose.DEK, patient)
                )
                if winner is None:
                    raise
                return self._info(winner)
        return self._info(record)

    async def create_patient_keys(self, tenant: str, patients: Sequence[str]) -> int:
        """Create data keys for many patients at once (bulk loads); one event per patient."""
        _check_tenant(tenant)
        for patient in patients:
            _check_patient(patient)
        self._require_unsealed()
        kek = await self.ensure_tenant(tenant)
        kek_aead = await self._kek(kek.key_id)
        existing = await self._io(self._store.live_many, tenant, patients)
        records = [
            self._wrapped_new(
                tenant,
                purpose=KeyPurpose.DEK,
                subject=patient,
                version=1,
                kek=kek,
                kek_aead=kek_aead,
                job=None,
            )
            for patient in patients
            if not existing[patient]
        ]
        for record in records:
            await self._record(
                self._event(
                    "create",
                    Action.CREATE,
                    tenant=tenant,
                    patient=record.subject,
                    key_ids=(record.key_id,),
                )
            )
        try:
            await self._io(self._store.add, records)
        except KeyStoreConflict:
            # Another worker created some of these keys meanwhile: nothing of this batch
            # was written; create the rest one by one (each is idempotent).
            for patient in patients:
                await self.create_patient_key(tenant, patient)
        return len(records)

    async def patient_cipher(
        self, tenant: str, patient: str, *, create: bool = False
    ) -> PatientCipher:
        """The cipher that seals and opens this patient's elements.

        ``create=True`` creates the data key on first use (writes); reads should not.
        Raises :class:`KeyNotFound`, :class:`PatientShredded`, :class:`Sealed`.
        """
        # A worker that cannot hear shred invalidations (scaled shape: NATS down, lease
        # lapsed) does not use its cache at all: every call reads the key store.
        if self._invalidation.cache_usable():
            cached = self._ciphers.get((tenant, patient))
            if cached is not None:
                return cached
        _check_tenant(tenant)
        _check_patient(patient)
        self._require_unsealed()
        # Seen before reading: an invalidation that arrives while the read is in flight
        # changes it, and the (possibly pre-shred) cipher is then not cached.
        epoch = self._ciphers.epoch
        # A cache miss reads the store off the event loop: on PostgreSQL (the scaled shape)
        # that is a network round trip, and a database that stopped answering must not stall
        # every other request of this worker while it times out. Destroyed keys are not
        # live: a shredded patient has none, and the shred record says why.
        records = await self._io(self._store.live, tenant, KeyPurpose.DEK, patient)
        if not records:
            if await self._io(self._store.shred_record, tenant, patient) is not None:
                raise PatientShredded(tenant, patient)
            if not create:
                raise KeyNotFound(f"no data key for Patient/{patient} in tenant {tenant}")
            await self.create_patient_key(tenant, patient)
            records = await self._io(self._store.live, tenant, KeyPurpose.DEK, patient)
        cipher = await self._build_cipher(tenant, patient, records)
        if self._invalidation.cache_usable():
            self._ciphers.put((tenant, patient), cipher, epoch=epoch)
        return cipher

    async def _build_cipher(
        self, tenant: str, patient: str, records: Sequence[KeyRecord]
    ) -> PatientCipher:
        keys: dict[int, AESGCM] = {}
        for record in records:
            keys[record.version] = await self._unwrap_to_aead(record)
        active = self._active(records)
        version = active.version if active is not None else max(keys)
        return PatientCipher(tenant, patient, keys, version)

    async def _unwrap_secret(self, record: KeyRecord) -> SecretKey:
        if record.wrapped is None:
            raise KeyUnavailable(f"key {record.key_id} is {record.state.value}")
        kek = await self._kek(record.wrapped_by)
        try:
            return unwrap_key(kek, record.wrapped, _aad_of(record), label=record.purpose.value)
        except DecryptionFailed as exc:
            raise await self._unwrap_failed(record, exc.diagnostic) from None

    async def _unwrap_to_aead(self, record: KeyRecord) -> AESGCM:
        secret = await self._unwrap_secret(record)
        try:
            return aead(secret)
        finally:
            secret.wipe()

    async def blind_indexer(self, tenant: str) -> BlindIndexer:
        """Token maker for the tenant's searchable fields (all live index key versions)."""
        cached = self._indexers.get((tenant, "index"))
        if cached is not None:
            return cached
        await self.ensure_tenant(tenant)
        records = await self._io(self._store.live, tenant, KeyPurpose.BLIND_INDEX)
        keys: dict[int, bytes] = {}
        for record in records:
            secret = await self._unwrap_secret(record)
            keys[record.version] = secret.reveal()
            secret.wipe()
        active = self._active(records)
        indexer = BlindIndexer(tenant, keys, active.version if active else max(keys))
        self._indexers.put((tenant, "index"), indexer)
        return indexer

    async def ledger_tokenizer(self, tenant: str) -> LedgerTokenizer:
        """Keyed tokens that audit events carry instead of identifiers."""
        cached = self._tokenizers.get((tenant, "token"))
        if cached is not None:
            return cached
        await self.ensure_tenant(tenant)
        active = self._active(await self._io(self._store.live, tenant, KeyPurpose.LEDGER_TOKEN))
        if active is None:
            raise KeyNotFound(f"tenant {tenant} has no active ledger-token key")
        secret = await self._unwrap_secret(active)
        tokenizer = LedgerTokenizer(tenant, secret.reveal(), active.version)
        secret.wipe()
        self._tokenizers.put((tenant, "token"), tokenizer)
        return tokenizer

    # holds and shredding ---------------------------------------------------------------

    async def place_hold(
        self,
        tenant: str,
        patient: str,
        *,
        until: datetime,
        reason: str,
        now: datetime | None = None,
    ) -> Hold:
        """Forbid shredding this patient's keys until ``until`` (a retention or legal hold)."""
        _check_tenant(tenant)
        _check_patient(patient)
        _check_code(reason, "the hold reason")
        now = now or self._now()
        if until.tzinfo is None:
            raise InvalidInput("the hold's end must carry a time zone")
        if until <= now:
            raise InvalidInput("the hold must end in the future")
        hold = Hold(
            tenant=tenant,
            patient=patient,
            until=until,
            reason=reason,
            placed_by=self._operator or SERVICE_PRINCIPAL,
            placed=now,
        )
        await self._record(
            self._event("hold", Action.UPDATE, tenant=tenant, patient=patient, reason=reason)
        )
        await self._io(self._store.place_hold, hold)
        return hold

    async def shred_patient(
        self,
        tenant: str,
        patient: str,
        *,
        reason: str,
        elements: SealedElementStore | None = None,
        now: datetime | None = None,
        operator: str | None = None,
    ) -> ShredOutcome:
        """Destroy every data key of the patient (and their blind-index tokens, if given).

        From then on nothing of the patient's PHI decrypts anywhere, backups of the records
        included. Refuses under a retention hold (:class:`RetentionHold`), changing nothing.
        Does not need the keystore unsealed: destroying needs no key.

        Once the keys are destroyed in the store, every worker sharing it is told to drop the
        patient's cached cipher; the outcome says whether all live workers confirmed
        (``propagation.complete``) or the shred is pending propagation (and for how long an
        unconfirmed worker's cache may still serve). Shredding a shredded patient again
        returns its record and announces again (how a pending shred is retried).
        ``operator``: who asked, for this call (an admin over HTTP), instead of the ring's.
        """
        _check_tenant(tenant)
        _check_patient(patient)
        _check_code(reason, "the shred reason")
        now = now or self._now()
        existing = await self._io(self._store.shred_record, tenant, patient)
        if existing is not None:
            return await self._announce(existing)
        holds = await self._io(self._store.holds, tenant, patient)
        active_holds = [h for h in holds if h.until > now]
        if active_holds:
            hold = max(active_holds, key=lambda h: h.until)
            await self._record(
                self._event(
                    "shred",
                    Action.DELETE,
                    tenant=tenant,
                    patient=patient,
                    outcome=Outcome.MINOR_FAILURE,
                    reason="retention-hold",
                    operator=operator,
                )
            )
            raise RetentionHold(patient, hold.until, hold.reason)
        live = await self._io(
            self._store.records, tenant, KeyPurpose.DEK, patient, include_destroyed=False
        )
        doomed = tuple(r.key_id for r in live)
        index = await self._record(
            self._event(
                "shred",
                Action.DELETE,
                tenant=tenant,
                patient=patient,
                reason=reason,
                key_ids=doomed,
                operator=operator,
            )
        )
        record = ShredRecord(
            tenant=tenant,
            patient=patient,
            shredded=now,
            by=operator or self._operator or SERVICE_PRINCIPAL,
            reason=reason,
            keys_destroyed=doomed,
            ledger_index=index,
        )
        try:
            await self._io(self._store.shred, record)
        except KeyStoreConflict:
            # Another worker shredded this patient at the same moment: its record stands.
            winner = await self._io(self._store.shred_record, tenant, patient)
            if winner is None:
                raise
            record = winner
        self._ciphers.evict((tenant, patient))
        if elements is not None:
            await self._io(elements.drop_patient_tokens, tenant, patient)
        return await self._announce(record)

    async def _announce(self, record: ShredRecord) -> ShredOutcome:
        propagation = await self._invalidation.announce(record.tenant, record.patient)
        return ShredOutcome(record, propagation)

    # rotation ----------------------------------------------------------------------------

    async def _job(self, tenant: str, kind: JobKind, patient: str | None) -> RotationJob:
        for job in await self._io(self._store.open_jobs, tenant):
            if job.kind is not kind:
                raise RotationInProgress(
                    f"a {job.kind.value} rotation ({job.job_id}) is unfinished for tenant "
                    f"{tenant}; resume it first (phivault keys rotate --{job.kind.value})"
                )
            return job
        now = self._now()
        job = RotationJob(
            job_id=f"rot-{secrets.token_hex(6)}",
            kind=kind,
            tenant=tenant,
            patient=patient,
            phase="keys",
            cursor=0,
            started=now,
            updated=now,
        )
        await self._record(
            self._event(
                "rotate", Action.EXECUTE, tenant=tenant, patient=patient, reason=f"{kind}-start"
            )
        )
        await self._io(self._store.start_job, job)
        return job

    async def _record_done(self, job: RotationJob, retired: list[str]) -> None:
        """The rotation's closing event, recorded *before* old keys are destroyed."""
        await self._record(
            self._event(
                "rotate",
                Action.EXECUTE,
                tenant=job.tenant,
                patient=job.patient,
                reason=f"{job.kind}-done",
                key_ids=retired[:50],
            )
        )

    def open_rotations(self, tenant: str) -> list[RotationJob]:
        return self._store.open_jobs(tenant)

    async def rotate_kek(
        self, tenant: str, *, batch: int = 5_000, progress: Progress | None = None
    ) -> RotationReport:
        """New KEK version; rewrap every key of the tenant under it; destroy the old KEK.

        Data is not touched. Resumable: rerunning continues an unfinished KEK rotation.
        """
        _check_tenant(tenant)
        self._require_unsealed()
        await self.ensure_tenant(tenant)
        job = await self._job(tenant, JobKind.KEK, None)
        keks = await self._io(self._store.live, tenant, KeyPurpose.KEK)
        new = next((k for k in keks if k.job == job.job_id), None)
        created = 0
        if new is None:
            new = await self._create_kek(tenant, job.job_id)
            await self._io(
                self._store.add,
                [new],
                demote=[k.key_id for k in keks if k.state is KeyState.ACTIVE],
            )
            created = 1
        new_aead = await self._kek(new.key_id)
        summary = await self._io(self._store.dek_summary)
        total = job.done + sum(
            count
            for (t, state, by), count in summary.items()
            if t == tenant and state != KeyState.DESTROYED.value and by != new.key_id
        )
        cursor, done = job.cursor, job.done
        olds: dict[str, AESGCM] = {}
        head = b"phivault.key.v1" + _lp(tenant)
        purposes = {p.value: _lp(p.value) for p in KeyPurpose}
        while True:
            rows = await self._io(self._store.scan_wrapped_by, tenant, new.key_id, cursor, batch)
            if not rows:
                break
            updates = []
            for row in rows:
                old = olds.get(row.wrapped_by)
                if old is None:
                    old = olds[row.wrapped_by] = await self._kek(row.wrapped_by)
                # key_aad(), inlined: this loop runs a million times in a KEK rotation
                aad = (
                    head
                    + purposes[row.purpose]
                    + _lp(row.subject)
                    + row.version.to_bytes(4, "big")
                    + _lp(row.key_id)
                )
                try:
                    blob = rewrap_key(old, new_aead, row.wrapped, aad)
                except DecryptionFailed as exc:
                    failed = await self._io(self._store.get, row.key_id)
                    raise await self._unwrap_failed(failed, exc.diagnostic) from None
                updates.append((row.seq, row.wrapped, blob, new.key_id))
            await self._io(self._store.rewrap, updates, self._now())
            cursor, done = rows[-1].seq, done + len(rows)
            await self._io(
                self._store.update_job,
                job.job_id,
                phase="rewrap",
                cursor=cursor,
                done=done,
                now=self._now(),
            )
            if progress is not None:
                progress(done, total)
        retired = [
            k.key_id
            for k in await self._io(self._store.live, tenant, KeyPurpose.KEK)
            if k.key_id != new.key_id
        ]
        await self._record_done(job, [new.key_id, *retired])
        await self._io(self._store.destroy, retired, self._now())
        for key_id in retired:
            self._keks.pop(key_id, None)
        await self._io(self._store.finish_job, job.job_id, self._now())
        return RotationReport(job.job_id, JobKind.KEK, tenant, None, done, created, tuple(retired))

    async def rotate_deks(
        self,
        tenant: str,
        elements: SealedElementStore | Sequence[SealedElementStore],
        *,
        patient: str | None = None,
        batch: int = 500,
        progress: Progress | None = None,
        settle_s: float = 0.0,
    ) -> RotationReport:
        """New data keys (one patient or all); re-encrypt their elements; retire old versions.

        Progress (phase and cursor) is persisted after every batch: after a crash, calling this
        again resumes the unfinished rotation. When every element is under the new versions,
        the old versions are destroyed (the minimum decryption version rises).

        ``settle_s``: with several workers, one may still hold a cached cipher whose active
        version is the old one for up to its cache lifetime. Pass that lifetime: after the
        first pass the rotation waits that long, then makes a second pass that re-seals any
        element written under an old version meanwhile, and only then retires the old keys.

        ``elements``: every store holding data sealed under the data keys (the records, then the
        break-glass grants' justifications and review notes), walked in this order; anything
        left out becomes unreadable when the old versions are destroyed. Each store has its
        own cursor (the phase names the store: ``reencrypt``, ``reencrypt:1``, ...), so resume
        with the same stores in the same order.
        """
        stores = _as_stores(elements)
        _check_tenant(tenant)
        if patient is not None:
            _check_patient(patient)
        self._require_unsealed()
        open_jobs = [] if patient is None else await self._io(self._store.open_jobs, tenant)
        if patient is not None and not any(j.kind is JobKind.DEK for j in open_jobs):
            if await self._io(self._store.shred_record, tenant, patient) is not None:
                raise PatientShredded(tenant, patient)
            if not await self._io(self._store.live, tenant, KeyPurpose.DEK, patient):
                raise KeyNotFound(f"no data key for Patient/{patient} in tenant {tenant}")
        kek = await self.ensure_tenant(tenant)
        job = await self._job(tenant, JobKind.DEK, patient)
        scope = job.patient
        created = 0
        if job.phase == "keys":
            kek_aead = await self._kek(kek.key_id)
            after = ""
            while True:
                subjects = (
                    [scope]
                    if scope is not None
                    else await self._io(self._store.subjects, tenant, after, 1000)
                )
                if not subjects:
                    break
                live = await self._io(self._store.live_many, tenant, subjects)
                fresh: list[KeyRecord] = []
                demote: list[str] = []
                for subject, records in live.items():
                    active = self._active(records)
                    if active is None or active.job == job.job_id:
                        continue
                    fresh.append(
                        self._wrapped_new(
                            tenant,
                            purpose=KeyPurpose.DEK,
                            subject=subject,
                            version=max(r.version for r in records) + 1,
                            kek=kek,
                            kek_aead=kek_aead,
                            job=job.job_id,
                        )
                    )
                    demote.append(active.key_id)
                await self._io(self._store.add, fresh, demote=demote)
                created += len(fresh)
                for record in fresh:
                    self._ciphers.evict((tenant, record.subject))
                if scope is not None:
                    break
                after = subjects[-1]
            self._ciphers.clear()
            await self._io(
                self._store.update_job,
                job.job_id,
                phase="reencrypt",
                cursor=0,
                done=0,
                now=self._now(),
            )
            job = _with_phase(job, "reencrypt", 0, 0)
        cursor, done = job.cursor, job.done
        self._ciphers.clear()  # ciphers cached before the new versions existed must not seal
        stage, first = _stage_of(job.phase)
        if stage == "reencrypt":
            done = await self._reencrypt_stores(
                job,
                stores,
                stage="reencrypt",
                first=first,
                cursor=cursor,
                done=done,
                batch=batch,
                progress=progress,
            )
            if settle_s > 0:
                await self._io(
                    self._store.update_job,
                    job.job_id,
                    phase="verify",
                    cursor=0,
                    done=done,
                    now=self._now(),
                )
                job = _with_phase(job, "verify", 0, done)
                stage, first = "verify", 0
                await asyncio.sleep(settle_s)
        if stage == "verify":
            self._ciphers.clear()
            done = await self._reencrypt_stores(
                job,
                stores,
                stage="verify",
                first=first,
                cursor=job.cursor,
                done=job.done,
                batch=batch,
                progress=progress,
            )
        retired: list[str] = []
        after = ""
        while True:
            subjects = (
                [scope]
                if scope is not None
                else await self._io(self._store.subjects, tenant, after, 1000)
            )
            if not subjects:
                break
            live_records = await self._io(self._store.live_many, tenant, subjects)
            for records in live_records.values():
                active = self._active(records)
                if active is not None:
                    retired.extend(r.key_id for r in records if r.version < active.version)
            if scope is not None:
                break
            after = subjects[-1]
        await self._record_done(job, retired)
        await self._io(self._store.destroy, retired, self._now())
        self._ciphers.clear()
        await self._io(self._store.finish_job, job.job_id, self._now())
        return RotationReport(job.job_id, JobKind.DEK, tenant, scope, done, created, tuple(retired))

    async def _reencrypt_stores(
        self,
        job: RotationJob,
        stores: Sequence[SealedElementStore],
        *,
        stage: str,
        first: int,
        cursor: int,
        done: int,
        batch: int,
        progress: Progress | None,
    ) -> int:
        """One pass over each store from ``first`` on; ``cursor`` belongs to ``first``."""
        if first >= len(stores):
            # Resumed with fewer stores than it was walking: going on would destroy old keys
            # with the rest never re-sealed.
            raise RotationInProgress(
                f"rotation {job.job_id} was walking element store {first + 1}, but only "
                f"{len(stores)} were given; resume it with the same element stores"
            )
        for number in range(first, len(stores)):
            phase = _phase_of(stage, number)
            if number != first:
                cursor = 0  # the store's own positions start over
                await self._io(
                    self._store.update_job,
                    job.job_id,
                    phase=phase,
                    cursor=0,
                    done=done,
                    now=self._now(),
                )
            done = await self._reencrypt_pass(
                job,
                stores[number],
                phase=phase,
                cursor=cursor,
                done=done,
                batch=batch,
                progress=progress,
            )
        return done

    async def _reencrypt_pass(
        self,
        job: RotationJob,
        elements: SealedElementStore,
        *,
        phase: str,
        cursor: int,
        done: int,
        batch: int,
        progress: Progress | None,
    ) -> int:
        while True:
            rows = elements.scan(job.tenant, patient=job.patient, after=cursor, limit=batch)
            if not rows:
                return done
            for element in rows:
                await self._reencrypt(elements, element)
            cursor, done = rows[-1].position, done + len(rows)
            await self._io(
                self._store.update_job,
                job.job_id,
                phase=phase,
                cursor=cursor,
                done=done,
                now=self._now(),
            )
            if progress is not None:
                progress(done, None)

    async def _reencrypt(self, elements: SealedElementStore, element: SealedElement) -> None:
        for _ in range(_RESEAL_TRIES):
            try:
                cipher = await self.patient_cipher(element.ref.tenant, element.patient)
            except PatientShredded:
                return  # nothing of a shredded patient can (or should) be re-encrypted
            if key_version_of(element.ciphertext) == cipher.active_version:
                return
            plaintext = cipher.open(element.ref, element.ciphertext)
            if elements.replace(element, cipher.seal(element.ref, plaintext)):
                return
            # Lost the compare-and-swap: the element was re-written meanwhile, perhaps by a
            # worker whose cached cipher still seals under the old version. Read it again and
            # re-seal that, or it would stay under a key about to be destroyed.
            again = elements.scan(
                element.ref.tenant, patient=element.patient, after=element.position - 1, limit=1
            )
            if not again or again[0].position != element.position:
                return  # gone (nothing left to re-seal)
            element = again[0]
        raise RotationInProgress(
            f"an element at position {element.position} kept changing during the rotation; "
            "run the rotation again to resume it"
        )

    async def rotate_index(
        self,
        tenant: str,
        elements: SealedElementStore,
        *,
        batch: int = 500,
        progress: Progress | None = None,
        settle_s: float = 0.0,
    ) -> RotationReport:
        """New blind-index key; re-index every indexed element; then retire the old version.

        While it runs, :meth:`BlindIndexer.tokens` yields tokens of both versions, so lookups
        keep finding everything. Resumable like DEK rotation; ``settle_s`` as there (a second
        pass after other workers' cached indexers have expired, before retiring).
        """
        _check_tenant(tenant)
        self._require_unsealed()
        kek = await self.ensure_tenant(tenant)
        job = await self._job(tenant, JobKind.INDEX, None)
        records = await self._io(self._store.live, tenant, KeyPurpose.BLIND_INDEX)
        new = next((r for r in records if r.job == job.job_id), None)
        created = 0
        if new is None:
            kek_aead = await self._kek(kek.key_id)
            version = await self._next_version(tenant, KeyPurpose.BLIND_INDEX, "")
            new = self._wrapped_new(
                tenant,
                purpose=KeyPurpose.BLIND_INDEX,
                subject="",
                version=version,
                kek=kek,
                kek_aead=kek_aead,
                job=job.job_id,
            )
            await self._io(
                self._store.add,
                [new],
                demote=[r.key_id for r in records if r.state is KeyState.ACTIVE],
            )
            created = 1
        self._indexers.evict((tenant, "index"))
        indexer = await self.blind_indexer(tenant)
        cursor, done = job.cursor, job.done
        passes = ["reindex", "verify"] if settle_s > 0 else ["reindex"]
        if job.phase == "verify":
            passes = ["verify"]
        for phase in passes:
            if phase == "verify" and job.phase != "verify":
                cursor = 0
                await self._io(
                    self._store.update_job,
                    job.job_id,
                    phase="verify",
                    cursor=0,
                    done=done,
                    now=self._now(),
                )
                await asyncio.sleep(settle_s)
            while True:
                rows = elements.scan(tenant, patient=None, after=cursor, limit=batch)
                if not rows:
                    break
                for element in rows:
                    if element.index is None:
                        continue
                    try:
                        cipher = await self.patient_cipher(tenant, element.patient)
                    except PatientShredded:
                        continue
                    value = cipher.open(element.ref, element.ciphertext).decode()
                    elements.add_tokens(
                        element, [indexer.token(element.index, value, version=new.version)]
                    )
                cursor, done = rows[-1].position, done + len(rows)
                await self._io(
                    self._store.update_job,
                    job.job_id,
                    phase=phase,
                    cursor=cursor,
                    done=done,
                    now=self._now(),
                )
                if progress is not None:
                    progress(done, None)
        old = [
            r
            for r in await self._io(self._store.live, tenant, KeyPurpose.BLIND_INDEX)
            if r.key_id != new.key_id
        ]
        retired = [r.key_id for r in old]
        await self._record_done(job, [new.key_id, *retired])
        for record in old:
            elements.drop_token_version(tenant, record.version)
        await self._io(self._store.destroy, retired, self._now())
        self._indexers.evict((tenant, "index"))
        await self._io(self._store.finish_job, job.job_id, self._now())
        return RotationReport(
            job.job_id, JobKind.INDEX, tenant, None, done, created, tuple(retired)
        )

    # inventory ----------------------------------------------------------------------------

    def _info(self, record: KeyRecord) -> KeyInfo:
        return KeyInfo(
            key_id=record.key_id,
            tenant=record.tenant,
            purpose=record.purpose.value,
            patient=record.subject or None,
            version=record.version,
            state=record.state.value,
            provider=self._provider.name,
            wrapped_by=record.wrapped_by if record.state is not KeyState.DESTROYED else None,
            created=record.created,
            rotated=record.rotated,
            destroyed=record.destroyed,
            principals=PRINCIPALS[record.purpose.value],
        )

    def inventory(self, *, tenant: str | None = None, patient: str | None = None) -> Inventory:
        """Every key (DEKs counted, or listed for one patient): custody facts, no material."""
        root = KeyInfo(
            key_id=self._provider.root_key_id,
            tenant="*",
            purpose="root",
            patient=None,
            version=1,
            state="sealed" if self._provider.sealed else "unsealed",
            provider=self._provider.name,
            wrapped_by=None,
            created=None,
            rotated=None,
            destroyed=None,
            principals=PRINCIPALS["root"],
        )
        keys: list[KeyRecord] = []
        if patient is not None:
            if tenant is None:
                raise InvalidInput("name the tenant to list a patient's keys")
            _check_patient(patient)
            keys = self._store.records(tenant, KeyPurpose.DEK, patient)
            if not keys and self._store.shred_record(tenant, patient) is None:
                raise KeyNotFound(f"no keys for Patient/{patient} in tenant {tenant}")
        else:
            for purpose in (KeyPurpose.KEK, KeyPurpose.BLIND_INDEX, KeyPurpose.LEDGER_TOKEN):
                keys.extend(self._store.records(tenant, purpose))
        deks = tuple(
            DekSummary(t, state, by, count)
            for (t, state, by), count in sorted(self._store.dek_summary().items())
            if tenant is None or t == tenant
        )
        return Inventory(root=root, keys=tuple(self._info(k) for k in keys), deks=deks)

    def holds(self, tenant: str, patient: str) -> list[Hold]:
        return self._store.holds(tenant, patient)

    def shred_record(self, tenant: str, patient: str) -> ShredRecord | None:
        return self._store.shred_record(tenant, patient)

    def __repr__(self) -> str:
        return f"<KeyRing provider={self._provider.name} sealed={self.sealed}>"


def _with_wrapped(record: KeyRecord, wrapped: bytes) -> KeyRecord:
    return KeyRecord(
        key_id=record.key_id,
        tenant=record.tenant,
        purpose=record.purpose,
        subject=record.subject,
        version=record.version,
        state=record.state,
        wrapped=wrapped,
        wrapped_by=record.wrapped_by,
        created=record.created,
        job=record.job,
    )


def _as_stores(
    elements: SealedElementStore | Sequence[SealedElementStore],
) -> Sequence[SealedElementStore]:
    return tuple(elements) if isinstance(elements, Sequence) else (elements,)


def _phase_of(stage: str, store: int) -> str:
    # The first store keeps the plain name: jobs persisted before there were several resume.
    return stage if store == 0 else f"{stage}:{store}"


def _stage_of(phase: str) -> tuple[str, int]:
    """``reencrypt:1`` -> (``reencrypt``, 1): the pass and the store it is walking."""
    stage, _, store = phase.partition(":")
    return stage, int(store) if store else 0


def _with_phase(job: RotationJob, phase: str, cursor: int, done: int) -> RotationJob:
    return RotationJob(
        job_id=job.job_id,
        kind=job.kind,
        tenant=job.tenant,
        patient=job.patient,
        phase=phase,
        cursor=cursor,
        started=job.started,
        updated=job.updated,
        done=done,
    )
