"""Batch and transaction Bundles: validation and planning, with storage passed in.

Why: a transaction is atomic, so everything that can fail for a reason in the request itself
-- a malformed entry, a ``urn:uuid:`` that points nowhere, a conditional reference that
matches no resource or several, an ``ifNoneExist`` that matches several -- must fail *before*
anything is written, naming the entry and the element path (never a value: a conditional
reference's query is often an identifier). This module turns a Bundle into a
:class:`TransactionPlan`: server-assigned ids, every reference rewritten (inside contained
resources, extensions and nested elements too), conditional references and ``ifNoneExist``
parsed into typed :class:`~phivault.records.query.SearchQuery` lookups and resolved through a
callable the storage layer supplies, and the entries in FHIR's processing order (DELETE, POST,
PUT/PATCH, GET/HEAD). A batch is planned entry by entry: one entry's failure is that entry's
outcome, not the batch's.

Conditional references and ``ifNoneExist`` resolve against what is stored, not against other
entries of the same Bundle (FHIR leaves this open; loading companion bundles first, as the
Synthea fixtures require, fits it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import orjson

from phivault.errors import InvalidInput
from phivault.records.classification import default_classification
from phivault.records.query import SearchQuery, parse_search
from phivault.records.search_params import patient_of

__all__ = [
    "MAX_ENTRIES",
    "PROCESSING_ORDER",
    "AmbiguousReference",
    "BatchPlan",
    "ConditionalLookup",
    "InvalidBundle",
    "Method",
    "Outcome",
    "PlannedEntry",
    "PreconditionFailed",
    "Resolver",
    "TransactionPlan",
    "UnresolvableReference",
    "parse_conditional",
    "plan_batch",
    "plan_transaction",
    "validate_bundle",
]

MAX_ENTRIES: Final = 10_000


class InvalidBundle(InvalidInput):
    """The Bundle or one of its entries is malformed. ``path`` names the element."""


class UnresolvableReference(InvalidInput):
    """A reference points at nothing: an unknown ``urn:uuid:``, or a conditional reference
    that matches no stored resource. ``path`` names the entry's reference element."""


class AmbiguousReference(InvalidInput):
    """A conditional reference matches more than one stored resource."""


class PreconditionFailed(InvalidInput):
    """``ifNoneExist`` or a conditional update/delete matches more than one resource (412)."""


class Method(StrEnum):
    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    PATCH = "PATCH"
    DELETE = "DELETE"


#: FHIR transaction processing order (R4 3.1.0.11.2): deletes, creates, updates, reads.
PROCESSING_ORDER: Final[Mapping[Method, int]] = {
    Method.DELETE: 0,
    Method.POST: 1,
    Method.PUT: 2,
    Method.PATCH: 2,
    Method.GET: 3,
    Method.HEAD: 3,
}


class Outcome(StrEnum):
    """What storage must do for an entry."""

    CREATE = "create"  # POST, or PUT/conditional PUT that creates
    EXISTS = "exists"  # POST with ifNoneExist that matched one resource: nothing to write
    UPDATE = "update"  # PUT of an id (storage decides update or create-with-id)
    PATCH = "patch"
    DELETE = "delete"
    READ = "read"
    SEARCH = "search"


@dataclass(frozen=True, slots=True)
class ConditionalLookup:
    """A search that must identify one resource: a conditional reference, ``ifNoneExist``,
    a conditional update or delete. ``query`` is typed (blind criteria carry their lookups)."""

    resource_type: str
    query: SearchQuery


#: Storage's answer to a lookup: the ids of the matching resources (any number).
Resolver = Callable[[ConditionalLookup], Sequence[str]]


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    """One entry, resolved. ``resource`` is a rewritten copy (never the caller's object)."""

    index: int
    method: Method
    outcome: Outcome
    resource_type: str
    id: str | None
    resource: Mapping[str, Any] | None = None
    full_url: str | None = None
    if_match: str | None = None
    conditional: ConditionalLookup | None = None  # conditional DELETE with no match, GET search
    matched: tuple[str, ...] = ()  # conditional DELETE targets
    version: str | None = None  # GET Type/id/_history/vid (a vread)
    # The lookups this entry relied on and what they found: storage re-runs them in the
    # transaction that writes, and refuses to write if the answer changed meanwhile.
    lookups: tuple[tuple[ConditionalLookup, tuple[str, ...]], ...] = ()
    # The patient ``resource`` belongs to (:func:`~phivault.records.search_params.patient_of`:
    # a Patient's own id, else its ``patient`` reference; None for directory resources),
    # worked out once here for every later step (access decisions, the data key). Only
    # when ``patient_known``: not for entries planned elsewhere, nor for a resource that
    # names several patients (the write refuses it where it looks, as before).
    patient: str | None = None
    patient_known: bool = False


@dataclass(frozen=True, slots=True)
class TransactionPlan:
    """Entries in processing order; ``ids`` maps each fullUrl to its ``Type/id``;
    ``lookups`` are every lookup the plan relied on, with what it found."""

    entries: tuple[PlannedEntry, ...]
    ids: Mapping[str, str]
    lookups: tuple[tuple[ConditionalLookup, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Entries in bundle order, each planned or refused on its own."""

    entries: tuple[PlannedEntry | InvalidInput, ...] = field(default=())


_TYPE_RE: Final = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_UUID_RE: Final = re.compile(r"^urn:uuid:[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")


def parse_conditional(text: str, *, path: str) -> ConditionalLookup:
    """``Type?query`` -> a lookup, or :class:`InvalidBundle` naming ``path``."""
    resource_type, sep, query = text.partition("?")
    if not sep or not _TYPE_RE.match(resource_type) or not query:
        raise InvalidBundle("not a conditional reference (Type?search)", path=path)
    try:
        default_classification().for_type(resource_type)
        parsed = parse_search(resource_type, query)
    except InvalidInput as exc:
        raise InvalidBundle(
            f"conditional search is not valid ({_reason(exc)})", path=path
        ) from None
    if not parsed.criteria:
        raise InvalidBundle("conditional search has no criteria", path=path)
    return ConditionalLookup(resource_type, parsed)


def _reason(exc: InvalidInput) -> str:
    """An error's reason without its path (the path of an inner parse is not ours)."""
    text = str(exc)
    return text[len(exc.path) + 2 :] if exc.path and text.startswith(f"{exc.path}: ") else text


#: Each method by its name (the enum's own lookup costs more, once per entry).
_METHODS: Final[Mapping[str, Method]] = {m.value: m for m in Method}


@dataclass(slots=True)  # not frozen: built once per entry, and a frozen init costs more
class _Entry:
    index: int
    method: Method
    url: str
    resource: Mapping[str, Any] | None
    full_url: str | None
    if_none_exist: str | None
    if_match: str | None


def validate_bundle(bundle: object, *, max_entries: int = MAX_ENTRIES) -> str:
    """Check the Bundle's shape; returns its type (``batch`` or ``transaction``).

    Raises :class:`InvalidBundle` naming the element (``Bundle.entry[3].request.method``).
    """
    for _ in _entries(bundle, max_entries=max_entries):
        pass
    return _bundle_type(bundle)


def _bundle_type(bundle: object) -> str:
    if not isinstance(bundle, Mapping):  # pragma: no cover -- _entries refused it already
        raise InvalidBundle("not a Bundle", path="Bundle")
    return str(bundle["type"])


def _entries(bundle: object, *, max_entries: int) -> Iterator[_Entry]:
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise InvalidBundle("not a Bundle", path="Bundle.resourceType")
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise InvalidBundle("only batch and transaction Bundles are processed", path="Bundle.type")
    raw = bundle.get("entry", [])
    if not isinstance(raw, list):
        raise InvalidBundle("must be an array", path="Bundle.entry")
    if len(raw) > max_entries:
        raise InvalidBundle(f"more than {max_entries} entries", path="Bundle.entry")
    seen_urls: set[str] = set()
    for index, entry in enumerate(raw):
        where = f"Bundle.entry[{index}]"
        if not isinstance(entry, Mapping):
            raise InvalidBundle("must be an object", path=where)
        request = entry.get("request")
        if not isinstance(request, Mapping):
            raise InvalidBundle("an entry needs a request", path=f"{where}.request")
        given = request.get("method")
        method = _METHODS.get(given) if isinstance(given, str) else None
        if method is None:
            raise InvalidBundle("unknown method", path=f"{where}.request.method")
        url = request.get("url")
        if not isinstance(url, str) or not url or url.startswith("/"):
            raise InvalidBundle("must be a relative URL", path=f"{where}.request.url")
        resource = entry.get("resource")
        if method in (Method.POST, Method.PUT, Method.PATCH):
            if not isinstance(resource, Mapping):
                raise InvalidBundle("this method needs a resource", path=f"{where}.resource")
        elif resource is not None:
            raise InvalidBundle("this method takes no resource", path=f"{where}.resource")
        full_url = entry.get("fullUrl")
        if full_url is not None:
            if not isinstance(full_url, str) or not full_url:
                raise InvalidBundle("must be a URI", path=f"{where}.fullUrl")
            if full_url.startswith("urn:uuid:") and not _UUID_RE.match(full_url):
                raise InvalidBundle("not a valid urn:uuid", path=f"{where}.fullUrl")
            if full_url in seen_urls:
                raise InvalidBundle("fullUrl repeats an earlier entry's", path=f"{where}.fullUrl")
            seen_urls.add(full_url)
        if_none_exist = request.get("ifNoneExist")
        if if_none_exist is not None and (
            not isinstance(if_none_exist, str) or method is not Method.POST
        ):
            raise InvalidBundle(
                "ifNoneExist is a search string, on POST only", path=f"{where}.request.ifNoneExist"
            )
        if_match = request.get("ifMatch")
        if if_match is not None and not isinstance(if_match, str):
            raise InvalidBundle("must be a string", path=f"{where}.request.ifMatch")
        if isinstance(resource, Mapping) and method in (Method.POST, Method.PUT):
            resource_type = resource.get("resourceType")
            if url.split("?", 1)[0].split("/", 1)[0] != resource_type:
                raise InvalidBundle(
                    "resource type does not match the request URL", path=f"{where}.resource"
                )
        yield _Entry(index, method, url, resource, full_url, if_none_exist, if_match)


class _Planner:
    def __init__(self, resolve: Resolver, new_id: Callable[[], str]) -> None:
        self._resolve = resolve
        self._new_id = new_id
        self._conditional_cache: dict[str, str] = {}
        self.used: list[tuple[ConditionalLookup, tuple[str, ...]]] = []

    def lookup(self, lookup: ConditionalLookup) -> tuple[str, ...]:
        found = tuple(self._resolve(lookup))
        self.used.append((lookup, found))
        return found

    def target(self, entry: _Entry) -> tuple[Outcome, str, str | None, tuple[str, ...]]:
        """(outcome, resource type, id, matched) of an entry, resolving its conditions."""
        where = f"Bundle.entry[{entry.index}].request"
        path, _, query = entry.url.partition("?")
        parts = path.split("/")
        resource_type = parts[0]
        if not _TYPE_RE.match(resource_type):
            raise InvalidBundle("not a resource type", path=f"{where}.url")
        try:
            default_classification().for_type(resource_type)
        except InvalidInput:
            raise InvalidBundle("resource type is not supported", path=f"{where}.url") from None
        vread = (
            entry.method in (Method.GET, Method.HEAD)
            and len(parts) == 4
            and parts[2] == "_history"
            and bool(_ID_RE.match(parts[3]))
        )
        if (len(parts) > 2 and not vread) or (len(parts) >= 2 and not _ID_RE.match(parts[1])):
            raise InvalidBundle("not Type, Type/id or Type?search", path=f"{where}.url")
        the_id = parts[1] if len(parts) >= 2 else None
        method = entry.method
        if method is Method.POST:
            if the_id is not None or query:
                raise InvalidBundle("POST goes to the type", path=f"{where}.url")
            if entry.if_none_exist is not None:
                lookup = parse_conditional(
                    f"{resource_type}?{entry.if_none_exist}", path=f"{where}.ifNoneExist"
                )
                found = self.lookup(lookup)
                if len(found) > 1:
                    raise PreconditionFailed(
                        "ifNoneExist matches more than one resource", path=f"{where}.ifNoneExist"
                    )
                if found:
                    return Outcome.EXISTS, resource_type, found[0], found
            return Outcome.CREATE, resource_type, self._new_id(), ()
        if method in (Method.PUT, Method.PATCH, Method.DELETE) and query:
            if the_id is not None:
                raise InvalidBundle("a conditional URL has no id", path=f"{where}.url")
            lookup = parse_conditional(entry.url, path=f"{where}.url")
            found = self.lookup(lookup)
            if method is Method.DELETE:
                return Outcome.DELETE, resource_type, None, found
            if len(found) > 1:
                raise PreconditionFailed(
                    "conditional URL matches more than one", path=f"{where}.url"
                )
            if found:
                outcome = Outcome.PATCH if method is Method.PATCH else Outcome.UPDATE
                return outcome, resource_type, found[0], found
            if method is Method.PATCH:
                raise UnresolvableReference(
                    "conditional patch matches nothing", path=f"{where}.url"
                )
            return Outcome.CREATE, resource_type, self._new_id(), ()
        if method in (Method.PUT, Method.PATCH, Method.DELETE):
            if the_id is None:
                raise InvalidBundle("needs Type/id or Type?search", path=f"{where}.url")
            outcome = {
                Method.PUT: Outcome.UPDATE,
                Method.PATCH: Outcome.PATCH,
                Method.DELETE: Outcome.DELETE,
            }[method]
            return outcome, resource_type, the_id, ()
        if the_id is not None:
            return Outcome.READ, resource_type, the_id, ()
        return Outcome.SEARCH, resource_type, None, ()

    def rewrite(
        self, node: Any, path: str, index: int, ids: Mapping[str, str], local: set[str]
    ) -> Any:
        """A copy of ``node`` with every reference made literal.

        The copy is made by orjson (a fraction of a walk building dicts in Python) and the
        references are replaced in it, in the same order as :meth:`_rewritten` visits them.
        A reference that fails is found again by :meth:`_rewritten`, which names its path
        (only an error needs one); so is anything orjson cannot copy."""
        try:
            text = orjson.dumps(node)
        except (orjson.JSONEncodeError, TypeError):
            return self._rewritten(node, path, index, ids, local)
        try:
            if b"\\" not in text and b'"contained"' not in text:
                # The usual case, on the encoded text: a "reference" key with a string value
                # is replaced where it stands (the same order as the walk below; no escapes,
                # so the matched text is the value; contained resources need the walk).
                return orjson.loads(
                    _REFERENCE_TEXT.sub(
                        lambda m: (
                            b'"reference":'
                            + orjson.dumps(self.reference(m[1].decode(), "", ids, local))
                        ),
                        text,
                    )
                )
            copied = orjson.loads(text)
            self._replace_references(copied, ids, local)
        except InvalidInput:
            return self._rewritten(node, path, index, ids, local)
        return copied

    def _replace_references(self, node: Any, ids: Mapping[str, str], local: set[str]) -> None:
        if isinstance(node, list):
            for item in node:
                if isinstance(item, dict | list):
                    self._replace_references(item, ids, local)
            return
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                node[key] = self.reference(value, "", ids, local)
            elif key == "contained":
                items = value if isinstance(value, list) else [value]
                node[key] = items
                for item in items:
                    if isinstance(item, dict | list):
                        self._replace_references(item, ids, set())
            elif isinstance(value, dict | list):
                self._replace_references(value, ids, local)

    def _rewritten(
        self, node: Any, path: str, index: int, ids: Mapping[str, str], local: set[str]
    ) -> Any:
        """:meth:`rewrite` by a walk that builds the copy and knows each element's path."""
        if isinstance(node, list):
            return [
                self._rewritten(v, f"{path}[{i}]", index, ids, local)
                if isinstance(v, dict | list)
                else v
                for i, v in enumerate(node)
            ]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                out[key] = self.reference(value, f"{path}.{key}", ids, local)
            elif key == "contained":
                where = f"{path}.{key}"
                out[key] = [
                    self._rewritten(v, f"{where}[{i}]", index, ids, set())
                    for i, v in enumerate(value if isinstance(value, list) else [value])
                ]
            elif isinstance(value, dict | list):
                out[key] = self._rewritten(value, f"{path}.{key}", index, ids, local)
            else:
                out[key] = value
        return out

    def reference(self, value: str, where: str, ids: Mapping[str, str], local: set[str]) -> str:
        if value in ids:
            return ids[value]
        if value.startswith("#"):
            if value != "#" and value[1:] not in local:
                raise UnresolvableReference("no contained resource has this id", path=where)
            return value
        if value.startswith("urn:uuid:"):
            raise UnresolvableReference("urn:uuid matches no entry's fullUrl", path=where)
        if "?" in value:
            cached = self._conditional_cache.get(value)
            if cached is not None:
                return cached
            lookup = parse_conditional(value, path=where)
            found = self.lookup(lookup)
            if not found:
                raise UnresolvableReference(
                    f"conditional reference to {lookup.resource_type} matches no resource",
                    path=where,
                )
            if len(found) > 1:
                raise AmbiguousReference(
                    f"conditional reference to {lookup.resource_type} matches more than one",
                    path=where,
                )
            literal = f"{lookup.resource_type}/{found[0]}"
            self._conditional_cache[value] = literal
            return literal
        return value


#: A "reference" key and its string value in orjson's compact output (a key is the only
#: string followed by a colon; used only on text without backslashes).
_REFERENCE_TEXT: Final = re.compile(rb'"reference":"([^"]*)"')


def _local_ids(resource: Mapping[str, Any]) -> set[str]:
    contained = resource.get("contained")
    if not isinstance(contained, list):
        return set()
    return {c["id"] for c in contained if isinstance(c, Mapping) and isinstance(c.get("id"), str)}


def _plan(
    entries: list[_Entry], planner: _Planner, ids: dict[str, str]
) -> Iterator[tuple[_Entry, tuple[Outcome, str, str | None, tuple[str, ...]]]]:
    for entry in entries:
        target = planner.target(entry)
        outcome, resource_type, the_id, _ = target
        if entry.full_url is not None and the_id is not None and outcome is not Outcome.DELETE:
            ids[entry.full_url] = f"{resource_type}/{the_id}"
        yield entry, target


def _finish(
    entry: _Entry,
    target: tuple[Outcome, str, str | None, tuple[str, ...]],
    planner: _Planner,
    ids: Mapping[str, str],
) -> PlannedEntry:
    outcome, resource_type, the_id, matched = target
    resource: dict[str, Any] | None = None
    where = f"Bundle.entry[{entry.index}].resource"
    if entry.resource is not None and outcome is not Outcome.EXISTS:
        if entry.method is Method.PUT and "?" not in entry.url:
            given = entry.resource.get("id")
            if given is not None and given != the_id:
                raise InvalidBundle(
                    "resource id does not match the request URL", path=f"{where}.id"
                )
        resource = planner.rewrite(
            dict(entry.resource), where, entry.index, ids, _local_ids(entry.resource)
        )
        if entry.method is not Method.PATCH and the_id is not None:
            resource["id"] = the_id
    conditional = None
    if outcome is Outcome.SEARCH:
        try:
            type_name, _, query = entry.url.partition("?")
            conditional = ConditionalLookup(type_name, parse_search(type_name, query))
        except InvalidInput as exc:
            raise InvalidBundle(
                f"search is not valid ({_reason(exc)})",
                path=f"Bundle.entry[{entry.index}].request.url",
            ) from None
    patient, patient_known = None, False
    if resource is not None and outcome in (Outcome.CREATE, Outcome.UPDATE):
        # Refused by the write, which works it out again (one place for the error).
        with contextlib.suppress(InvalidInput):
            patient, patient_known = patient_of(resource), True
    parts = entry.url.partition("?")[0].split("/")
    return PlannedEntry(
        entry.index,
        entry.method,
        outcome,
        resource_type,
        the_id,
        resource,
        entry.full_url,
        entry.if_match,
        conditional,
        matched,
        parts[3] if len(parts) == 4 else None,
        patient=patient,
        patient_known=patient_known,
    )


def _new_uuid() -> str:
    return str(uuid.uuid4())


def plan_transaction(
    bundle: object,
    resolve: Resolver,
    *,
    new_id: Callable[[], str] = _new_uuid,
    max_entries: int = MAX_ENTRIES,
) -> TransactionPlan:
    """Plan a transaction Bundle, or raise the first error (nothing may be written then).

    ``resolve`` runs a lookup against storage; ``new_id`` makes server-assigned ids. Raises
    :class:`InvalidBundle`, :class:`UnresolvableReference`, :class:`AmbiguousReference` or
    :class:`PreconditionFailed`, each naming the entry's element path.
    """
    entries = list(_entries(bundle, max_entries=max_entries))
    if _bundle_type(bundle) != "transaction":
        raise InvalidBundle("not a transaction Bundle", path="Bundle.type")
    planner = _Planner(resolve, new_id)
    ids: dict[str, str] = {}
    targets = list(_plan(entries, planner, ids))
    written: dict[str, int] = {}
    for entry, (outcome, resource_type, the_id, _) in targets:
        if the_id is not None and outcome not in (Outcome.READ, Outcome.EXISTS):
            key = f"{resource_type}/{the_id}"
            if key in written:
                raise InvalidBundle(
                    f"entry {written[key]} already changes this resource",
                    path=f"Bundle.entry[{entry.index}].request.url",
                )
            written[key] = entry.index
    planned = [_finish(entry, target, planner, ids) for entry, target in targets]
    planned.sort(key=lambda p: (PROCESSING_ORDER[p.method], p.index))
    return TransactionPlan(tuple(planned), dict(ids), tuple(planner.used))


def plan_batch(
    bundle: object,
    resolve: Resolver,
    *,
    new_id: Callable[[], str] = _new_uuid,
    max_entries: int = MAX_ENTRIES,
) -> BatchPlan:
    """Plan a batch Bundle entry by entry; a failing entry yields its error in its place.

    Entries of a batch may not depend on each other: ``urn:uuid:`` references between them are
    unresolvable (FHIR R4: batch entries are processed independently).
    """
    entries = list(_entries(bundle, max_entries=max_entries))
    if _bundle_type(bundle) != "batch":
        raise InvalidBundle("not a batch Bundle", path="Bundle.type")
    out: list[PlannedEntry | InvalidInput] = []
    for entry in entries:
        planner = _Planner(resolve, new_id)
        try:
            ids: dict[str, str] = {}
            ((_, target),) = list(_plan([entry], planner, ids))
            planned = _finish(entry, target, planner, ids)
            out.append(dataclasses.replace(planned, lookups=tuple(planner.used)))
        except InvalidInput as exc:
            out.append(exc)
    return BatchPlan(tuple(out))
