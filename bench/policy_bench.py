"""Benchmark of access decisions on the shipped default policy. Prints one JSON line last.

Keys: ``decisions_per_s`` and ``decision_us`` (one ``decide`` call, averaged over a mix of
questions a server asks: clinicians with and without a care relationship, break-glass grants
live and expired, billing, front desk, patients, services and admins, every interaction),
``allowed_decision_us`` (the allowed questions of the mix alone: the slower path, every
role's tables and the scopes consulted), ``compiled_policy_load_ms`` (parsing, validating,
checking the invariants of and compiling the default policy from its text, the cost paid
once at start). The goal (issue 6) is a single decision under 20 µs in-process.

Run: ``.venv/bin/python bench/policy_bench.py [--decisions N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import cycle, islice

from phivault.access.decision import (
    AccessContext,
    BreakGlassGrant,
    RelationshipFacts,
    compile_policy,
    decide,
)
from phivault.access.policy import default_policy_text, load_policy
from phivault.access.vocabulary import Interaction
from phivault.identity.principal import Role
from phivault.identity.scopes import parse_scopes

NOW = 1_800_000_000.0


def contexts() -> list[AccessContext]:
    def ctx(role: Role, scope: str, **kw: object) -> AccessContext:
        scopes, _ = parse_scopes(scope)
        return AccessContext(
            subject="u1",
            tenant="t1",
            roles=frozenset({role}),
            scopes=scopes,
            **kw,  # type: ignore[arg-type]
        )

    live = BreakGlassGrant("bg-1", "t1", "u1", "p2", NOW - 60, NOW + 3600)
    expired = BreakGlassGrant("bg-0", "t1", "u1", "p3", NOW - 7200, NOW - 3600)
    return [
        ctx(Role.CLINICIAN, "user/*.cruds"),
        ctx(Role.CLINICIAN, "user/*.rs", grants=(live, expired)),
        ctx(Role.NURSE, "user/Observation.cruds user/Patient.rs", purposes=("TREAT",)),
        ctx(Role.FRONT_DESK, "user/Patient.cruds user/Coverage.rs"),
        ctx(Role.BILLING, "user/*.rs", purposes=("HPAYMT",)),
        ctx(Role.PATIENT, "patient/*.rs", fhir_user="Patient/p1", patient_context="p1"),
        ctx(Role.SERVICE, "system/*.rs", purposes=("PUBHLTH",)),
        ctx(Role.ADMIN, "system/*.cruds"),
    ]


FACTS = [
    RelationshipFacts("t1", "p1", care_relationship=True),
    RelationshipFacts("t1", "p2", care_relationship=False),
    RelationshipFacts("t1", "p3", care_relationship=False),
    RelationshipFacts("t1", None),
]
TYPES = ["Patient", "Observation", "Claim", "Encounter", "Practitioner", "MedicationRequest"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=500_000)
    args = parser.parse_args()

    text = default_policy_text()
    loads = []
    for _ in range(5):
        start = time.perf_counter()
        compiled = compile_policy(load_policy(text))
        loads.append(time.perf_counter() - start)
    load_ms = min(loads) * 1000

    questions = [
        (c, t, i, f)
        for c in contexts()
        for t in TYPES
        for i in Interaction
        for f in (FACTS[3],)
        if t == "Practitioner"
    ] + [
        (c, t, i, f)
        for c in contexts()
        for t in TYPES
        if t != "Practitioner"
        for i in Interaction
        for f in FACTS[:3]
    ]
    allowed = sum(decide(compiled, c, t, i, f, now=NOW).allowed for c, t, i, f in questions)
    work = list(islice(cycle(questions), args.decisions))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for c, t, i, f in work:
            decide(compiled, c, t, i, f, now=NOW)
        best = min(best, time.perf_counter() - start)
    decision_us = best / len(work) * 1e6
    granted = [q for q in questions if decide(compiled, q[0], q[1], q[2], q[3], now=NOW).allowed]
    granted_work = list(islice(cycle(granted), args.decisions // 2))
    granted_best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for c, t, i, f in granted_work:
            decide(compiled, c, t, i, f, now=NOW)
        granted_best = min(granted_best, time.perf_counter() - start)
    print(
        f"{len(questions)} distinct questions ({allowed} allowed), {len(work)} decisions, "
        f"best of 3 runs",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "decisions_per_s": round(len(work) / best),
                "decision_us": round(decision_us, 3),
                "compiled_policy_load_ms": round(load_ms, 3),
                "allowed_decision_us": round(granted_best / len(granted_work) * 1e6, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
