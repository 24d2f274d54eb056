"""FHIR R4 over HTTP against ``phivault serve`` as shipped: real CLI, ledger, key ring,
SQLite records, dev identity provider; Synthea bundles in, the patient's record back out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import phivault_serve

from phivault.datadir import DataDir
from phivault.ledger.service import open_ledger_readonly
from ports_support import free_port

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "synthea"
COMPANIONS = (
    "sof2019_hospitalInformation1559319163815.json",
    "sof2019_practitionerInformation1559319163815.json",
)
PATIENT_BUNDLE = "sof2019_Clemente_Kreiger.json"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not FIXTURES.is_dir(), reason="the Synthea fixtures are not here"),
]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHIVAULT, *args], capture_output=True, text=True, timeout=60, check=False
    )


def token(data_dir: Path, *args: str) -> dict[str, str]:
    minted = run_cli("token", *args, "--json", "--data-dir", str(data_dir))
    assert minted.returncode == 0, minted.stderr
    value = json.loads(minted.stdout)["access_token"]
    return {"Authorization": f"Bearer {value}", "Content-Type": "application/fhir+json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    data_dir = tmp_path_factory.mktemp("fhir") / "data"
    init = run_cli("init", "--dev", "--json", "--data-dir", str(data_dir))
    assert init.returncode == 0, init.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PHIVAULT_API__RATE_LIMIT_PER_ADDRESS": "10000/minute",
           "PHIVAULT_API__RATE_LIMIT_PER_PRINCIPAL": "10000/minute"}  # fmt: skip
    with phivault_serve(
        ["--port", str(port), "--data-dir", str(data_dir)], url=url, verify=False, env=env
    ):
        yield url, data_dir


def loader(data_dir: Path) -> dict[str, str]:
    return token(data_dir, "--role", "service", "--purpose", "HOPERAT", "--scope", "system/*.cruds")


def post_bundle(client: httpx.Client, url: str, headers: dict[str, str], name: str) -> Any:
    response = client.post(f"{url}/fhir", content=(FIXTURES / name).read_bytes(), headers=headers)
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["type"] == "transaction-response"
    assert {e["response"]["status"] for e in body["entry"]} <= {"200 OK", "201 Created"}
    return body


def test_metadata_is_public(server: tuple[str, Path]) -> None:
    url, _ = server
    response = httpx.get(f"{url}/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["implementation"]["url"] == f"{url}/fhir"


def test_synthea_in_and_the_patients_record_out(server: tuple[str, Path]) -> None:
    url, data_dir = server
    with httpx.Client(timeout=60) as client:
        headers = loader(data_dir)
        for name in COMPANIONS:
            post_bundle(client, url, headers, name)
        body = post_bundle(client, url, headers, PATIENT_BUNDLE)
        sent = json.loads((FIXTURES / PATIENT_BUNDLE).read_bytes())
        kinds = [e["resource"]["resourceType"] for e in sent["entry"]]
        pid = body["entry"][kinds.index("Patient")]["fullUrl"].rsplit("/", 1)[-1]
        own = token(
            data_dir, "--role", "patient", "--fhir-user", f"Patient/{pid}",
            "--scope", "patient/*.rs",
        )  # fmt: skip

        me = client.get(f"{url}/fhir/Patient/{pid}", headers=own)
        assert me.status_code == 200, me.text
        assert me.headers["etag"] == 'W/"1"'
        original = sent["entry"][kinds.index("Patient")]["resource"]
        assert me.json()["name"] == original["name"]
        assert me.json()["birthDate"] == original["birthDate"]

        # Every observation, page by page through the next links.
        seen: list[str] = []
        next_url: str | None = f"{url}/fhir/Observation?patient={pid}&_count=10&_total=accurate"
        while next_url:
            page = client.get(next_url, headers=own)
            assert page.status_code == 200, page.text
            seen += [e["resource"]["id"] for e in page.json().get("entry", [])]
            links = {link["relation"]: link["url"] for link in page.json()["link"]}
            next_url = links.get("next")
        assert len(seen) == len(set(seen)) == kinds.count("Observation")

        history = client.get(f"{url}/fhir/Patient/{pid}/_history", headers=own)
        assert history.status_code == 200
        assert history.json()["entry"][0]["response"]["etag"] == 'W/"1"'

        # Someone else's record is not there for them.
        stranger = token(
            data_dir, "--role", "patient", "--fhir-user", "Patient/someone-else",
            "--scope", "patient/*.rs",
        )  # fmt: skip
        assert client.get(f"{url}/fhir/Patient/{pid}", headers=stranger).status_code == 404

    # The disclosures are in the real ledger.
    with open_ledger_readonly(DataDir.open(data_dir)) as store:
        deadline = time.monotonic() + 5
        while store.size() < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.size() >= 5


def test_errors_over_http(server: tuple[str, Path]) -> None:
    url, data_dir = server
    headers = loader(data_dir)
    with httpx.Client() as client:
        cases = [
            client.get(f"{url}/fhir/Nonsense/1", headers=headers),
            client.post(f"{url}/fhir/Patient", content=b"{not json", headers=headers),
            client.post(
                f"{url}/fhir/Observation",
                content=json.dumps({"resourceType": "Patient"}),
                headers=headers,
            ),
            client.get(f"{url}/fhir/Observation?colour=blue", headers=headers),
            client.get(f"{url}/fhir/Patient/1"),
        ]
        assert [c.status_code for c in cases] == [404, 400, 400, 400, 401]
        for response in cases:
            assert response.json()["resourceType"] == "OperationOutcome"
