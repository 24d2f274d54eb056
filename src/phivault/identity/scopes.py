"""SMART on FHIR v2 scopes, parsed once at the front door so nothing downstream re-parses text.

A v2 resource scope is ``<context>/<resource>.<permissions>[?<query>]``: the context is
``patient``, ``user`` or ``system``; the resource a FHIR type or ``*``; the permissions a
subset of ``cruds`` written in that order (``rs``, ``cud``). SMART v1 forms (``.read``,
``.write``, ``.*``) are accepted and mapped to their v2 meaning, because many identity
providers still issue them. Anything else (``openid``, ``fhirUser``, ``launch/patient``,
``offline_access``) is kept as an opaque scope. A scope that looks like a resource scope but
is malformed is refused rather than guessed at: a typo must not widen or narrow access silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from phivault.errors import InvalidInput

__all__ = ["Permission", "ScopeContext", "SmartScope", "parse_scope", "parse_scopes"]


class ScopeContext(StrEnum):
    PATIENT = "patient"
    USER = "user"
    SYSTEM = "system"


class Permission(StrEnum):
    CREATE = "c"
    READ = "r"
    UPDATE = "u"
    DELETE = "d"
    SEARCH = "s"


_ORDER = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_RESOURCE_SCOPE = re.compile(
    r"^(?P<ctx>patient|user|system)/(?P<res>\*|[A-Z][A-Za-z]{1,63})\.(?P<perm>[a-z*]{1,5})"
    r"(?:\?(?P<query>\S{1,512}))?$"
)
_LOOKS_LIKE_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/")
_OPAQUE_SCOPE = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,256}$")  # RFC 6749 scope-token


@dataclass(frozen=True, slots=True)
class SmartScope:
    """One SMART v2 resource scope. ``query`` is the raw fine-grained filter, if any."""

    context: ScopeContext
    resource: str  # a FHIR resource type, or "*"
    permissions: frozenset[Permission]
    query: str | None = None

    def grants(self, resource_type: str, permission: Permission) -> bool:
        """Whether this scope covers ``permission`` on ``resource_type`` (ignoring ``query``)."""
        return permission in self.permissions and self.resource in ("*", resource_type)

    def __str__(self) -> str:
        perms = "".join(p for p in _ORDER if Permission(p) in self.permissions)
        text = f"{self.context.value}/{self.resource}.{perms}"
        return text if self.query is None else f"{text}?{self.query}"


def parse_scope(text: str) -> SmartScope | None:
    """Parse one scope token: a :class:`SmartScope`, or ``None`` for a non-resource scope.

    Raises :class:`~phivault.errors.InvalidInput` for a malformed scope.
    """
    if not _OPAQUE_SCOPE.match(text):
        raise InvalidInput("not a valid scope token", path="scope")
    match = _RESOURCE_SCOPE.match(text)
    if match is None:
        if _LOOKS_LIKE_RESOURCE_SCOPE.match(text):
            raise InvalidInput("malformed SMART resource scope", path="scope")
        return None
    perm_text = match["perm"]
    perm_text = _V1.get(perm_text, perm_text)
    if not _in_order(perm_text):
        raise InvalidInput("SMART permissions must be a subset of 'cruds' in order", path="scope")
    return SmartScope(
        context=ScopeContext(match["ctx"]),
        resource=match["res"],
        permissions=frozenset(Permission(p) for p in perm_text),
        query=match["query"],
    )


def parse_scopes(
    text: str | list[str] | tuple[str, ...],
) -> tuple[tuple[SmartScope, ...], frozenset[str]]:
    """Split a ``scope`` claim (space-separated string or list) into resource and other scopes."""
    tokens = text.split() if isinstance(text, str) else list(text)
    resource: list[SmartScope] = []
    other: set[str] = set()
    for token in tokens:
        if not isinstance(token, str):
            raise InvalidInput("scope entries must be strings", path="scope")
        parsed = parse_scope(token)
        if parsed is None:
            other.add(token)
        elif parsed not in resource:
            resource.append(parsed)
    return tuple(resource), frozenset(other)


def _in_order(perms: str) -> bool:
    if "*" in perms or not perms:
        return False
    positions = [_ORDER.find(p) for p in perms]
    return all(p >= 0 for p in positions) and positions == sorted(set(positions))
