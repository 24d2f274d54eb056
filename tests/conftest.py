"""Test-wide fixtures (where the shared fixtures live) and how tests are spread over workers."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from postgres_support import require_postgres
from redis_support import redis_server  # noqa: F401  (a fixture for any test: a private Redis)

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


# --- running on several workers (pytest-xdist, `make test`) -----------------------------------
#
# `make test` runs `pytest -n N --dist loadgroup`: each worker is its own process with its own
# session, so a module- or session-scoped fixture is built once per worker that runs a test
# needing it. Tests that share such a fixture are put in one xdist group here, so that it is
# built once per run (and its tests never race each other on it); the other tests are spread
# one by one. The longest are handed out first, so that no worker starts a long one last.

_TESTS = Path(__file__).resolve().parent
# Each of these runs alone on its worker, one test after another: fault tests start 3-node
# NATS clusters, private PostgreSQL clusters and several worker processes each, and their
# timing bounds assume that no other fault test competes for the 2 cores.
_SERIAL_DIRS = {"faults": "faults"}


def _shared_setup_keys(item: pytest.Item) -> set[str]:
    """What ``item`` shares with other tests: a module- or class-scoped fixture (its module's
    tests), a session-scoped fixture defined outside a conftest.py (every test using it)."""
    keys: set[str] = set()
    module = item.nodeid.split("::", 1)[0]
    relative = Path(module).relative_to("tests") if module.startswith("tests/") else Path(module)
    if relative.parts and relative.parts[0] in _SERIAL_DIRS:
        keys.add(_SERIAL_DIRS[relative.parts[0]])
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return keys
    for name in info.names_closure:
        for fixturedef in info.name2fixturedefs.get(name, ()):
            source = Path(inspect.getsourcefile(fixturedef.func) or "")
            if not source.is_relative_to(_TESTS):
                continue  # a plugin's (pytest-asyncio's loops): nothing expensive
            if fixturedef.scope in ("class", "module"):
                keys.add(module)
            elif fixturedef.scope in ("package", "session") and source.name != "conftest.py":
                keys.add(f"{fixturedef.func.__module__}.{fixturedef.func.__name__}")
    return keys


def _weight(item: pytest.Item) -> int:
    """The order in which work is handed out: the longest units first (the fault tests, one
    group of several minutes), then e2e and slow tests, then the rest."""
    top = item.nodeid.split("/", 2)[1] if item.nodeid.startswith("tests/") else ""
    if top in _SERIAL_DIRS:
        return 0
    if top == "e2e" or item.get_closest_marker("slow") is not None:
        return 1
    return 2


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("dist", "no") != "loadgroup":
        return
    # Tests that share anything share one group: union-find over what each test shares.
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    shared = {item.nodeid: sorted(_shared_setup_keys(item)) for item in items}
    for keys in shared.values():
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
    for item in items:
        keys = shared[item.nodeid]
        if keys:
            item.add_marker(pytest.mark.xdist_group(root(keys[0])))
    items.sort(key=_weight)  # stable: collection order otherwise
