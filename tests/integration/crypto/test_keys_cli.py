"""`phivault init` key custody and `phivault keys ...`, end to end, with the real ledger."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cli_process_support import run_phivault
from phivault.crypto.custody import open_keyring
from phivault.crypto.element_store import SqliteSealedElementStore
from phivault.crypto.elements import ElementRef, key_version_of
from phivault.datadir import DataDir
from phivault.ledger.service import open_ledger
from phivault.settings import Settings

pytestmark = pytest.mark.integration


def phivault(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    # its own process, forked from one that imported phivault (tests/cli_process_support.py)
    return run_phivault(list(args), stdin=stdin, env={**os.environ, **env})


def _events(path: Path) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        async with open_ledger(DataDir.open(path)) as ledger:
            return [ledger.read(i).document for i in range(ledger.size)]

    return asyncio.run(read())


@pytest.fixture
def production(tmp_path: Path) -> tuple[Path, list[str]]:
    path = tmp_path / "prod"
    done = phivault("init", "--data-dir", str(path), "--json", "--shares", "4", "--threshold", "2")
    assert done.returncode == 0, done.stderr
    keys = json.loads(done.stdout)["keys"]
    assert keys["unseal_threshold"] == 2 and len(keys["unseal_shares"]) == 4
    assert keys["dev_unseal_file"] is None
    assert not (path / "keys" / "dev-unseal.json").exists()
    return path, keys["unseal_shares"]


def test_init_dev_prints_shares_once_and_writes_the_dev_unseal_file(tmp_path: Path) -> None:
    path = tmp_path / "dev"
    done = phivault("init", "--dev", "--data-dir", str(path), "--json")
    assert done.returncode == 0, done.stderr
    keys = json.loads(done.stdout)["keys"]
    assert keys["provider"] == "sealed" and keys["unseal_threshold"] == 3
    assert len(keys["unseal_shares"]) == 5
    assert Path(keys["dev_unseal_file"]).exists()
    stored = "".join(p.read_text(errors="replace") for p in (path / "keys").glob("*.json"))
    assert keys["unseal_shares"][4] not in stored  # only M shares, and only in the dev file
    # the demo unseals itself from the dev file, loudly
    rotated = phivault("keys", "rotate", "--kek", "--tenant", "acme", "--data-dir", str(path))
    assert rotated.returncode == 0, rotated.stderr
    assert "DEVELOPMENT unseal file" in rotated.stderr
    # production settings refuse the development data directory and its unseal file
    refused = phivault(
        "keys", "rotate", "--kek", "--data-dir", str(path), "--json",
        PHIVAULT_ENVIRONMENT="production",
    )  # fmt: skip
    assert refused.returncode == 1
    assert "production settings refuse" in json.loads(refused.stdout)["message"]


def test_init_refuses_a_bad_split_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    refused = phivault("init", "--data-dir", str(path), "--threshold", "4", "--shares", "3")
    assert refused.returncode == 1 and "nothing was created" in refused.stderr
    assert not path.exists()
    no_pin = phivault("init", "--data-dir", str(path), PHIVAULT_KEYS__PROVIDER="pkcs11")
    assert no_pin.returncode == 1 and "pkcs11_pin is required" in no_pin.stderr
    assert not path.exists()


def test_unseal_good_and_bad_shares_are_audited(production: tuple[Path, list[str]]) -> None:
    path, shares = production
    good = phivault("keys", "unseal", "--data-dir", str(path), "--shares-file", "-", "--json",
                    stdin="\n".join(shares[1:3]) + "\n")  # fmt: skip
    assert good.returncode == 0, good.stderr
    bad = phivault("keys", "unseal", "--data-dir", str(path), "--share", shares[0], "--json")
    assert bad.returncode == 1
    message = json.loads(bad.stdout)["message"]
    assert "2 of 4 are needed" in message and shares[0] not in message
    typo = shares[0][:-1] + ("0" if shares[0][-1] != "0" else "1")
    mistyped = phivault("keys", "unseal", "--data-dir", str(path), "--share", typo,
                        "--share", shares[1])  # fmt: skip
    assert mistyped.returncode == 1 and "share #1 has a bad checksum" in mistyped.stderr
    events = [e for e in _events(path) if e["kind"] == "key-operation"]
    subtypes = [(e["subtype"], e["outcome"]) for e in events]
    assert ("create", 0) in subtypes  # the root key's creation, recorded on first use
    assert subtypes.count(("unseal", 0)) == 1 and subtypes.count(("unseal", 4)) == 2
    assert ("seal", 0) in subtypes
    ledger_text = json.dumps(_events(path))
    assert not any(share.split("-")[4] in ledger_text for share in shares)


def test_rotating_while_sealed_changes_nothing(production: tuple[Path, list[str]]) -> None:
    path, _ = production
    before = (path / "keys" / "keystore.sqlite3").read_bytes()
    sealed = phivault("keys", "rotate", "--kek", "--data-dir", str(path), "--json", stdin="")
    assert sealed.returncode == 1
    assert json.loads(sealed.stdout)["error"] == "sealed"
    assert (path / "keys" / "keystore.sqlite3").read_bytes() == before
    usage = phivault("keys", "rotate", "--kek", "--dek", "--data-dir", str(path))
    assert usage.returncode == 1 and "exactly one" in usage.stderr


def test_hold_shred_and_dek_rotation(production: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, shares = production
    store_path = tmp_path / "elements.sqlite3"

    async def seed() -> None:
        directory = DataDir.open(path)
        elements = SqliteSealedElementStore(store_path)
        async with (
            open_ledger(directory) as ledger,
            open_keyring(directory, Settings(), ledger, credentials=shares[:2]) as ring,
        ):
            for patient in ("p1", "p2"):
                cipher = await ring.patient_cipher("default", patient, create=True)
                ref = ElementRef("default", "Patient", patient, "birthDate")
                elements.put(ref, patient, cipher.seal(ref, b"1970-01-01"))
        elements.close()

    asyncio.run(seed())
    held = phivault("keys", "hold", "--patient", "p1", "--until", "2099-01-01", "--reason",
                    "litigation", "--data-dir", str(path), "--json")  # fmt: skip
    assert held.returncode == 0, held.stderr
    refused = phivault("keys", "shred", "--patient", "p1", "--yes", "--data-dir", str(path))
    assert refused.returncode == 1 and "retention hold until 2099-01-01" in refused.stderr
    bad_hold = phivault("keys", "hold", "--patient", "p1", "--until", "tomorrow", "--reason",
                        "x", "--data-dir", str(path))  # fmt: skip
    assert bad_hold.returncode == 1 and "--until must be" in bad_hold.stderr

    shares_file = tmp_path / "shares.txt"
    shares_file.write_text("\n".join(shares[2:4]) + "\n")
    no_store = phivault("keys", "rotate", "--dek", "--data-dir", str(path),
                        "--shares-file", str(shares_file))  # fmt: skip
    assert no_store.returncode == 1 and "--element-store" in no_store.stderr
    rotated = phivault("keys", "rotate", "--dek", "--data-dir", str(path), "--shares-file",
                       str(shares_file), "--element-store", str(store_path), "--json")  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    report = json.loads(rotated.stdout)
    assert report["new_keys"] == 2 and report["processed"] == 2 and len(report["retired"]) == 2
    elements = SqliteSealedElementStore(store_path)
    assert {
        key_version_of(e.ciphertext)
        for e in elements.scan("default", patient=None, after=0, limit=10)
    } == {2}
    elements.close()

    shredded = phivault(
        "keys", "shred", "--patient", "p2", "--yes", "--data-dir", str(path), "--json"
    )
    assert shredded.returncode == 0, shredded.stderr
    record = json.loads(shredded.stdout)
    assert record["patient"] == "Patient/p2" and len(record["keys_destroyed"]) == 1
    # embedded shape: no other process holds the keys, the shred is complete at once
    assert record["propagation"]["status"] == "complete"
    shred_event = _events(path)[record["ledger_index"]]
    assert shred_event["subtype"] == "shred" and shred_event["patient"] == "Patient/p2"

    inventory = phivault("keys", "inventory", "--data-dir", str(path), "--json")
    assert inventory.returncode == 0, inventory.stderr
    doc = json.loads(inventory.stdout)
    states = {(d["state"], d["count"]) for d in doc["dek_summary"]}
    assert ("active", 1) in states and ("destroyed", 3) in states
    assert {k["purpose"] for k in doc["keys"]} == {"kek", "blind-index", "ledger-token"}
    one = phivault("keys", "inventory", "--tenant", "default", "--patient", "p1",
                   "--data-dir", str(path), "--json")  # fmt: skip
    assert [k["version"] for k in json.loads(one.stdout)["keys"]] == [1, 2]
    unknown = phivault("keys", "inventory", "--tenant", "default", "--patient", "nobody",
                       "--data-dir", str(path))  # fmt: skip
    assert unknown.returncode == 1 and "no keys for Patient/nobody" in unknown.stderr
