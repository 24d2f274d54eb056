"""The root of phivault's exception tree.

Every error a port can raise derives from :class:`PhivaultError`. Adapters translate driver
exceptions into these (``raise StoreUnavailable(...) from exc``) so that no driver exception
crosses a port, and the API and CLI can map them to clear messages without PHI.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "InvalidInput",
    "PhivaultError",
    "StoreUnavailable",
]


class PhivaultError(Exception):
    """Base class for every error phivault raises on purpose.

    Messages must never contain PHI: they may name ids, indexes, paths in a document and
    field names, never the values of PHI elements.
    """


class ConfigurationError(PhivaultError):
    """Settings are missing, inconsistent, or refused in this environment (fail closed)."""


class InvalidInput(PhivaultError):
    """Input from a caller was rejected. ``path`` names where, never what the value was."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message if path is None else f"{path}: {message}")
        self.path = path


class StoreUnavailable(PhivaultError):
    """A storage backend (files, database, stream) cannot take or serve data right now."""
