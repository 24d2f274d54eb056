"""The records layer's errors as HTTP problems: one table, used by every FHIR route.

Why a translation here rather than ``create_app(error_map=...)``: the answer for some errors
depends on the request (a version conflict is a 412 when the client sent ``If-Match`` and a
409 otherwise; an unsupported type is a 404 in the URL and a 400 in a body), and a batch
answers each failed entry with the same status and OperationOutcome a single request would
get. Messages that could carry a caller-supplied id (not found, deleted, conflicts) get fixed
texts; an :class:`~phivault.errors.InvalidInput` keeps its message, which by contract names
an element path and never a value, and its path goes into ``issue.expression``.
"""

from __future__ import annotations

from typing import Final

from phivault.api.problems import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    HttpProblem,
    NotFound,
    PreconditionFailed,
    ServiceUnavailable,
    Unprocessable,
)
from phivault.crypto.errors import KeyUnavailable, PatientShredded, Sealed
from phivault.errors import InvalidInput
from phivault.records.bundles import AmbiguousReference
from phivault.records.bundles import PreconditionFailed as BundlePreconditionFailed
from phivault.records.classification import UnclassifiedElement
from phivault.records.errors import (
    AccessDenied,
    IfMatchFailed,
    RecordGone,
    RecordNotFound,
    TransactionConflict,
)
from phivault.records.store import VersionConflict

__all__ = ["translate"]

_BY_STATUS: Final[dict[int, type[HttpProblem]]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    412: PreconditionFailed,
    422: Unprocessable,
}


def _invalid(status: int, exc: InvalidInput) -> HttpProblem:
    return _BY_STATUS[status](str(exc), expression=exc.path)


def translate(exc: BaseException, *, if_match: bool = False) -> HttpProblem | None:
    """The problem to answer for ``exc``, or None to let the front door map it (503s, 500s).

    ``if_match``: the request carried ``If-Match``, so a version conflict is a 412.
    """
    if isinstance(exc, HttpProblem):
        return exc
    if isinstance(exc, PatientShredded):
        return Gone("the patient's records were erased")
    if isinstance(exc, (Sealed, KeyUnavailable)):
        # Sealed until operators unseal it (or a key provider is down): retry later.
        return ServiceUnavailable(headers={"Retry-After": "5"})
    if isinstance(exc, RecordNotFound):
        return NotFound("the resource is not known")
    if isinstance(exc, RecordGone):
        return Gone(headers={"ETag": f'W/"{exc.version}"'})
    if isinstance(exc, AccessDenied):
        return Forbidden("the access policy does not allow this interaction")
    if isinstance(exc, IfMatchFailed):
        return PreconditionFailed("the resource version does not match If-Match")
    if isinstance(exc, VersionConflict):
        if if_match:
            return PreconditionFailed("the resource version does not match If-Match")
        return Conflict("the resource changed concurrently; read it again and retry")
    if isinstance(exc, TransactionConflict):
        return Conflict("a concurrent write changed what the request was based on; retry")
    if isinstance(exc, (AmbiguousReference, BundlePreconditionFailed)):
        return _invalid(412, exc)
    if isinstance(exc, UnclassifiedElement):
        return _invalid(422, exc)
    if isinstance(exc, InvalidInput):
        return _invalid(400, exc)
    return None
