"""The PKCS#11 provider against a real SoftHSM2 token (each test gets its own token).

SoftHSM2 reads its configuration once per process, so a session fixture points
SOFTHSM2_CONF at a temporary config whose token directory holds one fresh token per test,
created before the library is loaded. Nothing is shared with the machine's own tokens.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from phivault.crypto._hazmat import SecretKey
from phivault.crypto.elements import ElementRef
from phivault.crypto.errors import DecryptionFailed, KeyUnavailable, Sealed
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.ports import KeyPurpose
from phivault.crypto.providers.pkcs11 import Pkcs11Provider
from phivault.ledger.events import Outcome
from phivault.ledger.testing import InMemoryAuditSink

pytestmark = pytest.mark.integration

MODULE_CANDIDATES = [
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
]
PIN = "4321"
TOKENS = 8


def _module() -> Path | None:
    return next((p for p in MODULE_CANDIDATES if p.exists()), None)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    module = _module()
    if module is None or shutil.which("softhsm2-util") is None:
        pytest.skip("softhsm2 is not installed (run `make system-deps`)")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    labels = [f"phivault-test-{i}" for i in range(TOKENS)]
    for label in labels:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN,
             "--so-pin", "8765"],
            check=True,
            capture_output=True,
        )  # fmt: skip
    yield module, labels
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture
def token(softhsm: tuple[Path, list[str]]) -> tuple[Path, str]:
    module, labels = softhsm
    if not labels:
        pytest.fail("no fresh SoftHSM token left: raise TOKENS")
    return module, labels.pop(0)


@pytest.fixture
def provider(token: tuple[Path, str]) -> Iterator[Pkcs11Provider]:
    module, label = token
    hsm = Pkcs11Provider(module, label, pool_size=4)
    hsm.initialize(PIN)
    yield hsm
    hsm.seal()


def test_root_key_is_non_extractable_and_sensitive(
    token: tuple[Path, str], provider: Pkcs11Provider
) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType

    module, label = token
    provider.initialize(PIN)  # idempotent: finds the key, makes no second one
    lib = pkcs11.lib(str(module))
    with lib.get_token(token_label=label).open(user_pin=PIN) as session:
        keys = list(session.get_objects({Attribute.LABEL: "phivault-root"}))
        assert len(keys) == 1
        key = session.get_key(label="phivault-root", key_type=KeyType.AES)
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.TOKEN] is True
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            _ = key[Attribute.VALUE]


def test_wrap_unwrap_inside_the_token(provider: Pkcs11Provider) -> None:
    with pytest.raises(Sealed):
        provider.wrap(SecretKey(bytes(range(1, 33))), b"aad")
    provider.unseal([PIN])
    secret = SecretKey(bytes(range(1, 33)))
    blob = provider.wrap(secret, b"aad")
    assert len(blob) == 12 + 32 + 16 and secret.reveal() not in blob
    assert provider.unwrap(blob, b"aad") == secret
    with pytest.raises(DecryptionFailed):
        provider.unwrap(blob, b"other aad")
    with pytest.raises(DecryptionFailed):
        provider.unwrap(blob[:-1] + bytes([blob[-1] ^ 1]), b"aad")


def test_wrong_pin_is_refused(provider: Pkcs11Provider) -> None:
    with pytest.raises(KeyUnavailable, match="PinIncorrect"):
        provider.unseal(["0000"])
    assert provider.sealed
    provider.unseal([PIN])
    assert not provider.sealed


def test_session_pool_serves_threads_concurrently(provider: Pkcs11Provider) -> None:
    provider.unseal([PIN])
    secrets_ = [SecretKey(bytes([i + 1]) * 32) for i in range(64)]

    def round_trip(secret: SecretKey) -> bool:
        return provider.unwrap(provider.wrap(secret, b"t"), b"t") == secret

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, secrets_))


async def test_key_ring_on_the_hsm(provider: Pkcs11Provider, tmp_path: Path) -> None:
    sink = InMemoryAuditSink()
    store = SqliteKeyStore(tmp_path / "keystore.sqlite3")
    ring = KeyRing(store=store, provider=provider, audit=sink, observer="node-hsm")
    with pytest.raises(KeyUnavailable):
        await ring.unseal(["bad-pin"])
    assert sink.events[-1].outcome is Outcome.MINOR_FAILURE
    await ring.unseal([PIN])
    ref = ElementRef("acme", "Patient", "p1", "name[0].family")
    cipher = await ring.patient_cipher("acme", "p1", create=True)
    sealed = cipher.seal(ref, b"Smith")
    await ring.seal()
    with pytest.raises(Sealed):
        await ring.patient_cipher("acme", "p1")
    await ring.unseal([PIN])  # the KEK is unwrapped inside the token again
    assert (await ring.patient_cipher("acme", "p1")).open(ref, sealed) == b"Smith"
    await asyncio.gather(*(ring.create_patient_key("acme", f"q{i}") for i in range(20)))
    report = await ring.rotate_kek("acme")
    assert report.processed == 23  # 21 DEKs, index and token keys
    await ring.seal()
    await ring.unseal([PIN])
    assert (await ring.patient_cipher("acme", "p1")).open(ref, sealed) == b"Smith"
    # a wrapped KEK that does not authenticate in the token is a failed-unwrap event
    (kek,) = store.live("acme", KeyPurpose.KEK)
    assert kek.wrapped is not None
    store._db.execute(
        "UPDATE keys SET wrapped = ? WHERE key_id = ?",
        (kek.wrapped[:-1] + bytes([kek.wrapped[-1] ^ 1]), kek.key_id),
    )
    await ring.seal()
    await ring.unseal([PIN])
    with pytest.raises(KeyUnavailable):
        await ring.patient_cipher("acme", "p1")
    assert sink.events[-1].subtype == "unwrap"
    await ring.seal()
    store.close()


async def test_custody_on_the_hsm_from_settings(token: tuple[Path, str], tmp_path: Path) -> None:
    from pydantic import SecretStr

    from phivault.crypto.custody import initialize_keystore, open_keyring
    from phivault.datadir import DataDir
    from phivault.settings import KeyProviderKind, KeySettings, Settings

    module, label = token
    keys = KeySettings(
        provider=KeyProviderKind.PKCS11,
        pkcs11_module=module,
        pkcs11_token_label=label,
        pkcs11_pin=SecretStr(PIN),
    )
    directory = DataDir.create(tmp_path / "data", dev=False)
    init = initialize_keystore(directory, keys)
    assert init.shares == () and init.root_key_id == f"pkcs11:{label}/phivault-root"
    sink = InMemoryAuditSink()
    async with open_keyring(directory, Settings(keys=keys), sink) as ring:
        assert not ring.sealed and ring.provider_name == "pkcs11"
        cipher = await ring.patient_cipher("acme", "p1", create=True)
        ref = ElementRef("acme", "Patient", "p1", "birthDate")
        assert cipher.open(ref, cipher.seal(ref, b"1970")) == b"1970"
    assert [e.subtype for e in sink.events][-1] == "seal"
