"""What a FHIR request says about itself, checked before the repository is called.

Why apart from the routes: these checks are the HTTP layer's only judgement of a request --
a well-formed id the audit ledger can record, a body whose type and id agree with the URL,
the parameters a history takes -- and each raises a 400 naming the element or parameter,
never the value. Everything else (access, validity of the resource, planning a Bundle) is
the repository's.
"""

from __future__ import annotations

import re
from typing import Any, Final

from pydantic import TypeAdapter, ValidationError

from phivault.api.fhir._bundles import OFFSET_PARAM
from phivault.api.fhir._http import FORMAT_PARAMS, Prefer
from phivault.api.problems import BadRequest
from phivault.ledger.events import Reference
from phivault.records.query import UnknownSearchParameter, UnsupportedSearch

__all__ = ["check_body", "check_entry_ids", "check_id", "history_pairs"]

_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_REFERENCE: Final[TypeAdapter[str]] = TypeAdapter(Reference)
_TYPE_RE: Final = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
#: Parameters a history interaction takes; FHIR's ``_since``/``_at``/``_list`` are not
#: supported (refused with a 400, or ignored under ``Prefer: handling=lenient``).
_HISTORY_PARAMS: Final = frozenset({"_count", OFFSET_PARAM}) | FORMAT_PARAMS


def check_id(resource_type: str, resource_id: str, *, where: str = "id") -> None:
    """A FHIR id that the audit ledger can record: ids go into audit events and logs, so one
    shaped like personal data (an SSN, a phone number) is refused rather than stored."""
    if not _ID_RE.match(resource_id):
        raise BadRequest("not a FHIR resource id", expression=where)
    try:
        _REFERENCE.validate_python(f"{resource_type}/{resource_id}")
    except ValidationError:
        raise BadRequest(
            "the id looks like personal data; resource ids must be opaque", expression=where
        ) from None


def check_entry_ids(entries: object) -> None:
    """The ids a Bundle's entries address (``request.url`` ``Type/id``), checked as the URL's
    would be, before anything is planned or written. The rest of the Bundle is the
    repository's to validate."""
    if not isinstance(entries, list):
        return
    for index, entry in enumerate(entries):
        request = entry.get("request") if isinstance(entry, dict) else None
        url = request.get("url") if isinstance(request, dict) else None
        if not isinstance(url, str):
            continue
        parts = url.split("?", 1)[0].strip("/").split("/")
        if len(parts) >= 2 and _TYPE_RE.match(parts[0]):
            check_id(parts[0], parts[1], where=f"Bundle.entry[{index}].request.url")


def check_body(
    body: dict[str, Any], resource_type: str, resource_id: str | None, *, id_required: bool
) -> None:
    declared = body.get("resourceType")
    if not isinstance(declared, str):
        raise BadRequest("the resource has no resourceType", expression="resourceType")
    if declared != resource_type:
        raise BadRequest(
            "resourceType does not match the type in the URL", expression="resourceType"
        )
    if resource_id is None:
        return
    body_id = body.get("id")
    if body_id is None and id_required:
        raise BadRequest("an update needs the resource's id in the body", expression="id")
    if body_id != resource_id:
        raise BadRequest("the id in the body does not match the id in the URL", expression="id")


def history_pairs(pairs: list[tuple[str, str]], prefer: Prefer) -> list[tuple[str, str]]:
    """The history parameters; unknown ones are a 400 unless ``handling=lenient``."""
    kept = []
    for key, value in pairs:
        if key in _HISTORY_PARAMS:
            kept.append((key, value))
        elif prefer.lenient:
            continue
        elif key in ("_since", "_at", "_list"):
            raise UnsupportedSearch("is not supported on history", path=key)
        else:
            raise UnknownSearchParameter("unknown history parameter", path="query")
    return kept
