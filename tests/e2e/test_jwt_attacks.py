"""The JWT attack suite, over real HTTP: every forgery and misuse is a 401 OperationOutcome."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest
from live_server import Live

from phivault.identity.testing import (
    DPoPKey,
    FakeIssuer,
    b64url,
    forge_hmac_with_public_key,
    forge_unsigned,
)
from phivault.identity.tokens import b64url_decode
from phivault.ledger.events import EventKind

Attack = Callable[[Live], dict[str, str]]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tampered_payload(live: Live) -> dict[str, str]:
    header, payload, signature = live.issuer.token().split(".")
    claims = json.loads(b64url_decode(payload))
    claims["roles"] = ["admin"]
    claims["amr"] = ["mfa"]
    return bearer(f"{header}.{b64url(json.dumps(claims).encode())}.{signature}")


def dpop_bound(live: Live, key: DPoPKey) -> str:
    return live.issuer.token(cnf={"jkt": key.jkt})


def replayed_proof(live: Live) -> dict[str, str]:
    key = DPoPKey()
    token = dpop_bound(live, key)
    proof = key.proof("GET", f"{live.url}/whoami", access_token=token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
    assert httpx.get(f"{live.url}/whoami", headers=headers).status_code == 200  # first use
    return headers


def proof_for_other_method(live: Live) -> dict[str, str]:
    key = DPoPKey()
    token = dpop_bound(live, key)
    return {
        "Authorization": f"DPoP {token}",
        "DPoP": key.proof("POST", f"{live.url}/whoami", access_token=token),
    }


def proof_for_other_url(live: Live) -> dict[str, str]:
    key = DPoPKey()
    token = dpop_bound(live, key)
    return {
        "Authorization": f"DPoP {token}",
        "DPoP": key.proof("GET", f"{live.url}/healthz", access_token=token),
    }


def bound_token_without_proof(live: Live) -> dict[str, str]:
    return {"Authorization": f"DPoP {dpop_bound(live, DPoPKey())}"}


def bound_token_as_bearer(live: Live) -> dict[str, str]:
    return bearer(dpop_bound(live, DPoPKey()))


def stolen_token_other_key(live: Live) -> dict[str, str]:
    victim, thief = DPoPKey(), DPoPKey()
    token = dpop_bound(live, victim)
    return {
        "Authorization": f"DPoP {token}",
        "DPoP": thief.proof("GET", f"{live.url}/whoami", access_token=token),
    }


ATTACKS: dict[str, Attack] = {
    "alg-none": lambda live: bearer(forge_unsigned(live.issuer.claims())),
    "hs256-with-public-key": lambda live: bearer(
        forge_hmac_with_public_key(
            live.issuer.claims(), live.issuer.jwks()["keys"][0], live.issuer.kid
        )
    ),
    "expired": lambda live: bearer(
        live.issuer.token(iat=time.time() - 7200, exp=time.time() - 3600)
    ),
    "nbf-in-future": lambda live: bearer(live.issuer.token(nbf=time.time() + 3600)),
    "wrong-issuer": lambda live: bearer(FakeIssuer("https://evil.test").token()),
    "wrong-issuer-claim-same-key": lambda live: bearer(live.issuer.token(iss="https://evil.test")),
    "wrong-audience": lambda live: bearer(live.issuer.token(aud="another-service")),
    "unknown-kid": lambda live: bearer(live.issuer.token(header={"kid": "rotated-away"})),
    "tampered-payload": tampered_payload,
    "signature-stripped": lambda live: bearer(live.issuer.token().rsplit(".", 1)[0] + "."),
    "dpop-proof-replayed": replayed_proof,
    "dpop-proof-other-method": proof_for_other_method,
    "dpop-proof-other-url": proof_for_other_url,
    "bound-token-without-proof": bound_token_without_proof,
    "bound-token-as-bearer": bound_token_as_bearer,
    "stolen-token-other-key": stolen_token_other_key,
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused(live: Live, name: str) -> None:
    headers = ATTACKS[name](live)
    before = len(live.sink.events)
    response = httpx.get(f"{live.url}/whoami", headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "www-authenticate" in response.headers
    # Nothing of the token is echoed back, and the refusal is recorded without it.
    token = headers["Authorization"].split(" ", 1)[1]
    for part in token.split("."):
        if len(part) > 8:
            assert part not in response.text
            for event in live.sink.events[before:]:
                assert part not in json.dumps(event.to_document())
    refusals = [
        e
        for e in live.sink.events[before:]
        if e.kind in (EventKind.LOGIN, EventKind.SECURITY_ALERT)
    ]
    assert refusals and refusals[-1].outcome > 0


def test_valid_token_and_dpop_pass(live: Live) -> None:
    assert httpx.get(f"{live.url}/whoami", headers=bearer(live.issuer.token())).status_code == 200
    key = DPoPKey()
    token = dpop_bound(live, key)
    proof = key.proof("GET", f"{live.url}/whoami", access_token=token)
    response = httpx.get(
        f"{live.url}/whoami", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
    )
    assert response.status_code == 200 and response.json()["dpopBound"] is True
