"""``phivault load`` as a user runs it, against a small fake FHIR endpoint on loopback.

The real server is exercised in tests/e2e/test_load_synthea.py; here the other side answers
what each test needs (a failing bundle, a refused token) and records what it was sent.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cli_support import phivault

from ports_support import free_port

pytestmark = pytest.mark.integration

SECRET_NAME = "Qwertyuiopa"  # a resource value that must never be printed
FAIL_MARKER = "fail-me"


@dataclass
class FakeFhir:
    url: str
    mode: str = "ok"  # ok | unauthorized
    received: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


def _respond(fake: FakeFhir, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    if fake.mode == "unauthorized":
        return 401, {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "login", "diagnostics": "token expired"}],
        }
    entries = body.get("entry", [])
    for index, entry in enumerate(entries):
        if entry["resource"].get("id") == FAIL_MARKER:
            return 422, {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "error",
                        "code": "processing",
                        "diagnostics": "conditional reference matched no resource",
                        "expression": [f"Bundle.entry[{index}].resource.subject"],
                        "details": {"text": SECRET_NAME},
                    }
                ],
            }
    kind = body["type"] + "-response"
    return 200, {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {
                "response": {
                    "status": "201 Created",
                    "location": f"{e['resource']['resourceType']}/s{i}/_history/1",
                }
            }
            for i, e in enumerate(entries)
        ],
    }


@pytest.fixture
def fake() -> Iterator[FakeFhir]:
    port = free_port()
    state = FakeFhir(url=f"http://127.0.0.1:{port}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            state.received.append((self.path, self.headers.get("Authorization", ""), body))
            status, answer = _respond(state, body)
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def patient_bundle(folder: Path, name: str, *, fail: bool = False) -> Path:
    patient = {
        "resourceType": "Patient",
        "id": FAIL_MARKER if fail else "p1",
        "name": [{"family": SECRET_NAME}],
    }
    practitioner = {
        "resourceType": "Practitioner",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "42"}],
        "name": [{"family": SECRET_NAME}],
    }
    document = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:1",
                "resource": patient,
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "fullUrl": "urn:uuid:2",
                "resource": practitioner,
                "request": {"method": "POST", "url": "Practitioner"},
            },
        ],
    }
    path = folder / name
    path.write_text(json.dumps(document))
    return path


def companion(folder: Path, name: str) -> Path:
    org = {
        "resourceType": "Organization",
        "identifier": [{"system": "urn:orgs", "value": "o1"}],
        "name": SECRET_NAME,
    }
    document = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": org, "request": {"method": "POST", "url": "Organization"}}],
    }
    path = folder / name
    path.write_text(json.dumps(document))
    return path


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("load") / "data"
    made = phivault("init", "--dev", "--json", "--data-dir", str(path))
    assert made.returncode == 0, made.stderr
    return path


def claims(authorization: str) -> dict[str, Any]:
    payload = authorization.removeprefix("Bearer ").split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def test_loads_companions_first_with_a_dev_service_token(
    fake: FakeFhir, dev_dir: Path, tmp_path: Path
) -> None:
    files = [
        patient_bundle(tmp_path, "a_patient.json"),
        companion(tmp_path, "x_practitionerInformation.json"),
        companion(tmp_path, "x_hospitalInformation.json"),
    ]
    result = phivault(
        "load", "--url", fake.url, "--data-dir", str(dev_dir), "--json", *map(str, files)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["loaded"] == 3 and report["entries_loaded"] == 4
    assert [Path(r["file"]).name for r in report["results"]] == [
        "x_hospitalInformation.json",
        "x_practitionerInformation.json",
        "a_patient.json",
    ]
    assert [path for path, _, _ in fake.received] == ["/fhir"] * 3
    # Each response is reported with the full URL it answers, for id mapping.
    assert report["results"][2]["responses"] == [
        {"status": "201 Created", "fullUrl": "urn:uuid:1", "location": "Patient/s0/_history/1"},
        {
            "status": "201 Created",
            "fullUrl": "urn:uuid:2",
            "location": "Practitioner/s1/_history/1",
        },
    ]
    # The inline Practitioner went as a conditional create; the Patient as it was.
    sent = fake.received[2][2]
    assert sent["entry"][0]["request"] == {"method": "POST", "url": "Patient"}
    assert sent["entry"][1]["request"]["ifNoneExist"] == (
        "identifier=http://hl7.org/fhir/sid/us-npi|42"
    )
    token = claims(fake.received[0][1])
    assert token["roles"] == ["service"]
    assert token["purpose_of_use"] == ["HOPERAT"]
    assert set(token["scope"].split()) >= {
        "system/*.cu",
        "system/Practitioner.rs",
        "system/Organization.rs",
        "system/Location.rs",
        "system/PractitionerRole.rs",
    }
    assert SECRET_NAME not in result.stdout + result.stderr


def test_a_failing_bundle_is_reported_and_the_rest_still_load(
    fake: FakeFhir, tmp_path: Path
) -> None:
    files = [
        patient_bundle(tmp_path, "one.json"),
        patient_bundle(tmp_path, "two.json", fail=True),
        patient_bundle(tmp_path, "three.json"),
    ]
    result = phivault("load", "--url", fake.url, "--token", "t0k", *map(str, files))
    assert result.returncode == 1
    assert "loaded 2 of 3 files" in result.stdout
    assert f"failed: {files[1]}" in result.stderr
    assert (
        "error processing: conditional reference matched no resource "
        "(at Bundle.entry[0].resource.subject)"
    ) in result.stderr
    assert len(fake.received) == 3
    assert fake.received[0][1] == "Bearer t0k"
    assert SECRET_NAME not in result.stdout + result.stderr

    as_json = phivault("load", "--url", fake.url, "--token", "t0k", "--json", *map(str, files))
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert [r["status"] for r in report["results"]] == ["loaded", "failed", "loaded"]
    assert report["results"][1]["http_status"] == 422
    assert report["results"][1]["issues"] == [
        {
            "severity": "error",
            "code": "processing",
            "diagnostics": "conditional reference matched no resource",
            "expression": ["Bundle.entry[0].resource.subject"],
        }
    ]
    assert as_json.stderr == ""


def test_a_refused_token_stops_the_load_and_names_what_did_not_load(
    fake: FakeFhir, tmp_path: Path
) -> None:
    fake.mode = "unauthorized"
    files = [patient_bundle(tmp_path, "one.json"), patient_bundle(tmp_path, "two.json")]
    result = phivault("load", "--url", fake.url, "--token", "t", "--json", *map(str, files))
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert report["error"] == "unauthorized"
    assert "the server refused the token (401): token expired" in report["message"]
    assert [r["status"] for r in report["results"]] == ["failed", "not-attempted"]
    assert len(fake.received) == 1


def test_an_unreachable_server(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    file = patient_bundle(tmp_path, "one.json")
    result = phivault("load", "--url", f"http://127.0.0.1:{port}", "--token", "t", str(file))
    assert result.returncode == 3
    assert f"cannot reach the server at http://127.0.0.1:{port}/fhir" in result.stderr
    assert f"not-attempted: {file}" in result.stderr


def test_bad_files_stop_everything_before_anything_is_sent(fake: FakeFhir, tmp_path: Path) -> None:
    good = patient_bundle(tmp_path, "good.json")
    not_json = tmp_path / "notes.json"
    not_json.write_text(f"{SECRET_NAME}, not json")
    not_bundle = tmp_path / "patient.json"
    not_bundle.write_text(json.dumps({"resourceType": "Patient", "name": [SECRET_NAME]}))
    result = phivault(
        "load", "--url", fake.url, "--token", "t", *map(str, [good, not_json, not_bundle])
    )
    assert result.returncode == 2
    assert fake.received == []
    assert f"{not_json} is not JSON (line 1, column 1)" in result.stderr
    assert f"{not_bundle} is not a FHIR Bundle" in result.stderr
    assert "nothing was sent" in result.stderr
    assert SECRET_NAME not in result.stdout + result.stderr


def test_no_token_and_no_dev_data_dir_is_refused(fake: FakeFhir, tmp_path: Path) -> None:
    file = patient_bundle(tmp_path, "one.json")
    result = phivault(
        "load", "--url", fake.url, "--data-dir", str(tmp_path / "nowhere"), "--json", str(file)
    )
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["error"] == "token"
    assert "pass --token" in report["message"]
    assert fake.received == []


def test_a_production_data_dir_mints_no_token(fake: FakeFhir, tmp_path: Path) -> None:
    data = tmp_path / "prod"
    made = phivault("init", "--json", "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    file = patient_bundle(tmp_path, "one.json")
    result = phivault("load", "--url", fake.url, "--data-dir", str(data), str(file))
    assert result.returncode == 2
    assert "no dev token can be made" in result.stderr
    assert "--dev" in result.stderr
    assert fake.received == []
