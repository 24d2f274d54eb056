"""The access policy compiled into SQL (``PolicyScope``), on both engines: for any search
scope, the rows a search returns, its total, every page and every ``_include`` are exactly the
rows ``SearchScope.admits`` admits -- the meaning the access decision is property-tested
against (``tests/unit/access/test_access_properties.py``).

A scope narrowed to the launch patient is compiled to the key subjects it admits when that
can be judged without the database (``key_subject = :patient`` for a patient's own app);
these tests hold that shortcut to the same meaning as the general predicate, for every
scope, including the odd ones (a launch patient or ``fhirUser`` naming the directory's
subject, an unknown patient, grants beside relationships).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from records_store_support import StoreFactory
from test_records_search import observation, put

from phivault.access.decision import RelationshipFacts, ScopeClause, SearchScope
from phivault.access.vocabulary import Relationship
from phivault.records.query import parse_search
from phivault.records.repository import PolicyScope
from phivault.records.store import DIRECTORY_SUBJECT, SqlRecordStore
from phivault.records.store.schema import resources

PATIENTS = ("p1", "p2", "p3")
CARES_FOR = {("pr1", "p1")}  # written below as a CareTeam
# label -> key subject of every Observation stored (None: no patient, the directory's subject)
OBSERVATIONS = {
    **{f"o-{p}-{k}": p for p in PATIENTS for k in range(3)},
    "o-none": None,  # an Observation without a subject
}


@pytest.fixture(scope="module")
def shared(module_stores: StoreFactory) -> SqlRecordStore:
    store = module_stores.open()
    for label, patient in OBSERVATIONS.items():
        doc = observation(label, patient or "x", "111", "2020")
        if patient is None:
            del doc["subject"]
        put(store, doc)
    for p in PATIENTS:
        put(store, {"resourceType": "Patient", "id": p})
    put(store, {"resourceType": "Organization", "id": "org1", "name": "General Hospital"})
    put(store, {"resourceType": "CareTeam", "id": "ct1", "status": "active",
                "subject": {"reference": "Patient/p1"},
                "participant": [{"member": {"reference": "Practitioner/pr1"}}]})  # fmt: skip
    return store


def _subjects(resource_type: str) -> dict[str, str]:
    """id -> key subject of the stored resources of a type."""
    if resource_type == "Observation":
        return {k: v or DIRECTORY_SUBJECT for k, v in OBSERVATIONS.items()}
    if resource_type == "Patient":
        return {p: p for p in PATIENTS}
    return {"org1": DIRECTORY_SUBJECT}


def _admitted(scope: PolicyScope, resource_type: str) -> set[str]:
    """What ``SearchScope.admits`` admits of the stored resources (the reference meaning)."""
    practitioner = None if scope.practitioner is None else scope.practitioner[1]
    found = set()
    for the_id, subject in _subjects(resource_type).items():
        patient = None if subject == DIRECTORY_SUBJECT else subject
        care = (practitioner, patient) in CARES_FOR
        if scope.scope.admits(RelationshipFacts("t1", patient, care_relationship=care)):
            found.add(the_id)
    return found


def _search(store: SqlRecordStore, query: str, scope: PolicyScope) -> tuple[list[str], int]:
    """Every page of ``query`` (pages of 2) under ``scope``: the ids in order, and the total
    each page reported (they must agree)."""
    rtype, _, params = query.partition("?")
    parsed = parse_search(rtype, f"{params}&_count=2&_total=accurate".lstrip("&"))
    seen: list[str] = []
    totals = set()
    offset: int | None = 0
    with store.unit_of_work(read_only=True) as uow:
        while offset is not None:
            page = uow.search("t1", parsed, scopes=[scope], offset=offset)
            seen += [m.key.resource_id for m in page.matches]
            totals.add(page.total)
            offset = page.next_offset
    assert len(totals) == 1, "every page reports the same total"
    (total,) = totals
    assert total is not None
    return seen, total


PEOPLE = st.sampled_from([None, *PATIENTS, "p9", DIRECTORY_SUBJECT])


@st.composite
def scopes(draw: st.DrawFn, *, directory: bool) -> PolicyScope:
    clauses = draw(
        st.lists(
            st.builds(
                ScopeClause,
                st.sampled_from([None, *Relationship]),
                st.booleans(),
                st.frozensets(st.sampled_from([*PATIENTS, "p9", DIRECTORY_SUBJECT]), max_size=2),
            ),
            max_size=3,
        )
    )
    scope = SearchScope(
        tenant="t1",
        directory=directory,
        clauses=tuple(clauses),
        own_patient=draw(PEOPLE),
        patient_only=draw(st.booleans()),
        patient_context=draw(PEOPLE),
    )
    practitioner = draw(st.sampled_from([None, ("Practitioner", "pr1"), ("Practitioner", "pr9")]))
    return PolicyScope(scope, practitioner)


def _own_app(patient: str) -> PolicyScope:
    """A patient's own app: ``patient/*.rs``, fhirUser and launch context the same patient."""
    clause = ScopeClause(Relationship.OWN, True)
    return PolicyScope(SearchScope("t1", False, (clause,), patient, True, patient), None)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scope=scopes(directory=False), patients=scopes(directory=False))
@example(scope=_own_app("p1"), patients=_own_app("p1"))
# The directory's subject named as the caller's own patient: no patient has that id, so it
# admits nothing (the SQL once admitted the subject-less Observation; the decision did not).
@example(
    scope=PolicyScope(
        SearchScope(
            "t1", False, (ScopeClause(Relationship.OWN, True),), DIRECTORY_SUBJECT, False, None
        ),
        None,
    ),
    patients=_own_app("p1"),
)
def test_searches_totals_pages_and_includes_are_exactly_what_the_scope_admits(
    shared: SqlRecordStore, scope: PolicyScope, patients: PolicyScope
) -> None:
    expected = _admitted(scope, "Observation")
    seen, total = _search(shared, "Observation", scope)
    assert set(seen) == expected and len(seen) == len(expected)
    assert total == len(expected)
    # _include: only the patients the caller could search for, of the matches' patients
    query = parse_search("Observation", "_count=100&_include=Observation:patient")
    with shared.unit_of_work(read_only=True) as uow:
        page = uow.search("t1", query, scopes=[scope])
        included = uow.included("t1", page.matches, query.includes[0], scopes=[patients])
    referenced = {OBSERVATIONS[m.key.resource_id] for m in page.matches} - {None}
    assert {m.key.resource_id for m in included} == referenced & _admitted(patients, "Patient")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scope=scopes(directory=True))
def test_directory_searches_are_exactly_what_the_scope_admits(
    shared: SqlRecordStore, scope: PolicyScope
) -> None:
    seen, total = _search(shared, "Organization", scope)
    assert set(seen) == _admitted(scope, "Organization") and total == len(seen)


def test_a_patients_own_app_sees_its_own_compartment_alone(shared: SqlRecordStore) -> None:
    mine = _own_app("p2")
    seen, total = _search(shared, "Observation?patient=p2", mine)
    assert sorted(seen) == ["o-p2-0", "o-p2-1", "o-p2-2"] and total == 3
    # asking for another patient's records finds nothing, and counts nothing
    assert _search(shared, "Observation?patient=p1", mine) == ([], 0)
    assert _search(shared, "Observation?code=111", mine) == (sorted(seen), 3)
    # a launch context of another patient than the caller's own admits nothing at all
    elsewhere = PolicyScope(replace(mine.scope, patient_context="p1"), None)
    assert _search(shared, "Observation", elsewhere) == ([], 0)
    # _include reaches the caller's own Patient only
    query = parse_search("Observation", "_count=100&_include=Observation:patient")
    everyone = PolicyScope(
        SearchScope("t1", False, (ScopeClause(Relationship.TENANT, True),)), None
    )
    with shared.unit_of_work(read_only=True) as uow:
        page = uow.search("t1", query, scopes=[everyone])
        included = uow.included("t1", page.matches, query.includes[0], scopes=[mine])
    assert [m.key.resource_id for m in included] == ["p2"]


def test_a_patients_own_app_compiles_to_one_comparison() -> None:
    """The shortcut: one equality on the key subject, no compartment test ANDed to it."""
    sql = str(_own_app("p2").predicate(resources).compile(compile_kwargs={"literal_binds": True}))
    assert sql == "rec_resources.key_subject = 'p2'"
    clinician = PolicyScope(
        SearchScope("t1", False, (ScopeClause(Relationship.CARE, True),), None, True, "p2"),
        ("Practitioner", "pr1"),
    )  # a care relationship needs the database: the general predicate
    assert "care_via" in str(clinician.predicate(resources))
