"""The tamper-evident audit ledger (invariants 1 and 5 of DESIGN.md).

Modules, from the pure core outwards:

* ``events``: the audit event model (FHIR AuditEvent / IHE BALP aligned; no PHI values).
* ``canonical``: RFC 8785 canonical JSON, the byte form of a leaf.
* ``merkle``: the RFC 9162 Merkle tree, inclusion and consistency proofs.
* ``note`` and ``checkpoint``: C2SP signed notes and tlog-checkpoints (Ed25519).
* ``ports``: ``AuditSink`` (what the rest of phivault records through) and ``LedgerStore``.
* ``file_store``: the embedded store (append-only frame files, torn-tail recovery).
* ``service``: the ``Ledger`` (group commit, back-links, checkpoints) and ``open_ledger``.
* ``verify``, ``bundle``, ``report``: offline verification, evidence bundles, patient reports.
* ``fhir``: FHIR AuditEvent in and out.
* ``testing``: fakes and sample events for other parts' tests.

Import from the module that defines a name; the package itself imports nothing, so that
depending on ``phivault.ledger.events`` never loads storage or keys.
"""
