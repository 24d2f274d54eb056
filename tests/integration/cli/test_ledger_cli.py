"""The `phivault init` and `phivault ledger` commands, end to end, as a user runs them."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from cli_support import phivault

from phivault.datadir import DataDir
from phivault.ledger.service import open_ledger
from phivault.ledger.testing import sample_event

pytestmark = pytest.mark.integration


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A data directory with 30 events of three patients, as the server would record them."""
    path = tmp_path / "data"
    assert phivault("init", "--dev", "--data-dir", str(path), "--json").returncode == 0

    async def fill() -> None:
        async with open_ledger(DataDir.open(path)) as ledger:
            for i in range(30):
                await ledger.record(sample_event(i, patient=f"Patient/p-{i % 3}"))

    asyncio.run(fill())
    return path


def test_init_creates_a_data_directory_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "data"
    created = phivault("init", "--data-dir", str(path), "--json")
    assert created.returncode == 0, created.stderr
    result = json.loads(created.stdout)
    assert result["ok"] is True and result["dev"] is False
    assert result["ledger_verifier_key"].startswith(result["origin"] + "+")
    again = phivault("init", "--data-dir", str(path), "--json")
    assert again.returncode == 1
    assert "refusing to overwrite" in json.loads(again.stdout)["message"]


def test_commands_on_a_missing_data_directory_say_so(tmp_path: Path) -> None:
    result = phivault("ledger", "verify", "--data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "no phivault data directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_verify_and_key(filled: Path) -> None:
    checkpoint = phivault("ledger", "checkpoint", "--data-dir", str(filled), "--json")
    assert checkpoint.returncode == 0, checkpoint.stderr
    assert json.loads(checkpoint.stdout)["size"] == 30
    verified = phivault("ledger", "verify", "--data-dir", str(filled), "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert (report["entries"], report["uncovered"]) == (30, 0)
    key = phivault("ledger", "key", "--data-dir", str(filled)).stdout.strip()
    assert key == json.loads(checkpoint.stdout)["note"].split("\n")[0] + key[key.index("+") :]


def test_verify_names_a_modified_entry_in_the_local_files(filled: Path) -> None:
    log = filled / "ledger" / "entries.log"
    data = bytearray(log.read_bytes())
    position = data.index(b"req-7")
    data[position + 4] = ord("8")  # req-7 -> req-8: the frame checksum no longer matches
    log.write_bytes(bytes(data))
    result = phivault("ledger", "verify", "--data-dir", str(filled), "--json")
    assert result.returncode == 2
    finding = json.loads(result.stdout)
    assert finding["kind"] == "modified"
    seq = 7  # sample_event numbers request ids by their order of recording
    assert finding["index"] == seq
    human = phivault("ledger", "verify", "--data-dir", str(filled))
    assert human.returncode == 2 and "modified at index 7" in human.stderr


def test_export_and_verify_a_bundle_offline(filled: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "evidence.json"
    exported = phivault(
        "ledger", "export", "--out", str(bundle), "--data-dir", str(filled), "--json"
    )
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["entries"] == 30
    doc = json.loads(bundle.read_text())
    assert set(doc) == {"origin", "verifier_key", "entries", "checkpoints"}
    assert [e["index"] for e in doc["entries"]] == list(range(30))
    key = phivault("ledger", "key", "--data-dir", str(filled)).stdout.strip()
    # Verification needs nothing but the bundle and the trusted key: no data directory.
    ok = phivault(
        "ledger", "verify", "--bundle", str(bundle), "--key", key, "--data-dir", "/nonexistent"
    )
    assert ok.returncode == 0, ok.stderr
    refused = phivault("ledger", "export", "--out", str(bundle), "--data-dir", str(filled))
    assert refused.returncode == 1 and "refusing to overwrite" in refused.stderr

    doc["entries"][3], doc["entries"][4] = doc["entries"][4], doc["entries"][3]
    for position, entry in enumerate(doc["entries"]):
        entry["index"] = position
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(doc))
    bad = phivault("ledger", "verify", "--bundle", str(swapped), "--key", key, "--json")
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["kind"] == "reordered"
    assert json.loads(bad.stdout)["index"] == 3


def test_verify_bundle_rejects_bad_input_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    result = phivault("ledger", "verify", "--bundle", str(junk), "--key", "x+00000000+AA==")
    assert result.returncode == 1 and "not a JSON document" in result.stderr
    missing_key = phivault("ledger", "verify", "--bundle", str(junk))
    assert missing_key.returncode == 1 and "--bundle needs --key" in missing_key.stderr


def test_prove_inclusion_and_consistency(filled: Path) -> None:
    from base64 import b64decode

    from phivault.ledger.merkle import verify_consistency, verify_inclusion

    phivault("ledger", "checkpoint", "--data-dir", str(filled))
    inclusion = json.loads(
        phivault("ledger", "prove", "--index", "11", "--data-dir", str(filled)).stdout
    )
    assert inclusion["tree_size"] == 30
    verify_inclusion(
        b64decode(inclusion["leaf_hash"]),
        11,
        30,
        [b64decode(h) for h in inclusion["proof"]],
        b64decode(inclusion["root_hash"]),
    )
    consistency = json.loads(
        phivault("ledger", "prove", "--from", "7", "--to", "30", "--data-dir", str(filled)).stdout
    )
    verify_consistency(
        7,
        30,
        [b64decode(h) for h in consistency["proof"]],
        b64decode(consistency["old_root_hash"]),
        b64decode(consistency["new_root_hash"]),
    )
    wrong = phivault("ledger", "prove", "--index", "99", "--data-dir", str(filled), "--json")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    both = phivault("ledger", "prove", "--index", "1", "--from", "1", "--data-dir", str(filled))
    assert both.returncode == 1


def test_report_follows_a_patients_back_links(filled: Path) -> None:
    phivault("ledger", "checkpoint", "--data-dir", str(filled))
    result = phivault("ledger", "report", "--patient", "p-1", "--data-dir", str(filled), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["back_link_chain"] == list(range(28, 0, -3))
    assert [e["index"] for e in report["events"]] == list(range(28, 0, -3))
    assert report["newest"]["index"] == 28 and report["newest"]["inclusion_proof"]
    # A window: sample events are one second apart from 2026-01-01T00:00:00Z.
    windowed = phivault(
        "ledger",
        "report",
        "--patient",
        "Patient/p-1",
        "--from",
        "2026-01-01T00:00:10+00:00",
        "--to",
        "2026-01-01T00:00:20+00:00",
        "--data-dir",
        str(filled),
        "--json",
    )
    assert [e["index"] for e in json.loads(windowed.stdout)["events"]] == [19, 16, 13, 10]
    table = phivault("ledger", "report", "--patient", "p-1", "--data-dir", str(filled))
    assert table.returncode == 0 and "Patient/p-1" in table.stdout
    bad_date = phivault(
        "ledger", "report", "--patient", "p-1", "--from", "yesterday", "--data-dir", str(filled)
    )
    assert bad_date.returncode != 0 and "not an ISO 8601" in bad_date.stderr


def test_writing_commands_refuse_while_another_process_holds_the_ledger(filled: Path) -> None:
    async def hold() -> subprocess.CompletedProcess[str]:
        async with open_ledger(DataDir.open(filled)):
            return await asyncio.to_thread(
                phivault, "ledger", "checkpoint", "--data-dir", str(filled)
            )

    result = asyncio.run(hold())
    assert result.returncode == 1
    assert "open for writing by another process" in result.stderr
