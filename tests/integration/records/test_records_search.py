"""Search compiled to SQL on both engines: each parameter type, date prefixes, paging,
sorting, totals, blind lookups and caller scopes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from records_store_support import StoreFactory

from phivault.crypto.blind_index import BlindIndexer
from phivault.errors import InvalidInput
from phivault.records.query import parse_search
from phivault.records.search_params import index_entries
from phivault.records.store import (
    DIRECTORY_SUBJECT,
    CareRelationshipScope,
    NewVersion,
    ResourceKey,
    SqlRecordStore,
    SubjectScope,
    blind_terms,
)

T0 = datetime(2026, 1, 2, tzinfo=UTC)
INDEXER = BlindIndexer("t1", {1: bytes(range(32))}, 1)


def put(store: SqlRecordStore, resource: dict[str, object], *, minutes: int = 0) -> None:
    """Index a resource the way the repository will (meta set first), with fake ciphertext."""
    stamp = T0 + timedelta(minutes=minutes)
    doc = {**resource, "meta": {"versionId": "1", "lastUpdated": stamp.isoformat()}}
    rtype, rid = str(resource["resourceType"]), str(resource["id"])
    subject = rid if rtype == "Patient" else DIRECTORY_SUBJECT
    subject_ref = resource.get("subject")
    if isinstance(subject_ref, dict):
        subject = str(subject_ref["reference"]).split("/")[1]
    with store.unit_of_work() as uow:
        uow.write(
            NewVersion(
                ResourceKey("t1", rtype, rid), 1, stamp, subject, {"clinical": b"c"},
                index_entries(doc, INDEXER.tokens),
            ),
            previous=None,
        )  # fmt: skip
        uow.commit()


def observation(the_id: str, patient: str, code: str, when: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "resourceType": "Observation",
        "id": the_id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    doc["effectivePeriod" if isinstance(when, dict) else "effectiveDateTime"] = when
    return doc


def fill(store: SqlRecordStore) -> SqlRecordStore:
    put(store, observation("a", "p1", "111", "2020-01-15T10:00:00Z"), minutes=3)
    put(store, observation("b", "p1", "222", "2020-03-01"), minutes=1)
    put(store, observation("c", "p2", "111", "2021"), minutes=2)
    put(store, observation("d", "p2", "333", {"start": "2019-06-01"}), minutes=0)  # open end
    put(
        store,
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Müller", "given": ["Ann"]}],
         "identifier": [{"system": "urn:mrn", "value": "MRN-001"}], "birthDate": "1980-05-17"},
    )  # fmt: skip
    put(
        store,
        {"resourceType": "Organization", "id": "org1", "name": "General Hospital"},
    )
    return store


@pytest.fixture
def loaded(store: SqlRecordStore) -> SqlRecordStore:
    """The sample records, for a test that changes them."""
    return fill(store)


@pytest.fixture(scope="module")
def shared(module_stores: StoreFactory) -> SqlRecordStore:
    """The sample records, loaded once per engine for the tests that only read."""
    return fill(module_stores.open())


def ids(store: SqlRecordStore, rtype: str, query: str, **kw: object) -> list[str]:
    parsed = parse_search(rtype, query)
    with store.unit_of_work(read_only=True) as uow:
        page = uow.search("t1", parsed, blind=blind_terms(parsed, INDEXER.tokens), **kw)  # type: ignore[arg-type]
    return [m.key.resource_id for m in page.matches]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("code=111", ["a", "c"]),
        ("code=http://loinc.org|222", ["b"]),
        ("code=other|222", []),
        ("code=|222", []),  # no-system only
        ("code:not=111", ["b", "d"]),
        ("code=111,333", ["a", "c", "d"]),
        ("code=111&patient=p2", ["c"]),
        ("subject=Patient/p1", ["a", "b"]),
        ("patient=p9", []),
        ("status=final&_id=a,d", ["a", "d"]),
        ("date=2020", ["a", "b"]),
        ("date=2020-01-15", ["a"]),
        ("date=ne2020", ["c", "d"]),
        ("date=gt2020-12-31", ["c", "d"]),
        ("date=lt2020-01-16", ["a", "d"]),
        ("date=ge2021", ["c", "d"]),
        ("date=le2019-06-01", ["d"]),
        ("date=sa2020-12-31", ["c"]),
        ("date=eb2020-02-01", ["a"]),
        ("date=ap2020-03", ["b", "d"]),
        ("date=ge2020&date=lt2021", ["a", "b", "d"]),
        ("_lastUpdated=gt2026-01-02T00:01:30Z", ["a", "c"]),
        ("_lastUpdated=2026-01-02T00:00:00Z", ["d"]),
    ],
)
def test_clear_parameters(shared: SqlRecordStore, query: str, expected: list[str]) -> None:
    assert ids(shared, "Observation", query) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("name=mu", ["p1"]),  # starts-with, accents and case folded
        ("family=MÜLLER", ["p1"]),
        ("family:exact=muller", ["p1"]),
        ("family:exact=mull", []),
        ("given=an", ["p1"]),
        ("name=ann,zz", ["p1"]),
        ("name=zz", []),
        ("identifier=urn:mrn|MRN-001", ["p1"]),
        ("identifier=mrn001", ["p1"]),  # identifier normalization
        ("identifier=other|MRN-001", []),
        ("birthdate=1980", ["p1"]),
        ("birthdate=1980-05-17", ["p1"]),
        ("birthdate=1980-05-18", []),
    ],
)
def test_blind_parameters(shared: SqlRecordStore, query: str, expected: list[str]) -> None:
    assert ids(shared, "Patient", query) == expected


def test_clear_strings_of_directory_resources(shared: SqlRecordStore) -> None:
    assert ids(shared, "Organization", "name=general") == ["org1"]
    assert ids(shared, "Organization", "name:contains=hosp") == ["org1"]
    assert ids(shared, "Organization", "name:exact=general") == []
    assert ids(shared, "Organization", "name=hospital") == []  # starts-with, not contains


def test_untokenized_blind_criteria_are_refused(shared: SqlRecordStore) -> None:
    with shared.unit_of_work() as uow, pytest.raises(InvalidInput) as refused:
        uow.search("t1", parse_search("Patient", "name=Müller"))
    assert "Müller" not in str(refused.value) and "name" in str(refused.value)


def test_sort_count_paging_and_total(shared: SqlRecordStore) -> None:
    assert ids(shared, "Observation", "_sort=date") == ["d", "a", "b", "c"]
    assert ids(shared, "Observation", "_sort=-date") == ["c", "b", "a", "d"]
    assert ids(shared, "Observation", "_sort=_lastUpdated") == ["d", "b", "c", "a"]
    assert ids(shared, "Observation", "_sort=-_lastUpdated") == ["a", "c", "b", "d"]
    query = parse_search("Observation", "_sort=date&_count=3&_total=accurate")
    with shared.unit_of_work(read_only=True) as uow:
        first = uow.search("t1", query)
        assert first.next_offset == 3 and first.total == 4
        second = uow.search("t1", query, offset=first.next_offset)
        only_total = uow.search("t1", parse_search("Observation", "_count=0&_total=accurate"))
        no_total = uow.search("t1", parse_search("Observation", "code=111"))
    assert [m.key.resource_id for m in first.matches] == ["d", "a", "b"]
    assert [m.key.resource_id for m in second.matches] == ["c"]
    assert second.next_offset is None and second.total == 4
    assert only_total.matches == () and only_total.total == 4
    assert no_total.total is None
    assert all(m.groups == {"clinical": b"c"} for m in first.matches)


def test_scopes_are_anded_into_results_and_totals(shared: SqlRecordStore) -> None:
    scope = SubjectScope(frozenset({"p2"}))
    query = parse_search("Observation", "code=111&_total=accurate")
    with shared.unit_of_work(read_only=True) as uow:
        page = uow.search("t1", query, scopes=[scope])
        nothing = uow.search("t1", query, scopes=[scope, SubjectScope(frozenset())])
    assert [m.key.resource_id for m in page.matches] == ["c"] and page.total == 1
    assert nothing.matches == () and nothing.total == 0


def test_find_ids_for_conditional_references(shared: SqlRecordStore) -> None:
    query = parse_search("Patient", "identifier=urn:mrn|MRN-001")
    with shared.unit_of_work(read_only=True) as uow:
        found = uow.find_ids("t1", query, blind=blind_terms(query, INDEXER.tokens))
        many = uow.find_ids("t1", parse_search("Observation", "status=final"), limit=2)
    assert found == ["p1"]
    assert many == ["a", "b"]


def test_include_follows_references_under_the_same_scopes(loaded: SqlRecordStore) -> None:
    query = parse_search("Observation", "code=111,222&_include=Observation:patient")
    put(loaded, {"resourceType": "Patient", "id": "p2"}, minutes=9)
    with loaded.unit_of_work(read_only=True) as uow:
        page = uow.search("t1", query)
        (include,) = query.includes
        everyone = uow.included("t1", page.matches, include)
        only_p2 = uow.included(
            "t1", page.matches, include, scopes=[SubjectScope(frozenset({"p2"}))]
        )
        groups = uow.included("t1", page.matches, include, groups=set())
    assert [m.key.resource_id for m in page.matches] == ["a", "b", "c"]
    assert [(m.key.resource_type, m.key.resource_id) for m in everyone] == [
        ("Patient", "p1"), ("Patient", "p2"),
    ]  # fmt: skip
    assert [m.key.resource_id for m in only_p2] == ["p2"]
    assert all(m.groups == {} for m in groups)


def test_scan_current_walks_every_live_resource_once(loaded: SqlRecordStore) -> None:
    with loaded.unit_of_work() as uow:
        uow.delete(ResourceKey("t1", "Observation", "b"), version=2, last_updated=T0, previous=1)
        uow.commit()
    seen: list[tuple[str, str]] = []
    after = None
    with loaded.unit_of_work(read_only=True) as uow:
        while batch := uow.scan_current("t1", after=after, limit=2):
            seen += [(v.key.resource_type, v.key.resource_id) for v in batch]
            after = seen[-1]
    assert seen == [
        ("Observation", "a"), ("Observation", "c"), ("Observation", "d"),
        ("Organization", "org1"), ("Patient", "p1"),
    ]  # fmt: skip


def test_care_relationship_scope_follows_care_teams_encounters_and_gps(
    loaded: SqlRecordStore,
) -> None:
    put(loaded, {"resourceType": "CareTeam", "id": "ct1", "subject": {"reference": "Patient/p1"},
                 "participant": [{"member": {"reference": "Practitioner/pr1"}}]})  # fmt: skip
    put(loaded, {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p2"},
                 "participant": [{"individual": {"reference": "Practitioner/pr2"}}]})  # fmt: skip
    put(loaded, {"resourceType": "Patient", "id": "p3",
                 "generalPractitioner": [{"reference": "Practitioner/pr3"}]})  # fmt: skip
    put(loaded, observation("e", "p3", "111", "2022"))
    query = parse_search("Observation", "_total=accurate")

    def visible(practitioner: str) -> tuple[list[str], int | None]:
        scope = CareRelationshipScope("Practitioner", practitioner)
        with loaded.unit_of_work(read_only=True) as uow:
            page = uow.search("t1", query, scopes=[scope])
        return [m.key.resource_id for m in page.matches], page.total

    assert visible("pr1") == (["a", "b"], 2)
    assert visible("pr2") == (["c", "d"], 2)
    assert visible("pr3") == (["e"], 1)
    assert visible("pr9") == ([], 0)
    with loaded.unit_of_work(read_only=True) as uow:  # another tenant's care team counts not
        other = uow.search("t2", query, scopes=[CareRelationshipScope("Practitioner", "pr1")])
    assert other.matches == () and other.total == 0


def test_care_related_answers_as_the_care_scope_does_in_one_statement(
    loaded: SqlRecordStore,
) -> None:
    # care_related (the repository's per-row fact) and CareRelationshipScope (the search
    # predicate) read the same links: for several patients at once, for one, in a unit that
    # began with a point read (SQLite: on the driver's cursor), and for another tenant.
    put(loaded, {"resourceType": "CareTeam", "id": "ct1", "subject": {"reference": "Patient/p1"},
                 "participant": [{"member": {"reference": "Practitioner/pr1"}}]})  # fmt: skip
    put(loaded, {"resourceType": "CareTeam", "id": "ct2", "status": "inactive",
                 "subject": {"reference": "Patient/p2"},
                 "participant": [{"member": {"reference": "Practitioner/pr1"}}]})  # fmt: skip
    put(loaded, {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p2"},
                 "participant": [{"individual": {"reference": "Practitioner/pr2"}}]})  # fmt: skip
    put(loaded, {"resourceType": "Patient", "id": "p3",
                 "generalPractitioner": [{"reference": "Practitioner/pr1"}]})  # fmt: skip
    with loaded.unit_of_work() as uow:
        uow.assign_care("t1", ("Practitioner", "pr2"), "p4", by="admin", at=0)
        uow.commit()
    everyone = ["p1", "p2", "p3", "p4", "p9"]
    expected = {"pr1": {"p1", "p3"}, "pr2": {"p2", "p4"}, "pr9": set()}
    query = parse_search("Observation", "_total=accurate")
    for practitioner, related in expected.items():
        doctor = ("Practitioner", practitioner)
        with loaded.unit_of_work(read_only=True) as uow:
            page = uow.search("t1", query, scopes=[CareRelationshipScope(*doctor)])
            assert {m.key_subject for m in page.matches} <= related
            assert uow.care_related("t1", doctor, everyone) == related
            assert uow.care_related("t2", doctor, everyone) == set()
        for patient in everyone:
            with loaded.unit_of_work(read_only=True) as uow:
                uow.read(ResourceKey("t1", "Patient", "p3"))  # a point read begins the unit
                assert uow.care_related("t1", doctor, [patient]) == related & {patient}
                assert uow.care_related("t2", doctor, [patient]) == set()
    with loaded.unit_of_work() as uow:
        assert uow.unassign_care("t1", ("Practitioner", "pr2"), "p4")
        uow.commit()
    with loaded.unit_of_work(read_only=True) as uow:
        assert uow.care_related("t1", ("Practitioner", "pr2"), ["p4"]) == set()
        assert uow.care_related("t1", ("Practitioner", "pr2"), ["p2", "p4"]) == {"p2"}


def test_voided_care_records_establish_no_relationship(loaded: SqlRecordStore) -> None:
    # The SQL scope and the access policy's Python check read the same voiding statuses.
    voided = [
        ("CareTeam", "member", "inactive"),
        ("CareTeam", "member", "entered-in-error"),
        ("Encounter", "individual", "cancelled"),
        ("Encounter", "individual", "entered-in-error"),
    ]
    for number, (kind, member, status) in enumerate(voided):
        practitioner = {"reference": f"Practitioner/prv{number}"}
        put(
            loaded,
            {
                "resourceType": kind,
                "id": f"void{number}",
                "status": status,
                "subject": {"reference": "Patient/p1"},
                "participant": [{member: practitioner}],
            },
        )
    put(
        loaded,
        {
            "resourceType": "Encounter",
            "id": "live",
            "status": "finished",
            "subject": {"reference": "Patient/p1"},
            "participant": [{"individual": {"reference": "Practitioner/prlive"}}],
        },
    )
    query = parse_search("Observation", "_total=accurate")
    with loaded.unit_of_work(read_only=True) as uow:
        for number in range(len(voided)):
            scope = CareRelationshipScope("Practitioner", f"prv{number}")
            page = uow.search("t1", query, scopes=[scope])
            assert page.matches == () and page.total == 0
        live = uow.search("t1", query, scopes=[CareRelationshipScope("Practitioner", "prlive")])
        own = uow.search("t1", query, scopes=[SubjectScope(frozenset({"p1"}))])
    assert own.matches  # the patient has observations to see
    assert [m.key for m in live.matches] == [m.key for m in own.matches]
