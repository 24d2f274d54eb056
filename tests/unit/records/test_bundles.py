"""Bundles: validation and transaction planning on every fixture bundle."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from records_support import DictStore, indexer

from phivault.errors import InvalidInput
from phivault.records.bundles import (
    AmbiguousReference,
    ConditionalLookup,
    InvalidBundle,
    Method,
    Outcome,
    PlannedEntry,
    PreconditionFailed,
    UnresolvableReference,
    parse_conditional,
    plan_batch,
    plan_transaction,
    validate_bundle,
)
from phivault.records.search_params import index_entries
from phivault.records.split import split

COMPANIONS = ("wasee11_hospitalInformation.json", "wasee11_practitionerInformation.json")


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"id{next(counter)}"


def nothing(_: ConditionalLookup) -> list[str]:
    return []


def _references(node: Any) -> list[str]:
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    if isinstance(node, dict):
        own = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return own + [r for v in node.values() for r in _references(v)]
    return []


@pytest.fixture(scope="module")
def loaded(synthea_bundles: dict[str, dict[str, Any]]) -> DictStore:
    """The wasee11 companions planned as batches and 'stored', as a loader would do first."""
    store = DictStore()
    new_id = ids()
    for name in COMPANIONS:
        plan = plan_batch(synthea_bundles[name], store.resolve, new_id=new_id)
        for entry in plan.entries:
            assert isinstance(entry, PlannedEntry)
            assert entry.resource is not None
            store.add(dict(entry.resource))
    return store


def test_every_fixture_bundle_validates(synthea_bundles: dict[str, dict[str, Any]]) -> None:
    kinds = {name: validate_bundle(b) for name, b in synthea_bundles.items()}
    assert {kinds[n] for n in COMPANIONS} == {"batch"}
    assert set(kinds.values()) == {"batch", "transaction"}


def test_companions_honour_if_none_exist(
    synthea_bundles: dict[str, dict[str, Any]], loaded: DictStore
) -> None:
    created = sum(len(rows) for rows in loaded.rows.values())
    assert created == sum(len(synthea_bundles[n]["entry"]) for n in COMPANIONS)
    # loading them again creates nothing: every ifNoneExist matches the stored resource
    again = plan_batch(synthea_bundles[COMPANIONS[0]], loaded.resolve, new_id=ids())
    outcomes = {e.outcome for e in again.entries if isinstance(e, PlannedEntry)}
    assert outcomes == {Outcome.EXISTS}
    assert all(isinstance(e, PlannedEntry) and e.resource is None for e in again.entries)


def test_wasee11_patients_plan_with_every_reference_resolved(
    synthea_bundles: dict[str, dict[str, Any]], loaded: DictStore
) -> None:
    for name, bundle in synthea_bundles.items():
        if not name.startswith("wasee11_") or name in COMPANIONS:
            continue
        original = copy.deepcopy(bundle)
        plan = plan_transaction(bundle, loaded.resolve, new_id=ids())
        assert bundle == original  # the caller's bundle is never modified
        assert len(plan.entries) == len(bundle["entry"])
        assert set(plan.ids) == {e["fullUrl"] for e in bundle["entry"]}
        stored = {f"{t}/{i}" for t, rows in loaded.rows.items() for i, _ in rows}
        stored |= set(plan.ids.values())
        for entry in plan.entries:
            assert entry.outcome is Outcome.CREATE and entry.resource is not None
            assert entry.resource["id"] == entry.id and entry.id.startswith("id")
            for ref in _references(entry.resource):
                assert not ref.startswith("urn:") and "?" not in ref
                assert ref.startswith("#") or ref in stored
            # contained references were rewritten too, local #ids kept
            for inner in entry.resource.get("contained", []):
                assert all(r in stored for r in _references(inner))
            # and the planned resource is ready for the next steps
            split(entry.resource)
            index_entries(entry.resource, indexer().tokens)


def test_other_transactions_plan_without_storage(
    synthea_bundles: dict[str, dict[str, Any]],
) -> None:
    for name, bundle in synthea_bundles.items():
        if not name.startswith("sof2019_"):
            continue
        plan = plan_transaction(bundle, nothing, new_id=ids())  # organizations are inline
        kinds = {e.resource_type for e in plan.entries}
        if "Patient" in kinds:
            assert {"Organization", "Practitioner"} <= kinds


def test_flexporter_fails_on_its_unresolvable_conditional_reference(
    synthea_bundles: dict[str, dict[str, Any]], loaded: DictStore
) -> None:
    bundle = synthea_bundles["flexporter_Lindsay928_Gerlach374.json"]
    with pytest.raises(UnresolvableReference) as caught:
        plan_transaction(bundle, nothing, new_id=ids())
    assert caught.value.path is not None and caught.value.path.startswith("Bundle.entry[")
    assert caught.value.path.endswith(".reference")
    index = int(caught.value.path.split("[", 2)[1].split("]")[0])
    entry = bundle["entry"][index]
    refs = [r for r in _references(entry["resource"]) if "?" in r]
    assert refs  # the named entry does hold a conditional reference
    message = str(caught.value)
    assert all(r.split("|")[-1] not in message for r in refs)  # the identifier is not echoed
    with pytest.raises(UnresolvableReference):  # the wasee11 companions do not cover it
        plan_transaction(bundle, loaded.resolve, new_id=ids())


def _bundle(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


PATIENT_URL = "urn:uuid:11111111-1111-1111-1111-111111111111"


def _post(resource: dict[str, Any], full_url: str | None = None, **request: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def test_processing_order_and_outcomes() -> None:
    bundle = _bundle(
        {"request": {"method": "GET", "url": "Patient?family=Smith"}},
        {"request": {"method": "PUT", "url": "Observation/o1"},
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": PATIENT_URL}}},
        _post({"resourceType": "Patient", "gender": "female"}, PATIENT_URL),
        {"request": {"method": "DELETE", "url": "Condition/c1"}},
        {"request": {"method": "GET", "url": "Patient/p7"}},
        {"request": {"method": "DELETE", "url": "Condition?code=http://snomed.info/sct|1"}},
    )  # fmt: skip
    plan = plan_transaction(bundle, lambda _: ["c2", "c3"], new_id=ids())
    order = [(e.index, e.method, e.outcome) for e in plan.entries]
    assert order == [
        (3, Method.DELETE, Outcome.DELETE),
        (5, Method.DELETE, Outcome.DELETE),
        (2, Method.POST, Outcome.CREATE),
        (1, Method.PUT, Outcome.UPDATE),
        (0, Method.GET, Outcome.SEARCH),
        (4, Method.GET, Outcome.READ),
    ]
    put = plan.entries[3]
    assert put.resource is not None and put.resource["subject"] == {"reference": "Patient/id1"}
    assert put.resource["id"] == "o1"
    assert plan.entries[1].matched == ("c2", "c3")
    search = plan.entries[4].conditional
    assert search is not None and search.query.criteria[0].blind


def test_conditional_reference_ambiguity_and_caching() -> None:
    calls: list[ConditionalLookup] = []

    def two(lookup: ConditionalLookup) -> list[str]:
        calls.append(lookup)
        return ["a", "b"]

    ref = {"reference": "Organization?identifier=https://example.org|42"}
    bundle = _bundle(_post({"resourceType": "Patient", "managingOrganization": ref}))
    with pytest.raises(AmbiguousReference) as caught:
        plan_transaction(bundle, two, new_id=ids())
    assert caught.value.path == "Bundle.entry[0].resource.managingOrganization.reference"
    assert "42" not in str(caught.value)
    calls.clear()
    twice = _bundle(
        _post({"resourceType": "Patient", "managingOrganization": ref}),
        _post({"resourceType": "Patient", "managingOrganization": ref}),
    )
    plan = plan_transaction(twice, lambda lookup: calls.append(lookup) or ["org9"], new_id=ids())
    assert len(calls) == 1  # one lookup per distinct conditional reference
    assert all(e.resource and e.resource["managingOrganization"]["reference"] == "Organization/org9"
               for e in plan.entries)  # fmt: skip


def test_if_none_exist_with_several_matches_is_a_failed_precondition() -> None:
    bundle = _bundle(_post({"resourceType": "Patient"}, ifNoneExist="identifier=s|1"))
    with pytest.raises(PreconditionFailed) as caught:
        plan_transaction(bundle, lambda _: ["a", "b"], new_id=ids())
    assert caught.value.path == "Bundle.entry[0].request.ifNoneExist"
    plan = plan_transaction(bundle, lambda _: ["a"], new_id=ids())
    assert plan.entries[0].outcome is Outcome.EXISTS and plan.entries[0].id == "a"


def test_references_to_an_existing_match_point_at_it() -> None:
    org_url = "urn:uuid:22222222-2222-2222-2222-222222222222"
    bundle = _bundle(
        _post({"resourceType": "Organization", "name": "A"}, org_url, ifNoneExist="identifier=s|1"),
        _post({"resourceType": "Patient", "managingOrganization": {"reference": org_url}}),
    )
    plan = plan_transaction(bundle, lambda _: ["known"], new_id=ids())
    patient = plan.entries[1].resource
    assert patient is not None
    assert patient["managingOrganization"]["reference"] == "Organization/known"


@pytest.mark.parametrize(
    ("bundle", "path"),
    [
        ({"resourceType": "Patient"}, "Bundle.resourceType"),
        ({"resourceType": "Bundle", "type": "collection", "entry": []}, "Bundle.type"),
        (
            _bundle({"request": {"method": "FETCH", "url": "Patient"}}),
            "Bundle.entry[0].request.method",
        ),
        (_bundle({"request": {"method": "POST", "url": "Patient"}}), "Bundle.entry[0].resource"),
        (_bundle({"request": {"method": "GET", "url": "/Patient"}}), "Bundle.entry[0].request.url"),
        (
            _bundle(_post({"resourceType": "Patient"}, "urn:uuid:not-a-uuid")),
            "Bundle.entry[0].fullUrl",
        ),
        (
            _bundle(
                _post({"resourceType": "Patient"}, PATIENT_URL),
                _post({"resourceType": "Patient"}, PATIENT_URL),
            ),
            "Bundle.entry[1].fullUrl",
        ),
        (
            _bundle(
                {
                    "request": {"method": "POST", "url": "Patient"},
                    "resource": {"resourceType": "Observation"},
                }
            ),
            "Bundle.entry[0].resource",
        ),
        (
            _bundle(
                {
                    "request": {"method": "PUT", "url": "Patient/a"},
                    "resource": {"resourceType": "Patient", "id": "b"},
                }
            ),
            "Bundle.entry[0].resource.id",
        ),
        (
            _bundle(
                {"request": {"method": "DELETE", "url": "Patient/a"}},
                {"request": {"method": "DELETE", "url": "Patient/a"}},
            ),
            "Bundle.entry[1].request.url",
        ),
        (
            _bundle({"request": {"method": "DELETE", "url": "Basic/a"}}),
            "Bundle.entry[0].request.url",
        ),
        (
            _bundle(_post({"resourceType": "Patient"}, ifNoneExist="shoe-size=9")),
            "Bundle.entry[0].request.ifNoneExist",
        ),
        (
            _bundle(
                _post(
                    {
                        "resourceType": "Patient",
                        "managingOrganization": {
                            "reference": "urn:uuid:33333333-3333-3333-3333-333333333333"
                        },
                    }
                )
            ),
            "Bundle.entry[0].resource.managingOrganization.reference",
        ),
        (
            _bundle(_post({"resourceType": "Claim", "referral": {"reference": "#nope"}})),
            "Bundle.entry[0].resource.referral.reference",
        ),
        (_bundle(_post({"resourceType": "Patient"}), kind="batch"), "Bundle.type"),
    ],
)
def test_bad_bundles_name_the_element(bundle: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        plan_transaction(bundle, nothing, new_id=ids())
    assert caught.value.path == path


def test_oversized_bundles_are_refused() -> None:
    bundle = _bundle(*[_post({"resourceType": "Patient"}) for _ in range(11)])
    with pytest.raises(InvalidBundle) as caught:
        plan_transaction(bundle, nothing, max_entries=10)
    assert caught.value.path == "Bundle.entry"


def test_a_batch_entry_fails_alone() -> None:
    bundle = _bundle(
        _post({"resourceType": "Patient"}),
        _post({"resourceType": "Patient", "managingOrganization": {"reference": PATIENT_URL}}),
        kind="batch",
    )
    plan = plan_batch(bundle, nothing, new_id=ids())
    assert isinstance(plan.entries[0], PlannedEntry)
    assert isinstance(plan.entries[1], UnresolvableReference)


def test_parse_conditional() -> None:
    lookup = parse_conditional(
        "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999963991", path="x"
    )
    assert lookup.resource_type == "Practitioner"
    (criterion,) = lookup.query.criteria
    assert criterion.blind  # a practitioner's identifier is a direct identifier
    for bad in (
        "Practitioner",
        "practitioner?identifier=a",
        "Practitioner?",
        "Practitioner?_count=1",
    ):
        with pytest.raises(InvalidBundle):
            parse_conditional(bad, path="x")


def test_vread_entries_keep_their_version() -> None:
    bundle = _bundle({"request": {"method": "GET", "url": "Patient/p1/_history/3"}})
    (entry,) = plan_transaction(bundle, nothing).entries
    assert (entry.outcome, entry.id, entry.version) == (Outcome.READ, "p1", "3")
    for url in ("Patient/p1/_history", "Patient/p1/x/3", "Patient/p!1"):
        with pytest.raises(InvalidBundle):
            plan_transaction(_bundle({"request": {"method": "GET", "url": url}}), nothing)


_URNS = [f"urn:uuid:{i:08d}-0000-4000-8000-000000000000" for i in range(4)]
_leaf = st.sampled_from(["x", 1, True, *_URNS])


def _tree(depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return _leaf
    inner = _tree(depth - 1)
    return st.one_of(
        _leaf,
        st.builds(lambda u: {"reference": u}, st.sampled_from(_URNS)),
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(["a", "b", "extension", "valueReference"]), inner, max_size=3
        ),
    )


@settings(max_examples=150, deadline=None)
@given(
    body=st.dictionaries(st.sampled_from(["a", "b", "c"]), _tree(4), max_size=3),
    contained=st.lists(_tree(3), max_size=2),
)
def test_every_urn_reference_is_rewritten_anywhere(
    body: dict[str, Any], contained: list[Any]
) -> None:
    entries = [_post({"resourceType": "Patient", "gender": "other"}, url) for url in _URNS]
    host = {"resourceType": "Basic", "extension": [{"url": "u", "valueString": "v", **body}]}
    if contained:
        host["contained"] = [
            {"resourceType": "Basic", "id": f"c{i}", "x": c} for i, c in enumerate(contained)
        ]
    target = {"resourceType": "Patient", "id": "h", "extension": [host]}
    entries.append({"request": {"method": "PUT", "url": "Patient/h"}, "resource": target})
    plan = plan_transaction(_bundle(*entries), nothing, new_id=ids())
    (put,) = [e for e in plan.entries if e.method is Method.PUT]
    refs = _references(put.resource)
    assert all(r.startswith("Patient/id") for r in refs)
    assert len(refs) == len(_references(entries[-1]["resource"]))

    # a urn:uuid that is not a reference (an Identifier value, say) is left alone
    def strings(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [s for k, v in node.items() if k != "reference" for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    assert strings(put.resource) == strings(entries[-1]["resource"])


def test_every_planned_resource_belongs_to_its_bundles_patient(
    synthea_bundles: dict[str, dict[str, Any]], loaded: DictStore
) -> None:
    from phivault.records.search_params import patient_of

    directory = {"Practitioner", "PractitionerRole", "Organization", "Location", "Medication"}
    for name, bundle in synthea_bundles.items():
        if name in COMPANIONS or "Information" in name or name.startswith("flexporter"):
            continue
        plan = plan_transaction(bundle, loaded.resolve, new_id=ids())
        (patient,) = [e.id for e in plan.entries if e.resource_type == "Patient"]
        for entry in plan.entries:
            assert entry.resource is not None
            owner = patient_of(entry.resource)
            if entry.resource_type in directory:
                assert owner is None
            else:
                assert owner == patient, (name, entry.resource_type)


def test_patient_of_refuses_two_patients() -> None:
    from phivault.records.search_params import patient_of

    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": "Patient/a"}, {"reference": "Patient/b"}],
    }
    with pytest.raises(InvalidInput) as caught:
        patient_of(provenance)
    assert caught.value.path == "Provenance.patient"
    assert patient_of({"resourceType": "Organization", "name": "x"}) is None


def test_a_failing_reference_deep_in_lists_is_named_by_its_path() -> None:
    """References are replaced in an orjson copy; a failing one is found again by the walk
    that knows paths, so the error names the same element as before."""
    resource = {
        "resourceType": "Claim",
        "contained": [{"resourceType": "Organization", "id": "org1"}],
        "item": [
            {"sequence": 1, "locationReference": {"reference": "#org1"}},
            {"sequence": 2, "encounter": [{"reference": "#org1"}, {"reference": "#gone"}]},
        ],
    }
    with pytest.raises(UnresolvableReference) as caught:
        plan_transaction(_bundle(_post(resource)), nothing, new_id=ids())
    assert caught.value.path == "Bundle.entry[0].resource.item[1].encounter[1].reference"


def test_what_orjson_cannot_copy_is_rewritten_all_the_same() -> None:
    huge = 2**70  # beyond 64 bits: orjson refuses it, the walk keeps it
    resource = {
        "resourceType": "Observation",
        "valueInteger": huge,
        "subject": {"reference": PATIENT_URL},
    }
    patient = _post({"resourceType": "Patient"}, PATIENT_URL)
    plan = plan_transaction(_bundle(patient, _post(resource)), nothing, new_id=ids())
    observation = next(e for e in plan.entries if e.resource_type == "Observation")
    assert observation.resource is not None
    assert observation.resource["valueInteger"] == huge
    assert observation.resource["subject"]["reference"].startswith("Patient/")


def _walked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plan with the walk alone (no replacement on the encoded text)."""
    from phivault.records.bundles import _Planner

    monkeypatch.setattr(
        _Planner,
        "rewrite",
        lambda self, node, path, index, ids, local: self._rewritten(node, path, index, ids, local),
    )


def test_references_replaced_on_the_text_are_what_the_walk_makes(
    synthea_bundles: dict[str, dict[str, Any]], loaded: DictStore
) -> None:
    """Every fixture bundle plans to the same entries, and looks its conditional references
    up in the same order, whether references are replaced on orjson's text or by the walk."""
    plans = {}
    for name, bundle in synthea_bundles.items():
        if name in COMPANIONS or "Information" in name or name.startswith("flexporter"):
            continue
        asked: list[ConditionalLookup] = []

        def resolve(lookup: ConditionalLookup, asked: list[ConditionalLookup] = asked) -> Any:
            asked.append(lookup)
            return loaded.resolve(lookup)

        plans[name] = (plan_transaction(bundle, resolve, new_id=ids()), asked)
    with pytest.MonkeyPatch.context() as patch:
        _walked(patch)
        for name, (plan, asked) in plans.items():
            walked: list[ConditionalLookup] = []

            def resolve_walked(
                lookup: ConditionalLookup, walked: list[ConditionalLookup] = walked
            ) -> Any:
                walked.append(lookup)
                return loaded.resolve(lookup)

            again = plan_transaction(synthea_bundles[name], resolve_walked, new_id=ids())
            assert again == plan, name
            assert walked == asked, name


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=12),
    key=st.sampled_from(["reference", "display", "x"]),
)
def test_strings_of_any_content_beside_references_survive_the_text_replacement(
    text: str, key: str
) -> None:
    """Quotes, backslashes, non-ASCII and look-alike keys: the plan is the walk's."""
    resource = {
        "resourceType": "Observation",
        "subject": {"reference": PATIENT_URL, "display": text},
        "note": [{"text": text, key: text}],
        "focus": [{"reference": text}] if text and key == "x" else [],
    }
    patient = _post({"resourceType": "Patient"}, PATIENT_URL)
    bundle = _bundle(patient, _post(resource))

    def plan() -> Any:
        try:
            return plan_transaction(bundle, nothing, new_id=ids())
        except InvalidInput as exc:
            return (type(exc), exc.path)

    fast = plan()
    with pytest.MonkeyPatch.context() as patch:
        _walked(patch)
        assert plan() == fast


def _plan_or_error(bundle: dict[str, Any]) -> Any:
    try:
        return plan_transaction(bundle, nothing, new_id=ids())
    except InvalidInput as exc:
        return (type(exc), exc.path)


_LOCAL = st.sampled_from(["#", "#host", "#c0", "#gone", PATIENT_URL, 'a"b\\c', "é/Patient"])


@settings(max_examples=200, deadline=None)
@given(
    host_refs=st.lists(_LOCAL, max_size=3),
    inner_refs=st.lists(_LOCAL, max_size=3),
    nested=st.booleans(),
    listed=st.booleans(),
)
def test_contained_resources_replaced_on_the_text_are_what_the_walk_makes(
    host_refs: list[str], inner_refs: list[str], nested: bool, listed: bool
) -> None:
    """A host's contained list is copied apart (its references without the host's #ids),
    a contained elsewhere or not a list goes to the walk: either way, the walk's plan or
    the walk's error path."""
    inner: dict[str, Any] = {
        "resourceType": "Basic",
        "id": "c0",
        "x": [{"reference": r} for r in inner_refs],
    }
    if nested:
        inner["contained"] = [{"resourceType": "Basic", "id": "deep"}]
    resource = {
        "resourceType": "Observation",
        "id": "host",
        "contained": [inner] if listed else inner,
        "subject": {"reference": PATIENT_URL},
        "focus": [{"reference": r} for r in host_refs],
    }
    patient = _post({"resourceType": "Patient"}, PATIENT_URL)
    bundle = _bundle(patient, _post(resource))
    fast = _plan_or_error(bundle)
    with pytest.MonkeyPatch.context() as patch:
        _walked(patch)
        assert _plan_or_error(bundle) == fast


def test_a_key_ending_in_reference_is_not_a_reference() -> None:
    """A key that ends in an escaped quote and ``reference`` looks like a reference key on
    orjson's text; it is left alone, as the walk leaves it."""
    resource = {
        "resourceType": "Observation",
        "subject": {"reference": PATIENT_URL},
        "extension": [{'x"reference': PATIENT_URL, "y": '"reference":"' + PATIENT_URL}],
    }
    patient = _post({"resourceType": "Patient"}, PATIENT_URL)
    plan = plan_transaction(_bundle(patient, _post(resource)), nothing, new_id=ids())
    observation = next(e for e in plan.entries if e.resource_type == "Observation")
    assert observation.resource is not None
    assert observation.resource["extension"] == resource["extension"]
    assert observation.resource["subject"]["reference"].startswith("Patient/")


def test_the_callers_resources_are_not_changed() -> None:
    contained = {"resourceType": "Basic", "id": "c0", "x": {"reference": PATIENT_URL}}
    resource = {
        "resourceType": "Observation",
        "contained": [contained],
        "subject": {"reference": PATIENT_URL},
    }
    patient = _post({"resourceType": "Patient"}, PATIENT_URL)
    bundle = _bundle(patient, _post(resource))
    before = copy.deepcopy(bundle)
    plan = plan_transaction(bundle, nothing, new_id=ids())
    assert bundle == before
    observation = next(e for e in plan.entries if e.resource_type == "Observation")
    assert observation.resource is not None
    assert observation.resource["contained"][0]["x"]["reference"].startswith("Patient/")


def test_planning_works_out_each_written_resources_patient_once(
    synthea_bundles: dict[str, dict[str, Any]], loaded: DictStore
) -> None:
    """Every written entry carries the patient ``patient_of`` gives for its planned resource
    (the repository takes it from there instead of working it out again); a Patient's is its
    own id, a directory resource's is None."""
    from phivault.records.search_params import patient_of

    bundle = synthea_bundles["sof2019_Kathe_Zieme.json"]
    plan = plan_transaction(bundle, loaded.resolve, new_id=ids())
    kinds = set()
    for entry in plan.entries:
        if entry.outcome is Outcome.EXISTS:  # nothing to write
            assert not entry.patient_known
            continue
        assert entry.resource is not None and entry.patient_known
        assert entry.patient == patient_of(entry.resource)
        if entry.resource_type == "Patient":
            assert entry.patient == entry.id
        kinds.add(entry.resource_type)
    assert {"Patient", "Observation", "Encounter"} <= kinds


def test_a_resource_of_two_patients_is_planned_with_its_patient_unknown() -> None:
    """``patient_of`` refuses a resource naming two patients; planning leaves the patient
    unknown, so the write works it out again and refuses it where it always did."""
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "request": {"method": "POST", "url": "Provenance"},
                "resource": {
                    "resourceType": "Provenance",
                    "target": [{"reference": "Patient/a"}, {"reference": "Patient/b"}],
                },
            }
        ],
    }
    (entry,) = plan_transaction(bundle, nothing, new_id=ids()).entries
    assert not entry.patient_known and entry.patient is None
