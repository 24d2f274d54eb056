"""Test-wide fixtures: where the shared fixtures live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from postgres_support import require_postgres

# The machine is shared: how fast Hypothesis generates inputs, and how long one example
# takes, say nothing about the code under test. The rules are checked on every example all
# the same; only the timing health check and the per-example deadline are off.
settings.register_profile("phivault", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "phivault"))

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repository beside ../shared; so does every developer's checkout.
SHARED = Path(os.environ.get("PHIVAULT_SHARED", REPO_ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES} (set PHIVAULT_SHARED)")
    return FIXTURES


@pytest.fixture(scope="session")
def postgres() -> str:
    """The PostgreSQL admin connection string; fails the test clearly if the server is down."""
    return require_postgres()
