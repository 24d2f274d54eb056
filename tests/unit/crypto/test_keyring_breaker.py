"""The root key provider behind a circuit breaker: fail closed, cheap while down, back by itself.

The provider is the real sealed keystore behind a fake of the port that can be switched to
"down" (raises KeyUnavailable, as the HSM and KMS adapters do), "slow" or "corrupt".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from phivault.access.decision import compile_policy
from phivault.access.policy import default_policy
from phivault.api import MountedRouter, create_app
from phivault.api.fhir import FHIR_PREFIX, fhir_router
from phivault.crypto._hazmat import SecretKey
from phivault.crypto.errors import DecryptionFailed, KeyUnavailable
from phivault.crypto.keyring import PROVIDER_BREAKER, KeyRing, provider_breaker
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.identity.testing import FakeIssuer
from phivault.ledger.testing import InMemoryAuditSink
from phivault.records.repository import RecordsRepository
from phivault.records.store import SqlRecordStore
from phivault.resilience import Breakers
from phivault.settings import ApiSettings, Settings


class OutageProvider:
    """A RootKeyProvider that passes calls to a real one unless told to fail."""

    def __init__(self, inner: SealedLocalProvider) -> None:
        self._inner = inner
        self.mode = "up"  # up | down | slow | corrupt
        self.calls = 0

    name = "outage-test"

    @property
    def root_key_id(self) -> str:
        return self._inner.root_key_id

    @property
    def credentials_needed(self) -> int:
        return self._inner.credentials_needed

    @property
    def sealed(self) -> bool:
        return self._inner.sealed

    def unseal(self, credentials: Sequence[str]) -> None:
        self._inner.unseal(credentials)

    def seal(self) -> None:
        self._inner.seal()

    def _fault(self) -> None:
        self.calls += 1
        if self.mode == "down":
            raise KeyUnavailable("HSM unwrap failed: DeviceRemoved")
        if self.mode == "slow":
            time.sleep(0.3)
        if self.mode == "corrupt":
            raise DecryptionFailed("tag mismatch")

    def wrap(self, key: SecretKey, aad: bytes) -> bytes:
        self._fault()
        return self._inner.wrap(key, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> SecretKey:
        self._fault()
        return self._inner.unwrap(blob, aad)


@dataclass
class Rings:
    keys_dir: Path
    shares: list[str]
    store: SqliteKeyStore
    provider: OutageProvider
    sink: InMemoryAuditSink

    async def ring(self, **breaker: float) -> KeyRing:
        """A fresh ring (empty caches: every KEK is unwrapped by the provider again)."""
        ring = KeyRing(
            store=self.store,
            provider=self.provider,
            audit=self.sink,
            observer="node-breaker",
            breaker=provider_breaker(**breaker),
        )
        if ring.sealed:
            await ring.unseal(self.shares)
        return ring


@pytest.fixture
async def rings(tmp_path: Path) -> AsyncIterator[Rings]:
    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=2)
    store = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    provider = OutageProvider(SealedLocalProvider(keys_dir))
    yield Rings(keys_dir, shares, store, provider, InMemoryAuditSink())
    store.close()


async def test_a_provider_outage_opens_the_breaker_and_ends_by_itself(rings: Rings) -> None:
    first = await rings.ring()
    await first.patient_cipher("acme", "p1", create=True)  # KEK wrapped while the HSM is up
    ring = await rings.ring(failure_threshold=2, reset_timeout_s=0.1)
    rings.provider.mode = "down"
    for _ in range(2):
        with pytest.raises(KeyUnavailable, match="DeviceRemoved"):
            await ring.patient_cipher("acme", "p1")
    assert ring.breaker.state == "open"
    calls = rings.provider.calls
    for _ in range(20):
        with pytest.raises(KeyUnavailable, match="unavailable"):
            await ring.patient_cipher("acme", "p1")
    assert rings.provider.calls == calls  # open: the HSM is not called at all
    rings.provider.mode = "up"
    await asyncio.sleep(0.12)
    assert await ring.patient_cipher("acme", "p1") is not None
    assert ring.breaker.state == "closed"


async def test_a_slow_provider_times_out_as_unavailable(rings: Rings) -> None:
    ring = await rings.ring(call_timeout_s=0.05, failure_threshold=1)
    rings.provider.mode = "slow"
    started = time.monotonic()
    with pytest.raises(KeyUnavailable, match="did not answer"):
        await ring.patient_cipher("acme", "p2", create=True)
    assert time.monotonic() - started < 0.25
    assert ring.breaker.state == "open"


async def test_a_wrapped_key_that_does_not_authenticate_is_not_an_outage(rings: Rings) -> None:
    first = await rings.ring()
    await first.patient_cipher("acme", "p3", create=True)
    ring = await rings.ring(failure_threshold=1)
    rings.provider.mode = "corrupt"
    for _ in range(3):
        with pytest.raises(KeyUnavailable, match="did not unwrap"):
            await ring.patient_cipher("acme", "p3")
    assert ring.breaker.state == "closed"  # the provider answered each time
    assert rings.provider.calls >= 4


async def test_the_provider_breaker_is_exported(rings: Rings) -> None:
    registry = CollectorRegistry()
    breakers = Breakers(registry)
    ring = await rings.ring(failure_threshold=1)
    breakers.add(ring.breaker)
    rings.provider.mode = "down"
    with pytest.raises(KeyUnavailable):
        await ring.patient_cipher("acme", "p4", create=True)
    state = registry.get_sample_value("phivault_breaker_state", {"breaker": PROVIDER_BREAKER})
    assert state == 2


async def test_phi_interactions_answer_503_while_the_provider_is_down(
    rings: Rings, tmp_path: Path
) -> None:
    # The breaker stays open longer than four requests take on a loaded machine (each reads
    # the key store in a worker thread): a half-open try in between would call the provider.
    ring = await rings.ring(failure_threshold=2, reset_timeout_s=2.0)
    store = SqlRecordStore(f"sqlite:///{tmp_path}/records.db")
    repository = RecordsRepository(store, ring, compile_policy(default_policy()))
    issuer = FakeIssuer()
    breakers = Breakers()
    breakers.add(ring.breaker)
    app = create_app(
        Settings(
            api=ApiSettings(
                rate_limit_per_address="100000/minute", rate_limit_per_principal="100000/minute"
            )
        ),
        audit_sink=rings.sink,
        key_sources={issuer.issuer: issuer.key_source()},
        routers=[MountedRouter(fhir_router(), prefix=FHIR_PREFIX)],
        state={"records": repository},
        breakers=breakers,
    )
    token = issuer.token(
        now=time.time(),
        sub="loader",
        roles=["service"],
        scope="system/*.cruds",
        purpose_of_use=["HOPERAT"],
        fhirUser=None,
    )
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    body = json.dumps({"resourceType": "Patient", "name": [{"family": "Quackenbush"}]})
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as client:
            rings.provider.mode = "down"
            for _ in range(4):
                refused = await client.post("/fhir/Patient", content=body, headers=headers)
                assert refused.status_code == 503, refused.text
                assert refused.json()["resourceType"] == "OperationOutcome"
                assert "Quackenbush" not in refused.text
            assert rings.provider.calls == 2  # then the breaker answered alone
            metrics = (await client.get("/metrics")).text
            assert f'phivault_breaker_state{{breaker="{PROVIDER_BREAKER}"}} 2.0' in metrics
            assert (await client.get("/healthz")).status_code == 200
            rings.provider.mode = "up"
            await asyncio.sleep(2.05)
            created = await client.post("/fhir/Patient", content=body, headers=headers)
            assert created.status_code == 201, created.text
    finally:
        store.close()


def test_a_kms_call_ends_inside_the_breaker_time_limit() -> None:
    from phivault.crypto.providers.awskms import AwsKmsProvider

    provider = AwsKmsProvider.connect("arn:aws:kms:eu-west-1:1:key/x", region="eu-west-1")
    config = provider._client.meta.config
    worst = (config.connect_timeout + config.read_timeout) * config.retries["total_max_attempts"]
    limit = provider_breaker().call_timeout_s
    assert limit is not None and worst < limit
