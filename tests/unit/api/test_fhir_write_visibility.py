"""Writes are not an existence oracle (DESIGN.md invariant 2, issue 6): a PUT, DELETE,
If-Match, transaction or batch entry naming a resource the caller may neither read nor so
change answers exactly as the same request naming an id nobody ever used -- status,
OperationOutcome, headers -- and writes nothing; the ledger alone records what was refused
and whose record it was. docs/decisions/records-write-visibility.md."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir_harness import Fhir, observation, open_fhir, patient
from write_visibility_support import Clinic, answer, body_for, build_clinic, deleting_clinicians

from phivault.ledger.events import Outcome

UNUSED = "never-used-1"


@pytest.fixture
async def fhir(tmp_path: Path) -> AsyncIterator[Fhir]:
    async with open_fhir(tmp_path) as h:
        yield h


@pytest.fixture
async def clinic(fhir: Fhir) -> Clinic:
    return await build_clinic(fhir)


def doctor(fhir: Fhir, clinic: Clinic, label: str = "dr1", **extra: str) -> dict[str, str]:
    """A clinician whose token may write (``user/*.cruds``), treating."""
    token = fhir.token(
        sub=f"dr-{label}",
        roles=["clinician"],
        scope="openid fhirUser user/*.cruds",
        fhirUser=f"Practitioner/{clinic.doctors[label]}",
        purpose_of_use=["TREAT"],
    )
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json", **extra}


async def both(
    fhir: Fhir, method: str, url: str, target: str, headers: dict[str, str], body: Any = None
) -> tuple[httpx.Response, httpx.Response]:
    """The request naming ``target``, then the same request naming :data:`UNUSED` instead;
    asserts that nothing was written by either."""
    rows = fhir.row_count()
    responses = []
    for the_id in (target, UNUSED):
        content = None if body is None else json.dumps(body).replace(target, the_id)
        responses.append(
            await fhir.client.request(
                method, url.replace(target, the_id), content=content, headers=headers
            )
        )
    assert fhir.row_count() == rows, "a refused write changed the store"
    return responses[0], responses[1]


def assert_alike(
    seen: tuple[httpx.Response, httpx.Response], target: str, status: int
) -> dict[str, Any]:
    hidden, unused = seen
    assert hidden.status_code == status, hidden.text
    assert answer(hidden, target) == answer(unused, UNUSED)
    return dict(hidden.json()) if hidden.content else {}


def refusals(fhir: Fhir, since: int) -> list[tuple[str | None, str | None]]:
    return [
        (e.patient, e.outcome_reason)
        for e in fhir.sink.events[since:]
        if e.outcome is not Outcome.SUCCESS
    ]


async def test_put_moving_an_unseen_record_is_404_like_an_unused_id(
    fhir: Fhir, clinic: Clinic
) -> None:
    # The old oracle: dr1 may write p1's Observations; o-p2 (p2's, whom dr1 does not care
    # for) answered 403 "moving a record to another patient", an unused id 201.
    o2 = clinic.targets["o-p2"].id
    since = len(fhir.sink.events)
    seen = await both(
        fhir,
        "PUT",
        f"/fhir/Observation/{o2}",
        o2,
        doctor(fhir, clinic),
        body_for(clinic, "Observation", o2, "p1"),
    )
    outcome = assert_alike(seen, o2, 404)
    assert outcome["issue"][0]["code"] == "not-found"
    # The ledger knows: a refusal on p2's record, then an update of nothing.
    assert refusals(fhir, since) == [
        (f"Patient/{clinic.patients['p2']}", "no-relationship"),
        (None, "not-found"),
    ]
    # o-p2 is untouched (dr2 cares for p2 and sees version 2).
    read = await fhir.client.get(f"/fhir/Observation/{o2}", headers=doctor(fhir, clinic, "dr2"))
    assert read.json()["meta"]["versionId"] == "2"


async def test_if_match_tells_nothing_about_an_unseen_version(fhir: Fhir, clinic: Clinic) -> None:
    o2 = clinic.targets["o-p2"].id
    for version in ("2", "1", "3"):  # the right one, a past one, a future one
        seen = await both(
            fhir,
            "PUT",
            f"/fhir/Observation/{o2}",
            o2,
            doctor(fhir, clinic, **{"If-Match": f'W/"{version}"'}),
            body_for(clinic, "Observation", o2, "p2"),
        )
        assert assert_alike(seen, o2, 412)["issue"][0]["code"] == "conflict"


async def test_delete_of_an_unseen_resource_is_nothing_to_delete(
    fhir: Fhir, clinic: Clinic
) -> None:
    fhir.use_policy(deleting_clinicians())
    o2 = clinic.targets["o-p2"].id
    url = f"/fhir/Observation/{o2}"
    assert_alike(await both(fhir, "DELETE", url, o2, doctor(fhir, clinic)), o2, 204)
    prefer = doctor(fhir, clinic, Prefer="return=OperationOutcome")
    assert_alike(await both(fhir, "DELETE", url, o2, prefer), o2, 200)
    # ... and nothing was deleted; a resource the caller may delete still is.
    dr2 = doctor(fhir, clinic, "dr2")
    assert (await fhir.client.get(url, headers=dr2)).status_code == 200
    mine = f"/fhir/Observation/{clinic.targets['o-p1'].id}"
    deleted = await fhir.client.delete(mine, headers=doctor(fhir, clinic))
    assert (deleted.status_code, deleted.headers["etag"]) == (204, 'W/"2"')


async def test_an_unseen_tombstone_is_an_unused_id(fhir: Fhir, clinic: Clinic) -> None:
    fhir.use_policy(deleting_clinicians())
    gone = clinic.targets["gone-p3"].id
    url = f"/fhir/Observation/{gone}"
    body = body_for(clinic, "Observation", gone, "p1")
    assert_alike(await both(fhir, "PUT", url, gone, doctor(fhir, clinic), body), gone, 404)
    assert_alike(await both(fhir, "DELETE", url, gone, doctor(fhir, clinic)), gone, 204)
    # The loader sees (may write) every Observation: it re-creates it, as version 3.
    revived = await fhir.client.put(url, content=json.dumps(body), headers=fhir.service())
    assert revived.status_code == 201, revived.text
    assert revived.json()["meta"]["versionId"] == "3"


async def test_transaction_and_batch_entries_name_nothing_unseen(
    fhir: Fhir, clinic: Clinic
) -> None:
    fhir.use_policy(deleting_clinicians())
    o2 = clinic.targets["o-p2"].id
    put = {
        "resource": body_for(clinic, "Observation", o2, "p1"),
        "request": {"method": "PUT", "url": f"Observation/{o2}"},
    }
    if_match = {**put, "request": {**put["request"], "ifMatch": 'W/"2"'}}
    delete = {"request": {"method": "DELETE", "url": f"Observation/{o2}"}}
    expected = {
        ("transaction", "put"): 404,
        ("transaction", "if-match"): 412,
        ("transaction", "delete"): 200,
        ("batch", "put"): 200,
        ("batch", "if-match"): 200,
        ("batch", "delete"): 200,
    }
    for (kind, name), status in expected.items():
        entry = {"put": put, "if-match": if_match, "delete": delete}[name]
        bundle = {"resourceType": "Bundle", "type": kind, "entry": [entry]}
        seen = await both(fhir, "POST", "/fhir", o2, doctor(fhir, clinic), bundle)
        body = assert_alike(seen, o2, status)
        if kind == "batch":
            statuses = {"put": "404", "if-match": "412", "delete": "204"}
            assert body["entry"][0]["response"]["status"].startswith(statuses[name])


async def test_conditional_lookups_do_not_find_unseen_resources(fhir: Fhir, clinic: Clinic) -> None:
    o2 = clinic.targets["o-p2"].id
    p1 = clinic.patients["p1"]
    dr1 = doctor(fhir, clinic)
    # A conditional reference to p2 (unseen) fails like one to nobody.
    mrn = "Patient?identifier=urn:mrn|mrn-p2"
    entry = {
        "fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001",
        "resource": {**observation(p1), "subject": {"reference": mrn}},
        "request": {"method": "POST", "url": "Observation"},
    }
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    seen = await both(fhir, "POST", "/fhir", "mrn-p2", dr1, bundle)
    assert assert_alike(seen, "mrn-p2", 400)["issue"][0]["expression"] == [
        "Bundle.entry[0].resource.subject.reference"
    ]
    # If-None-Exist matching only an unseen resource creates, as matching nothing does.
    for criteria in (f"_id={o2}", f"_id={UNUSED}"):
        created = await fhir.create(observation(p1), dr1, **{"If-None-Exist": criteria})
        assert created.status_code == 201, created.text
        assert created.json()["id"] not in (o2, UNUSED)
    # A conditional update matching only an unseen resource: with an id in the body it is
    # update-as-create of that id (404 for this caller either way), without one a create.
    body = body_for(clinic, "Observation", o2, "p1")
    seen = await both(fhir, "PUT", f"/fhir/Observation?_id={o2}", o2, dr1, body)
    assert_alike(seen, o2, 404)
    anonymous = {k: v for k, v in body.items() if k != "id"}
    created = await fhir.client.put(
        f"/fhir/Observation?_id={o2}", content=json.dumps(anonymous), headers=dr1
    )
    assert created.status_code == 201, created.text
    assert created.json()["id"] != o2


async def test_update_as_create_only_for_callers_who_see_the_whole_type(
    fhir: Fhir, clinic: Clinic
) -> None:
    p1 = clinic.patients["p1"]
    cases = [
        (fhir.service(), "Observation", observation(p1, id="new-obs-1"), 201),  # the loader
        (fhir.service(), "Organization", body_for(clinic, "Organization", "new-org", "p1"), 201),
        (fhir.admin(), "Organization", body_for(clinic, "Organization", "new-org-2", "p1"), 201),
        # a clinician sees only their patients' records: PUT updates, POST creates
        (doctor(fhir, clinic), "Observation", observation(p1, id="new-obs-2"), 404),
    ]
    for headers, kind, body, status in cases:
        response = await fhir.client.put(
            f"/fhir/{kind}/{body['id']}", content=json.dumps(body), headers=headers
        )
        assert response.status_code == status, (kind, response.text)
    # front desk: every Patient of the tenant
    desk = fhir.token(sub="desk-1", roles=["front-desk"], scope="user/Patient.cruds", fhirUser=None)
    desk_headers = {"Authorization": f"Bearer {desk}", "Content-Type": "application/fhir+json"}
    response = await fhir.client.put(
        "/fhir/Patient/new-patient",
        content=json.dumps(patient(id="new-patient")),
        headers=desk_headers,
    )
    assert response.status_code == 201, response.text
    # a visible resource is updated as before
    o1 = clinic.targets["o-p1"].id
    updated = await fhir.client.put(
        f"/fhir/Observation/{o1}",
        content=json.dumps(observation(p1, id=o1, status="amended")),
        headers=doctor(fhir, clinic, **{"If-Match": 'W/"1"'}),
    )
    assert updated.status_code == 200, updated.text


async def test_no_write_right_on_the_type_is_403_before_looking(fhir: Fhir, clinic: Clinic) -> None:
    o2 = clinic.targets["o-p2"].id
    body = body_for(clinic, "Observation", o2, "p2")
    as_patient = fhir.patient(clinic.patients["p2"])
    for method, payload in (("PUT", body), ("DELETE", None)):
        seen = await both(fhir, method, f"/fhir/Observation/{o2}", o2, as_patient, payload)
        assert assert_alike(seen, o2, 403)["issue"][0]["code"] == "forbidden"


async def test_a_failing_ledger_answers_alike(fhir: Fhir, clinic: Clinic) -> None:
    """Both cases record one event first, so a ledger that refuses fails both (503)."""
    fhir.use_policy(deleting_clinicians())
    o2 = clinic.targets["o-p2"].id
    fhir.sink.failing = True
    body = body_for(clinic, "Observation", o2, "p1")
    url = f"/fhir/Observation/{o2}"
    assert_alike(await both(fhir, "PUT", url, o2, doctor(fhir, clinic), body), o2, 503)
    assert_alike(await both(fhir, "DELETE", url, o2, doctor(fhir, clinic)), o2, 503)
