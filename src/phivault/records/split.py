"""Split a FHIR resource into its element groups, and assemble it back from the groups a
caller may see.

Why: the storage layer seals each group separately (one AES-GCM unit per group, bound to
``groups/<group>`` of the resource), and a read opens only the groups the caller's mask allows.
This module is the only place that knows how a resource maps to groups and back, so the
round trip ``assemble(split(r)) == r`` is a property tested on every fixture resource.

A group's content is deterministic JSON (sorted keys; see :meth:`GroupContent.encode`) of
``{"elements": {...}, "fragments": [[pointer, value], ...]}``: ``elements`` are top-level
elements wholly in the group; ``fragments`` are parts placed by a pointer (keys and list
indexes) -- parts of an element that a nested rule takes into another group
(``subject.display``), and the items of ``extension``/``modifierExtension``/``contained``,
which are classified one by one. The same resource always gives the same bytes.

The envelope (``resourceType``, ``id``, ``meta.versionId``, ``meta.lastUpdated``) stays
outside the groups. When groups the resource has are withheld, the assembled resource carries
``meta.security`` ``REDACTED`` (v3-ObservationValue), and a fragment whose parent element was
withheld is dropped rather than shown out of context; empty containers left behind are pruned.

Numbers: a decimal goes through JSON as a float, so ``4.0`` stays ``4.0`` but ``4.50`` reads
back as ``4.5`` (equal in value; the written precision of a FHIR decimal is not kept).
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import orjson

from phivault.crypto.elements import ElementRef
from phivault.errors import InvalidInput
from phivault.ledger.canonical import canonical_json
from phivault.records.classification import (
    CONTAINED,
    ENVELOPE_ELEMENTS,
    ENVELOPE_META,
    EXTENSION_ELEMENTS,
    Classification,
    ElementGroup,
    default_classification,
)

__all__ = [
    "REDACTED",
    "ClassifiedResource",
    "Envelope",
    "GroupContent",
    "assemble",
    "group_element_ref",
    "split",
]

REDACTED: Final[Mapping[str, str]] = MappingProxyType(
    {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "REDACTED",
        "display": "redacted",
    }
)

Pointer = tuple[str | int, ...]
_GROUP_ORDER: Final = tuple(ElementGroup)  # the fixed order groups are written and placed in


@dataclass(frozen=True, slots=True)
class Envelope:
    """The clear part of a stored resource: its identity and version."""

    resource_type: str
    id: str | None = None
    version_id: str | None = None
    last_updated: str | None = None


@dataclass(frozen=True, slots=True)
class GroupContent:
    """One group's part of a resource, decoded. Build it from sealed bytes with ``decode``."""

    elements: Mapping[str, Any]
    fragments: tuple[tuple[Pointer, Any], ...]

    def encode(self) -> bytes:
        """Deterministic JSON bytes (keys sorted): the plaintext to seal.

        orjson with sorted keys, not RFC 8785: both are deterministic, orjson is an order of
        magnitude faster on Observations (JCS's number rules send every float down a
        pure-Python path), and it keeps a decimal's written form (``4.0`` stays ``4.0``).
        What orjson refuses (a lone surrogate, an integer beyond 64 bits) goes through
        :func:`canonical_json`, which names the path of what it cannot encode.
        """
        document = {
            "elements": self.elements,
            "fragments": [[list(p), v] for p, v in self.fragments],
        }
        try:
            return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
        except (orjson.JSONEncodeError, TypeError):
            return canonical_json(document)

    @classmethod
    def decode(cls, data: bytes) -> GroupContent:
        """Parse bytes made by :meth:`encode` (after opening); refuses anything else."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise InvalidInput("group content is not JSON") from None
        if not isinstance(doc, dict) or set(doc) != {"elements", "fragments"}:
            raise InvalidInput("group content has the wrong shape")
        elements, fragments = doc["elements"], doc["fragments"]
        if not isinstance(elements, dict) or not isinstance(fragments, list):
            raise InvalidInput("group content has the wrong shape")
        parsed: list[tuple[Pointer, Any]] = []
        for item in fragments:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], list)
                or not item[0]
                or not isinstance(item[0][0], str)
                or not all(isinstance(s, str | int) and not isinstance(s, bool) for s in item[0])
            ):
                raise InvalidInput("group content has a malformed fragment")
            parsed.append((tuple(item[0]), item[1]))
        return cls(elements, tuple(parsed))


@dataclass(frozen=True, slots=True)
class ClassifiedResource:
    """A resource partitioned by group: the clear envelope and each group's sealable bytes."""

    envelope: Envelope
    groups: Mapping[ElementGroup, bytes]

    def assemble(self, visible: Collection[ElementGroup] | None = None) -> dict[str, Any]:
        """The resource as a caller who may see ``visible`` groups (default: all) gets it."""
        shown = (
            self.groups
            if visible is None
            else {g: d for g, d in self.groups.items() if g in visible}
        )
        withheld = set(self.groups) - set(shown)
        return assemble(self.envelope, shown, withheld=withheld)


def group_element_ref(tenant: str, envelope: Envelope, group: ElementGroup) -> ElementRef:
    """The element a group is sealed as: ``_history/<version>/groups/<group>`` of the resource.

    The associated data binds tenant, type, id and this path, so a group's ciphertext opens
    only as that group of that version: it cannot be moved to another group, record, or
    version of the same record (say, to put an old value back into the current version).
    """
    if envelope.id is None:
        raise InvalidInput("a resource needs an id before its groups are sealed", path="id")
    if envelope.version_id is None:
        raise InvalidInput(
            "a resource needs a version before its groups are sealed", path="meta.versionId"
        )
    path = f"_history/{envelope.version_id}/groups/{group.value}"
    return ElementRef(tenant, envelope.resource_type, envelope.id, path)


def _text(value: object, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidInput("must be a non-empty string", path=path)
    return value


def _pointer_key(item: tuple[Pointer, Any]) -> tuple[int, tuple[tuple[int, int, str], ...]]:
    pointer = item[0]
    steps = tuple((0, s, "") if isinstance(s, int) else (1, 0, s) for s in pointer)
    return len(pointer), steps


def _extract(
    node: Any, rest: tuple[str, ...], pointer: Pointer, out: list[tuple[Pointer, Any]]
) -> None:
    """Remove every value at ``rest`` under ``node`` (through lists) into ``out``."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            _extract(item, rest, (*pointer, index), out)
        return
    if not isinstance(node, dict):
        return
    head = rest[0]
    if len(rest) == 1:
        for key in (head, f"_{head}"):
            if key in node:
                out.append(((*pointer, key), node.pop(key)))
        return
    if head in node:
        _extract(node[head], rest[1:], (*pointer, head), out)


def _copy_json(node: Any) -> Any:
    """A copy of a JSON-like value whose dicts and lists are new (what the nested rules take
    parts out of); scalars are immutable and shared. A fifth of what ``copy.deepcopy`` costs,
    which also tracks identities that JSON cannot have."""
    if isinstance(node, dict):
        return {key: _copy_json(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_copy_json(value) for value in node]
    if node is None or isinstance(node, str | int | float):
        return node
    return copy.deepcopy(node)  # not JSON (a tuple, a mapping proxy): as before


def split(
    resource: Mapping[str, Any], classification: Classification | None = None
) -> ClassifiedResource:
    """Partition ``resource`` into its envelope and group contents (as sealable bytes).

    Raises :class:`~phivault.records.classification.UnsupportedResourceType`,
    :class:`~phivault.records.classification.UnclassifiedElement`, or
    :class:`~phivault.errors.InvalidInput` (naming the path, never the value).
    """
    table = classification or default_classification()
    if not isinstance(resource, Mapping):
        raise InvalidInput("a resource must be a JSON object")
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise InvalidInput("must be a string", path="resourceType")
    tc = table.for_type(resource_type)
    meta = resource.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise InvalidInput("must be an object", path=f"{resource_type}.meta")
    meta = meta or {}
    envelope = Envelope(
        resource_type,
        _text(resource.get("id"), f"{resource_type}.id"),
        _text(meta.get("versionId"), f"{resource_type}.meta.versionId"),
        _text(meta.get("lastUpdated"), f"{resource_type}.meta.lastUpdated"),
    )
    elements: dict[ElementGroup, dict[str, Any]] = {}
    fragments: dict[ElementGroup, list[tuple[Pointer, Any]]] = {}
    for key, value in resource.items():
        if key in ENVELOPE_ELEMENTS:
            continue
        where = f"{resource_type}.{key}"
        if key == "meta":
            rest = {k: v for k, v in meta.items() if k not in ENVELOPE_META}
            if rest or len(rest) == len(meta):  # keep an (invalid) empty meta as it came
                elements.setdefault(tc.group_of(key), {})[key] = rest
        elif key in EXTENSION_ELEMENTS or key == CONTAINED:
            if not isinstance(value, list):
                raise InvalidInput("must be an array", path=where)
            for index, item in enumerate(value):
                if not isinstance(item, Mapping):
                    raise InvalidInput("must be an object", path=f"{where}[{index}]")
                group = (
                    table.contained_group(item.get("resourceType"))
                    if key == CONTAINED
                    else table.extension_group(item.get("url"))
                )
                fragments.setdefault(group, []).append(((key, index), item))
        else:
            group, rules = tc.placement(key)
            if rules and not key.startswith("_"):
                remaining = _copy_json(value)
                for rule in reversed(rules):  # deepest first: inner overrides leave first
                    taken: list[tuple[Pointer, Any]] = []
                    _extract(remaining, rule.path[1:], (key,), taken)
                    fragments.setdefault(rule.group, []).extend(taken)
                elements.setdefault(group, {})[key] = remaining
            else:
                # No copy: the content is encoded to bytes below, before split returns.
                elements.setdefault(group, {})[key] = value
    groups = {}
    for group in _GROUP_ORDER:
        if group in elements or group in fragments:
            content = GroupContent(
                elements.get(group, {}),
                tuple(sorted(fragments.get(group, ()), key=_pointer_key)),
            )
            groups[group] = content.encode()
    return ClassifiedResource(envelope, MappingProxyType(groups))


def _place(doc: dict[str, Any], pointer: Pointer, value: Any) -> None:
    parent: Any = doc
    for depth, step in enumerate(pointer[:-1]):
        if isinstance(parent, dict) and isinstance(step, str):
            child = parent.get(step)
        elif isinstance(parent, list) and isinstance(step, int) and 0 <= step < len(parent):
            child = parent[step]
        else:
            child = None
        if child is None:
            if depth == 0 and len(pointer) == 2 and isinstance(pointer[1], int):
                child = parent[step] = []  # a top-level list made only of fragments
            else:
                return  # the parent element was withheld: drop the part, do not show it alone
        parent = child
    last = pointer[-1]
    if isinstance(parent, list) and isinstance(last, int):
        parent.insert(min(last, len(parent)), value)
    elif isinstance(parent, dict) and isinstance(last, str):
        parent[last] = value
    else:
        raise InvalidInput(
            "group content does not fit the resource", path=".".join(map(str, pointer))
        )


def _prune(node: Any) -> Any:
    if isinstance(node, dict):
        pruned = {k: _prune(v) for k, v in node.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, [])}
    if isinstance(node, list):
        items = [_prune(v) for v in node]
        return [v for v in items if v not in ({}, [])]
    return node


def assemble(
    envelope: Envelope,
    groups: Mapping[ElementGroup, bytes | GroupContent],
    *,
    withheld: Iterable[ElementGroup] = (),
    fresh: bool = False,
) -> dict[str, Any]:
    """Rebuild a resource from its envelope and the (opened) groups given.

    ``withheld`` names groups the resource has but the caller may not see: the result is
    marked ``meta.security`` REDACTED, parts whose parent was withheld are dropped, and empty
    containers are pruned. ``assemble(r.envelope, r.groups) == resource`` for every resource
    :func:`split` accepts. ``fresh``: the contents were just decoded and are not used
    elsewhere, so their values are placed as they are instead of copied.
    """
    own = None if fresh else copy.deepcopy
    doc: dict[str, Any] = {"resourceType": envelope.resource_type}
    if envelope.id is not None:
        doc["id"] = envelope.id
    envelope_meta = {
        k: v
        for k, v in (("versionId", envelope.version_id), ("lastUpdated", envelope.last_updated))
        if v is not None
    }
    if envelope_meta:
        doc["meta"] = dict(envelope_meta)
    placed: list[tuple[Pointer, Any]] = []
    for group in _GROUP_ORDER:  # a fixed order, whatever order the caller's mapping has
        raw = groups.get(group)
        if raw is None:
            continue
        content = GroupContent.decode(raw) if isinstance(raw, bytes) else raw
        elements = content.elements if own is None else own(content.elements)
        for key, value in elements.items():
            if key == "meta" and isinstance(value, dict):
                doc["meta"] = {**value, **doc.get("meta", {})}
            else:
                doc[key] = value
        if content.fragments:
            fragments = content.fragments if own is None else own(content.fragments)
            placed.extend(fragments)
    if len(placed) > 1:
        placed.sort(key=_pointer_key)
    for pointer, value in placed:
        _place(doc, pointer, value)
    if set(withheld) - set(groups):
        doc = _prune(doc)
        meta = doc.setdefault("meta", {})
        security = meta.setdefault("security", [])
        if not any(
            isinstance(c, dict)
            and c.get("code") == REDACTED["code"]
            and c.get("system") == REDACTED["system"]
            for c in security
        ):
            security.append(dict(REDACTED))
    return doc
