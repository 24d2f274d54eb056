"""``phivault load``'s pure part and its HTTP client: order, rewriting, outcomes, errors."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from phivault.cli.load import (
    BundleFileError,
    FileResult,
    Issue,
    Loader,
    LoadStopped,
    add_conditional_creates,
    creates_conditionally,
    fhir_base,
    identifier_condition,
    order_files,
    outcome_issues,
    read_bundle,
)

NPI = "http://hl7.org/fhir/sid/us-npi"
SECRET_NAME = "Zyxwvutsrq"  # stands for a value no error message may echo


def practitioner(value: str = "123", *, system: str = NPI) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": system, "value": value}],
        "name": [{"family": SECRET_NAME}],
    }


def entry(resource: dict[str, Any], *, method: str = "POST", **request: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{len(json.dumps(resource))}",
        "resource": resource,
        "request": {"method": method, "url": resource["resourceType"], **request},
    }


def bundle(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def write(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document))
    return path


# --- order ------------------------------------------------------------------------------------


def test_companions_first_hospital_then_practitioner_the_rest_in_given_order(
    tmp_path: Path,
) -> None:
    names = [
        "b_patient.json",
        "x_practitionerInformation1.json",
        "a_patient.json",
        "x_hospitalInformation1.json",
        "y_practitionerInformation.json",
        "y_hospitalInformation.json",
    ]
    paths = [tmp_path / name for name in names]
    ordered = [p.name for p in order_files(paths)]
    assert ordered == [
        "x_hospitalInformation1.json",
        "y_hospitalInformation.json",
        "x_practitionerInformation1.json",
        "y_practitionerInformation.json",
        "b_patient.json",
        "a_patient.json",
    ]


def test_directories_expand_to_their_json_files_and_duplicates_load_once(tmp_path: Path) -> None:
    folder = tmp_path / "bundles"
    folder.mkdir()
    for name in ("p2.json", "p1.json", "hospitalInformation.json", "notes.txt"):
        (folder / name).write_text("{}")
    ordered = order_files([folder, folder / "p1.json"])
    assert [p.name for p in ordered] == ["hospitalInformation.json", "p1.json", "p2.json"]


def test_fixture_directory_order(fixtures_dir: Path) -> None:
    ordered = [p.name for p in order_files([fixtures_dir / "synthea"])]
    assert len(ordered) == 25
    assert [n for n in ordered[:2]] == [
        "sof2019_hospitalInformation1559319163815.json",
        "wasee11_hospitalInformation.json",
    ]
    assert ordered[2:4] == [
        "sof2019_practitionerInformation1559319163815.json",
        "wasee11_practitionerInformation.json",
    ]
    assert not any("Information" in n for n in ordered[4:])


# --- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"resourceType": "Bundle", "type": "transaction", ', "is not JSON (line 1, column"),
        (b"\xff\xfe not utf-8", "is not JSON"),
        (b"[1, 2]", "is not a FHIR Bundle"),
        (
            json.dumps({"resourceType": "Patient", "name": [{"family": SECRET_NAME}]}).encode(),
            "is not a FHIR Bundle",
        ),
        (
            json.dumps({"resourceType": "Bundle", "type": "searchset"}).encode(),
            "Bundle of type searchset; only transaction and batch",
        ),
        (
            json.dumps({"resourceType": "Bundle", "type": SECRET_NAME + " !"}).encode(),
            "Bundle of type missing",
        ),
        (
            json.dumps({"resourceType": "Bundle", "type": "batch", "entry": {}}).encode(),
            "Bundle.entry is not a list",
        ),
        (
            json.dumps(
                {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": {}}]}
            ).encode(),
            "Bundle.entry[0] has no request.method",
        ),
    ],
)
def test_bad_files_are_refused_without_echoing_their_content(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "file.json"
    path.write_bytes(content)
    with pytest.raises(BundleFileError) as caught:
        read_bundle(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)
    assert SECRET_NAME not in str(caught.value)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleFileError, match="cannot be read"):
        read_bundle(tmp_path / "absent.json")


def test_every_fixture_reads_as_a_transaction_or_batch(fixtures_dir: Path) -> None:
    for path in order_files([fixtures_dir / "synthea"]):
        assert read_bundle(path)["type"] in ("transaction", "batch")


# --- conditional creates for directory resources ------------------------------------------


def test_plain_posts_of_directory_resources_become_conditional_creates() -> None:
    org = {
        "resourceType": "Organization",
        "identifier": [
            {"value": "no-system"},
            {"system": "https://github.com/synthetichealth/synthea", "value": "abc-1"},
        ],
    }
    location = {"resourceType": "Location", "identifier": [{"system": "urn:s", "value": "L1"}]}
    document = bundle(entry(practitioner()), entry(org), entry(location))
    assert add_conditional_creates(document) == 3
    conditions = [e["request"]["ifNoneExist"] for e in document["entry"]]
    assert conditions == [
        f"identifier={NPI}|123",
        "identifier=https://github.com/synthetichealth/synthea|abc-1",
        "identifier=urn:s|L1",
    ]


def test_everything_else_is_left_exactly_as_it_was() -> None:
    untouched = bundle(
        entry(practitioner(), ifNoneExist="identifier=other|1"),  # has its own
        entry(practitioner(), method="PUT"),  # not a create
        entry({"resourceType": "Practitioner", "name": [{"family": "X"}]}),  # no identifier
        entry({"resourceType": "Practitioner", "identifier": [{"value": "1"}]}),  # no system
        entry({"resourceType": "Patient", "identifier": [{"system": "s", "value": "1"}]}),
        entry({"resourceType": "PractitionerRole", "identifier": [{"system": "s", "value": "1"}]}),
    )
    before = copy.deepcopy(untouched)
    assert add_conditional_creates(untouched) == 0
    assert untouched == before


def test_search_separators_in_identifiers_are_escaped() -> None:
    condition = identifier_condition(practitioner("a|b,c$d\\e&f g#h%", system="urn:x|y"))
    assert condition == "identifier=urn:x\\|y|a\\|b\\,c\\$d\\\\e%26f%20g%23h%25"


def test_fixture_counts(fixtures_dir: Path) -> None:
    synthea = fixtures_dir / "synthea"
    # sof2019: every directory resource, in the companions and inline in patient bundles.
    assert add_conditional_creates(read_bundle(synthea / "sof2019_Clemente_Kreiger.json")) == 2
    hospital = read_bundle(synthea / "sof2019_hospitalInformation1559319163815.json")
    assert add_conditional_creates(hospital) == 102
    # wasee11's companions say ifNoneExist themselves; its patient bundles refer by condition.
    assert add_conditional_creates(read_bundle(synthea / "wasee11_hospitalInformation.json")) == 0
    assert add_conditional_creates(read_bundle(synthea / "wasee11_Alvin56_Jerde200.json")) == 0


# --- outcomes ---------------------------------------------------------------------------------


def test_outcome_issues_keep_severity_code_diagnostics_and_expression_only() -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "not-found",
                "diagnostics": "conditional reference matched no resource",
                "expression": ["Bundle.entry[3].resource.subject"],
                "details": {"text": SECRET_NAME},
            },
            {"severity": "warning", "code": "informational", "location": ["Bundle.entry[1]"]},
            "garbage",
        ],
    }
    issues = outcome_issues(outcome)
    assert issues == [
        Issue(
            "error",
            "not-found",
            "conditional reference matched no resource",
            ("Bundle.entry[3].resource.subject",),
        ),
        Issue("warning", "informational", None, ("Bundle.entry[1]",)),
    ]
    assert SECRET_NAME not in json.dumps([i.as_json() for i in issues])
    assert issues[0].describe() == (
        "error not-found: conditional reference matched no resource "
        "(at Bundle.entry[3].resource.subject)"
    )
    assert outcome_issues({"resourceType": "Patient"}) == []
    assert outcome_issues(None) == []


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/fhir"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/fhir"),
        ("https://h/fhir", "https://h/fhir"),
        ("https://h/fhir/", "https://h/fhir"),
    ],
)
def test_fhir_base(url: str, endpoint: str) -> None:
    assert fhir_base(url) == endpoint


# --- the HTTP client, against a mock transport ----------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def outcome(code: str, diagnostics: str, *expression: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": code,
                "diagnostics": diagnostics,
                "expression": list(expression),
            }
        ],
    }


def response_bundle(kind: str, *statuses: str) -> dict[str, Any]:
    entries = []
    for index, status in enumerate(statuses):
        item: dict[str, Any] = {"status": status}
        if status.startswith("2"):
            item["location"] = f"Practitioner/id-{index}/_history/1"
        else:
            item["outcome"] = outcome("processing", f"entry {index} failed")
        entries.append({"response": item})
    return {"resourceType": "Bundle", "type": f"{kind}-response", "entry": entries}


def send(
    handler: Handler, document: dict[str, Any], *, sleeps: list[float] | None = None
) -> tuple[FileResult, list[httpx.Request]]:
    requests: list[httpx.Request] = []

    def recording(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return handler(request)

    client = httpx.Client(transport=httpx.MockTransport(recording))
    loader = Loader(
        client,
        "http://fhir.test",
        lambda: "tok",
        sleep=(sleeps if sleeps is not None else []).append,
    )
    result = FileResult(
        file=Path("b.json"), bundle_type=document["type"], entries=len(document["entry"])
    )
    loader.send(result, document)
    return result, requests


TWO = bundle(entry(practitioner("1")), entry(practitioner("2")))


def test_a_transaction_that_loads() -> None:
    result, requests = send(
        lambda _: httpx.Response(200, json=response_bundle("transaction", "201 Created", "200 OK")),
        TWO,
    )
    assert result.status == "loaded" and result.ok
    assert result.http_status == 200
    assert [r["location"] for r in result.responses] == [
        "Practitioner/id-0/_history/1",
        "Practitioner/id-1/_history/1",
    ]
    assert [r["fullUrl"] for r in result.responses] == [e["fullUrl"] for e in TWO["entry"]]
    (request,) = requests
    assert request.url == "http://fhir.test/fhir"
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["content-type"] == "application/fhir+json"
    assert json.loads(request.content) == TWO


def test_a_failing_transaction_reports_the_outcome() -> None:
    result, _ = send(
        lambda _: httpx.Response(
            422,
            json=outcome(
                "not-found",
                "conditional reference Practitioner?identifier=... matched no resource",
                "Bundle.entry[1].resource.participant[0].individual",
            ),
        ),
        TWO,
    )
    assert result.status == "failed"
    assert result.http_status == 422
    (issue,) = result.issues
    assert issue.code == "not-found"
    assert issue.expression == ("Bundle.entry[1].resource.participant[0].individual",)


def test_a_failing_answer_without_an_outcome() -> None:
    result, _ = send(lambda _: httpx.Response(400, text="<html>bad</html>"), TWO)
    assert result.status == "failed"
    assert result.message == "the server answered 400 without an outcome"


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_server_error_leaves_the_outcome_unknown_and_is_not_sent_again(status: int) -> None:
    # A 503 can follow a commit whose outcome the ledger could not take: sending the bundle
    # again could write it twice.
    result, requests = send(
        lambda _: httpx.Response(status, json=outcome("transient", "audit unavailable")), TWO
    )
    assert result.status == "unknown"
    assert result.http_status == status
    assert "may or may not have been written" in (result.message or "")
    assert result.issues[0].diagnostics == "audit unavailable"
    assert len(requests) == 1


def test_a_batch_with_a_failed_entry_is_partial() -> None:
    document = bundle(entry(practitioner("1")), entry(practitioner("2")), kind="batch")
    result, _ = send(
        lambda _: httpx.Response(200, json=response_bundle("batch", "201 Created", "400 Bad")),
        document,
    )
    assert result.status == "partial"
    assert result.message == "1 of 2 entries failed"
    assert [i.entry for i in result.issues] == [1]
    assert result.responses[1]["issues"][0]["diagnostics"] == "entry 1 failed"


@pytest.mark.parametrize(
    "answer",
    [
        {"resourceType": "Bundle", "type": "batch-response", "entry": []},
        {"resourceType": "OperationOutcome"},
        {"resourceType": "Bundle", "type": "transaction-response", "entry": [{}]},
    ],
)
def test_an_answer_that_does_not_match_the_bundle_is_unknown(answer: dict[str, Any]) -> None:
    result, _ = send(lambda _: httpx.Response(200, json=answer), TWO)
    assert result.status == "unknown"
    assert result.message is not None


def test_a_refused_token_stops_the_load() -> None:
    with pytest.raises(LoadStopped) as caught:
        send(lambda _: httpx.Response(401, json=outcome("login", "token expired")), TWO)
    assert caught.value.kind == "unauthorized"
    assert caught.value.http_status == 401
    assert "token expired" in str(caught.value)


def test_a_forbidden_bundle_fails_alone_with_a_hint_about_the_token() -> None:
    denied = outcome("forbidden", "the access policy does not allow this interaction")
    result, _ = send(lambda _: httpx.Response(403, json=denied), TWO)
    assert result.status == "failed"
    assert result.http_status == 403
    assert result.issues[0].diagnostics == "the access policy does not allow this interaction"
    assert "role service, purpose HOPERAT" in (result.message or "")


def test_an_unreachable_server_stops_the_load() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(LoadStopped) as caught:
        send(refuse, TWO)
    assert caught.value.kind == "unreachable"
    assert "is `phivault serve` running?" in str(caught.value)


def test_a_timeout_leaves_the_outcome_unknown_and_is_not_retried() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    result, requests = send(slow, TWO)
    assert result.status == "unknown"
    assert "may or may not have been written" in (result.message or "")
    assert len(requests) == 1


def test_rate_limits_are_waited_out() -> None:
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": "2"}),
            httpx.Response(429),
            httpx.Response(200, json=response_bundle("transaction", "201 Created", "201 Created")),
        ]
    )
    sleeps: list[float] = []
    result, requests = send(lambda _: next(answers), TWO, sleeps=sleeps)
    assert result.status == "loaded"
    assert len(requests) == 3
    assert sleeps == [2.0, 2.0]  # Retry-After, then the back-off for the second attempt


def test_retries_end() -> None:
    sleeps: list[float] = []
    result, requests = send(
        lambda _: httpx.Response(429, json=outcome("throttled", "too many requests")),
        TWO,
        sleeps=sleeps,
    )
    assert result.status == "failed"
    assert result.http_status == 429
    assert len(requests) == 6
    assert max(sleeps) <= 30.0


# --- the command, in process --------------------------------------------------------------


def test_ctrl_c_reports_the_bundle_in_flight_as_unknown_and_the_rest_as_not_attempted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from phivault.cli import load as load_module
    from phivault.cli.main import app

    files = [write(tmp_path / f"{n}.json", TWO) for n in ("a", "b", "c")]
    sent: list[str] = []

    def send(self: Loader, result: FileResult, document: dict[str, Any]) -> None:
        sent.append(result.file.name)
        if len(sent) == 2:
            raise KeyboardInterrupt
        result.status = "loaded"

    monkeypatch.setattr(load_module.Loader, "send", send)
    outcome = CliRunner().invoke(
        app, ["load", "--token", "t", "--json", *map(str, files)], catch_exceptions=False
    )
    assert outcome.exit_code == 130
    report = json.loads(outcome.stdout)
    assert report["error"] == "interrupted"
    assert [r["status"] for r in report["results"]] == ["loaded", "unknown", "not-attempted"]
    assert sent == ["a.json", "b.json"]


def test_creates_conditionally() -> None:
    assert not creates_conditionally(TWO)
    plain = bundle(entry(practitioner()))
    add_conditional_creates(plain)
    assert creates_conditionally(plain)
    assert creates_conditionally(
        bundle(entry(practitioner(), method="PUT", url="Practitioner?identifier=s|1"))
    )
    assert not creates_conditionally(
        bundle(entry(practitioner(), method="PUT", url="Practitioner/abc"))
    )


def test_jobs_send_companions_first_and_conditional_creators_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    from typer.testing import CliRunner

    from phivault.cli import load as load_module
    from phivault.cli.main import app

    patient_only = bundle(entry({"resourceType": "Patient"}))
    files = [
        write(tmp_path / "p1.json", patient_only),
        write(tmp_path / "sof_a.json", TWO),  # inline directory resources: conditional creates
        write(tmp_path / "p2.json", patient_only),
        write(tmp_path / "x_hospitalInformation.json", TWO),
        write(tmp_path / "sof_b.json", TWO),
        write(tmp_path / "p3.json", patient_only),
        write(tmp_path / "p4.json", patient_only),
    ]
    spans: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()

    def send(self: Loader, result: FileResult, document: dict[str, Any]) -> None:
        started = time.monotonic()
        time.sleep(0.05)
        with lock:
            spans[result.file.name] = (started, time.monotonic())
        result.status = "loaded"

    monkeypatch.setattr(load_module.Loader, "send", send)
    outcome = CliRunner().invoke(
        app, ["load", "--token", "t", "--json", "--jobs", "3", *map(str, files)]
    )
    assert outcome.exit_code == 0, outcome.stdout
    assert json.loads(outcome.stdout)["loaded"] == 7
    companion_end = spans["x_hospitalInformation.json"][1]
    assert all(start >= companion_end for name, (start, _) in spans.items() if "hosp" not in name)
    assert spans["sof_b.json"][0] >= spans["sof_a.json"][1]  # in order, never together
    overlapping = [
        (a, b)
        for a in spans
        for b in spans
        if a < b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
    ]
    assert overlapping  # the others went side by side


def test_jobs_stop_taking_bundles_once_the_token_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from phivault.cli import load as load_module
    from phivault.cli.main import app

    files = [write(tmp_path / f"p{n}.json", TWO) for n in range(8)]

    def send(self: Loader, result: FileResult, document: dict[str, Any]) -> None:
        raise LoadStopped("unauthorized", "the server refused the token (401): expired")

    monkeypatch.setattr(load_module.Loader, "send", send)
    outcome = CliRunner().invoke(
        app, ["load", "--token", "t", "--json", "--jobs", "2", *map(str, files)]
    )
    assert outcome.exit_code == 3
    report = json.loads(outcome.stdout)
    assert report["error"] == "unauthorized"
    statuses = [r["status"] for r in report["results"]]
    assert statuses.count("failed") <= 2  # at most one per lane was in flight
    assert statuses.count("not-attempted") >= 6
