"""Every Synthea fixture through ``phivault load`` into a real ``phivault serve``, read back.

One server for the module, on a ``--dev`` data directory; ``phivault load --json`` of the
whole fixture directory, as a user would run it. Then:

- every bundle loaded, except the one that has no companion bundles (flexporter): its
  conditional references match nothing, so its transaction fails with an OperationOutcome that
  says so and points at such a reference;
- every resource the loader created reads back through FHIR equal to what was sent, apart from
  the server-assigned id, ``meta`` and the references the server rewrote (``urn:uuid:`` and
  conditional ones), which must point where the bundle said. Each patient's resources are read
  with that patient's own token (``patient/*.rs``); the companions with the loader's;
- the sof2019 directory resources that patient bundles repeat inline were not created again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from phivault.cli.load import LOADER_PURPOSE, LOADER_SCOPES, order_files
from phivault.datadir import DataDir
from phivault.identity.dev_provider import DevIdentityProvider, DevProviderWarning
from phivault.identity.principal import Role
from phivault.settings import Settings
from ports_support import free_port

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
pytestmark = pytest.mark.integration

NO_COMPANION = "flexporter_Lindsay928_Gerlach374.json"
DIRECTORY_TYPES = ("Practitioner", "Organization", "Location")
CONDITIONAL = re.compile(r"^([A-Za-z]+)\?identifier=(.+)$")
UNRESOLVED = re.compile(
    r"^(?:(?P<path>[\w.\[\]]+): )?"
    r"conditional reference to (?P<type>Practitioner|Organization|Location) matches no resource$"
)
READERS = 8
# _id values per search: the server takes at most 2,048 characters in one parameter.
IDS_PER_SEARCH = 50


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
class Loaded:
    url: str
    data_dir: Path
    returncode: int
    stderr: str
    report: dict[str, Any]
    by_name: dict[str, dict[str, Any]] = field(default_factory=dict)

    def tokens(self) -> Tokens:
        return Tokens(self.data_dir)


class Tokens:
    """Tokens from the data directory's dev identity provider, minted in process."""

    def __init__(self, data_dir: Path) -> None:
        self._settings = Settings()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DevProviderWarning)
            self._provider = DevIdentityProvider.open(DataDir.open(data_dir), self._settings)

    def loader(self) -> str:
        return self._provider.mint(
            user="service-loader",
            roles=[Role.SERVICE],
            audience=self._settings.identity.audience,
            scopes=LOADER_SCOPES,
            purpose_of_use=[LOADER_PURPOSE],
        )

    def patient(self, patient_id: str) -> str:
        return self._provider.mint(
            user=f"patient-{patient_id}",
            roles=[Role.PATIENT],
            audience=self._settings.identity.audience,
            fhir_user=f"Patient/{patient_id}",
            scopes=["patient/*.rs"],
        )


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> Iterator[Loaded]:
    folder = tmp_path_factory.mktemp("synthea")
    data_dir = folder / "data"
    init = subprocess.run(
        [PHIVAULT, "init", "--dev", "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    env = {
        **os.environ,
        "PHIVAULT_API__RATE_LIMIT_PER_ADDRESS": "1000000/minute",
        "PHIVAULT_API__RATE_LIMIT_PER_PRINCIPAL": "1000000/minute",
    }
    with phivault_serving(data_dir, env=env, log=folder / "serve.log") as url:
        result = subprocess.run(
            [
                PHIVAULT,
                "load",
                "--url",
                url,
                "--data-dir",
                str(data_dir),
                "--json",
                str(fixtures_dir / "synthea"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=env,
        )
        assert result.stdout, result.stderr
        report = json.loads(result.stdout)
        yield Loaded(
            url=url,
            data_dir=data_dir,
            returncode=result.returncode,
            stderr=result.stderr,
            report=report,
            by_name={Path(r["file"]).name: r for r in report["results"]},
        )


def at_path(document: Any, expression: str) -> Any:
    """The element at a FHIRPath-like path of simple steps (``Bundle.entry[3].resource.x``)."""
    steps = expression.split(".")
    assert steps[0] == "Bundle", expression
    node = document
    for step in steps[1:]:
        match = re.fullmatch(r"([A-Za-z_]+)(?:\[(\d+)\])?", step)
        assert match is not None, expression
        node = node[match.group(1)]
        if match.group(2) is not None:
            node = node[int(match.group(2))]
    return node


def test_every_bundle_loads_but_the_one_without_companions(
    loaded: Loaded, fixtures_dir: Path
) -> None:
    assert loaded.returncode == 1, loaded.stderr  # one bundle did not load
    assert loaded.stderr == ""  # --json: nothing but the JSON document
    ordered = [p.name for p in order_files([fixtures_dir / "synthea"])]
    assert list(loaded.by_name) == ordered
    statuses = {name: r["status"] for name, r in loaded.by_name.items()}
    assert statuses == {name: "failed" if name == NO_COMPANION else "loaded" for name in ordered}
    assert loaded.report["entries_loaded"] == sum(
        r["entries"] for name, r in loaded.by_name.items() if name != NO_COMPANION
    )
    # The sof2019 duplicates went as conditional creates: every Organization and Practitioner
    # of its companions and inline in its patient bundles.
    sof = {n: r for n, r in loaded.by_name.items() if n.startswith("sof2019_")}
    assert sof["sof2019_hospitalInformation1559319163815.json"]["conditional_creates_added"] == 102
    assert all(r["conditional_creates_added"] >= 2 for r in sof.values())

    failed = loaded.by_name[NO_COMPANION]
    assert failed["http_status"] == 400
    (issue,) = failed["issues"]
    assert issue["severity"] == "error"
    said = UNRESOLVED.match(issue["diagnostics"])
    assert said is not None, issue["diagnostics"]
    (expression,) = issue["expression"]
    assert said.group("path") in (None, expression)
    document = json.loads((fixtures_dir / "synthea" / NO_COMPANION).read_text())
    element = at_path(document, expression)
    reference = element["reference"] if isinstance(element, dict) else element
    match = CONDITIONAL.match(reference)
    assert match is not None, expression
    assert match.group(1) == said.group("type")
    # ... and it is indeed one that no loaded bundle carries.
    loaded_identifiers = {
        f"{resource['resourceType']}?identifier={i['system']}|{i['value']}"
        for name in ordered
        if name != NO_COMPANION
        for entry in json.loads((fixtures_dir / "synthea" / name).read_text())["entry"]
        for resource in [entry["resource"]]
        if resource["resourceType"] in DIRECTORY_TYPES
        for i in resource.get("identifier", [])
    }
    assert reference not in loaded_identifiers


# --- read back --------------------------------------------------------------------------


def literal(location: str) -> str:
    """``Type/id`` from ``Type/id/_history/v`` (or an absolute URL ending so)."""
    parts = location.split("/_history/", maxsplit=1)[0].rstrip("/").split("/")
    return f"{parts[-2]}/{parts[-1]}"


def rewrite(value: Any, urns: dict[str, str], directory: dict[str, str]) -> Any:
    """The resource as the server should hold it: references pointed where the bundle said."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            target = item
            if key == "reference" and isinstance(item, str):
                if item.startswith("urn:uuid:"):
                    target = urns[item]
                elif CONDITIONAL.match(item):
                    target = directory[item]
            out[key] = rewrite(target, urns, directory)
        return out
    if isinstance(value, list):
        return [rewrite(item, urns, directory) for item in value]
    return value


def comparable(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


def first_difference(expected: Any, actual: Any, path: str) -> str | None:
    """The first path where two JSON values differ (a path only: never a value, no PHI)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            if key not in actual:
                return f"{path}.{key} missing"
            if key not in expected:
                return f"{path}.{key} added"
            found = first_difference(expected[key], actual[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return f"{path} has {len(actual)} items, not {len(expected)}"
        for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
            found = first_difference(e, a, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if expected == actual else f"{path} differs"


@dataclass
class Expected:
    file: str
    index: int
    reference: str  # Type/id on the server
    resource: dict[str, Any]  # as sent, references rewritten
    patient: str | None  # the compartment's patient id (None: a companion bundle)


def expected_resources(loaded: Loaded, fixtures_dir: Path) -> tuple[list[Expected], list[str]]:
    """What each created resource should read back as; and the duplicates that were matched."""
    documents = {
        name: json.loads((fixtures_dir / "synthea" / name).read_text())
        for name, result in loaded.by_name.items()
        if result["status"] == "loaded"
    }
    directory: dict[str, str] = {}
    created: dict[str, dict[str, Any]] = {}
    matched: list[str] = []
    for name, document in documents.items():
        responses = loaded.by_name[name]["responses"]
        assert len(responses) == len(document["entry"])
        for entry, response in zip(document["entry"], responses, strict=True):
            resource = entry["resource"]
            reference = literal(response["location"])
            assert reference.split("/")[0] == resource["resourceType"]
            if response["status"].startswith("201"):
                assert reference not in created, f"{name}: {reference} created twice"
                created[reference] = resource
            else:
                # A conditional create that found the resource an earlier bundle created.
                assert response["status"].startswith("200"), response["status"]
                assert reference in created, f"{name}: {reference} matched nothing created"
                matched.append(reference)
            if resource["resourceType"] in DIRECTORY_TYPES:
                for identifier in resource.get("identifier", []):
                    key = (
                        f"{resource['resourceType']}?identifier="
                        f"{identifier['system']}|{identifier['value']}"
                    )
                    directory.setdefault(key, reference)
    expected: list[Expected] = []
    for name, document in documents.items():
        responses = loaded.by_name[name]["responses"]
        urns = {
            entry["fullUrl"]: literal(response["location"])
            for entry, response in zip(document["entry"], responses, strict=True)
        }
        patients = [
            urns[e["fullUrl"]] for e in document["entry"] if e["request"]["url"] == "Patient"
        ]
        patient = patients[0].split("/")[1] if patients else None
        for index, (entry, response) in enumerate(zip(document["entry"], responses, strict=True)):
            if not response["status"].startswith("201"):
                continue
            expected.append(
                Expected(
                    file=name,
                    index=index,
                    reference=literal(response["location"]),
                    resource=comparable(rewrite(entry["resource"], urns, directory)),
                    patient=patient,
                )
            )
    return expected, matched


def test_every_resource_reads_back_as_sent(loaded: Loaded, fixtures_dir: Path) -> None:
    """Every created resource comes back by search (``_id``, 50 at a time) and equals what was
    sent; the first of each type in each bundle is also read on its own (the read route)."""
    expected, matched = expected_resources(loaded, fixtures_dir)
    assert len(expected) > 10_000
    tokens = loaded.tokens()
    by_patient: dict[str | None, str] = {}
    groups: dict[tuple[str | None, str], list[Expected]] = {}
    for item in expected:
        if item.patient not in by_patient:
            by_patient[item.patient] = (
                tokens.loader() if item.patient is None else tokens.patient(item.patient)
            )
        groups.setdefault((item.patient, item.reference.split("/")[0]), []).append(item)
    assert len(by_patient) == 21  # 20 patients with companions, and the companions

    def compare(item: Expected, read: dict[str, Any]) -> str | None:
        where = f"{item.file} entry {item.index} ({item.reference.split('/')[0]})"
        if read.get("id") != item.reference.split("/")[1]:
            return f"{where}: another id"
        if not read.get("meta", {}).get("versionId"):
            return f"{where}: no meta.versionId"
        difference = first_difference(item.resource, comparable(read), "")
        return None if difference is None else f"{where}: {difference}"

    limits = httpx.Limits(max_connections=READERS, max_keepalive_connections=READERS)
    with httpx.Client(base_url=f"{loaded.url}/fhir", limits=limits, timeout=120) as client:

        def headers(patient: str | None) -> dict[str, str]:
            return {
                "Authorization": f"Bearer {by_patient[patient]}",
                "Accept": "application/fhir+json",
            }

        def search(chunk: list[Expected]) -> list[str]:
            first = chunk[0]
            resource_type = first.reference.split("/")[0]
            try:
                answer = client.get(
                    resource_type,
                    params={
                        "_id": ",".join(item.reference.split("/")[1] for item in chunk),
                        "_count": str(len(chunk)),
                    },
                    headers=headers(first.patient),
                )
            except httpx.TimeoutException:
                return [f"{first.file}: search of {len(chunk)} {resource_type} timed out"]
            if answer.status_code != 200:
                return [f"{first.file}: search of {resource_type} answered {answer.status_code}"]
            found = {
                entry["resource"]["id"]: entry["resource"]
                for entry in answer.json().get("entry", [])
                if entry.get("search", {}).get("mode", "match") == "match"
            }
            problems = []
            for item in chunk:
                read = found.pop(item.reference.split("/")[1], None)
                if read is None:
                    problems.append(f"{item.file} entry {item.index}: not found by search")
                    continue
                problem = compare(item, read)
                if problem:
                    problems.append(problem)
            if found:
                problems.append(f"{first.file}: search of {resource_type} returned others")
            return problems

        def read_one(item: Expected) -> list[str]:
            try:
                answer = client.get(item.reference, headers=headers(item.patient))
            except httpx.TimeoutException:
                return [f"{item.file} entry {item.index}: read timed out"]
            if answer.status_code != 200:
                return [f"{item.file} entry {item.index}: read answered {answer.status_code}"]
            problem = compare(item, answer.json())
            return [problem] if problem else []

        chunks = [
            items[start : start + IDS_PER_SEARCH]
            for items in groups.values()
            for start in range(0, len(items), IDS_PER_SEARCH)
        ]
        with ThreadPoolExecutor(READERS) as pool:
            problems = [p for found in pool.map(search, chunks) for p in found]
            problems += [
                p for found in pool.map(read_one, [g[0] for g in groups.values()]) for p in found
            ]
    assert problems == [], f"{len(problems)} problems in {len(expected)} resources:\n" + "\n".join(
        problems[:25]
    )
    # Each sof2019 patient bundle's inline Organizations and Practitioners matched the ones
    # the companions created: 24 in all, none created twice.
    assert len(matched) == 24
