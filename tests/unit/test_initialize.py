"""Creating a data directory: all of it, or nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from phivault.datadir import DataDir, DataDirExists
from phivault.errors import ConfigurationError
from phivault.initialize import initialize_data_dir


def test_a_dev_data_directory_has_every_parts_state(tmp_path: Path) -> None:
    done = initialize_data_dir(tmp_path / "data", dev=True)
    assert DataDir.open(tmp_path / "data").dev
    assert done.ledger_verifier_key.startswith(done.data_dir.origin + "+")
    assert len(done.keystore.shares) == 5 and done.keystore.threshold == 3
    assert done.dev_identity_issuer is not None
    assert "shares" not in repr(done) and done.keystore.shares[0] not in repr(done)
    with pytest.raises(DataDirExists):
        initialize_data_dir(tmp_path / "data", dev=True)


def test_bad_settings_create_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        initialize_data_dir(tmp_path / "data", dev=False, threshold=6, shares=5)
    assert not (tmp_path / "data").exists()


def test_a_failure_half_way_removes_what_was_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "data"
    # A keys folder that cannot be created (a file is in the way once the ledger exists).
    original = DataDir.create

    def create_then_block(path: Path, *, dev: bool, origin: str | None = None) -> DataDir:
        made = original(path, dev=dev, origin=origin)
        made.keys_dir.rmdir()
        made.keys_dir.write_text("in the way")
        return made

    monkeypatch.setattr(DataDir, "create", staticmethod(create_then_block))
    with pytest.raises(OSError):
        initialize_data_dir(target, dev=True)
    assert not target.exists()
