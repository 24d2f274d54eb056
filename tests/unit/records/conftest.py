"""Fixtures for the records unit tests: every Synthea bundle, parsed once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

Resource = dict[str, Any]


@pytest.fixture(scope="session")
def synthea_bundles(fixtures_dir: Path) -> dict[str, dict[str, Any]]:
    """File name -> parsed Bundle, for every Synthea fixture (each file read once)."""
    paths = sorted((fixtures_dir / "synthea").glob("*.json"))
    if not paths:
        pytest.fail("no Synthea fixtures found")
    return {p.name: orjson.loads(p.read_bytes()) for p in paths}


def iter_resources(bundles: dict[str, dict[str, Any]]) -> Iterator[tuple[str, int, Resource]]:
    for name, bundle in bundles.items():
        for index, entry in enumerate(bundle["entry"]):
            yield name, index, entry["resource"]


@pytest.fixture(scope="session")
def synthea_resources(synthea_bundles: dict[str, dict[str, Any]]) -> list[Resource]:
    """Every resource of every fixture bundle, in file and entry order."""
    return [r for _, _, r in iter_resources(synthea_bundles)]
