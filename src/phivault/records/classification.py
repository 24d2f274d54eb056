"""Element groups: which part of a FHIR resource falls under which protection.

Why: each group of each resource is sealed separately under the patient's data key, so that a
caller allowed to see only some groups (minimum necessary) never causes the others to be
decrypted. The classification is declarative (``element_groups.toml`` beside this module) so
that a privacy officer can review it without reading code; this module loads and validates
it, and answers "which group holds this element?".

Unknown elements never silently become clear text, nor fall into a convenient group: an
element of a supported type that the table does not list raises :class:`UnclassifiedElement`
(naming its path), and an unsupported resource type raises :class:`UnsupportedResourceType`.
Two open-ended places cannot be listed in advance: top-level extensions (classified by URL)
and contained resources (classified by type). Unknown URLs and types there fall into
:attr:`ElementGroup.DIRECT_IDENTIFIERS`, the most protective group. See
``docs/decisions/records-element-groups.md``.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from phivault.errors import InvalidInput

__all__ = [
    "ENVELOPE_ELEMENTS",
    "ENVELOPE_META",
    "MOST_PROTECTIVE",
    "Classification",
    "ElementGroup",
    "NestedRule",
    "TypeClassification",
    "UnclassifiedElement",
    "UnsupportedResourceType",
    "default_classification",
    "load_classification",
]


class ElementGroup(StrEnum):
    """The element groups, each sealed on its own (docs/decisions/records-element-groups.md)."""

    DIRECT_IDENTIFIERS = "direct-identifiers"
    DEMOGRAPHICS = "demographics"
    CLINICAL = "clinical"
    FREE_TEXT = "free-text-and-attachments"
    FINANCIAL = "financial"
    ADMINISTRATIVE = "administrative"


MOST_PROTECTIVE = ElementGroup.DIRECT_IDENTIFIERS

#: Top-level elements outside every group: the resource's identity, stored in clear.
ENVELOPE_ELEMENTS = frozenset({"resourceType", "id"})
#: ``meta`` children outside every group (server-assigned; the rest of ``meta`` is grouped).
ENVELOPE_META = frozenset({"versionId", "lastUpdated"})
#: Top-level elements whose items are classified one by one (by URL or by resource type).
EXTENSION_ELEMENTS = frozenset({"extension", "modifierExtension"})
CONTAINED = "contained"

_NAME_RE = re.compile(r"^[a-z][A-Za-z0-9]*(\[x\])?$")
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]+$")


#: How many element names :meth:`TypeClassification.placement` remembers per type.
_PLACED_MAX = 1024


class UnsupportedResourceType(InvalidInput):
    """The resource type is not one phivault stores (no classification exists for it)."""


class UnclassifiedElement(InvalidInput):
    """An element has no group: refused rather than stored under a guess."""


@dataclass(frozen=True, slots=True)
class NestedRule:
    """A part of a top-level element that belongs to another group than its parent.

    ``path`` is the element path without indexes, starting at the top-level element
    (``("participant", "individual", "display")``); it applies through every list on the way.
    """

    path: tuple[str, ...]
    group: ElementGroup


@dataclass(frozen=True, slots=True)
class TypeClassification:
    """The groups of one resource type's elements."""

    resource_type: str
    elements: Mapping[str, ElementGroup]
    choices: Mapping[str, ElementGroup]
    nested: Mapping[str, tuple[NestedRule, ...]]
    # element -> its (group, nested rules), as :meth:`placement` worked them out (bounded:
    # choice elements admit any suffix, so names are not a closed set)
    _placed: dict[str, tuple[ElementGroup, tuple[NestedRule, ...]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def element_name(self, element: str) -> str:
        """The declared name of ``element``: ``value[x]`` for ``valueQuantity``; ``_x`` -> ``x``.

        Raises :class:`UnclassifiedElement` when the type declares no such element.
        """
        name = element[1:] if element.startswith("_") else element
        if name in self.elements:
            return name
        if name.endswith("[x]") and name[:-3] in self.choices:
            return name
        for base in self.choices:
            if name.startswith(base) and len(name) > len(base) and name[len(base)].isupper():
                return f"{base}[x]"
        raise UnclassifiedElement(
            "element has no classification", path=f"{self.resource_type}.{element}"
        )

    def group_of(self, element: str) -> ElementGroup:
        """The group of a top-level element (a primitive's ``_element`` goes with it)."""
        name = self.element_name(element)
        if name.endswith("[x]"):
            return self.choices[name[:-3]]
        return self.elements[name]

    def nested_rules(self, element: str) -> tuple[NestedRule, ...]:
        """Overrides inside a top-level element, outermost first."""
        return self.nested.get(self.element_name(element), ())

    def placement(self, element: str) -> tuple[ElementGroup, tuple[NestedRule, ...]]:
        """(:meth:`group_of`, :meth:`nested_rules`) of a top-level element, in one lookup:
        remembered per element name (every resource of a type repeats the same few), and
        never for a refused one (raised again each time)."""
        found = self._placed.get(element)
        if found is None:
            found = (self.group_of(element), self.nested_rules(element))
            if len(self._placed) < _PLACED_MAX:
                self._placed[element] = found
        return found

    def declared(self) -> frozenset[str]:
        """Every declared top-level element name (choices with ``[x]``)."""
        return frozenset(self.elements) | {f"{base}[x]" for base in self.choices}


@dataclass(frozen=True, slots=True)
class Classification:
    """The whole table: per-type groups, extension URLs, contained resource types."""

    types: Mapping[str, TypeClassification]
    extensions: Mapping[str, ElementGroup]
    contained: Mapping[str, ElementGroup]

    @property
    def resource_types(self) -> frozenset[str]:
        return frozenset(self.types)

    def for_type(self, resource_type: str) -> TypeClassification:
        found = self.types.get(resource_type)
        if found is None:
            raise UnsupportedResourceType("resource type is not supported", path="resourceType")
        return found

    def extension_group(self, url: object) -> ElementGroup:
        """The group of a top-level extension; unknown URLs get the most protective group."""
        if isinstance(url, str):
            return self.extensions.get(url, MOST_PROTECTIVE)
        return MOST_PROTECTIVE

    def contained_group(self, resource_type: object) -> ElementGroup:
        """The group of a contained resource; unknown types get the most protective group."""
        if isinstance(resource_type, str):
            return self.contained.get(resource_type, MOST_PROTECTIVE)
        return MOST_PROTECTIVE

    def group_of_path(self, resource_type: str, path: str) -> ElementGroup:
        """The group of a dotted element path without indexes (``Encounter.subject.display``).

        The deepest nested rule that covers the path wins; otherwise the top-level element's
        group. The leading resource type is optional.
        """
        parts = path.split(".")
        if parts and parts[0] == resource_type:
            parts = parts[1:]
        if not parts or parts[0] in ENVELOPE_ELEMENTS:
            raise UnclassifiedElement("envelope elements have no group", path=path)
        tc = self.for_type(resource_type)
        group = tc.group_of(parts[0])
        for rule in tc.nested_rules(parts[0]):
            if tuple(parts[: len(rule.path)]) == rule.path:
                group = rule.group
        return group


def _group(value: object, where: str) -> ElementGroup:
    try:
        return ElementGroup(str(value))
    except ValueError:
        raise InvalidInput("not an element group", path=where) from None


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise InvalidInput("must be a table", path=key)
    return value


def load_classification(text: str) -> Classification:
    """Parse and validate a classification table (the format of ``element_groups.toml``).

    Checks: every value is a group; element names are FHIR element names; every nested rule
    starts at a declared top-level element. Raises :class:`InvalidInput` naming the key.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"not TOML: {exc}") from None
    common = {k: _group(v, f"common.{k}") for k, v in _table(raw, "common").items()}
    extensions = {
        url: _group(v, f"extensions.{url}") for url, v in _table(raw, "extensions").items()
    }
    contained = {t: _group(v, f"contained.{t}") for t, v in _table(raw, "contained").items()}
    types: dict[str, TypeClassification] = {}
    for resource_type, body in _table(raw, "types").items():
        if not _TYPE_RE.match(resource_type) or not isinstance(body, dict):
            raise InvalidInput("not a resource type table", path=f"types.{resource_type}")
        elements: dict[str, ElementGroup] = {}
        choices: dict[str, ElementGroup] = {}
        pending: list[tuple[tuple[str, ...], ElementGroup]] = []
        for key, value in {**common, **body}.items():
            where = f"types.{resource_type}.{key}"
            group = _group(value, where)
            parts = tuple(key.split("."))
            if not all(_NAME_RE.match(p) for p in parts) or any(p.endswith("]") for p in parts[1:]):
                raise InvalidInput("not an element path", path=where)
            if key in ENVELOPE_ELEMENTS | EXTENSION_ELEMENTS | {CONTAINED}:
                raise InvalidInput("classified elsewhere (envelope, by URL or by type)", path=where)
            if len(parts) > 1:
                pending.append((parts, group))
            elif key.endswith("[x]"):
                choices[key[:-3]] = group
            else:
                elements[key] = group
        nested: dict[str, list[NestedRule]] = {}
        for parts, group in pending:
            top = parts[0]
            if top not in elements and not (top.endswith("[x]") and top[:-3] in choices):
                raise InvalidInput(
                    "nested rule under an undeclared element",
                    path=f"types.{resource_type}.{'.'.join(parts)}",
                )
            nested.setdefault(top, []).append(NestedRule(parts, group))
        types[resource_type] = TypeClassification(
            resource_type,
            MappingProxyType(elements),
            MappingProxyType(choices),
            MappingProxyType(
                {k: tuple(sorted(v, key=lambda r: len(r.path))) for k, v in nested.items()}
            ),
        )
    return Classification(
        MappingProxyType(types), MappingProxyType(extensions), MappingProxyType(contained)
    )


@functools.cache
def default_classification() -> Classification:
    """The table shipped with phivault (read once, on first use, never at import)."""
    text = (
        importlib.resources.files("phivault.records")
        .joinpath("element_groups.toml")
        .read_text(encoding="utf-8")
    )
    return load_classification(text)
