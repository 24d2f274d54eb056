"""The canary test: unique synthetic PHI planted in requests to every endpoint, happy and error
paths alike, must appear in no log line, error body, response header, metric or audit event.

Keep this test growing as routes are added: add the new paths to ``requests_to_send``.
"""

from __future__ import annotations

import json
import logging

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
