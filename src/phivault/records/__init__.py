"""FHIR records: element classification, split and reassembly, search index values, queries
and bundles.

Why this package is pure: the storage and API layers decide *where* records go; this package
decides *what* a record is made of, which parts are protected how, and what a search or a
transaction means, with no database and no HTTP, so that every rule is tested on the Synthea
fixtures in isolation. Import the submodules (``phivault.records.classification``,
``.split``, ``.search_params``, ``.query``, ``.bundles``) for their public names.
"""

from __future__ import annotations

__all__: list[str] = []
