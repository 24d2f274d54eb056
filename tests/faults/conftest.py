"""Fixtures for the fault tests: a harness per test that always cleans up, a hard time limit
per test, and the tails of the servers' logs in the report when a test fails."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import pytest
from fault_support import Harness, LogBook, kill_everything, remove_template

# A module may set FAULT_TIMEOUT_S; this is the default hard limit of one fault test.
DEFAULT_TIMEOUT_S = 60.0
# After the limit: one more chance for the test to unwind once every server is killed, then
# the whole run stops (its servers already killed) rather than hang.
_GRACE_S = 15.0

LOGBOOK_KEY = pytest.StashKey[LogBook]()


class FaultTestTimeout(BaseException):
    """The test ran past its hard limit (a BaseException: ``except Exception`` in the code
    under test must not swallow it)."""


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    h = Harness(request.node.name)
    request.node.stash[LOGBOOK_KEY] = h.logs
    try:
        yield h
    finally:
        problems = h.close()
        if problems:
            pytest.fail("fault harness cleanup: " + "; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def hard_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    limit = float(getattr(request.module, "FAULT_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    fired = 0

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        fired += 1
        if fired == 1:
            signal.setitimer(signal.ITIMER_REAL, _GRACE_S)
            raise FaultTestTimeout(f"{request.node.nodeid} ran past its {limit:.0f} s limit")
        kill_everything()
        if fired == 2:
            signal.setitimer(signal.ITIMER_REAL, _GRACE_S)
            raise FaultTestTimeout(f"{request.node.nodeid} still running after its servers died")
        faulthandler.dump_traceback(file=sys.stderr)
        os._exit(70)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session", autouse=True)
def _last_resort_cleanup() -> Iterator[None]:
    try:
        yield
    finally:
        kill_everything()
        remove_template()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        logbook = item.stash.get(LOGBOOK_KEY, None)
        if logbook is not None:
            for name, tail in logbook.tails():
                report.sections.append((f"log of {name} (tail)", tail))
    return report
