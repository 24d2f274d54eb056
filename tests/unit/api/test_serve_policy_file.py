"""An operator's access policy file: used when valid, and an invalid one stops the start with
every problem listed (``access.policy_file`` / ``PHIVAULT_ACCESS__POLICY_FILE``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phivault.access.policy import PolicyInvalid, default_policy_text
from phivault.api.serve import open_service
from phivault.datadir import DataDir
from phivault.errors import ConfigurationError
from phivault.identity.testing import FakeIssuer
from phivault.initialize import initialize_data_dir
from phivault.settings import AccessSettings, Settings


async def test_a_valid_policy_file_is_used_and_an_invalid_one_refused(tmp_path: Path) -> None:
    init = initialize_data_dir(tmp_path / "data", dev=False, threshold=2, shares=3)
    data_dir = DataDir.open(tmp_path / "data")
    shares = init.keystore.shares[:2]
    good = tmp_path / "policy.toml"
    good.write_text(default_policy_text())
    settings = Settings(access=AccessSettings(policy_file=good))
    issuer = FakeIssuer()
    sources = {issuer.issuer: issuer.key_source()}
    async with open_service(settings, data_dir, key_sources=sources, unseal_shares=shares) as app:
        assert app.state.records is not None
    bad = tmp_path / "bad.toml"
    bad.write_text(
        default_policy_text().replace('relationship = "tenant"', 'relationship = "x"', 1)
    )
    with pytest.raises(PolicyInvalid, match="invalid access policy"):
        async with open_service(
            Settings(access=AccessSettings(policy_file=bad)), data_dir, unseal_shares=shares
        ):
            pass
    with pytest.raises(ConfigurationError, match="cannot be read"):
        async with open_service(
            Settings(access=AccessSettings(policy_file=tmp_path / "missing.toml")),
            data_dir,
            unseal_shares=shares,
        ):
            pass


def test_phivault_serve_stops_on_an_invalid_policy_with_a_clear_message(tmp_path: Path) -> None:
    phivault = str(Path(sys.executable).with_name("phivault"))
    subprocess.run([phivault, "init", "--dev", "--data-dir", str(tmp_path / "d")],
                   capture_output=True, check=True, timeout=60)  # fmt: skip
    bad = tmp_path / "bad.toml"
    bad.write_text("format = 1\n[roles.clinician]\nrelationship = 'nonsense'\n")
    env = {**os.environ, "PHIVAULT_ACCESS__POLICY_FILE": str(bad)}
    result = subprocess.run(
        [phivault, "serve", "--data-dir", str(tmp_path / "d"), "--port", "0"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "invalid access policy" in result.stderr
    assert "Traceback" not in result.stderr
