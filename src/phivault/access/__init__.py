"""Access: roles as job functions, the policy that says what each may see, and decisions.

Why its own part: minimum necessary (DESIGN.md invariant 2) and no standing god-mode
(invariant 6) must hold the same way for every caller, so the policy is data (a TOML file a
reviewer can read), checked against invariants before use, compiled once into lookup tables,
and every decision is a pure function of its inputs (the server's clock passed in). The
records repository asks :func:`~phivault.access.decision.decide` before it decrypts anything.

Public modules: ``phivault.access.vocabulary`` (the words), ``.policy`` (loading and
invariants), ``.decision`` (compiled policy, access context, decisions), ``.matrix`` (the
access matrix and its Markdown, JSON and SARIF renderings), ``.relationships`` (care links
derived from stored records).
"""

from __future__ import annotations

__all__: list[str] = []
