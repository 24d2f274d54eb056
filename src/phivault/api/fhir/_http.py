"""The FHIR REST conventions on the wire: media type, headers, Prefer, bodies, URLs.

Why a module of its own: every route answers the same way (``application/fhir+json``,
``ETag: W/"n"``, ``Last-Modified``, ``Location`` with the version), reads the same headers
(``Prefer``, ``If-Match``) and parses bodies with the same refusals, so each is written once.
Errors raised here name the header or element, never a value the caller sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import Request
from fastapi.responses import Response

from phivault.api.problems import FHIR_JSON, BadRequest, NotAcceptable, operation_outcome_doc
from phivault.records.results import RecordVersion

__all__ = [
    "FORMAT_PARAMS",
    "Prefer",
    "check_format",
    "fhir_response",
    "http_date",
    "information_outcome",
    "instant",
    "parse_count",
    "parse_if_match",
    "parse_offset",
    "parse_prefer",
    "query_pairs",
    "read_json_object",
    "url_with",
    "version_headers",
]

#: HTTP-level parameters that are not search criteria (FHIR R4 3.1.1.2 and our paging).
FORMAT_PARAMS: Final = frozenset({"_format", "_pretty"})
_JSON_FORMATS: Final = frozenset(
    {"json", "application/json", "application/fhir+json", "application/json+fhir"}
)
_IF_MATCH_RE: Final = re.compile(r'^(?:W/)?"(\d{1,18})"$')
_RETURN_VALUES: Final = frozenset({"minimal", "representation", "OperationOutcome"})


@dataclass(frozen=True, slots=True)
class Prefer:
    """The ``Prefer`` header (RFC 7240) as FHIR uses it."""

    return_: Literal["minimal", "representation", "OperationOutcome"] | None = None
    lenient: bool = False


def parse_prefer(request: Request) -> Prefer:
    """``return=minimal|representation|OperationOutcome`` and ``handling=strict|lenient``;
    unknown preferences are ignored, as RFC 7240 asks."""
    return_: Literal["minimal", "representation", "OperationOutcome"] | None = None
    lenient = False
    for header in request.headers.getlist("prefer"):
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            value = value.strip().strip('"')
            if name.strip().lower() == "return" and value in _RETURN_VALUES:
                return_ = value  # type: ignore[assignment]  # checked against the literals
            elif name.strip().lower() == "handling":
                lenient = value == "lenient"
    return Prefer(return_, lenient)


def parse_if_match(request: Request) -> int | None:
    """The version ``If-Match: W/"n"`` names, or None when the header is absent."""
    values = request.headers.getlist("if-match")
    if not values:
        return None
    match = _IF_MATCH_RE.match(values[0].strip()) if len(values) == 1 else None
    if match is None:
        raise BadRequest('If-Match must be one version ETag: W/"<version>"', expression="If-Match")
    return int(match.group(1))


def query_pairs(request: Request) -> list[tuple[str, str]]:
    """The URL's parameters in order, blanks kept (a blank value is the parser's to refuse)."""
    if not request.scope.get("query_string"):
        return []  # a read: no need to build the URL to learn that it has no query
    return parse_qsl(request.url.query, keep_blank_values=True)


def _accepts_json(accept: str) -> bool:
    for item in accept.split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if media not in _JSON_FORMATS and media not in ("*/*", "application/*"):
            continue
        quality = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            if float(quality) > 0:
                return True
        except ValueError:
            return True  # a malformed weight: take the range as acceptable
    return False


def check_format(request: Request, pairs: Iterable[tuple[str, str]]) -> bool:
    """Whether the caller asked for pretty output. Answers are JSON only: a ``_format``
    (which overrides ``Accept``, as FHIR says) or an ``Accept`` that excludes JSON is a 406."""
    pretty = False
    formatted = False
    for key, value in pairs:
        if key == "_format":
            formatted = True
            if value.strip().lower().split(";")[0] not in _JSON_FORMATS:
                raise NotAcceptable(expression="_format")
        if key == "_pretty":
            pretty = value.strip().lower() == "true"
    accept = request.headers.get("accept")
    if not formatted and accept and accept.strip() and not _accepts_json(accept):
        raise NotAcceptable(expression="Accept")
    return pretty


def parse_offset(pairs: Iterable[tuple[str, str]], name: str) -> int:
    """The paging offset (a non-negative integer); 0 when absent."""
    found = [value for key, value in pairs if key == name]
    if not found:
        return 0
    if len(found) > 1 or not found[0].isdigit() or len(found[0]) > 9:
        raise BadRequest("must be one non-negative integer", expression=name)
    return int(found[0])


def parse_count(pairs: Iterable[tuple[str, str]], default: int, maximum: int) -> int:
    """``_count`` for history (searches leave it to the search parser); capped at maximum."""
    found = [value for key, value in pairs if key == "_count"]
    if not found:
        return default
    if len(found) > 1 or not found[0].isdigit() or len(found[0]) > 9:
        raise BadRequest("must be one non-negative integer", expression="_count")
    return min(int(found[0]), maximum)


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 when it is empty, not JSON or not an object."""
    body = await request.body()
    if not body.strip():
        raise BadRequest("the request needs a FHIR resource as its body")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object (a FHIR resource)")
    return doc


def instant(moment: datetime) -> str:
    """A FHIR instant (ISO 8601 with offset)."""
    return moment.isoformat()


_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)


def http_date(moment: datetime) -> str:
    """An RFC 9110 HTTP-date (``Last-Modified``) of a UTC time: what
    ``email.utils.format_datetime(moment, usegmt=True)`` gives, at a fraction of its cost
    (every read answers one)."""
    if moment.tzinfo is None or moment.tzinfo != UTC:
        return format_datetime(moment, usegmt=True)  # raises, as it always did
    return (
        f"{_DAYS[moment.weekday()]}, {moment.day:02d} {_MONTHS[moment.month - 1]} "
        f"{moment.year:04d} {moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} GMT"
    )


def version_headers(record: RecordVersion, base: str, *, location: bool) -> dict[str, str]:
    """``ETag``, ``Last-Modified`` and, for writes, ``Location`` of the version."""
    headers = {"ETag": record.etag, "Last-Modified": http_date(record.last_updated)}
    if location:
        headers["Location"] = f"{base}/{record.versioned_reference}"
    return headers


def url_with(base_url: str, pairs: Iterable[tuple[str, str]]) -> str:
    """``base_url`` with the query ``pairs`` (a Bundle link)."""
    query = urlencode(list(pairs))
    return f"{base_url}?{query}" if query else base_url


def information_outcome(text: str) -> dict[str, Any]:
    """An informational OperationOutcome (``Prefer: return=OperationOutcome``)."""
    doc = operation_outcome_doc(200, text)
    doc["issue"][0]["severity"] = "information"
    doc["issue"][0]["code"] = "informational"
    return doc


def fhir_response(
    doc: Mapping[str, Any] | None,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    pretty: bool = False,
) -> Response:
    """A FHIR JSON response (an empty body when ``doc`` is None)."""
    if doc is None:
        return Response(status_code=status, headers=dict(headers or {}))
    option = orjson.OPT_INDENT_2 if pretty else 0
    return Response(
        orjson.dumps(doc, option=option),
        status_code=status,
        media_type=FHIR_JSON,
        headers=dict(headers or {}),
    )
