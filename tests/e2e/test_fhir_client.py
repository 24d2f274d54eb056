"""A FHIR client nobody here wrote (fhirpy) drives a real ``phivault serve``.

fhirpy speaks FHIR R4 REST as its authors read the specification: it sends
``application/json`` bodies, reads ``id`` and ``meta`` from the answers of POST and PUT,
turns 404 and 410 into ``ResourceNotFound``, 403 into ``ForbiddenError`` and other
OperationOutcomes into ``OperationOutcome``, and follows ``Bundle.link[next]`` to page.

The users are the dev identity provider's job functions under the default access policy:
front-desk staff register and update patients (PHI; nobody deletes PHI), an administrator
(with multi-factor sign-in) keeps the directory (Practitioner, Organization, ...) and may
delete from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError, OperationOutcome, ResourceNotFound

from phivault.datadir import DataDir
from phivault.identity.dev_provider import DEMO_USERS, DevIdentityProvider, DevProviderWarning
from phivault.identity.principal import Role
from phivault.settings import Settings
from ports_support import free_port

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
pytestmark = pytest.mark.integration

MRN = "urn:oid:2.16.840.1.113883.19.5"
NPI = "http://hl7.org/fhir/sid/us-npi"


@contextmanager
def phivault_serving(data_dir: Path, *, env: dict[str, str], log: Path) -> Iterator[str]:
    """``phivault serve`` on a free port, its log in a file; SIGINT it after.

    Not live_server.phivault_serve: that one pipes the server's stderr and never reads it, so
    a server that logs a line per request blocks once the pipe is full (about a thousand
    requests), which a test of thousands of requests reaches.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [PHIVAULT, "serve", "--port", str(port), "--data-dir", str(data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env=env,
        )
        try:
            deadline = time.monotonic() + 120  # a loaded machine (live_server.phivault_serve)
            while True:
                try:
                    httpx.get(f"{url}/healthz", timeout=1)
                    break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("phivault serve did not start") from None
                    time.sleep(0.1)
            yield url
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Server:
    fhir: str
    data_dir: Path

    def client(self, role: Role, *, mfa: bool = False, scopes: list[str] | None = None) -> Any:
        settings = Settings()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DevProviderWarning)
            provider = DevIdentityProvider.open(DataDir.open(self.data_dir), settings)
        demo = DEMO_USERS[role]
        token = provider.mint(
            user=demo.user,
            roles=[role],
            audience=settings.identity.audience,
            fhir_user=demo.fhir_user,
            scopes=scopes or demo.scopes,
            mfa=mfa,
        )
        return SyncFHIRClient(
            self.fhir, authorization=f"Bearer {token}", requests_config={"timeout": 30}
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("fhirpy")
    data_dir = folder / "data"
    init = subprocess.run(
        [PHIVAULT, "init", "--dev", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    env = {**os.environ, "PHIVAULT_API__RATE_LIMIT_PER_ADDRESS": "100000/minute"}
    with phivault_serving(data_dir, env=env, log=folder / "serve.log") as url:
        yield Server(fhir=f"{url}/fhir", data_dir=data_dir)


@pytest.fixture
def front_desk(server: Server) -> Any:
    return server.client(Role.FRONT_DESK)


@pytest.fixture
def admin(server: Server) -> Any:
    return server.client(
        Role.ADMIN,
        mfa=True,
        scopes=[
            "user/Practitioner.cruds",
            "user/Organization.cruds",
            "user/PractitionerRole.cruds",
        ],
    )


def test_create_read_search_update_a_patient(front_desk: Any) -> None:
    patient = front_desk.resource(
        "Patient",
        identifier=[{"system": MRN, "value": "fhirpy-1"}],
        name=[{"family": "Fhirpyson", "given": ["Ada"]}],
        gender="female",
        birthDate="1990-02-03",
    )
    patient.save()  # POST
    assert patient.id
    assert patient["meta"]["versionId"] == "1"

    read = front_desk.reference("Patient", patient.id).to_resource()  # GET Patient/id
    assert read["name"] == [{"family": "Fhirpyson", "given": ["Ada"]}]
    assert read["birthDate"] == "1990-02-03"

    by_identifier = front_desk.resources("Patient").search(identifier=f"{MRN}|fhirpy-1").get()
    assert by_identifier.id == patient.id
    by_name = front_desk.resources("Patient").search(family="Fhirpyson", gender="female")
    assert [p.id for p in by_name.fetch_all()] == [patient.id]
    # (fhirpy's count() adds _totalMethod, an Aidbox parameter that a strict server refuses.)
    totals = front_desk.execute(
        "Patient", method="get", params={"family": "Fhirpyson", "_total": "accurate"}
    )
    assert totals["total"] == 1

    patient["telecom"] = [{"system": "phone", "value": "555-0100", "use": "home"}]
    patient.save()  # PUT Patient/id
    assert patient["meta"]["versionId"] == "2"
    again = front_desk.reference("Patient", patient.id).to_resource()
    assert again["telecom"] == [{"system": "phone", "value": "555-0100", "use": "home"}]
    assert again["meta"]["versionId"] == "2"


def test_nobody_deletes_phi(front_desk: Any) -> None:
    patient = front_desk.resource("Patient", name=[{"family": "Keptforever"}])
    patient.save()
    with pytest.raises(ForbiddenError):
        patient.delete()
    assert front_desk.reference("Patient", patient.id).to_resource().id == patient.id


def test_search_pages_through_next_links(front_desk: Any) -> None:
    for index in range(7):
        front_desk.resource(
            "Patient",
            identifier=[{"system": MRN, "value": f"paging-{index}"}],
            name=[{"family": "Pagingfamily"}],
        ).save()
    search = front_desk.resources("Patient").search(family="Pagingfamily").limit(3)
    found = search.fetch_all()  # follows Bundle.link[next]
    assert len(found) == 7
    assert len({p.id for p in found}) == 7


def test_directory_create_read_search_update_delete(admin: Any) -> None:
    practitioner = admin.resource(
        "Practitioner",
        identifier=[{"system": NPI, "value": "9990001"}],
        name=[{"family": "Clientwright", "given": ["Grace"], "prefix": ["Dr."]}],
        active=True,
    )
    practitioner.save()
    assert practitioner.id
    found = admin.resources("Practitioner").search(identifier=f"{NPI}|9990001").get()
    assert found.id == practitioner.id
    practitioner["active"] = False
    practitioner.save()
    assert admin.reference("Practitioner", practitioner.id).to_resource()["active"] is False

    practitioner.delete()
    with pytest.raises(ResourceNotFound):  # 410 Gone: a versioned tombstone
        admin.reference("Practitioner", practitioner.id).to_resource()
    assert admin.resources("Practitioner").search(identifier=f"{NPI}|9990001").fetch() == []


def test_a_transaction_rewrites_urn_uuid_references(admin: Any) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:7f1f0c7e-0000-4000-8000-000000000001",
                "resource": {
                    "resourceType": "Organization",
                    "identifier": [{"system": "urn:orgs", "value": "fhirpy-org"}],
                    "name": "Fhirpy General",
                },
                "request": {"method": "POST", "url": "Organization"},
            },
            {
                "fullUrl": "urn:uuid:7f1f0c7e-0000-4000-8000-000000000002",
                "resource": {
                    "resourceType": "Practitioner",
                    "identifier": [{"system": NPI, "value": "9990002"}],
                    "name": [{"family": "Bundleton"}],
                },
                "request": {"method": "POST", "url": "Practitioner"},
            },
            {
                "fullUrl": "urn:uuid:7f1f0c7e-0000-4000-8000-000000000003",
                "resource": {
                    "resourceType": "PractitionerRole",
                    "practitioner": {"reference": "urn:uuid:7f1f0c7e-0000-4000-8000-000000000002"},
                    "organization": {"reference": "urn:uuid:7f1f0c7e-0000-4000-8000-000000000001"},
                },
                "request": {"method": "POST", "url": "PractitionerRole"},
            },
        ],
    }
    response = admin.execute(admin.url, method="post", data=bundle)
    assert response["type"] == "transaction-response"
    locations = [entry["response"]["location"] for entry in response["entry"]]
    assert [entry["response"]["status"][:3] for entry in response["entry"]] == ["201"] * 3
    org, practitioner, role = (location.split("/_history/")[0] for location in locations)
    stored = admin.reference(reference=role).to_resource()
    assert stored["practitioner"]["reference"] == practitioner
    assert stored["organization"]["reference"] == org
    assert admin.reference(reference=practitioner).to_resource()["name"] == [
        {"family": "Bundleton"}
    ]


def test_a_failing_transaction_writes_nothing(admin: Any) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Practitioner",
                    "identifier": [{"system": NPI, "value": "9990003"}],
                },
                "request": {"method": "POST", "url": "Practitioner"},
            },
            {
                "resource": {
                    "resourceType": "PractitionerRole",
                    "practitioner": {"reference": f"Practitioner?identifier={NPI}|no-such-npi"},
                },
                "request": {"method": "POST", "url": "PractitionerRole"},
            },
        ],
    }
    with pytest.raises(OperationOutcome) as caught:
        admin.execute(admin.url, method="post", data=bundle)
    issue = caught.value.resource["issue"][0]
    assert "conditional reference" in issue["diagnostics"]
    assert issue["expression"] == ["Bundle.entry[1].resource.practitioner.reference"]
    assert admin.resources("Practitioner").search(identifier=f"{NPI}|9990003").fetch() == []
