"""Search (GET and POST _search) and history over HTTP: paging links, _include, _total,
strict and lenient handling of unknown parameters, tombstones in history."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fhir_harness import FHIR_JSON, Fhir, observation, open_fhir, organization, patient


@pytest.fixture
async def fhir(tmp_path: Path) -> AsyncIterator[Fhir]:
    async with open_fhir(tmp_path) as h:
        yield h


def links(bundle: dict[str, Any]) -> dict[str, str]:
    return {link["relation"]: link["url"] for link in bundle["link"]}


def relative(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


async def seeded(fhir: Fhir, observations: int = 5) -> tuple[str, list[str]]:
    pid = (await fhir.created(patient()))["id"]
    await fhir.created(patient("Other"))
    ids = [
        (await fhir.created(observation(pid, effectiveDateTime=f"2024-01-0{i + 1}T00:00:00Z")))[
            "id"
        ]
        for i in range(observations)
    ]
    return pid, ids


async def search(fhir: Fhir, url: str, headers: dict[str, str]) -> dict[str, Any]:
    response = await fhir.client.get(url, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "searchset"
    return body


async def test_paging_follows_next_links_to_the_end(fhir: Fhir) -> None:
    pid, ids = await seeded(fhir)
    headers = fhir.patient(pid)
    url = f"/fhir/Observation?patient={pid}&_count=2&_sort=date"
    seen: list[str] = []
    pages = 0
    while url:
        page = await search(fhir, url, headers)
        pages += 1
        assert "total" not in page
        seen += [entry["resource"]["id"] for entry in page.get("entry", [])]
        assert all(entry["search"]["mode"] == "match" for entry in page.get("entry", []))
        found = links(page)
        assert "self" in found
        url = relative(found["next"]) if "next" in found else ""
        if url:
            query = parse_qs(urlsplit(url).query)
            assert query["_count"] == ["2"]
            assert query["patient"] == [pid]
    assert pages == 3
    assert seen == ids  # sorted by date, each once
    assert pages < 10


async def test_total_accurate(fhir: Fhir) -> None:
    pid, ids = await seeded(fhir)
    page = await search(
        fhir, f"/fhir/Observation?patient={pid}&_count=1&_total=accurate", fhir.patient(pid)
    )
    assert page["total"] == len(ids)
    assert len(page["entry"]) == 1


async def test_include_the_patient(fhir: Fhir) -> None:
    pid, _ = await seeded(fhir, observations=2)
    page = await search(
        fhir, f"/fhir/Observation?patient={pid}&_include=Observation:patient", fhir.patient(pid)
    )
    modes = [(e["search"]["mode"], e["resource"]["resourceType"]) for e in page["entry"]]
    assert modes.count(("match", "Observation")) == 2
    assert modes.count(("include", "Patient")) == 1
    included = next(e for e in page["entry"] if e["search"]["mode"] == "include")
    assert included["fullUrl"] == f"http://testserver/fhir/Patient/{pid}"


async def test_search_by_name_and_identifier_sees_only_the_own_record(fhir: Fhir) -> None:
    pid, _ = await seeded(fhir, observations=0)
    for query in ("name=quack", "family=Quackenbush", "identifier=urn:mrn|mrn-quackenbush", ""):
        page = await search(fhir, f"/fhir/Patient?{query}", fhir.patient(pid))
        assert [e["resource"]["id"] for e in page.get("entry", [])] == [pid], query
    page = await search(fhir, "/fhir/Patient?family=Other", fhir.patient(pid))
    assert "entry" not in page


async def test_unknown_parameter_is_400_unless_lenient(fhir: Fhir) -> None:
    pid, _ = await seeded(fhir, observations=1)
    strict = await fhir.client.get(f"/fhir/Observation?patient={pid}&colour=blue",
                                   headers=fhir.patient(pid))  # fmt: skip
    assert strict.status_code == 400
    outcome = strict.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["(parameter)"]  # unknown names not echoed
    assert "blue" not in strict.text
    lenient = await search(
        fhir,
        f"/fhir/Observation?patient={pid}&colour=blue",
        fhir.patient(pid, Prefer="handling=lenient"),
    )
    modes = [e["search"]["mode"] for e in lenient["entry"]]
    assert modes == ["match", "outcome"]


async def test_malformed_search_values_name_the_parameter(fhir: Fhir) -> None:
    pid, _ = await seeded(fhir, observations=0)
    for query, where in (
        ("birthdate=someday", "birthdate"),
        ("_count=-1", "_count"),
        ("_sort=name", "_sort"),
        ("_offset=x", "_offset"),
        ("general-practitioner.name=x", "general-practitioner.name"),
        ("_summary=true", "_summary"),  # would narrow the answer: refused, never ignored
        ("_elements=id", "_elements"),
    ):
        response = await fhir.client.get(f"/fhir/Patient?{query}", headers=fhir.patient(pid))
        assert response.status_code == 400, query
        assert response.json()["issue"][0]["expression"] == [where], query


async def test_a_type_nobody_may_search_is_403(fhir: Fhir) -> None:
    pid, _ = await seeded(fhir, observations=0)
    response = await fhir.client.get("/fhir/Claim?_id=x", headers=fhir.clinician("p1"))
    assert response.status_code == 403
    assert response.json()["issue"][0]["code"] == "forbidden"
    assert pid


async def test_post_search_with_url_parameters(fhir: Fhir) -> None:
    pid, ids = await seeded(fhir, observations=2)
    response = await fhir.client.post(
        f"/fhir/Observation/_search?patient={pid}", headers=fhir.patient(pid)
    )
    assert response.status_code == 200, response.text
    assert sorted(e["resource"]["id"] for e in response.json()["entry"]) == sorted(ids)


async def test_post_search_with_a_form_body(fhir: Fhir) -> None:
    pid, ids = await seeded(fhir, observations=2)
    response = await fhir.client.post(
        "/fhir/Observation/_search",
        content=f"patient={pid}",
        headers=fhir.patient(pid, **{"Content-Type": "application/x-www-form-urlencoded"}),
    )
    assert response.status_code == 200, response.text
    assert sorted(e["resource"]["id"] for e in response.json()["entry"]) == sorted(ids)
    # a form is a search's body only: anywhere else it is refused before any route reads it
    refused = await fhir.client.post(
        "/fhir/Observation",
        content=f"patient={pid}",
        headers=fhir.patient(pid, **{"Content-Type": "application/x-www-form-urlencoded"}),
    )
    assert refused.status_code == 415


async def test_instance_history_with_a_tombstone(fhir: Fhir) -> None:
    org = await fhir.created(organization())
    url = f"/fhir/Organization/{org['id']}"
    org["name"] = "Acme Clinic North"
    put = await fhir.client.put(url, content=json.dumps(org), headers=fhir.service())
    assert put.status_code == 200, put.text
    deleted = await fhir.client.delete(url, headers=fhir.admin())
    assert deleted.status_code == 204
    response = await fhir.client.get(f"{url}/_history", headers=fhir.admin())
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["type"] == "history"
    entries = bundle["entry"]
    assert [e["response"]["etag"] for e in entries] == ['W/"3"', 'W/"2"', 'W/"1"']
    assert [e["request"]["method"] for e in entries] == ["DELETE", "PUT", "POST"]
    assert "resource" not in entries[0]
    assert entries[1]["resource"]["name"] == "Acme Clinic North"
    assert entries[2]["resource"]["meta"]["versionId"] == "1"


async def test_type_history_pages(fhir: Fhir) -> None:
    for n in range(3):
        await fhir.created(organization(f"Clinic {n}"))
    first = await fhir.client.get("/fhir/Organization/_history?_count=2", headers=fhir.admin())
    assert first.status_code == 200, first.text
    bundle = first.json()
    assert len(bundle["entry"]) == 2
    nxt = links(bundle)["next"]
    second = await fhir.client.get(relative(nxt), headers=fhir.admin())
    assert len(second.json()["entry"]) == 1
    assert "next" not in links(second.json())
    unsupported = await fhir.client.get(
        "/fhir/Organization/_history?_since=2020-01-01", headers=fhir.admin()
    )
    assert unsupported.status_code == 400
    lenient = await fhir.client.get(
        "/fhir/Organization/_history?_since=2020-01-01",
        headers=fhir.admin(Prefer="handling=lenient"),
    )
    assert lenient.status_code == 200


async def test_patient_reads_own_history(fhir: Fhir) -> None:
    pid, _ = await seeded(fhir, observations=0)
    response = await fhir.client.get(f"/fhir/Patient/{pid}/_history", headers=fhir.patient(pid))
    assert response.status_code == 200, response.text
    assert [e["response"]["status"] for e in response.json()["entry"]] == ["201 Created"]
    other = await fhir.client.get(f"/fhir/Patient/{pid}/_history", headers=fhir.service())
    assert other.status_code in (403, 404)


async def test_search_is_audited_and_fails_closed(fhir: Fhir) -> None:
    pid, _ = await seeded(fhir, observations=1)
    fhir.sink.failing = True
    response: httpx.Response = await fhir.client.get(
        f"/fhir/Observation?patient={pid}", headers=fhir.patient(pid)
    )
    assert response.status_code == 503
    assert "entry" not in response.text


async def test_count_zero_gives_the_total_and_no_next_link(fhir: Fhir) -> None:
    for n in range(3):
        await fhir.created(organization(f"Clinic {n}"))
    page = await search(fhir, "/fhir/Organization?_count=0&_total=accurate", fhir.service())
    assert page["total"] == 3
    assert "entry" not in page
    assert set(links(page)) == {"self"}
    past = await search(fhir, "/fhir/Organization?_offset=50", fhir.service())
    assert "entry" not in past
    assert set(links(past)) == {"self"}


async def test_history_of_nothing_is_404(fhir: Fhir) -> None:
    response = await fhir.client.get("/fhir/Organization/nope/_history", headers=fhir.admin())
    assert response.status_code == 404
