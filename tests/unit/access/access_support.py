"""Helpers for the access tests: the default policy text, edited in small, named ways."""

from __future__ import annotations

from phivault.access.policy import default_policy_text


def default_text() -> str:
    return default_policy_text()


def replace_once(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced exactly once (fails loudly if the anchor moved)."""
    assert text.count(old) == 1, f"anchor not unique: {old!r}"
    return text.replace(old, new)


def line_of(text: str, needle: str) -> int:
    """The 1-based line number of the first line containing ``needle``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"not found: {needle!r}")
