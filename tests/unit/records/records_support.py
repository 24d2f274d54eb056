"""Helpers shared by the records tests (a uniquely named module: tests are not packages)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from phivault.crypto.blind_index import BlindIndexer

KEY = bytes(range(32))


def indexer() -> BlindIndexer:
    """A real blind indexer with a fixed test key (two live versions, like a rotation)."""
    return BlindIndexer("t1", {1: KEY, 2: bytes(reversed(KEY))}, 2)


def _rewrite(node: Any, urls: dict[str, str]) -> None:
    if isinstance(node, list):
        for item in node:
            _rewrite(item, urls)
    elif isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            if ref in urls:
                node["reference"] = urls[ref]
            elif "?" in ref:  # a conditional reference, as if resolved
                kind = ref.split("?", 1)[0]
                node["reference"] = f"{kind}/c{hashlib.sha256(ref.encode()).hexdigest()[:16]}"
        for value in node.values():
            _rewrite(value, urls)


def resolved_resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    """The bundle's resources with urn:uuid and conditional references made literal."""
    urls = {
        e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle["entry"]
        if "fullUrl" in e
    }
    out = []
    for entry in bundle["entry"]:
        resource = copy.deepcopy(entry["resource"])
        _rewrite(resource, urls)
        out.append(resource)
    return out


class DictStore:
    """A tiny resolver over index entries, as storage would answer a conditional lookup."""

    def __init__(self) -> None:
        from phivault.records.search_params import IndexEntry

        self.rows: dict[str, list[tuple[str, set[IndexEntry]]]] = {}
        self._indexer = indexer()

    def add(self, resource: dict[str, Any]) -> None:
        from phivault.records.search_params import index_entries

        entries = set(index_entries(resource, self._indexer.tokens))
        self.rows.setdefault(resource["resourceType"], []).append((resource["id"], entries))

    def resolve(self, lookup: Any) -> list[str]:
        from phivault.records.search_params import BlindEntry, TokenEntry

        blind = dict(lookup.query.blind_lookups())
        out = []
        for the_id, entries in self.rows.get(lookup.resource_type, []):
            ok = True
            for criterion in lookup.query.criteria:
                name = criterion.param.name
                if criterion in blind:
                    wanted = {
                        BlindEntry(name, t)
                        for field, value in blind[criterion]
                        for t in self._indexer.tokens(field, value)
                    }
                    hit = bool(wanted & entries)
                else:
                    hit = any(
                        isinstance(e, TokenEntry)
                        and e.param == name
                        and any(
                            e.code == v.code and (v.system is None or (e.system or "") == v.system)
                            for v in criterion.values
                        )
                        for e in entries
                    )
                ok = ok and hit
            if ok:
                out.append(the_id)
        return out
