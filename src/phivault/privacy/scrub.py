"""Boundary scrubbing: nothing that leaves phivault as text (logs, error bodies, anything sent to
an error tracker) may carry a PHI value, even by accident.

Two nets, applied in this order:

1. **Tainted values.** While a request is handled, every value the records layer decrypts from
   a PHI-classified element is added to a per-request set (:func:`taint`). Any exact,
   case-insensitive occurrence of one of them is redacted, whatever it looks like: a rare
   surname, an allergy, a free-text note. The set lives in a context variable opened by
   :func:`tainted_scope` at the front door, so it follows the request through ``await``\\s and
   into worker threads, and is dropped when the request ends.
2. **Patterns.** :func:`phivault.privacy.patterns.redact` catches what looks like PHI (SSN,
   MRN-like numbers, phones, e-mail addresses, dates, street addresses, person names) even if
   nobody tainted it, e.g. a value echoed from a malformed request.

:class:`Scrubber` is also a structlog processor, so every log line passes through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from functools import lru_cache
from typing import Any

from phivault.privacy.patterns import redact

__all__ = [
    "MIN_TAINT_LENGTH",
    "REDACTED",
    "Screened",
    "Scrubber",
    "close_tainted_scope",
    "open_tainted_scope",
    "taint",
    "taint_tree",
    "tainted_scope",
    "tainted_values",
]

REDACTED = "[REDACTED]"
# Shorter values ("F", "12") would redact half of every line and protect nothing.
MIN_TAINT_LENGTH = 3

_TAINTED: ContextVar[set[str] | None] = ContextVar("phivault_tainted_values", default=None)


@contextmanager
def tainted_scope() -> Iterator[set[str]]:
    """Open a fresh tainted-value set for one request (the front door does this)."""
    token = open_tainted_scope()
    current = _TAINTED.get()
    assert current is not None  # just set
    try:
        yield current  # the live set (an empty set is falsy: never ``or set()`` here)
    finally:
        close_tainted_scope(token)


def open_tainted_scope() -> Token[set[str] | None]:
    """:func:`tainted_scope` without the context manager, for the hot path of the front door."""
    return _TAINTED.set(set())


def close_tainted_scope(token: Token[set[str] | None]) -> None:
    _TAINTED.reset(token)


def taint(*values: object) -> None:
    """Mark values as PHI for the rest of the current request (records layer, on decrypt).

    Strings are tainted as they are; numbers and other scalars by their text. Outside a
    request scope this does nothing: there is no request whose output could carry them.
    """
    current = _TAINTED.get()
    if current is None:
        return
    for value in values:
        if value is None or isinstance(value, bool):
            continue
        text = value if isinstance(value, str) else str(value)
        text = text.strip()
        if len(text) >= MIN_TAINT_LENGTH:
            current.add(text)


def taint_tree(roots: Iterable[Any]) -> None:
    """:func:`taint` every scalar inside ``roots`` (JSON-like: dicts, lists, strings, numbers).

    The records layer taints each decrypted document whole; a search of 20 Observations has
    hundreds of leaves, and a call of :func:`taint` per leaf cost three times this walk
    (measured). The same values end up in the set: strings stripped, numbers by their text,
    booleans and None never, nothing shorter than :data:`MIN_TAINT_LENGTH`.
    """
    current = _TAINTED.get()
    if current is None:
        return
    add = current.add
    stack: list[Any] = [list(roots)]
    while stack:
        node = stack.pop()
        # A container's values are taken in place; only nested containers go on the stack
        # (a push and a pop per leaf were a third of the walk).
        for value in node.values() if type(node) is dict else node:
            kind = type(value)
            if kind is str:
                if len(value) >= MIN_TAINT_LENGTH:  # else its stripped text is shorter still
                    text = value.strip()
                    if len(text) >= MIN_TAINT_LENGTH:
                        add(text)
            elif kind is dict or kind is list:
                stack.append(value)
            elif kind is int or kind is float:
                text = str(value)
                if len(text) >= MIN_TAINT_LENGTH:
                    add(text)
            elif value is None or kind is bool:
                continue  # never tainted (as taint() does)
            elif isinstance(value, Mapping):
                stack.append(dict(value))
            elif isinstance(value, list | tuple):
                stack.append(value)
            else:
                taint(value)  # subclasses of str or numbers, and anything else, as taint() does


def tainted_values() -> frozenset[str]:
    current = _TAINTED.get()
    return frozenset(current) if current else frozenset()


_CACHED_LENGTH = 128


@lru_cache(maxsize=8192)
def _redact_short(text: str) -> str:
    # Log lines repeat the same short values (routes, methods, subjects, tenants) on every
    # request; the patterns are pure, so their verdict on a short string can be remembered.
    return redact(text, REDACTED)


class Screened(str):
    """A string already screened for PHI patterns where it was made (a request id phivault
    generated or checked). The scrubber still redacts tainted values in it but does not scan
    it for patterns again, and does not fill its cache with one-off values."""

    __slots__ = ()


class Scrubber:
    """Redacts tainted values and PHI patterns from strings and nested JSON-like values."""

    def __init__(self, replacement: str = REDACTED) -> None:
        self.replacement = replacement

    def scrub_text(self, text: str) -> str:
        tainted = _TAINTED.get()
        if tainted:
            text = self._redact_tainted(text, tainted)
        return self._redact_patterns(text)

    def _redact_patterns(self, text: str) -> str:
        if isinstance(text, Screened):
            return text
        if len(text) <= _CACHED_LENGTH and self.replacement == REDACTED:
            return _redact_short(text)
        return redact(text, self.replacement)

    def scrub(self, value: Any) -> Any:
        """Scrub every string inside ``value`` (dicts, lists, tuples); keys are kept."""
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, Mapping):
            return {key: self.scrub(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.scrub(item) for item in value]
        return value

    def scrub_exception(self, exc: BaseException) -> dict[str, str]:
        """What may be sent to an error tracker about ``exc``: its type and a scrubbed message."""
        return {"type": type(exc).__name__, "message": self.scrub_text(str(exc))}

    def __call__(
        self, logger: object, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """The structlog processor: scrub every value of the event."""
        tainted = _TAINTED.get()
        if tainted:
            # One test of the tainted values against all of the line's strings at once: a
            # line rarely holds any, and then each string needs only the pattern net.
            strings = [value for value in event_dict.values() if isinstance(value, str)]
            if strings and not self._present("\x00".join(strings).lower(), tainted):
                for key, value in event_dict.items():
                    if isinstance(value, str):
                        event_dict[key] = self._redact_patterns(value)
                    elif isinstance(value, (Mapping, list, tuple)):
                        event_dict[key] = self.scrub(value)
                return event_dict
        for key, value in event_dict.items():
            if isinstance(value, (str, Mapping, list, tuple)):
                event_dict[key] = self.scrub(value)
        return event_dict

    @staticmethod
    def _present(folded: str, tainted: set[str]) -> list[str]:
        """The tainted values that occur in ``folded`` (a case-folded text)."""
        return [value for value in tainted if value.lower() in folded]

    def _redact_tainted(self, text: str, tainted: set[str]) -> str:
        """Redact every tainted value found in ``text``, case-insensitively.

        Substring tests first (C speed, no allocation per value), and a pattern only of the
        values actually present: a request taints hundreds of values and scrubs a few short
        log lines, so compiling a pattern of all of them per request cost more than the
        request (and concurrent requests never share a set, so no cache helps).
        """
        present = self._present(text.lower(), tainted)  # the mapping re.IGNORECASE uses
        if not present:
            return text
        present.sort(key=len, reverse=True)  # "Mary Ann" whole before "Mary"
        pattern = re.compile("|".join(re.escape(v) for v in present), re.IGNORECASE)
        return pattern.sub(self.replacement, text)
