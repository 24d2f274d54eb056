"""Break-glass over HTTP: the whole ASGI stack (front door, step-up, FHIR routes, repository,
SQLite, key ring) with the break-glass routers mounted as the service will mount them.

Only the identity provider, the clock and the ledger are doubles. The app is built as
``open_service`` will build it (``wire_break_glass``: service on ``app.state.break_glass``, its
routers mounted); the FHIR router's caller gets the caller's grants
(``access_context_with_grants``), installed here as a dependency override until the FHIR
router does it; ``test_open_service_wires_break_glass`` checks the real composition.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from live_server import serve_app
from typer.testing import CliRunner

from phivault.access.alerts import Alert
from phivault.access.breakglass import REASON_SYSTEM
from phivault.access.decision import compile_policy
from phivault.access.policy import default_policy
from phivault.api import MountedRouter, create_app
from phivault.api.breakglass import access_context_with_grants, wire_break_glass
from phivault.api.context import AuditCtx, CurrentPrincipal
from phivault.api.fhir import FHIR_PREFIX, fhir_router
from phivault.api.fhir._routes import _caller
from phivault.cli.main import app as cli_app
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.identity.testing import FakeIssuer
from phivault.ledger.events import EventKind, Outcome
from phivault.ledger.testing import InMemoryAuditSink
from phivault.records.repository import RecordsRepository
from phivault.records.results import Caller
from phivault.records.store import SqlRecordStore
from phivault.settings import AccessSettings, ApiSettings, IdentitySettings, Settings

START = 1_800_000_000.0
FHIR_JSON = "application/fhir+json"
SECRET_TEXT = "Zebulon Quackenbush collapsed in the lobby, MRN 555-12-3456"


class Clock:
    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t


class RecordingSink:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


@dataclass
class World:
    client: httpx.AsyncClient
    issuer: FakeIssuer
    sink: InMemoryAuditSink
    clock: Clock
    alerts: RecordingSink
    log: io.StringIO
    store: SqlRecordStore
    patient_id: str

    def headers(self, **claims: Any) -> dict[str, str]:
        token = self.issuer.token(now=self.clock.t, **claims)
        return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}

    def er_doctor(self, *, mfa: bool = True, sub: str = "dr-er") -> dict[str, str]:
        """A clinician with no care relationship to the patient."""
        return self.headers(
            sub=sub,
            roles=["clinician"],
            scope="openid fhirUser user/*.rs",
            fhirUser="Practitioner/er-1",
            purpose_of_use=["TREAT"],
            amr=["pwd", "otp"] if mfa else ["pwd"],
            acr="urn:mfa" if mfa else None,
        )

    def privacy_officer(self) -> dict[str, str]:
        return self.headers(
            sub="po-1",
            roles=["privacy-officer"],
            scope="openid",
            fhirUser=None,
            amr=["pwd", "otp"],
            acr="urn:mfa",
        )

    def nurse(self) -> dict[str, str]:
        return self.headers(
            sub="nurse-1",
            roles=["nurse"],
            scope="openid fhirUser user/*.rs",
            fhirUser="Practitioner/n-1",
            amr=["pwd", "otp"],
            acr="urn:mfa",
        )

    def events(self, subtype: str | None = None) -> list[Any]:
        return [
            e
            for e in self.sink.events
            if e.kind is EventKind.BREAK_GLASS and (subtype is None or e.subtype == subtype)
        ]

    async def break_glass(
        self, headers: dict[str, str], *, reason: str = "emergency-treatment"
    ) -> httpx.Response:
        body = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "reason", "valueCoding": {"system": REASON_SYSTEM, "code": reason}},
                {"name": "justification", "valueString": SECRET_TEXT},
            ],
        }
        return await self.client.post(
            f"/fhir/Patient/{self.patient_id}/$break-glass",
            content=json.dumps(body),
            headers=headers,
        )

    async def read_patient(self, headers: dict[str, str]) -> httpx.Response:
        return await self.client.get(f"/fhir/Patient/{self.patient_id}", headers=headers)


def _grant_id(response: httpx.Response) -> str:
    params = {p["name"]: p for p in response.json()["parameter"]}
    value: str = params["grant"]["valueId"]
    return value


@dataclass
class Parts:
    app: FastAPI
    issuer: FakeIssuer
    sink: InMemoryAuditSink
    clock: Clock
    alerts: RecordingSink
    log: io.StringIO
    store: SqlRecordStore
    keystore: SqliteKeyStore

    def close(self) -> None:
        self.store.close()
        self.keystore.close()

    def loader(self) -> dict[str, str]:
        token = self.issuer.token(
            now=self.clock.t,
            sub="loader",
            roles=["service"],
            scope="system/*.cruds",
            purpose_of_use=["HOPERAT"],
            fhirUser=None,
        )
        return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}


PATIENT = {
    "resourceType": "Patient",
    "name": [{"family": "Quackenbush", "given": ["Zebulon"]}],
    "birthDate": "1970-04-01",
}


async def build(tmp_path: Path) -> Parts:
    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=2)
    keystore = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    sink = InMemoryAuditSink()
    clock = Clock()
    ring = KeyRing(
        store=keystore, provider=SealedLocalProvider(keys_dir), audit=sink, observer="bg-test"
    )
    await ring.unseal(shares)
    store = SqlRecordStore(f"sqlite:///{tmp_path}/records.db")
    policy = compile_policy(default_policy())
    repository = RecordsRepository(store, ring, policy, clock=clock)
    alerts = RecordingSink()
    log = io.StringIO()
    issuer = FakeIssuer()
    settings = Settings(
        identity=IdentitySettings(mfa_acr_values=["urn:mfa"]),
        api=ApiSettings(
            rate_limit_per_address="100000/minute", rate_limit_per_principal="100000/minute"
        ),
        access=AccessSettings(break_glass_minutes=60, break_glass_overdue_hours=24),
    )
    # What open_service will do: build break-glass, mount its routers, keep it on app.state.
    wiring = wire_break_glass(
        settings,
        engine=store.engine,
        ciphers=ring,
        policy=policy,
        clock=clock,
        log_stream=log,
        extra_sinks=[alerts],
    )
    app = create_app(
        settings,
        audit_sink=sink,
        key_sources={issuer.issuer: issuer.key_source()},
        routers=[
            *wiring.routers,
            MountedRouter(fhir_router(default_count=50, max_bundle_entries=100), FHIR_PREFIX),
        ],
        state={"records": repository, "break_glass": wiring.service},
        clock=clock,
        on_shutdown=wiring.on_shutdown,
    )

    # And the FHIR router's caller construction: the caller's grants in its access context.
    async def caller_with_grants(
        request: Request, principal: CurrentPrincipal, audit: AuditCtx
    ) -> Caller:
        return Caller(await access_context_with_grants(request, principal), audit)

    app.dependency_overrides[_caller] = caller_with_grants
    return Parts(app, issuer, sink, clock, alerts, log, store, keystore)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    parts = await build(tmp_path)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=parts.app), base_url="http://testserver"
    )
    try:
        async with client:
            created = await client.post(
                "/fhir/Patient", content=json.dumps(PATIENT), headers=parts.loader()
            )
            assert created.status_code == 201, created.text
            yield World(
                client,
                parts.issuer,
                parts.sink,
                parts.clock,
                parts.alerts,
                parts.log,
                parts.store,
                created.json()["id"],
            )
    finally:
        parts.close()


async def test_granting_needs_a_recent_mfa(world: World) -> None:
    response = await world.break_glass(world.er_doctor(mfa=False))
    assert response.status_code == 401
    assert "insufficient_user_authentication" in response.headers.get("www-authenticate", "")
    assert response.json()["resourceType"] == "OperationOutcome"
    assert world.events("grant") == []


async def test_grant_then_read_as_etreat_with_the_grant_in_the_ledger(world: World) -> None:
    before = await world.read_patient(world.er_doctor())
    assert before.status_code == 404
    unseen = await world.client.get(
        "/fhir/Patient", params={"_id": world.patient_id}, headers=world.er_doctor()
    )
    assert unseen.status_code == 200 and unseen.json().get("entry", []) == []

    granted = await world.break_glass(world.er_doctor())
    assert granted.status_code == 200, granted.text
    assert granted.headers["content-type"].startswith(FHIR_JSON)
    params = {p["name"]: p for p in granted.json()["parameter"]}
    grant_id = params["grant"]["valueId"]
    assert params["expires"]["valueInstant"] == "2027-01-15T09:00:00.000Z"
    assert params["status"]["valueCode"] == "active"
    assert SECRET_TEXT not in granted.text

    [grant_event] = world.events("grant")
    assert grant_event.break_glass_grant == grant_id
    assert grant_event.outcome is Outcome.SUCCESS
    assert grant_event.patient == f"Patient/{world.patient_id}"
    assert SECRET_TEXT not in grant_event.model_dump_json()

    read = await world.read_patient(world.er_doctor())
    assert read.status_code == 200, read.text
    assert read.json()["name"][0]["family"] == "Quackenbush"
    reads = [e for e in world.sink.events if e.kind is EventKind.REST and e.subtype == "read"]
    assert reads[-1].break_glass_grant == grant_id
    assert "ETREAT" in reads[-1].purpose_of_use

    # Searches are scoped by the grant too (in the query), and only for this patient.
    found = await world.client.get(
        "/fhir/Patient", params={"_id": world.patient_id}, headers=world.er_doctor()
    )
    assert found.status_code == 200, found.text
    assert [e["resource"]["id"] for e in found.json().get("entry", [])] == [world.patient_id]

    # The grant is the caller's only: another clinician still sees nothing.
    other = await world.read_patient(world.er_doctor(sub="dr-other"))
    assert other.status_code == 404


async def test_expiry_on_the_server_clock_stops_access_even_with_a_valid_token(
    world: World,
) -> None:
    granted = await world.break_glass(world.er_doctor())
    assert granted.status_code == 200
    world.clock.t += 59 * 60
    assert (await world.read_patient(world.er_doctor())).status_code == 200
    world.clock.t += 61  # past the hour; the token below is freshly minted and valid
    assert (await world.read_patient(world.er_doctor())).status_code == 404
    reads = [e for e in world.sink.events if e.kind is EventKind.REST]
    assert reads[-1].outcome_reason == "break-glass-expired"


async def test_revocation_stops_access(world: World) -> None:
    granted = await world.break_glass(world.er_doctor())
    grant_id = _grant_id(granted)
    assert (await world.read_patient(world.er_doctor())).status_code == 200

    # Someone else's grant is not found; the grantee may end their own.
    stranger = await world.client.post(
        f"/fhir/Patient/{world.patient_id}/$break-glass/{grant_id}/$revoke",
        headers=world.er_doctor(sub="dr-other"),
    )
    assert stranger.status_code == 404
    revoked = await world.client.post(
        f"/fhir/Patient/{world.patient_id}/$break-glass/{grant_id}/$revoke",
        headers=world.er_doctor(),
    )
    assert revoked.status_code == 200, revoked.text
    assert [e.break_glass_grant for e in world.events("revoke")] == [grant_id]
    assert (await world.read_patient(world.er_doctor())).status_code == 404
    again = await world.client.post(
        f"/fhir/Patient/{world.patient_id}/$break-glass/{grant_id}/$revoke",
        headers=world.er_doctor(),
    )
    assert again.status_code == 409
    assert [a["event"] for a in world.alerts.alerts] == ["granted", "revoked"]


async def test_review_queue_overdue_and_review(world: World) -> None:
    first = _grant_id(await world.break_glass(world.er_doctor()))
    world.clock.t += 25 * 3600
    second = _grant_id(await world.break_glass(world.er_doctor(), reason="urgent-consult"))
    po = world.privacy_officer()

    queue = await world.client.get("/admin/break-glass?status=unreviewed", headers=po)
    assert queue.status_code == 200, queue.text
    grants = queue.json()["grants"]
    assert [g["grant"] for g in grants] == [second, first]
    assert {g["grant"]: g["review_status"] for g in grants} == {
        first: "overdue",
        second: "unreviewed",
    }
    assert SECRET_TEXT not in queue.text
    overdue = await world.client.get("/admin/break-glass?status=overdue", headers=po)
    assert [g["grant"] for g in overdue.json()["grants"]] == [first]

    detail = await world.client.get(f"/admin/break-glass/{first}", headers=po)
    assert detail.status_code == 200
    assert detail.json()["justification"] == SECRET_TEXT
    assert world.events("read")[-1].break_glass_grant == first

    review = await world.client.post(
        f"/admin/break-glass/{first}/review",
        content=json.dumps({"outcome": "appropriate", "note": "checked with the ED lead"}),
        headers=po,
    )
    assert review.status_code == 200, review.text
    body = review.json()
    assert body["review_status"] == "reviewed" and body["review_outcome"] == "appropriate"
    assert body["review_note"] == "checked with the ED lead"
    [review_event] = world.events("review")
    assert review_event.break_glass_grant == first
    assert "checked" not in review_event.model_dump_json()

    twice = await world.client.post(
        f"/admin/break-glass/{first}/review",
        content=json.dumps({"outcome": "inappropriate"}),
        headers=po,
    )
    assert twice.status_code == 409
    left = await world.client.get("/admin/break-glass?status=unreviewed", headers=po)
    assert [g["grant"] for g in left.json()["grants"]] == [second]
    done = await world.client.get("/admin/break-glass?status=reviewed", headers=po)
    assert [g["grant"] for g in done.json()["grants"]] == [first]


async def test_privacy_officers_only(world: World) -> None:
    grant_id = _grant_id(await world.break_glass(world.er_doctor()))
    for headers in (world.er_doctor(), world.nurse()):
        queue = await world.client.get("/admin/break-glass", headers=headers)
        assert queue.status_code == 403
        assert queue.json()["resourceType"] == "OperationOutcome"
        review = await world.client.post(
            f"/admin/break-glass/{grant_id}/review",
            content=json.dumps({"outcome": "appropriate"}),
            headers=headers,
        )
        assert review.status_code == 403
    refused = [e for e in world.sink.events if e.outcome is not Outcome.SUCCESS]
    assert {e.outcome_reason for e in refused} == {"not-privacy-officer"}


async def test_only_break_glass_roles_may_ask(world: World) -> None:
    for headers in (world.nurse(), world.privacy_officer()):
        response = await world.break_glass(headers)
        assert response.status_code == 403
    [*refusals] = world.events("grant")
    assert {e.outcome_reason for e in refusals} == {"role-not-permitted"}
    assert world.alerts.alerts == []


async def test_the_alert_is_phi_free(world: World) -> None:
    grant_id = _grant_id(await world.break_glass(world.er_doctor()))
    [alert] = world.alerts.alerts
    assert alert["grant"] == grant_id and alert["user"] == "dr-er"
    assert alert["reason"] == "emergency-treatment"
    text = json.dumps(alert) + world.log.getvalue()
    for phi in (SECRET_TEXT, "Quackenbush", "Zebulon", "1970-04-01", world.patient_id):
        assert phi not in text
    assert grant_id in world.log.getvalue()


async def test_unknown_patient_is_404_and_recorded(world: World) -> None:
    response = await world.client.post(
        "/fhir/Patient/no-such-patient/$break-glass",
        content=json.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "reason", "valueCode": "emergency-treatment"},
                    {"name": "justification", "valueString": "x"},
                ],
            }
        ),
        headers=world.er_doctor(),
    )
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"
    assert [e.outcome_reason for e in world.events("grant")] == ["patient-not-found"]


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all Quackenbush",
        b'{"resourceType": "Patient", "name": "Quackenbush"}',
        json.dumps({"resourceType": "Parameters", "parameter": "Quackenbush"}).encode(),
        json.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "reason", "valueCode": "Quackenbush"},
                    {"name": "justification", "valueString": "Quackenbush fell"},
                ],
            }
        ).encode(),
        json.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "reason", "valueCode": "emergency-treatment"},
                    {"name": "justification", "valueString": "   "},
                ],
            }
        ).encode(),
        json.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [{"name": "Quackenbush", "valueString": "Quackenbush"}],
            }
        ).encode(),
        json.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "reason", "valueCode": "emergency-treatment"},
                    {"name": "justification", "valueString": "Quackenbush " * 400},
                ],
            }
        ).encode(),
    ],
)
async def test_bad_input_is_an_operation_outcome_without_echo(world: World, body: bytes) -> None:
    response = await world.client.post(
        f"/fhir/Patient/{world.patient_id}/$break-glass",
        content=body,
        headers=world.er_doctor(),
    )
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert "Quackenbush" not in response.text
    assert world.events("grant") == []
    review = await world.client.post(
        "/admin/break-glass/bg-x/review",
        content=json.dumps({"outcome": "Quackenbush"}),
        headers=world.privacy_officer(),
    )
    assert review.status_code == 400
    assert "Quackenbush" not in review.text


async def test_a_phi_shaped_patient_id_is_refused_without_echo(world: World) -> None:
    response = await world.client.post(
        "/fhir/Patient/555-12-3456/$break-glass",
        content=json.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "reason", "valueCode": "emergency-treatment"},
                    {"name": "justification", "valueString": "unconscious in the ED"},
                ],
            }
        ),
        headers=world.er_doctor(),
    )
    assert response.status_code == 400, response.text
    assert "555-12-3456" not in response.text
    assert world.events() == []


async def test_the_ledger_refusing_the_grant_event_leaves_no_grant(world: World) -> None:
    world.sink.failing = True
    response = await world.break_glass(world.er_doctor())
    assert response.status_code == 503
    world.sink.failing = False
    assert (await world.read_patient(world.er_doctor())).status_code == 404
    with world.store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM bg_grants").scalar_one() == 0
    assert world.alerts.alerts == []


def test_the_review_cli_against_a_live_server(tmp_path: Path) -> None:
    """``phivault breakglass list|review`` over real HTTP against uvicorn serving the app."""
    parts = asyncio.run(build(tmp_path))
    try:
        with serve_app(parts.app) as url, httpx.Client(base_url=url) as http:
            created = http.post(
                "/fhir/Patient", content=json.dumps(PATIENT), headers=parts.loader()
            )
            assert created.status_code == 201, created.text
            doctor = parts.issuer.token(
                now=parts.clock.t,
                sub="dr-er",
                roles=["clinician"],
                scope="openid fhirUser user/*.rs",
                fhirUser="Practitioner/er-1",
                amr=["pwd", "otp"],
                acr="urn:mfa",
            )
            granted = http.post(
                f"/fhir/Patient/{created.json()['id']}/$break-glass",
                content=json.dumps(
                    {
                        "resourceType": "Parameters",
                        "parameter": [
                            {"name": "reason", "valueCode": "covering-clinician"},
                            {"name": "justification", "valueString": SECRET_TEXT},
                        ],
                    }
                ),
                headers={"Authorization": f"Bearer {doctor}", "Content-Type": FHIR_JSON},
            )
            assert granted.status_code == 200, granted.text
            grant_id = _grant_id(granted)
            po = parts.issuer.token(
                now=parts.clock.t,
                sub="po-1",
                roles=["privacy-officer"],
                scope="openid",
                fhirUser=None,
                amr=["pwd", "otp"],
                acr="urn:mfa",
            )
            runner = CliRunner()
            env = {"PHIVAULT_URL": url, "PHIVAULT_TOKEN": po}
            listed = runner.invoke(cli_app, ["breakglass", "list", "--json"], env=env)
            assert listed.exit_code == 0, listed.output
            assert [g["grant"] for g in json.loads(listed.stdout)["grants"]] == [grant_id]
            assert SECRET_TEXT not in listed.stdout
            reviewed = runner.invoke(
                cli_app,
                ["breakglass", "review", grant_id, "--outcome", "inappropriate", "--json"],
                env=env,
            )
            assert reviewed.exit_code == 0, reviewed.output
            assert json.loads(reviewed.stdout)["review_outcome"] == "inappropriate"
            empty = runner.invoke(cli_app, ["breakglass", "list"], env=env)
            assert empty.exit_code == 0 and "no unreviewed" in empty.stdout
            refused = runner.invoke(
                cli_app, ["breakglass", "list"], env={**env, "PHIVAULT_TOKEN": doctor}
            )
            assert refused.exit_code == 1
        kinds = [
            (e.subtype, e.outcome) for e in parts.sink.events if e.kind is EventKind.BREAK_GLASS
        ]
        assert ("review", Outcome.SUCCESS) in kinds and ("queue", Outcome.MINOR_FAILURE) in kinds
    finally:
        parts.close()


async def test_open_service_wires_break_glass(tmp_path: Path) -> None:
    """``phivault serve``'s composition: grant, read under it, queue, after the wiring lands."""
    from phivault.api.serve import open_service
    from phivault.datadir import DataDir
    from phivault.initialize import initialize_data_dir

    init = initialize_data_dir(tmp_path / "data", dev=False, threshold=2, shares=3)
    data_dir = DataDir.open(tmp_path / "data")
    issuer = FakeIssuer()
    settings = Settings(identity=IdentitySettings(mfa_acr_values=["urn:mfa"]))
    async with (
        open_service(
            settings,
            data_dir,
            key_sources={issuer.issuer: issuer.key_source()},
            unseal_shares=init.keystore.shares[:2],
        ) as app,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as http,
    ):
        loader = issuer.token(
            sub="loader",
            roles=["service"],
            scope="system/*.cruds",
            purpose_of_use=["HOPERAT"],
            fhirUser=None,
        )
        created = await http.post(
            "/fhir/Patient",
            content=json.dumps(PATIENT),
            headers={"Authorization": f"Bearer {loader}", "Content-Type": FHIR_JSON},
        )
        assert created.status_code == 201, created.text
        patient_id = created.json()["id"]
        doctor = {
            "Authorization": "Bearer "
            + issuer.token(
                sub="dr-er",
                roles=["clinician"],
                scope="openid fhirUser user/*.rs",
                fhirUser="Practitioner/er-1",
                amr=["pwd", "otp"],
                acr="urn:mfa",
            ),
            "Content-Type": FHIR_JSON,
        }
        assert (await http.get(f"/fhir/Patient/{patient_id}", headers=doctor)).status_code == 404
        granted = await http.post(
            f"/fhir/Patient/{patient_id}/$break-glass",
            content=json.dumps(
                {
                    "resourceType": "Parameters",
                    "parameter": [
                        {"name": "reason", "valueCode": "emergency-treatment"},
                        {"name": "justification", "valueString": SECRET_TEXT},
                    ],
                }
            ),
            headers=doctor,
        )
        assert granted.status_code == 200, granted.text
        read = await http.get(f"/fhir/Patient/{patient_id}", headers=doctor)
        assert read.status_code == 200, read.text
        po = issuer.token(
            sub="po-1",
            roles=["privacy-officer"],
            scope="openid",
            fhirUser=None,
            amr=["pwd", "otp"],
            acr="urn:mfa",
        )
        queue = await http.get("/admin/break-glass", headers={"Authorization": f"Bearer {po}"})
        assert [g["grant"] for g in queue.json()["grants"]] == [_grant_id(granted)]
