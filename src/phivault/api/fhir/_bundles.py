"""Bundles the server sends: searchset, history, and batch/transaction responses.

Why they are built here and not by the repository: a Bundle is a presentation of results the
repository already decided (which resources, which versions, which page), plus URLs that only
the HTTP layer knows (the public base, the paging parameter). Nothing here decides access or
touches storage; an entry's resource is exactly what the repository returned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from phivault.api._ids import random_uuid_hex
from phivault.api.fhir._errors import translate
from phivault.api.fhir._http import information_outcome, instant, url_with
from phivault.api.problems import operation_outcome_doc
from phivault.records.results import (
    BundleEntryOutcome,
    BundleOutcome,
    HistoryPage,
    RecordVersion,
    SearchResult,
)

__all__ = [
    "OFFSET_PARAM",
    "history_bundle",
    "searchset_bundle",
    "status_line",
    "transaction_response",
]

#: The paging parameter of searchset and history links (an offset into the result).
OFFSET_PARAM = "_offset"


@functools.cache  # a handful of statuses, once per entry of every Bundle answered
def status_line(status: int) -> str:
    """``201 Created``: the status as a Bundle entry's ``response.status`` states it."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _links(
    self_url: str, pairs: Sequence[tuple[str, str]], offset: int, next_offset: int | None
) -> list[dict[str, str]]:
    def page(at: int) -> str:
        kept = [(k, v) for k, v in pairs if k != OFFSET_PARAM]
        return url_with(self_url, kept + ([(OFFSET_PARAM, str(at))] if at else []))

    links = [{"relation": "self", "url": page(offset)}]
    if next_offset is not None:
        links.append({"relation": "next", "url": page(next_offset)})
    return links


def _bundle(kind: str, now: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": random_uuid_hex(),
        "meta": {"lastUpdated": instant(now)},
        "type": kind,
    }


def searchset_bundle(
    result: SearchResult,
    *,
    base: str,
    self_url: str,
    pairs: Sequence[tuple[str, str]],
    now: datetime,
) -> dict[str, Any]:
    """A searchset: matches (mode ``match``), ``_include``\\d resources (mode ``include``),
    ``total`` when the search asked for it, and ``self``/``next`` links (no ``next`` on the
    last page). ``pairs`` are the parameters as the caller sent them, for the links."""
    bundle = _bundle("searchset", now)
    if result.total is not None and result.query.total in ("accurate", "estimate"):
        bundle["total"] = result.total
    bundle["link"] = _links(self_url, pairs, result.offset, result.next_offset)
    entries: list[dict[str, Any]] = []
    for mode, records in (("match", result.matches), ("include", result.included)):
        for record in records:
            entry: dict[str, Any] = {"fullUrl": f"{base}/{record.reference}"}
            if record.resource is not None:
                entry["resource"] = record.resource
            entry["search"] = {"mode": mode}
            entries.append(entry)
    if result.query.ignored:
        outcome = information_outcome(
            f"{result.query.ignored} unknown search parameter(s) were ignored"
        )
        outcome["issue"][0]["severity"] = "warning"
        outcome["issue"][0]["code"] = "not-supported"
        entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return bundle


def _history_entry(record: RecordVersion, base: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"fullUrl": f"{base}/{record.reference}"}
    if record.deleted:
        request = {"method": "DELETE", "url": record.reference}
        status = "410 Gone"
    elif record.version == 1:
        request = {"method": "POST", "url": record.resource_type}
        status = "201 Created"
    else:
        request = {"method": "PUT", "url": record.reference}
        status = "200 OK"
    if not record.deleted and record.resource is not None:
        entry["resource"] = record.resource
    entry["request"] = request
    entry["response"] = {
        "status": status,
        "etag": record.etag,
        "lastModified": instant(record.last_updated),
    }
    return entry


def history_bundle(
    page: HistoryPage,
    *,
    base: str,
    self_url: str,
    pairs: Sequence[tuple[str, str]],
    now: datetime,
) -> dict[str, Any]:
    """A history Bundle, newest first; a deletion is an entry with ``request.method`` DELETE
    and no resource."""
    bundle = _bundle("history", now)
    bundle["link"] = _links(self_url, pairs, page.offset, page.next_offset)
    entries = [_history_entry(record, base) for record in page.versions]
    if entries:
        bundle["entry"] = entries
    return bundle


def _entry_request(bundle: Mapping[str, Any], index: int) -> tuple[str, str]:
    """The ``request.method`` and ``request.url`` of entry ``index`` (empty when absent)."""
    entries = bundle.get("entry")
    entry = entries[index] if isinstance(entries, list) and 0 <= index < len(entries) else None
    request = entry.get("request") if isinstance(entry, dict) else None
    if not isinstance(request, dict):
        return "", ""
    method, url = request.get("method"), request.get("url")
    return (
        method.upper() if isinstance(method, str) else "",
        url if isinstance(url, str) else "",
    )


def _response_entry(
    outcome: BundleEntryOutcome,
    bundle: Mapping[str, Any],
    *,
    base: str,
    representation: bool,
    now: datetime,
    scrub: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    method, url = _entry_request(bundle, outcome.index)
    entry: dict[str, Any] = {}
    response: dict[str, Any] = {"status": status_line(outcome.status)}
    record = outcome.record
    if record is not None:
        entry["fullUrl"] = f"{base}/{record.reference}"
        response["etag"] = record.etag
        response["lastModified"] = instant(record.last_updated)
        if method in ("POST", "PUT", "PATCH") and outcome.status in (200, 201):
            response["location"] = record.versioned_reference
        reading = method in ("GET", "HEAD")
        if record.resource is not None and not record.deleted and (reading or representation):
            entry["resource"] = record.resource
    if outcome.search is not None:
        path, _, query = url.partition("?")
        entry["resource"] = searchset_bundle(
            outcome.search,
            base=base,
            self_url=f"{base}/{path.strip('/')}",
            pairs=parse_qsl(query, keep_blank_values=True),
            now=now,
        )
    if outcome.error is not None:
        problem = translate(outcome.error)
        if problem is None:
            response["outcome"] = operation_outcome_doc(outcome.status)
        else:
            response["outcome"] = scrub(
                operation_outcome_doc(
                    outcome.status, problem.diagnostics, expression=problem.expression
                )
            )
    entry["response"] = response
    return entry


def transaction_response(
    outcome: BundleOutcome,
    bundle: Mapping[str, Any],
    *,
    base: str,
    representation: bool,
    now: datetime,
    scrub: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """A ``transaction-response`` or ``batch-response``, one entry per request entry in the
    request's order. Written resources are included only with ``Prefer:
    return=representation``; reads and searches always carry theirs. A failed batch entry
    carries its OperationOutcome in ``response.outcome`` (scrubbed: it is not an error
    response, so the front door's error scrubbing does not see it)."""
    result = _bundle(f"{outcome.kind}-response", now)
    result["entry"] = [
        _response_entry(
            item, bundle, base=base, representation=representation, now=now, scrub=scrub
        )
        for item in sorted(outcome.entries, key=lambda item: item.index)
    ]
    return result
