"""Key bytes never appear in the ledger, reprs, exceptions or logs; the hazmat fence holds."""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path

import pytest
from crypto_support import Env

import phivault.crypto.keyring as keyring_module
from phivault.crypto._hazmat import SecretKey, Share, combine
from phivault.crypto.blind_index import IndexField, Normalization
from phivault.crypto.element_store import SqliteSealedElementStore
from phivault.crypto.elements import ElementRef
from phivault.crypto.errors import CryptoError
from phivault.errors import PhivaultError

SRC = Path(__file__).resolve().parents[3] / "src" / "phivault"


def _forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
    ]


async def test_no_key_bytes_in_events_reprs_errors_or_logs(
    env: Env,
    elements: SqliteSealedElementStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    made: list[bytes] = []
    original = keyring_module.generate_key

    def recording(label: str = "key") -> SecretKey:
        key = original(label)
        made.append(key.reveal())
        return key

    monkeypatch.setattr(keyring_module, "generate_key", recording)
    field = IndexField("Patient.name.family", Normalization.NAME)
    texts: list[str] = []
    errors: list[BaseException] = []
    for patient in ("p1", "p2"):
        cipher = await env.ring.patient_cipher("acme", patient, create=True)
        ref = ElementRef("acme", "Patient", patient, "name[0].family")
        indexer = await env.ring.blind_indexer("acme")
        elements.put(
            ref,
            patient,
            cipher.seal(ref, b"Smith"),
            index=field,
            tokens=indexer.tokens(field, "Smith"),
        )
        texts += [repr(cipher), str(cipher), repr(indexer)]
        try:
            cipher.open(ref, b"\x01\x00\x00\x00\x01" + bytes(40))
        except CryptoError as exc:
            errors.append(exc)
    tokenizer = await env.ring.ledger_tokenizer("acme")
    texts.append(repr(tokenizer))
    await env.ring.rotate_kek("acme")
    await env.ring.rotate_deks("acme", elements)
    await env.ring.rotate_index("acme", elements)
    await env.ring.shred_patient("acme", "p1", reason="erasure-request", elements=elements)
    texts += [repr(env.ring), repr(env.provider), json.dumps(env.ring.inventory().to_json())]
    for record in env.store.records():
        texts.append(repr(record))
    await env.ring.seal()
    try:
        await env.ring.unseal(env.shares[:1])
    except PhivaultError as exc:
        errors.append(exc)
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [json.dumps(e.to_document()) for e in env.sink.events]
    texts += [r.getMessage() for r in caplog.records]
    root = combine([Share.parse(t) for t in env.shares[:3]]).reveal()
    secrets_ = [root, *made]
    assert len(made) >= 8  # KEKs, DEKs, index and token keys were all observed
    haystack = "\n".join(texts)
    for secret in secrets_:
        for form in _forms(secret):
            assert form not in haystack
    for share in env.shares:
        assert share not in haystack and share.split("-")[4] not in haystack


def test_secret_key_hides_itself() -> None:
    key = SecretKey(bytes(range(1, 33)))
    assert bytes(range(1, 33)).hex() not in repr(key) + str(key) + f"{key}"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(key)
    key.wipe()
    with pytest.raises(ValueError, match="wiped"):
        key.reveal()


def test_only_key_management_imports_the_hazmat_fence() -> None:
    allowed = ("crypto/_hazmat/", "crypto/keyring.py", "crypto/ports.py", "crypto/providers/")
    importer = re.compile(r"^\s*(from|import)\s+phivault\.crypto\._hazmat", re.M)
    offenders = [
        path.relative_to(SRC).as_posix()
        for path in SRC.rglob("*.py")
        if importer.search(path.read_text())
        and not path.relative_to(SRC).as_posix().startswith(allowed)
    ]
    assert offenders == []


def test_public_surface_resolves_and_hides_the_hazmat() -> None:
    import phivault.crypto as crypto

    for name in crypto.__all__:
        assert getattr(crypto, name) is not None
    assert not any("hazmat" in name.lower() or "secret" in name.lower() for name in crypto.__all__)
    with pytest.raises(AttributeError):
        crypto.SecretKey  # noqa: B018
