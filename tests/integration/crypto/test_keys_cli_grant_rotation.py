"""`phivault keys rotate --dek` on a data directory with an embedded records database: the
rotation walks the records and the break-glass grants there (no --element-store needed), so a
justification and its review note still open after the old data keys are destroyed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from phivault.access.breakglass import BreakGlassReason, BreakGlassService, ReviewOutcome
from phivault.access.decision import compile_policy
from phivault.access.grant_store import SqlGrantElements, SqlGrantStore
from phivault.access.policy import default_policy
from phivault.crypto.custody import open_keyring
from phivault.crypto.elements import key_version_of
from phivault.datadir import DataDir
from phivault.identity.principal import Role
from phivault.ledger.service import open_ledger
from phivault.ledger.testing import InMemoryAuditSink
from phivault.records.classification import ElementGroup
from phivault.records.split import Envelope, group_element_ref
from phivault.records.store import NewVersion, ResourceKey, SqlRecordStore
from phivault.records.testing import FixedCallerTrail
from phivault.settings import Settings

pytestmark = pytest.mark.integration

T0 = 1_800_000_000.0
REASON = "Unconscious, no relatives reachable"
NOTE = "Appropriate"


def phivault(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phivault.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ),
    )


def trail(who: str) -> FixedCallerTrail:
    return FixedCallerTrail(
        InMemoryAuditSink(), who, observer="cli-test",
        clock=lambda: datetime.fromtimestamp(T0, UTC),
    )  # fmt: skip


def test_dek_rotation_from_the_cli_keeps_grant_texts_readable(tmp_path: Path) -> None:
    path = tmp_path / "prod"
    done = phivault("init", "--data-dir", str(path), "--json", "--shares", "2", "--threshold", "2")
    assert done.returncode == 0, done.stderr
    shares = json.loads(done.stdout)["keys"]["unseal_shares"]
    directory = DataDir.open(path)
    directory.records_dir.mkdir(mode=0o700)
    url = f"sqlite:///{directory.records_dir}/records.db"

    async def with_ring(work: str) -> tuple[str | None, str | None, bool, str]:
        store = SqlRecordStore(url)
        try:
            async with (
                open_ledger(directory) as ledger,
                open_keyring(directory, Settings(), ledger, credentials=shares) as ring,
            ):
                service = BreakGlassService(
                    SqlGrantStore(store.engine), ring, compile_policy(default_policy()),
                    clock=lambda: T0,
                )  # fmt: skip
                if work == "seed":
                    cipher = await ring.patient_cipher("default", "p1", create=True)
                    ref = group_element_ref(
                        "default", Envelope("Patient", "p1", "1"), ElementGroup.DEMOGRAPHICS
                    )
                    with store.unit_of_work() as uow:
                        uow.write(
                            NewVersion(
                                key=ResourceKey("default", "Patient", "p1"), version=1,
                                last_updated=datetime.fromtimestamp(T0, UTC), key_subject="p1",
                                groups={"demographics": cipher.seal(ref, b"{}")}, index=(),
                            ),
                            previous=None,
                        )  # fmt: skip
                        uow.commit()
                    grant = await service.request(
                        trail("dr-er"), tenant="default", subject="dr-er",
                        roles=frozenset({Role.CLINICIAN}), patient="p1",
                        reason=BreakGlassReason.EMERGENCY_TREATMENT, justification=REASON,
                    )  # fmt: skip
                    await service.review(
                        trail("po-1"), tenant="default", grant_id=grant.grant_id, by="po-1",
                        outcome=ReviewOutcome.APPROPRIATE, note=NOTE,
                    )  # fmt: skip
                    return None, None, False, grant.grant_id
                view = await service.detail(trail("po-1"), tenant="default", grant_id=work)
                return view.justification, view.review_note, view.unreadable, work
        finally:
            store.close()

    *_, grant_id = asyncio.run(with_ring("seed"))
    shares_file = tmp_path / "shares.txt"
    shares_file.write_text("\n".join(shares) + "\n")
    rotated = phivault("keys", "rotate", "--dek", "--data-dir", str(path), "--shares-file",
                       str(shares_file), "--json")  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    report = json.loads(rotated.stdout)
    # the patient's group, the justification and the review note; the old key destroyed
    assert report["processed"] == 3 and len(report["retired"]) == 1
    store = SqlRecordStore(url)
    try:
        texts = SqlGrantElements(store.engine).scan("default", patient=None, after=0, limit=9)
    finally:
        store.close()
    assert [key_version_of(e.ciphertext) for e in texts] == [2, 2]
    assert asyncio.run(with_ring(grant_id)) == (REASON, NOTE, False, grant_id)
