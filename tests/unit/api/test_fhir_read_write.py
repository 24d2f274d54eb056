"""Conformance of the instance interactions over the real records stack: create (with
If-None-Exist), read, vread, update (If-Match, update-as-create), conditional update, delete,
and their error paths. Each error is an OperationOutcome naming the element, never a value."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir_harness import FHIR_JSON, MAX_BODY, Fhir, observation, open_fhir, organization, patient

SECRET = "Quackenbush"


@pytest.fixture
async def fhir(tmp_path: Path) -> AsyncIterator[Fhir]:
    async with open_fhir(tmp_path) as h:
        yield h


def issue(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    first: dict[str, Any] = body["issue"][0]
    assert SECRET not in response.text
    return first


async def test_create_then_read_by_the_patient(fhir: Fhir) -> None:
    response = await fhir.create(patient())
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body = response.json()
    pid = body["id"]
    assert body["meta"]["versionId"] == "1"
    assert "lastUpdated" in body["meta"]
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["location"] == f"http://testserver/fhir/Patient/{pid}/_history/1"
    assert response.headers["last-modified"].endswith(" GMT")
    read = await fhir.client.get(f"/fhir/Patient/{pid}", headers=fhir.patient(pid))
    assert read.status_code == 200, read.text
    assert read.json()["name"] == [{"family": "Quackenbush", "given": ["Zebulon"]}]
    assert read.json()["meta"] == body["meta"]
    assert read.headers["etag"] == 'W/"1"'
    assert read.headers["last-modified"] == response.headers["last-modified"]


async def test_a_caller_who_may_not_read_gets_404_not_403(fhir: Fhir) -> None:
    pid = (await fhir.created(patient()))["id"]
    other = (await fhir.created(patient("Other")))["id"]
    # The loader writes but never reads PHI back; another patient sees nothing of this one.
    for headers in (fhir.service(), fhir.patient(other)):
        response = await fhir.client.get(f"/fhir/Patient/{pid}", headers=headers)
        assert response.status_code == 404
        assert issue(response)["code"] == "not-found"


async def test_create_ignores_a_client_id(fhir: Fhir) -> None:
    body = await fhir.created(patient(id="chosen-by-client"))
    assert body["id"] != "chosen-by-client"


async def test_if_none_exist_returns_the_existing_resource(fhir: Fhir) -> None:
    first = await fhir.created(organization())
    again = await fhir.create(organization(), **{"If-None-Exist": "identifier=urn:org|acme-clinic"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first["id"]
    assert "location" not in again.headers
    other = await fhir.create(organization(), **{"If-None-Exist": "identifier=urn:org|nobody"})
    assert other.status_code == 201


async def test_prefer_return(fhir: Fhir) -> None:
    minimal = await fhir.create(patient(), Prefer="return=minimal")
    assert minimal.status_code == 201
    assert minimal.content == b""
    assert minimal.headers["location"].startswith("http://testserver/fhir/Patient/")
    outcome = await fhir.create(patient(), Prefer="return=OperationOutcome")
    assert outcome.status_code == 201
    assert outcome.json()["resourceType"] == "OperationOutcome"
    assert outcome.json()["issue"][0]["severity"] == "information"


async def test_vread_and_update_with_if_match(fhir: Fhir) -> None:
    org = await fhir.created(organization())
    oid = org["id"]
    org["name"] = "Acme Clinic North"
    url = f"/fhir/Organization/{oid}"
    updated = await fhir.client.put(
        url, content=json.dumps(org), headers=fhir.service(**{"If-Match": 'W/"1"'})
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["meta"]["versionId"] == "2"
    assert updated.headers["etag"] == 'W/"2"'
    assert updated.headers["location"] == f"http://testserver{url}/_history/2"
    # A stale If-Match: 412, nothing written.
    stale = await fhir.client.put(
        url, content=json.dumps(org), headers=fhir.service(**{"If-Match": 'W/"1"'})
    )
    assert stale.status_code == 412
    assert issue(stale)["code"] == "conflict"
    # (vread is the directory keeper's: the loader may read the current version only)
    v1 = await fhir.client.get(f"{url}/_history/1", headers=fhir.admin())
    v2 = await fhir.client.get(f"{url}/_history/2", headers=fhir.admin())
    assert (v1.status_code, v2.status_code) == (200, 200)
    assert v1.json()["name"] == "Acme Clinic"
    assert v1.headers["etag"] == 'W/"1"'
    assert v2.json()["name"] == "Acme Clinic North"
    current = await fhir.client.get(url, headers=fhir.service())
    assert current.json()["meta"]["versionId"] == "2"
    missing = await fhir.client.get(f"{url}/_history/9", headers=fhir.admin())
    assert missing.status_code == 404
    junk = await fhir.client.get(f"{url}/_history/x", headers=fhir.admin())
    assert junk.status_code == 404


async def test_malformed_if_match_is_400(fhir: Fhir) -> None:
    org = await fhir.created(organization())
    response = await fhir.client.put(
        f"/fhir/Organization/{org['id']}",
        content=json.dumps(org),
        headers=fhir.service(**{"If-Match": "version one"}),
    )
    assert response.status_code == 400
    assert issue(response)["expression"] == ["If-Match"]


async def test_update_as_create(fhir: Fhir) -> None:
    response = await fhir.client.put(
        "/fhir/Organization/org-chosen",
        content=json.dumps(organization(id="org-chosen")),
        headers=fhir.service(),
    )
    assert response.status_code == 201, response.text
    assert response.json()["id"] == "org-chosen"
    assert response.headers["location"].endswith("/fhir/Organization/org-chosen/_history/1")


async def test_update_body_must_agree_with_the_url(fhir: Fhir) -> None:
    org = await fhir.created(organization())
    url = f"/fhir/Organization/{org['id']}"
    cases = [
        ({**org, "id": "someone-else"}, "id"),
        ({k: v for k, v in org.items() if k != "id"}, "id"),
        ({**org, "resourceType": "Location"}, "resourceType"),
    ]
    for body, where in cases:
        response = await fhir.client.put(url, content=json.dumps(body), headers=fhir.service())
        assert response.status_code == 400, body
        assert issue(response)["expression"] == [where]


async def test_wrong_type_in_the_url_is_400(fhir: Fhir) -> None:
    response = await fhir.client.post(
        "/fhir/Observation", content=json.dumps(patient()), headers=fhir.service()
    )
    assert response.status_code == 400
    assert issue(response)["expression"] == ["resourceType"]


async def test_unknown_type_is_404(fhir: Fhir) -> None:
    for method, url in (
        ("GET", "/fhir/Quackenbush/1"),
        ("GET", "/fhir/Basic"),
        ("POST", "/fhir/Basic"),
        ("GET", "/fhir/patient/1"),
        ("DELETE", "/fhir/Basic/1"),
        ("GET", "/fhir/Basic/_history"),
    ):
        body = json.dumps({"resourceType": "Basic"}) if method == "POST" else None
        response = await fhir.client.request(method, url, content=body, headers=fhir.service())
        assert response.status_code == 404, (method, url)
        assert issue(response)["code"] == "not-found"


async def test_malformed_bodies_are_400(fhir: Fhir) -> None:
    for content in (b'{"resourceType": "Patient", "name": [', b"[1, 2]", b'"Patient"', b"  "):
        response = await fhir.client.post("/fhir/Patient", content=content, headers=fhir.service())
        assert response.status_code == 400, content
        issue(response)


async def test_an_element_phivault_cannot_classify_is_refused_with_its_path(fhir: Fhir) -> None:
    response = await fhir.create(patient(favouriteColour=SECRET))
    assert response.status_code == 422, response.text
    assert issue(response)["expression"] == ["Patient.favouriteColour"]


async def test_a_malformed_id_in_the_url_is_400(fhir: Fhir) -> None:
    response = await fhir.client.get("/fhir/Patient/a b", headers=fhir.service())
    assert response.status_code == 400
    assert issue(response)["expression"] == ["id"]


async def test_an_id_shaped_like_personal_data_is_400(fhir: Fhir) -> None:
    # Ids go into audit events and logs: one that looks like an SSN is refused, not stored.
    ssn = "123-45-6789"
    put = await fhir.client.put(
        f"/fhir/Organization/{ssn}",
        content=json.dumps(organization(id=ssn)),
        headers=fhir.service(),
    )
    assert put.status_code == 400
    assert issue(put)["expression"] == ["id"]
    assert ssn not in put.text
    read = await fhir.client.get(f"/fhir/Organization/{ssn}", headers=fhir.service())
    assert read.status_code == 400


async def test_oversized_body_is_413(fhir: Fhir) -> None:
    big = patient(text={"status": "generated", "div": "<div>" + "x" * MAX_BODY + "</div>"})
    response = await fhir.create(big)
    assert response.status_code == 413
    assert issue(response)["code"] == "too-costly"


async def test_content_type_and_format(fhir: Fhir) -> None:
    response = await fhir.client.post(
        "/fhir/Patient",
        content=json.dumps(patient()),
        headers=fhir.service(**{"Content-Type": "application/xml"}),
    )
    assert response.status_code == 415
    xml = await fhir.client.get("/fhir/Patient/x?_format=xml", headers=fhir.service())
    assert xml.status_code == 406
    assert issue(xml)["expression"] == ["_format"]
    only_xml = await fhir.client.get(
        "/fhir/metadata", headers={"Accept": "application/fhir+xml, text/html;q=0.5"}
    )
    assert only_xml.status_code == 406
    assert issue(only_xml)["expression"] == ["Accept"]
    for accept in (
        "application/fhir+json",
        "application/json;q=0.9",
        "*/*",
        "text/html, */*;q=0.1",
    ):
        assert (
            await fhir.client.get("/fhir/metadata", headers={"Accept": accept})
        ).status_code == 200
    overridden = await fhir.client.get(
        "/fhir/metadata?_format=json", headers={"Accept": "application/fhir+xml"}
    )
    assert overridden.status_code == 200
    org = await fhir.created(organization())
    pretty = await fhir.client.get(
        f"/fhir/Organization/{org['id']}?_format=json&_pretty=true", headers=fhir.service()
    )
    assert pretty.status_code == 200
    assert pretty.text.startswith("{\n")


async def test_delete_tombstone_then_410(fhir: Fhir) -> None:
    org = await fhir.created(organization())
    url = f"/fhir/Organization/{org['id']}"
    deleted = await fhir.client.delete(url, headers=fhir.admin())
    assert deleted.status_code == 204, deleted.text
    assert deleted.headers["etag"] == 'W/"2"'
    gone = await fhir.client.get(url, headers=fhir.admin())
    assert gone.status_code == 410
    assert issue(gone)["code"] == "deleted"
    # The version before the deletion still reads; the tombstone version is gone.
    v1 = await fhir.client.get(f"{url}/_history/1", headers=fhir.admin())
    assert v1.status_code == 200
    v2 = await fhir.client.get(f"{url}/_history/2", headers=fhir.admin())
    assert v2.status_code == 410
    again = await fhir.client.delete(url, headers=fhir.admin())
    assert again.status_code == 204
    nothing = await fhir.client.delete(
        "/fhir/Organization/never-was", headers=fhir.admin(Prefer="return=OperationOutcome")
    )
    assert nothing.status_code == 200
    assert nothing.json()["resourceType"] == "OperationOutcome"


async def test_deleting_phi_is_refused(fhir: Fhir) -> None:
    pid = (await fhir.created(patient()))["id"]
    response = await fhir.client.delete(f"/fhir/Patient/{pid}", headers=fhir.service())
    assert response.status_code in (403, 404)
    issue(response)
    read = await fhir.client.get(f"/fhir/Patient/{pid}", headers=fhir.patient(pid))
    assert read.status_code == 200


async def test_conditional_update(fhir: Fhir) -> None:
    created = await fhir.client.put(
        "/fhir/Organization?identifier=urn:org|acme-clinic",
        content=json.dumps(organization()),
        headers=fhir.service(),
    )
    assert created.status_code == 201, created.text
    oid = created.json()["id"]
    updated = await fhir.client.put(
        "/fhir/Organization?identifier=urn:org|acme-clinic",
        content=json.dumps(organization(active=True)),
        headers=fhir.service(),
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["id"] == oid
    assert updated.json()["meta"]["versionId"] == "2"
    no_criteria = await fhir.client.put(
        "/fhir/Organization", content=json.dumps(organization()), headers=fhir.service()
    )
    assert no_criteria.status_code == 400
    unknown = await fhir.client.put(
        "/fhir/Organization?colour=blue", content=json.dumps(organization()), headers=fhir.service()
    )
    assert unknown.status_code == 400


async def test_observation_for_a_patient(fhir: Fhir) -> None:
    pid = (await fhir.created(patient()))["id"]
    obs = await fhir.created(observation(pid))
    read = await fhir.client.get(f"/fhir/Observation/{obs['id']}", headers=fhir.patient(pid))
    assert read.status_code == 200, read.text
    assert read.json()["subject"] == {"reference": f"Patient/{pid}"}


async def test_no_token_is_401(fhir: Fhir) -> None:
    response = await fhir.client.get("/fhir/Patient/x")
    assert response.status_code == 401
    assert "www-authenticate" in response.headers


async def test_ledger_down_fails_closed(fhir: Fhir) -> None:
    pid = (await fhir.created(patient()))["id"]
    before = fhir.row_count()
    fhir.sink.failing = True
    read = await fhir.client.get(f"/fhir/Patient/{pid}", headers=fhir.patient(pid))
    assert read.status_code == 503
    assert SECRET not in read.text
    write = await fhir.create(patient())
    assert write.status_code == 503
    assert fhir.row_count() == before
    metadata = await fhir.client.get("/fhir/metadata")
    assert metadata.status_code == 200


async def test_conditions_matching_several_resources_are_412(fhir: Fhir) -> None:
    for _ in range(2):
        await fhir.created(organization("Same"))
    before = fhir.row_count()
    update = await fhir.client.put(
        "/fhir/Organization?identifier=urn:org|same",
        content=json.dumps(organization("Same")),
        headers=fhir.service(),
    )
    assert update.status_code == 412
    assert issue(update)["code"] == "conflict"
    create = await fhir.create(organization("Same"), **{"If-None-Exist": "identifier=urn:org|same"})
    assert create.status_code == 412
    assert issue(create)["expression"] == ["If-None-Exist"]
    assert fhir.row_count() == before
