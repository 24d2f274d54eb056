"""``make demo`` end to end: ``python -m phivault.demo --no-serve`` in a temporary directory.

The demo starts ``phivault serve`` on a fresh dev data directory, loads every Synthea fixture,
mints the demo users' tokens, makes its requests and checks each control itself; it exits 0
only if every check held. This test runs it as ``make demo`` does (a subprocess, output to a
pipe) and asserts the exit code and the lines that say what each control did. It also checks
that the server's log, which the demo keeps in the data directory, carries no name of the
patient the tour is about, and that the tokens file works as a shell file. And that the demo
leaves alone a directory it did not make, and one a server is running on (it removes only a
previous demo's dev data directory, once nothing uses it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import phivault_serve

from phivault.initialize import initialize_data_dir
from ports_support import free_port

pytestmark = pytest.mark.integration

FIXTURES = (
    Path(os.environ.get("PHIVAULT_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    / "fixtures"
    / "synthea"
)


def run_demo(data_dir: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phivault.demo", "--data-dir", str(data_dir), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=cwd,
        # pytest sets COLUMNS=80; the demo's tables fold long ids at that width.
        env={**os.environ, "COLUMNS": "200"},
    )


def test_demo_leaves_a_directory_it_did_not_make_alone(tmp_path: Path) -> None:
    precious = tmp_path / "not-a-demo"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    result = run_demo(precious, tmp_path, "--no-serve")
    assert result.returncode == 2
    assert "is not a phivault development data directory; not touching it" in result.stdout
    assert (precious / "keep.txt").read_text() == "mine"


def test_demo_leaves_a_served_data_directory_alone(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-data"
    initialize_data_dir(data_dir, dev=True)
    port = free_port()
    with phivault_serve(
        ["--data-dir", str(data_dir), "--port", str(port)],
        url=f"http://127.0.0.1:{port}",
        env=dict(os.environ),
    ):
        result = run_demo(data_dir, tmp_path, "--no-serve")
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"a server is running on {data_dir}" in result.stdout
        assert (data_dir / "ledger").is_dir()


@pytest.mark.slow
@pytest.mark.skipif(
    not FIXTURES.is_dir(), reason="the Synthea fixtures are not beside the checkout"
)
def test_demo_runs_the_tour_and_every_control_holds(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-data"
    result = run_demo(data_dir, tmp_path, "--port", "0", "--no-serve")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "✗" not in out
    assert "every control did what it should" in out

    # The load: every bundle with its companions; the flexporter one refused, saying why.
    assert re.search(r"loaded 24 of 25 bundles: [\d,]+ entries", out)
    assert "refused flexporter_Lindsay928_Gerlach374.json (HTTP 400" in out
    assert "conditional reference to Practitioner matches no resource" in out

    # The requests, as curl lines to try, and what came back.
    assert re.search(
        r'curl -s -H "Authorization: Bearer \$CLINICIAN" "http://127\.0\.0\.1:\d+/fhir/Patient/[\w-]+"',
        out,
    )
    assert out.count("→ 200 OK") == 3
    assert out.count("→ 404 Not Found") == 2
    assert "meta.security: REDACTED" in out
    assert re.search(r"total: \d+ Observations", out)

    # The ledger: events of the requests, verified; an edit caught.
    assert "denied: no-relationship" in out
    assert "purpose-not-permitted" in out
    assert re.search(r"verified .*: \d+ entries, \d+ signed checkpoints", out)
    assert re.search(r"FAILED ledger modified at index \d+", out)

    # At rest: the name the API returned appears in no file the server wrote.
    match = re.search(r"returned the patient's name \((\S+) (\S+)\)", out)
    assert match, out[-4000:]
    given, family = match.groups()
    assert f"{given} {family}" in out  # the API's answer, shown in the tour
    for path in [*data_dir.joinpath("records").iterdir(), data_dir / "serve.log"]:
        data = path.read_bytes().lower()
        assert given.lower().encode() not in data, path.name
        assert family.lower().encode() not in data, path.name

    # tokens.env is a shell file with a token for every demo user.
    env = subprocess.run(
        ["bash", "-c", f"source {data_dir / 'tokens.env'} && env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in (
        "CLINICIAN",
        "NURSE",
        "FRONT_DESK",
        "BILLING",
        "PATIENT",
        "PRIVACY_OFFICER",
        "ADMIN",
        "OTHER_CLINICIAN",
        "LOADER",
    ):
        assert re.search(rf"^{name}=ey[\w-]+\.[\w-]+\.[\w-]+$", env, re.MULTILINE), name
