from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_harness import Harness, build

from phivault.identity.testing import DPoPKey
from phivault.ledger.events import EventKind, Outcome
from phivault.settings import ApiSettings, IdentitySettings, Settings


def assert_outcome(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] in ("error", "fatal")
    assert "Traceback" not in response.text
    return body


async def test_public_endpoints(harness: Harness) -> None:
    assert (await harness.client.get("/healthz")).json() == {"status": "ok"}
    ready = await harness.client.get("/readyz")
    assert ready.status_code == 200
    metrics = await harness.client.get("/metrics")
    assert metrics.status_code == 200
    assert "phivault_http_requests_total" in metrics.text


async def test_whoami_requires_a_token(harness: Harness) -> None:
    response = await harness.client.get("/whoami")
    assert_outcome(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer realm="phivault"'
    assert harness.sink.events == []  # no credentials presented: nothing to audit


async def test_whoami(harness: Harness) -> None:
    response = await harness.client.get("/whoami", headers=harness.auth(purpose_of_use=["TREAT"]))
    assert response.status_code == 200
    body = response.json()
    assert body["subject"] == "user-1"
    assert body["roles"] == ["clinician"]
    assert "user/*.rs" in body["scopes"]
    assert body["fhirUser"] == "Practitioner/p1"
    assert body["purposeOfUse"] == ["TREAT"]
    assert response.headers["x-request-id"]
    assert response.headers["cache-control"] == "no-store"
    # The first request of a session is recorded as a login.
    [login] = harness.sink.events
    assert login.kind is EventKind.LOGIN and login.outcome is Outcome.SUCCESS
    assert login.agents[0].who == "user-1"
    await harness.client.get("/whoami", headers=harness.auth(sid="s-1"))
    await harness.client.get("/whoami", headers=harness.auth(sid="s-1"))
    assert len(harness.sink.events) == 2


async def test_request_id_kept_if_well_formed(harness: Harness) -> None:
    r = await harness.client.get("/healthz", headers={"X-Request-ID": "abcdef012345"})
    assert r.headers["x-request-id"] == "abcdef012345"
    r = await harness.client.get("/healthz", headers={"X-Request-ID": "John Smith 555-1234"})
    assert r.headers["x-request-id"] != "John Smith 555-1234"


async def test_failed_authentication_is_audited_without_token(harness: Harness) -> None:
    token = harness.token(exp=harness.clock.t - 3600, iat=harness.clock.t - 4000)
    response = await harness.client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
    body = assert_outcome(response, 401)
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert token not in json.dumps(body)
    [event] = harness.sink.events
    assert event.kind is EventKind.LOGIN
    assert event.outcome is Outcome.MINOR_FAILURE
    assert event.outcome_reason == "expired"
    assert event.agents[0].who == "anonymous"
    document = json.dumps(event.to_document())
    assert token not in document and token.split(".")[1] not in document


async def test_forged_token_is_a_security_alert(harness: Harness) -> None:
    token = harness.token()
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[::-1]}"
    assert_outcome(
        await harness.client.get("/whoami", headers={"Authorization": f"Bearer {forged}"}), 401
    )
    [event] = harness.sink.events
    assert event.kind is EventKind.SECURITY_ALERT
    assert event.outcome is Outcome.SERIOUS_FAILURE


@pytest.mark.parametrize("status", [403, 404, 409, 412, 422, 500])
async def test_problems_from_routes(harness: Harness, status: int) -> None:
    body = assert_outcome(
        await harness.client.get(f"/t/fail/{status}", headers=harness.auth()), status
    )
    assert "Zebulon" not in json.dumps(body) and "boom" not in json.dumps(body)


async def test_unknown_path_and_method(harness: Harness) -> None:
    assert_outcome(await harness.client.get("/nope", headers=harness.auth()), 404)
    response = await harness.client.delete("/whoami", headers=harness.auth())
    assert_outcome(response, 405)
    assert "GET" in response.headers["allow"]


async def test_unknown_path_without_token_is_401_not_404(harness: Harness) -> None:
    # Default deny: an anonymous caller cannot even probe which paths exist.
    assert_outcome(await harness.client.get("/fhir/Patient/123"), 401)


async def test_body_limit(harness: Harness) -> None:
    big = json.dumps({"code": "x" * 5000, "count": 1})
    headers = {**harness.auth(), "Content-Type": "application/json"}
    assert_outcome(await harness.client.post("/t/records", content=big, headers=headers), 413)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 500

    response = await harness.client.post("/t/records", content=chunks(), headers=headers)
    assert_outcome(response, 413)


async def test_malformed_json_wrong_type_and_invalid_body(harness: Harness) -> None:
    headers = {**harness.auth(), "Content-Type": "application/fhir+json"}
    assert_outcome(
        await harness.client.post("/t/records", content=b"{not json", headers=headers), 400
    )
    plain = {**harness.auth(), "Content-Type": "text/plain"}
    assert_outcome(await harness.client.post("/t/records", content=b"hello", headers=plain), 415)
    body = assert_outcome(
        await harness.client.post(
            "/t/records", content=b'{"code": "123-45-6789", "count": "many"}', headers=headers
        ),
        422,
    )
    assert "body.count" in json.dumps(body)
    assert "123-45-6789" not in json.dumps(body) and "many" not in json.dumps(body)
    ok = await harness.client.post(
        "/t/records", content=b'{"code": "a", "count": 2}', headers=headers
    )
    assert ok.status_code == 200


async def test_invalid_content_length(harness: Harness) -> None:
    # httpx computes Content-Length itself; send a raw scope-level header through the transport.
    request = harness.client.build_request(
        "POST", "/t/records", content=b"{}", headers=harness.auth()
    )
    request.headers["Content-Length"] = "abc"
    assert_outcome(await harness.client.send(request), 400)


async def test_rate_limit() -> None:
    h = build(
        Settings(
            api=ApiSettings(
                rate_limit_per_address="1000/minute", rate_limit_per_principal="3/minute"
            )
        )
    )
    async with h.client:
        headers = h.auth()
        for _ in range(3):
            assert (await h.client.get("/whoami", headers=headers)).status_code == 200
        response = await h.client.get("/whoami", headers=headers)
        assert_outcome(response, 429)
        assert int(response.headers["retry-after"]) >= 1
        # Another credential from the same address is not limited by this one's quota...
        assert (await h.client.get("/whoami", headers=h.auth(sub="user-2"))).status_code == 200
        # ...and health checks are never limited.
        assert (await h.client.get("/healthz")).status_code == 200


async def test_rate_limit_per_address() -> None:
    h = build(Settings(api=ApiSettings(rate_limit_per_address="2/minute")))
    async with h.client:
        await h.client.get("/whoami")
        await h.client.get("/whoami")
        assert_outcome(await h.client.get("/whoami"), 429)


async def test_idle_timeout(harness: Harness) -> None:
    token = harness.issuer.token(now=harness.clock.t, exp=harness.clock.t + 3000, sid="idle-1")
    headers = {"Authorization": f"Bearer {token}"}
    assert (await harness.client.get("/whoami", headers=headers)).status_code == 200
    harness.clock.t += 901
    response = await harness.client.get("/whoami", headers=headers)
    assert_outcome(response, 401)
    assert harness.sink.events[-1].outcome_reason == "idle-timeout"


async def test_service_role_has_no_idle_timeout(harness: Harness) -> None:
    token = harness.issuer.token(now=harness.clock.t, exp=harness.clock.t + 3000, roles=["service"])
    headers = {"Authorization": f"Bearer {token}"}
    assert (await harness.client.get("/whoami", headers=headers)).status_code == 200
    harness.clock.t += 2000
    assert (await harness.client.get("/whoami", headers=headers)).status_code == 200


@pytest.mark.parametrize("role", ["admin", "privacy-officer"])
async def test_mfa_required(harness: Harness, role: str) -> None:
    response = await harness.client.get("/whoami", headers=harness.auth(roles=[role], amr=["pwd"]))
    assert_outcome(response, 401)
    challenge = response.headers["www-authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge
    assert 'acr_values="urn:mfa"' in challenge
    ok = await harness.client.get("/whoami", headers=harness.auth(roles=[role], amr=["pwd", "otp"]))
    assert ok.status_code == 200 and ok.json()["mfa"] is True


async def test_step_up(harness: Harness) -> None:
    old = harness.auth(amr=["pwd", "otp"], auth_time=harness.clock.t - 600)
    response = await harness.client.get("/t/sensitive", headers=old)
    assert_outcome(response, 401)
    challenge = response.headers["www-authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge
    assert 'max_age="300"' in challenge
    refused = [e for e in harness.sink.events if e.subtype == "step-up"]
    assert refused and refused[-1].outcome is Outcome.MINOR_FAILURE
    assert refused[-1].outcome_reason == "step-up-required"
    fresh = harness.auth(amr=["pwd", "otp"], auth_time=harness.clock.t - 10)
    assert (await harness.client.get("/t/sensitive", headers=fresh)).status_code == 200
    no_mfa = harness.auth(amr=["pwd"])
    assert_outcome(await harness.client.get("/t/sensitive", headers=no_mfa), 401)


async def test_audit_failure_fails_phi_routes_closed(harness: Harness) -> None:
    headers = harness.auth(sid="s-audit")
    assert (await harness.client.get("/t/records/7", headers=headers)).status_code == 200
    harness.sink.failing = True
    response = await harness.client.get("/t/records/7", headers=headers)
    body = assert_outcome(response, 503)
    assert "Zebulon" not in json.dumps(body)
    # PHI-free endpoints stay up.
    assert (await harness.client.get("/healthz")).status_code == 200
    assert (await harness.client.get("/metrics")).status_code == 200
    # A failed authentication that cannot be recorded is refused as unavailable.
    assert_outcome(
        await harness.client.get("/whoami", headers={"Authorization": "Bearer x.y.z"}), 503
    )


async def test_phi_route_records_before_it_returns(harness: Harness) -> None:
    response = await harness.client.get("/t/records/42", headers=harness.auth())
    assert response.status_code == 200
    rest = [e for e in harness.sink.events if e.kind is EventKind.REST]
    assert len(rest) == 1
    assert rest[0].patient == "Patient/42"
    assert rest[0].request_id == response.headers["x-request-id"]


async def test_error_bodies_are_scrubbed(harness: Harness) -> None:
    response = await harness.client.get("/t/leaky", headers=harness.auth())
    body = json.dumps(assert_outcome(response, 409))
    assert "Quackenbush" not in body and "123-45-6789" not in body
    assert "[REDACTED]" in body


async def test_a_scrubbed_outcome_keeps_its_structure(harness: Harness) -> None:
    """Tainted values that spell "OperationOutcome" or an issue code are scrubbed from the
    text, not from the structure: the client still gets a readable OperationOutcome."""
    response = await harness.client.get("/t/tainted-words", headers=harness.auth())
    body = assert_outcome(response, 409)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error"
    assert body["issue"][0]["code"] == "conflict"
    assert "OperationOutcome" not in body["issue"][0].get("diagnostics", "")


async def test_logs_are_json_and_scrubbed(harness: Harness) -> None:
    await harness.client.get("/t/records/9", headers=harness.auth())
    await harness.client.get("/t/fail/500", headers=harness.auth())
    lines = harness.log_lines()
    requests = [line for line in lines if line["event"] == "http.request"]
    assert {line["route"] for line in requests} >= {"/t/records/{record_id}", "/t/fail/{status}"}
    text = harness.logs.getvalue()
    assert "Zebulon" not in text and "123-45-6789" not in text
    assert any(line["event"] == "http.error" and line["error"] == "RuntimeError" for line in lines)


async def test_metrics_use_route_templates(harness: Harness) -> None:
    await harness.client.get("/t/records/patient-secret-id", headers=harness.auth())
    metrics = (await harness.client.get("/metrics")).text
    assert "patient-secret-id" not in metrics
    assert 'route="/t/records/{record_id}"' in metrics


async def test_dpop_over_http(harness: Harness) -> None:
    key = DPoPKey()
    token = harness.token(cnf={"jkt": key.jkt})
    url = "http://testserver/whoami"
    proof = key.proof("GET", url, access_token=token, iat=harness.clock.t)
    ok = await harness.client.get(
        "/whoami", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
    )
    assert ok.status_code == 200 and ok.json()["dpopBound"] is True
    replay = await harness.client.get(
        "/whoami", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
    )
    assert_outcome(replay, 401)
    assert replay.headers["www-authenticate"].startswith("DPoP ")
    assert 'error="invalid_dpop_proof"' in replay.headers["www-authenticate"]
    assert harness.sink.events[-1].kind is EventKind.SECURITY_ALERT


async def test_readyz_reports_unavailable_shared_state() -> None:
    settings = Settings(api=ApiSettings(shared_state="redis", redis_url="redis://127.0.0.1:1/0"))
    h = build(settings)
    async with h.client:
        assert_outcome(await h.client.get("/readyz"), 503)
        assert (await h.client.get("/healthz")).status_code == 200
        # Authentication cannot check replay or sessions: fail closed.
        assert_outcome(await h.client.get("/whoami", headers=h.auth()), 503)


def test_symmetric_algorithms_refused_at_build_time() -> None:
    from phivault.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        build(Settings(identity=IdentitySettings(algorithms=["HS256"])))


async def test_request_id_shaped_like_an_ssn_is_replaced(harness: Harness) -> None:
    # Regression (found by the canary test): an incoming X-Request-ID of "987-65-4329" fit the
    # id grammar, was echoed in headers and logs, and made audit events invalid (a 500).
    headers = {**harness.auth(), "X-Request-ID": "987-65-4329"}
    response = await harness.client.get("/t/records/5", headers=headers)
    assert response.status_code == 200
    assert response.headers["x-request-id"] != "987-65-4329"
    assert "987-65-4329" not in harness.logs.getvalue()


async def test_unauditable_caller_id_is_a_400_not_a_500(harness: Harness) -> None:
    # Regression (found by schemathesis): a path id the audit model refuses (too long, or
    # PHI-shaped) made building the audit event raise, which surfaced as a 500.
    response = await harness.client.get("/t/records/" + "1" * 80, headers=harness.auth())
    body = assert_outcome(response, 400)
    assert "audit" in json.dumps(body)


def test_production_refuses_the_dev_identity_provider(tmp_path: Path) -> None:
    from phivault.api import create_app
    from phivault.datadir import DataDir
    from phivault.errors import ConfigurationError
    from phivault.identity.dev_provider import DevIdentityProvider
    from phivault.ledger.testing import InMemoryAuditSink
    from phivault.settings import Environment

    data_dir = DataDir.create(tmp_path / "dev", dev=True)
    DevIdentityProvider.initialize(data_dir)
    with pytest.raises(ConfigurationError, match="production"):
        create_app(
            Settings(environment=Environment.PRODUCTION),
            audit_sink=InMemoryAuditSink(),
            data_dir=data_dir,
        )


def test_no_issuer_fails_at_build_time() -> None:
    from phivault.api import create_app
    from phivault.errors import ConfigurationError
    from phivault.ledger.testing import InMemoryAuditSink

    with pytest.raises(ConfigurationError, match="issuer"):
        create_app(Settings(), audit_sink=InMemoryAuditSink())


async def test_unknown_methods_do_not_become_metric_labels(harness: Harness) -> None:
    await harness.client.request("JOHNSMITH", "/whoami", headers=harness.auth())
    metrics = (await harness.client.get("/metrics")).text
    assert "JOHNSMITH" not in metrics and 'method="OTHER"' in metrics


def test_production_needs_https_for_keys() -> None:
    from phivault.api import create_app
    from phivault.errors import ConfigurationError
    from phivault.ledger.testing import InMemoryAuditSink
    from phivault.settings import Environment, TrustedIssuer

    insecure = IdentitySettings(issuers=[TrustedIssuer(issuer="http://idp.example")])
    with pytest.raises(ConfigurationError, match="HTTPS"):
        create_app(
            Settings(environment=Environment.PRODUCTION, identity=insecure),
            audit_sink=InMemoryAuditSink(),
        )


async def test_state_readiness_and_shutdown_hooks() -> None:
    calls: list[str] = []

    async def check() -> None:
        calls.append("ready")
        raise RuntimeError("database down")

    async def stop() -> None:
        calls.append("stopped")

    h = build(state={"repository": "repo-object"}, readiness_checks=[check], on_shutdown=[stop])
    async with h.client:
        assert h.app.state.repository == "repo-object"
        assert_outcome(await h.client.get("/readyz"), 503)
        async with h.app.router.lifespan_context(h.app):
            pass
    assert calls == ["ready", "stopped"]
