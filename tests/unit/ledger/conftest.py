"""Fixtures for the ledger's tests: each test gets its own data directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from phivault.datadir import DataDir


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    from phivault.ledger.service import initialize_ledger

    directory = DataDir.create(tmp_path / "data", dev=True, origin="phivault.test/ledger")
    initialize_ledger(directory)
    return directory
