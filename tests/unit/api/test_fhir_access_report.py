"""``$access-report`` end to end: a privacy officer (or the patient) gets the accounting of
disclosures from the running service, and ``phivault ledger verify-report`` checks it offline
with the ledger's verifier key; a dropped, added or altered event is named, never accepted."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from service_support import bearer, served

from phivault.datadir import DataDir
from phivault.initialize import initialize_data_dir
from phivault.ledger.access_report import (
    AccessReportInvalid,
    ReportFailure,
    verify_access_report,
)
from phivault.ledger.note import NoteVerifier
from phivault.ledger.service import verifier_key_of


def verify_cli(path: Path, key: str) -> subprocess.CompletedProcess[str]:
    phivault = str(Path(sys.executable).with_name("phivault"))
    return subprocess.run(
        [phivault, "ledger", "verify-report", str(path), "--key", key, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_access_report_is_served_and_verifies_offline(tmp_path: Path) -> None:
    async with served(tmp_path) as service:
        http, issuer, data_dir = service.http, service.issuer, service.data_dir
        loader, officer = service.loader(), service.officer()
        body = json.dumps({"resourceType": "Patient", "gender": "female"})
        pid = (await http.post("/fhir/Patient", content=body, headers=loader)).json()["id"]
        own = service.patient(pid)
        for _ in range(3):
            assert (await http.get(f"/fhir/Patient/{pid}", headers=own)).status_code == 200
        answer = await http.get(f"/fhir/Patient/{pid}/$access-report", headers=officer)
        assert answer.status_code == 200, answer.text
        report: dict[str, Any] = answer.json()
        mine = await http.get(f"/fhir/Patient/{pid}/$access-report", headers=own)
        assert mine.status_code == 200
        clinician = bearer(
            issuer, roles=["clinician"], scope="user/*.rs", fhirUser="Practitioner/x"
        )
        refused = await http.get(f"/fhir/Patient/{pid}/$access-report", headers=clinician)
        assert refused.status_code == 403
        bad = await http.get(f"/fhir/Patient/{pid}/$access-report?start=yesterday", headers=officer)
        assert bad.status_code == 400 and "yesterday" not in bad.text
    events = [e["resource"] for e in report["entry"][1:]]
    assert len(events) >= 4  # the create's intent and outcome, three reads
    key = verifier_key_of(data_dir)
    verified = verify_access_report(report, NoteVerifier.from_verifier_key(key))
    assert verified.patient == f"Patient/{pid}" and len(verified.events) == len(events)

    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(report))
    ok = verify_cli(saved, key)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["verified"] is True

    dropped = copy.deepcopy(report)
    del dropped["entry"][2]
    with pytest.raises(AccessReportInvalid) as caught:
        verify_access_report(dropped, NoteVerifier.from_verifier_key(key))
    assert caught.value.failure is ReportFailure.EVENT_MISMATCH
    saved.write_text(json.dumps(dropped))
    refused_cli = verify_cli(saved, key)
    assert refused_cli.returncode == 2
    assert json.loads(refused_cli.stdout)["error"] == "event-mismatch"

    forged = copy.deepcopy(report)
    forged["entry"][1]["resource"]["agent"][0]["who"] = {"reference": "Practitioner/someone"}
    with pytest.raises(AccessReportInvalid) as caught:
        verify_access_report(forged, NoteVerifier.from_verifier_key(key))
    assert caught.value.failure is ReportFailure.EVENT_MISMATCH

    cut = copy.deepcopy(report)
    links = [p for p in cut["entry"][0]["resource"]["parameter"] if p["name"] == "link"]
    cut["entry"][0]["resource"]["parameter"].remove(links[-1])
    with pytest.raises(AccessReportInvalid) as caught:
        verify_access_report(cut, NoteVerifier.from_verifier_key(key))
    assert caught.value.failure in (ReportFailure.INCOMPLETE, ReportFailure.EVENT_MISMATCH)

    altered = copy.deepcopy(report)
    leaf = altered["entry"][0]["resource"]["parameter"]
    first_link = next(p for p in leaf if p["name"] == "link")
    first_link["part"][1]["valueBase64Binary"] = (
        first_link["part"][1]["valueBase64Binary"][:-4] + "AAA="
    )
    with pytest.raises(AccessReportInvalid) as caught:
        verify_access_report(altered, NoteVerifier.from_verifier_key(key))
    assert caught.value.failure in (ReportFailure.INCLUSION, ReportFailure.MALFORMED)

    initialize_data_dir(tmp_path / "other", dev=False, threshold=2, shares=3)
    other_key = verifier_key_of(DataDir.open(tmp_path / "other"))
    with pytest.raises(AccessReportInvalid) as caught:
        verify_access_report(report, NoteVerifier.from_verifier_key(other_key))
    assert caught.value.failure is ReportFailure.CHECKPOINT
