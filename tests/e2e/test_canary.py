"""The canary test: unique synthetic PHI planted in requests to every endpoint, happy and error
paths alike, must appear in no log line, error body, response header, metric or audit event.

Keep this test growing as routes are added: add the new paths to ``requests_to_send`` (front
door) or ``fhir_requests`` (the FHIR routes, over the real records stack).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import Live

from phivault.identity.testing import DPoPKey

NAME = "Zebulon Quackenbush"
SSN = "987-65-4329"
PHONE = "555-014-7788"
ADDRESS = "1742 Evergreen Terrace"
CANARIES = (NAME, SSN, PHONE, ADDRESS, "Quackenbush", "Evergreen Terrace", "0147788", "987654329")


def requests_to_send(live: Live) -> list[httpx.Request]:
    good = live.issuer.token()
    auth = {"Authorization": f"Bearer {good}"}
    planted_headers = {
        "X-Request-ID": SSN,
        "User-Agent": f"{NAME} {PHONE}",
        "X-Patient": ADDRESS,
        "Referer": f"http://x/?ssn={SSN}",
    }
    body = json.dumps({"name": NAME, "ssn": SSN, "phone": PHONE, "address": ADDRESS})
    key = DPoPKey()
    bound = live.issuer.token(cnf={"jkt": key.jkt})
    paths = [
        "/healthz",
        "/readyz",
        "/metrics",
        "/whoami",
        "/openapi.json",
        "/docs",
        "/.well-known/jwks.json",
        "/.well-known/openid-configuration",
        f"/t/patients/{SSN}",
        "/t/patients/12345",
        f"/t/patients/{NAME}",
        f"/{ADDRESS}",
        f"/whoami/{PHONE}",
    ]
    out: list[httpx.Request] = []
    for path in paths:
        for headers in ({}, auth):
            out.append(
                httpx.Request(
                    "GET",
                    f"{live.url}{path}?name={NAME}&phone={PHONE}",
                    headers={**planted_headers, **headers},
                )
            )
            out.append(
                httpx.Request("DELETE", f"{live.url}{path}", headers={**planted_headers, **headers})
            )
    json_headers = {**planted_headers, **auth, "Content-Type": "application/fhir+json"}
    out += [
        httpx.Request("POST", f"{live.url}/t/patients", content=body, headers=json_headers),
        httpx.Request("POST", f"{live.url}/t/patients", content=body[:-5], headers=json_headers),
        httpx.Request(
            "POST",
            f"{live.url}/t/patients",
            content=json.dumps({"name": NAME}),
            headers=json_headers,
        ),
        httpx.Request("POST", f"{live.url}/t/patients", content=body * 100, headers=json_headers),
        httpx.Request(
            "POST",
            f"{live.url}/t/patients",
            content=body,
            headers={**planted_headers, **auth, "Content-Type": "text/plain"},
        ),
        # Credentials carrying PHI: junk tokens, a token whose claims are PHI, junk DPoP proofs.
        httpx.Request("GET", f"{live.url}/whoami", headers={"Authorization": f"Bearer {SSN}"}),
        httpx.Request("GET", f"{live.url}/whoami", headers={"Authorization": f"Bearer {NAME}"}),
        httpx.Request("GET", f"{live.url}/whoami", headers={"Authorization": f"Basic {ADDRESS}"}),
        httpx.Request(
            "GET",
            f"{live.url}/whoami",
            headers={"Authorization": f"Bearer {live.issuer.token(sub=SSN)}"},
        ),
        httpx.Request(
            "GET",
            f"{live.url}/whoami",
            headers={
                "Authorization": f"Bearer {live.issuer.token(name=NAME, phone=PHONE, tenant=PHONE)}"
            },
        ),
        httpx.Request(
            "GET",
            f"{live.url}/whoami",
            headers={"Authorization": f"DPoP {bound}", "DPoP": f"{NAME}.{SSN}.x"},
        ),
        httpx.Request(
            "GET",
            f"{live.url}/whoami",
            headers={
                "Authorization": f"DPoP {bound}",
                "DPoP": key.proof(
                    "GET", f"{live.url}/whoami", access_token=bound, jti=SSN + "-" + NAME
                ),
            },
        ),
    ]
    return out


def test_no_canary_escapes(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    outputs: list[str] = []
    statuses: set[int] = set()
    with httpx.Client() as client:
        for request in requests_to_send(live):
            response = client.send(request)
            statuses.add(response.status_code)
            if response.status_code >= 400 or request.url.path in (
                "/whoami",
                "/metrics",
                "/healthz",
                "/readyz",
            ):
                outputs.append(response.text)
            outputs.append(json.dumps(dict(response.headers)))
        outputs.append(client.get(f"{live.url}/metrics").text)
    outputs.append(live.logs.getvalue())
    # uvicorn's own loggers and anything else server-side that logged (not the test client's).
    outputs += [
        record.getMessage()
        for record in caplog.records
        if not record.name.startswith(("httpx", "httpcore"))
    ]
    outputs += [json.dumps(event.to_document()) for event in live.sink.events]
    # The test must have exercised the error paths it claims to.
    assert {200, 400, 401, 404, 405, 409, 412, 413, 415, 422} <= statuses, statuses
    assert live.sink.events, "no audit events were produced"
    haystack = "\n".join(outputs).lower()
    for canary in CANARIES:
        assert canary.lower() not in haystack, f"canary {canary!r} escaped"
        assert canary.lower().replace(" ", "%20") not in haystack
        assert canary.lower().replace(" ", "+") not in haystack


# --- the FHIR routes ----------------------------------------------------------------------------


@pytest.fixture
def live_fhir(tmp_path: Path) -> Iterator[Live]:
    from canary_routes import serve_fhir

    with serve_fhir(tmp_path) as live:
        yield live


def canary_patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "name": [{"family": "Quackenbush", "given": ["Zebulon"]}],
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": SSN}],
        "telecom": [{"system": "phone", "value": PHONE}],
        "address": [{"line": [ADDRESS], "city": "Springfield"}],
        "birthDate": "1970-04-01",
        **extra,
    }


FORM = "application/x-www-form-urlencoded"


def fhir_requests(live: Live, pid: str) -> list[httpx.Request]:
    """Every FHIR route, with canaries in ids, query values, headers and bodies."""
    base = f"{live.url}/fhir"
    json_type = {"Content-Type": "application/fhir+json"}
    writer = {
        "Authorization": "Bearer "
        + live.issuer.token(
            sub="loader", roles=["service"], scope="system/*.cruds",
            purpose_of_use=["HOPERAT"], fhirUser=None,
        ),
        **json_type,
    }  # fmt: skip
    reader = {
        "Authorization": "Bearer "
        + live.issuer.token(
            sub="pat", roles=["patient"], scope="patient/*.rs", fhirUser=f"Patient/{pid}"
        ),
        **json_type,
    }
    planted = {"X-Patient": ADDRESS, "User-Agent": f"{NAME} {PHONE}", "X-Request-ID": SSN}
    body = json.dumps(canary_patient()).encode()
    by_ssn = f"identifier=http://hl7.org/fhir/sid/us-ssn|{SSN}"
    unresolvable = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": NAME},
        "subject": {"reference": f"Patient?identifier=urn:x|{SSN}-{PHONE}"},
    }
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": canary_patient(), "request": {"method": "POST", "url": "Patient"}},
            {"resource": unresolvable, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    batch = {**transaction, "type": "batch"}
    batch["entry"] = [
        *transaction["entry"],
        {"resource": canary_patient(colour=NAME), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": f"Patient?name={NAME}"}},
        {"request": {"method": "GET", "url": f"Patient/{SSN}"}},
    ]

    def req(method: str, path: str, headers: dict[str, str], content: bytes | None = None) -> Any:
        return httpx.Request(
            method, f"{base}{path}", headers={**planted, **headers}, content=content
        )

    return [
        req("GET", f"/metadata?name={NAME}", {}),
        req("GET", f"/Patient/{pid}", reader),
        req("GET", f"/Patient/{pid}", {}),
        req("GET", f"/Patient/{SSN}", reader),
        req("GET", f"/Patient/{NAME}", reader),
        req("GET", f"/{ADDRESS}/1", reader),
        req("GET", f"/Patient?name={NAME}&phone={PHONE}&address={ADDRESS}", reader),
        req("GET", f"/Patient?name={NAME}&colour={SSN}", reader),
        req("GET", f"/Patient?birthdate={NAME}", reader),
        req("GET", f"/Patient?{by_ssn}&_count={PHONE}", reader),
        req("POST", "/Patient/_search", {**reader, "Content-Type": FORM}, f"name={NAME}".encode()),
        req("POST", f"/Patient/_search?name={NAME}", reader),
        req("POST", "/Patient", writer, body),
        req("POST", "/Patient", {**writer, "If-None-Exist": by_ssn}, body),
        req("POST", "/Patient", {**writer, "If-None-Exist": f"colour={NAME}"}, body),
        req("POST", "/Patient", writer, body[:-7]),
        req("POST", "/Observation", writer, body),
        req("POST", "/Patient", writer, json.dumps(canary_patient(colour=NAME)).encode()),
        req("POST", "/Patient", writer, body * 200),
        req("POST", "/Patient", {**writer, "Content-Type": "text/plain"}, body),
        req("PUT", f"/Patient/{pid}", writer, json.dumps(canary_patient(id=SSN)).encode()),
        req("PUT", f"/Patient/{pid}", {**writer, "If-Match": 'W/"99"'},
            json.dumps(canary_patient(id=pid)).encode()),
        req("PUT", f"/Patient/{pid}", {**writer, "If-Match": NAME},
            json.dumps(canary_patient(id=pid)).encode()),
        req("PUT", f"/Patient/{SSN}", writer, json.dumps(canary_patient(id=SSN)).encode()),
        req("PUT", f"/Patient?{by_ssn}", writer, body),
        req("PUT", f"/Patient?name={NAME}&colour={PHONE}", writer, body),
        req("DELETE", f"/Patient/{pid}", writer),
        req("DELETE", f"/Patient/{SSN}", writer),
        req("GET", f"/Patient/{pid}/_history", reader),
        req("GET", f"/Patient/{pid}/_history?_since={SSN}", reader),
        req("GET", f"/Patient/_history?_count={PHONE}", reader),
        req("GET", f"/Patient/{pid}/_history/1", reader),
        req("GET", f"/Patient/{pid}/_history/{SSN}", reader),
        req("POST", "", writer, json.dumps(transaction).encode()),
        req("POST", "", writer, json.dumps(batch).encode()),
        req("POST", "", writer, body),
        req("POST", "", writer, b'{"resourceType": "Bundle", "type": "' + NAME.encode() + b'"}'),
    ]  # fmt: skip


def test_no_canary_escapes_the_fhir_routes(
    live_fhir: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    live = live_fhir
    outputs: list[str] = []
    statuses: set[int] = set()
    with httpx.Client(timeout=30) as client:
        token = live.issuer.token(
            sub="loader", roles=["service"], scope="system/*.cruds",
            purpose_of_use=["HOPERAT"], fhirUser=None,
        )  # fmt: skip
        created = client.post(
            f"{live.url}/fhir/Patient",
            content=json.dumps(canary_patient()),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
        )
        assert created.status_code == 201, created.text
        outputs.append(json.dumps(dict(created.headers)))
        pid = created.json()["id"]
        for request in fhir_requests(live, pid):
            response = client.send(request)
            statuses.add(response.status_code)
            if response.status_code >= 400 or request.url.path in ("/fhir", "/fhir/metadata"):
                outputs.append(response.text)  # errors, and batch outcomes (inside a 200)
            outputs.append(json.dumps(dict(response.headers)))
        outputs.append(client.get(f"{live.url}/metrics").text)
    outputs.append(live.logs.getvalue())
    outputs += [
        record.getMessage()
        for record in caplog.records
        if not record.name.startswith(("httpx", "httpcore"))
    ]
    outputs += [json.dumps(event.to_document()) for event in live.sink.events]
    assert {200, 201, 400, 401, 403, 404, 412, 413, 415, 422} <= statuses, statuses
    assert not any(status >= 500 for status in statuses), statuses
    assert live.sink.events, "no audit events were produced"
    haystack = "\n".join(outputs).lower()
    for canary in CANARIES:
        assert canary.lower() not in haystack, f"canary {canary!r} escaped"
        assert canary.lower().replace(" ", "%20") not in haystack
        assert canary.lower().replace(" ", "+") not in haystack
