"""``phivault serve`` starts sealed when it cannot unseal itself; custodians unseal it over
HTTP with their shares, and only then is it ready for traffic."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import phivault_serve
from test_serve import run_cli

from ports_support import free_port

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
pytestmark = pytest.mark.integration


@pytest.fixture
def sealed_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    data_dir = tmp_path / "data"
    init = run_cli("init", "--dev", "--json", "--data-dir", str(data_dir))
    assert init.returncode == 0, init.stderr
    shares = json.loads(init.stdout)["keys"]["unseal_shares"]
    # Without the dev unseal file, nothing can unseal the server but the custodians' shares.
    (data_dir / "keys" / "dev-unseal.json").unlink()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PHIVAULT_API__RATE_LIMIT_PER_ADDRESS": "10000/minute"}
    with phivault_serve(["--port", str(port), "--data-dir", str(data_dir)], url=url, env=env):
        yield url, data_dir, shares


def test_custodians_unseal_a_sealed_server(sealed_server: tuple[str, Path, list[str]]) -> None:
    url, data_dir, shares = sealed_server
    minted = run_cli("token", "--role", "admin", "--mfa", "--json", "--data-dir", str(data_dir))
    assert minted.returncode == 0, minted.stderr
    operator = {"Authorization": f"Bearer {json.loads(minted.stdout)['access_token']}"}
    with httpx.Client(base_url=url) as client:
        assert client.get("/healthz").status_code == 200  # up...
        assert client.get("/readyz").status_code == 503  # ...but not ready: sealed
        for share in shares[:2]:
            partial = client.post(
                "/admin/keys/unseal", json={"credentials": [share]}, headers=operator
            )
            assert partial.status_code == 200 and partial.json()["sealed"] is True
        done = client.post(
            "/admin/keys/unseal", json={"credentials": [shares[4]]}, headers=operator
        )
        assert done.status_code == 200, done.text
        assert done.json()["sealed"] is False
        assert client.get("/readyz").status_code == 200
