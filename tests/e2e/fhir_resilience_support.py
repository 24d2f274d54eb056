"""Helpers for the fail-closed and crash tests: a ``--dev`` data directory, tokens from its dev
identity provider, the ledger's events read back, and ``phivault ledger verify``.

(A uniquely named module: the e2e tests are not a package.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from phivault.access.decision import AccessContext
from phivault.cli.load import LOADER_PURPOSE, LOADER_SCOPES
from phivault.datadir import DataDir
from phivault.identity.dev_provider import DevIdentityProvider, DevProviderWarning
from phivault.identity.principal import Role
from phivault.identity.scopes import parse_scopes
from phivault.ledger.ports import AuditSink
from phivault.ledger.service import open_ledger_readonly
from phivault.records.results import Caller
from phivault.records.testing import FixedCallerTrail
from phivault.settings import Settings

PHIVAULT = str(Path(sys.executable).with_name("phivault"))
FHIR_JSON = "application/fhir+json"
#: What each write intent must eventually be followed by (same request, same versions).
DOMAIN_RESOURCE = "4"  # AuditEvent.entity.role, as the repository names written versions
OUTCOMES = frozenset({"committed", "rolled-back", "reconciled-committed", "reconciled-absent"})


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PHIVAULT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def init_dev_data_dir(path: Path) -> Path:
    """``phivault init --dev`` as a user runs it."""
    result = run_cli("init", "--dev", "--json", "--data-dir", str(path))
    if result.returncode != 0:
        raise RuntimeError(f"phivault init failed: {result.stderr}")
    return path


class Tokens:
    """Bearer tokens from the data directory's dev identity provider, minted in process."""

    def __init__(self, data_dir: Path, settings: Settings | None = None) -> None:
        self._audience = (settings or Settings()).identity.audience
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DevProviderWarning)
            self._provider = DevIdentityProvider.open(
                DataDir.open(data_dir), settings or Settings()
            )

    def _headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON}

    def loader(self) -> dict[str, str]:
        """What ``phivault load`` uses: service, HOPERAT, write-only on PHI."""
        return self._headers(
            self._provider.mint(
                user="service-loader",
                roles=[Role.SERVICE],
                audience=self._audience,
                scopes=LOADER_SCOPES,
                purpose_of_use=[LOADER_PURPOSE],
            )
        )

    def registry(self) -> dict[str, str]:
        """A public-health registry (service, PUBHLTH): may search Patients tenant-wide."""
        return self._headers(
            self._provider.mint(
                user="service-registry",
                roles=[Role.SERVICE],
                audience=self._audience,
                scopes=["system/Patient.rs", "system/Immunization.rs"],
                purpose_of_use=["PUBHLTH"],
            )
        )

    def patient(self, patient_id: str) -> dict[str, str]:
        return self._headers(
            self._provider.mint(
                user=f"patient-{patient_id}",
                roles=[Role.PATIENT],
                audience=self._audience,
                fhir_user=f"Patient/{patient_id}",
                scopes=["patient/*.rs"],
            )
        )


def ledger_events(data_dir: Path) -> list[dict[str, Any]]:
    """Every event document in the data directory's ledger (read-only, beside a writer)."""
    with open_ledger_readonly(DataDir.open(data_dir)) as store:
        return [json.loads(leaf) for leaf in store.scan()]


def _written(event: dict[str, Any]) -> tuple[str, ...]:
    return tuple(
        sorted(
            e["what"]
            for e in event.get("entities", ())
            if "/_history/" in e.get("what", "") and e.get("role") == DOMAIN_RESOURCE
        )
    )


def open_intents(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Intent events with no outcome event for the same request and the same versions."""
    settled = Counter(
        (e.get("request_id"), _written(e)) for e in events if e.get("outcome_reason") in OUTCOMES
    )
    missing = []
    for event in events:
        if event.get("outcome_reason") != "intent":
            continue
        key = (event.get("request_id"), _written(event))
        if settled[key] > 0:
            settled[key] -= 1
        else:
            missing.append(event)
    return missing


def verify_ledger(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``phivault ledger verify --thorough``, offline, as an auditor runs it."""
    return run_cli("ledger", "verify", "--thorough", "--data-dir", str(data_dir))


def ledger_trail(
    sink: AuditSink, who: str, request_id: str, purposes: tuple[str, ...]
) -> FixedCallerTrail:
    """An audit trail as the front door builds one (who, request id), over any sink."""
    return FixedCallerTrail(
        sink, who, observer="resilience-test", request_id=request_id, purposes=purposes
    )


def service_caller(
    sink: AuditSink, *, scopes: str, purpose: str, request_id: str = "req-test"
) -> Caller:
    """A service caller of the ``default`` tenant (a dev data directory's), audited to
    ``sink`` (the service's own ledger)."""
    access = AccessContext(
        subject=f"service-{purpose.lower()}",
        tenant="default",
        roles=frozenset({Role.SERVICE}),
        scopes=parse_scopes(scopes)[0],
        purposes=(purpose,),
    )
    return Caller(access, ledger_trail(sink, access.subject, request_id, (purpose,)))
