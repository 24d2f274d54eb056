"""``phivault serve`` as shipped: real CLI, real ledger, dev identity provider, HTTPS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from live_server import phivault_serve

from phivault.datadir import DataDir
from phivault.ledger.service import open_ledger_readonly
from ports_support import free_port

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
pytestmark = pytest.mark.integration


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHIVAULT, *args], capture_output=True, text=True, timeout=60, check=False
    )


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _trust(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    folder = tmp_path_factory.mktemp("serve")
    data_dir = folder / "data"
    init = run_cli("init", "--dev", "--json", "--data-dir", str(data_dir))
    assert init.returncode == 0, init.stderr
    cert, key = self_signed(folder)
    port = free_port()
    env = {**os.environ, "PHIVAULT_API__RATE_LIMIT_PER_ADDRESS": "10000/minute"}
    url = f"https://127.0.0.1:{port}"
    args = ["--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)]
    with phivault_serve(
        [*args, "--data-dir", str(data_dir)], url=url, verify=_trust(cert), env=env
    ):
        yield url, cert, data_dir


def test_https_dev_token_and_jwks(server: tuple[str, Path, Path]) -> None:
    url, cert, data_dir = server
    minted = run_cli("token", "--role", "clinician", "--json", "--data-dir", str(data_dir))
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)["access_token"]
    with httpx.Client(verify=_trust(cert)) as client:
        me = client.get(f"{url}/whoami", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        assert me.json()["subject"] == "dr-alice"
        jwks = client.get(f"{url}/.well-known/jwks.json").json()
        discovery = client.get(f"{url}/.well-known/openid-configuration").json()
        assert discovery["jwks_uri"].endswith("/.well-known/jwks.json")
        assert all("d" not in k for k in jwks["keys"])
        refused = client.get(f"{url}/whoami", headers={"Authorization": f"Bearer {token[:-4]}AAAA"})
        assert refused.status_code == 401
    # Both the session start and the refusal are in the real ledger.
    with open_ledger_readonly(DataDir.open(data_dir)) as store:
        deadline = time.monotonic() + 5
        while store.size() < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.size() >= 2


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_versions(server: tuple[str, Path, Path]) -> None:
    url, cert, _ = server
    host, port = url.removeprefix("https://").split(":")
    modern = ssl.create_default_context(cafile=str(cert))
    with (
        socket.create_connection((host, int(port))) as raw,
        modern.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() == "TLSv1.3"
    old = ssl.create_default_context(cafile=str(cert))
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError), socket.create_connection((host, int(port))) as raw:
        old.wrap_socket(raw, server_hostname=host)


def test_plain_http_is_not_served(server: tuple[str, Path, Path]) -> None:
    url, _, _ = server
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https://", "http://") + "/healthz", timeout=2)


def test_serve_refuses_several_workers_with_the_embedded_ledger(
    server: tuple[str, Path, Path],
) -> None:
    _, _, data_dir = server
    result = run_cli("serve", "--workers", "2", "--data-dir", str(data_dir))
    assert result.returncode == 1
    assert "single writer" in result.stderr


def test_serve_names_every_problem_of_a_settings_file(tmp_path: Path) -> None:
    missing = run_cli("serve", "--config", str(tmp_path / "absent.toml"))
    assert missing.returncode == 1
    assert "cannot be read" in missing.stderr
    bad = tmp_path / "phivault.toml"
    bad.write_text(
        '[shape]\nstore = "postgres"\n[api]\nmax_body_bytes = -987654\n', encoding="utf-8"
    )
    result = run_cli("serve", "--config", str(bad), "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "api.max_body_bytes" in result.stderr
    assert "987654" not in result.stderr  # problems are named, values never echoed


def test_several_workers_need_the_scaled_shape(tmp_path: Path) -> None:
    config = tmp_path / "phivault.toml"
    config.write_text('[shape]\nshared_state = "redis"\n', encoding="utf-8")
    result = run_cli("serve", "--config", str(config), "--workers", "2")
    assert result.returncode == 1
    assert "scaled shape" in result.stderr
