from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from phivault.api.serve import ServeOptions, serve, tls_context
from phivault.datadir import DataDir
from phivault.errors import ConfigurationError
from phivault.settings import Settings


def test_refuses_half_a_tls_configuration(tmp_path: Path) -> None:
    data_dir = DataDir.create(tmp_path / "d", dev=True)
    with pytest.raises(ConfigurationError, match="go together"):
        serve(Settings(), data_dir, ServeOptions(tls_cert=tmp_path / "cert.pem"))


def test_refuses_several_workers(tmp_path: Path) -> None:
    data_dir = DataDir.create(tmp_path / "d", dev=True)
    with pytest.raises(ConfigurationError, match="single writer"):
        serve(Settings(), data_dir, ServeOptions(workers=4))


def test_unreadable_certificate(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        tls_context(tmp_path / "missing.pem", tmp_path / "missing.key")


def test_tls_context_minimum_version(tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = tls_context(tmp_path / "c.pem", tmp_path / "k.pem")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
