"""`phivault ledger append`: FHIR AuditEvents in on stdin; bad input changes nothing.

And `phivault ledger export --format fhir`: the events out again as AuditEvent NDJSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_support import phivault

from phivault.datadir import DataDir
from phivault.ledger.fhir import audit_event_to_fhir
from phivault.ledger.service import open_ledger_readonly
from phivault.ledger.testing import sample_event

pytestmark = pytest.mark.integration

PLANTED_NAME = "Zebediah Quarrington"
PLANTED_SSN = "078-05-1120"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    assert phivault("init", "--dev", "--data-dir", str(path)).returncode == 0
    return path


def _lines(resources: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(resource) + "\n" for resource in resources)


def _size(path: Path) -> int:
    with open_ledger_readonly(DataDir.open(path)) as store:
        return store.size()


def _fhir(number: int) -> dict[str, Any]:
    resource = audit_event_to_fhir(sample_event(number, patient=f"Patient/p-{number % 2}"), index=0)
    del resource["id"]  # an incoming event has no ledger index yet
    resource.pop("extension", None)  # nor a back-link
    return resource


def test_valid_events_are_appended_in_order(data_dir: Path) -> None:
    result = phivault(
        "ledger",
        "append",
        "--data-dir",
        str(data_dir),
        "--json",
        stdin=_lines([_fhir(i) for i in range(5)]),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["indexes"] == [0, 1, 2, 3, 4]
    plain = phivault("ledger", "append", "--data-dir", str(data_dir), stdin=_lines([_fhir(5)]))
    assert plain.stdout.split() == ["5"]
    assert phivault("ledger", "verify", "--data-dir", str(data_dir)).returncode == 0
    report = json.loads(
        phivault(
            "ledger", "report", "--patient", "p-1", "--data-dir", str(data_dir), "--json"
        ).stdout
    )
    assert report["back_link_chain"] == [5, 3, 1]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "line 3: not valid JSON"),
        ("[1, 2]", "line 3: not a JSON object"),
        (json.dumps(_fhir(2) | {"colour": "blue"}), "line 3: "),
        (json.dumps({**_fhir(2), "resourceType": "Patient"}), "line 3: "),
    ],
)
def test_one_bad_line_appends_nothing(data_dir: Path, bad_line: str, message: str) -> None:
    stdin = _lines([_fhir(0), _fhir(1)]) + bad_line + "\n" + _lines([_fhir(3)])
    result = phivault("ledger", "append", "--data-dir", str(data_dir), stdin=stdin)
    assert result.returncode == 1
    assert message in result.stderr and "nothing was appended" in result.stderr
    assert "Traceback" not in result.stderr
    assert _size(data_dir) == 0


def test_phi_in_free_text_is_refused_without_echoing_it(data_dir: Path) -> None:
    resource = _fhir(0)
    resource["entity"][0]["description"] = f"chart of {PLANTED_NAME}, SSN {PLANTED_SSN}"
    result = phivault(
        "ledger", "append", "--data-dir", str(data_dir), "--json", stdin=_lines([resource])
    )
    assert result.returncode == 1
    error = json.loads(result.stdout)
    assert "entity[0].description" in error["message"]
    assert "looks like PHI" in error["message"]
    for secret in (PLANTED_NAME, PLANTED_SSN, "Zebediah", "078-05"):
        assert secret not in result.stdout + result.stderr
    assert _size(data_dir) == 0


def test_an_id_that_is_phi_is_refused(data_dir: Path) -> None:
    resource = _fhir(0)
    resource["agent"][0]["who"] = {"reference": f"Practitioner/{PLANTED_SSN}"}
    result = phivault("ledger", "append", "--data-dir", str(data_dir), stdin=_lines([resource]))
    assert result.returncode == 1
    assert PLANTED_SSN not in result.stderr
    assert _size(data_dir) == 0


def test_empty_input_is_an_error(data_dir: Path) -> None:
    result = phivault("ledger", "append", "--data-dir", str(data_dir), stdin="\n\n")
    assert result.returncode == 1 and "no events" in result.stderr


def test_export_as_fhir_ndjson(data_dir: Path, tmp_path: Path) -> None:
    phivault(
        "ledger", "append", "--data-dir", str(data_dir), stdin=_lines([_fhir(i) for i in range(4)])
    )
    out = tmp_path / "audit.ndjson"
    result = phivault(
        "ledger",
        "export",
        "--format",
        "fhir",
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    resources = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in resources] == [f"ledger-{i}" for i in range(4)]
    assert all(r["resourceType"] == "AuditEvent" for r in resources)
    bad = phivault(
        "ledger",
        "export",
        "--format",
        "xml",
        "--out",
        str(tmp_path / "x"),
        "--data-dir",
        str(data_dir),
    )
    assert bad.returncode == 1 and "--format must be" in bad.stderr
