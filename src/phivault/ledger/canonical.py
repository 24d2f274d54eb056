"""RFC 8785 JSON Canonicalization Scheme (JCS): the one byte form of a ledger leaf.

A leaf's hash commits to its bytes, so the same document must always encode to the same bytes,
whoever encodes it and whenever. JCS gives that: keys sorted by UTF-16 code units, no
whitespace, minimal string escaping, ECMAScript number formatting, and I-JSON limits
(integers within ±(2**53 - 1), no NaN or infinities, valid Unicode only).

This runs on every append, so it has a fast path. For a document without floats whose keys
all sort the same by code point as by UTF-16 code unit (any key below U+D800, in particular
ASCII), :mod:`json` with ``sort_keys`` already writes the JCS bytes, in C; only a type and
range check runs in Python first. Everything else takes the exact, slower path. The
``rfc8785`` package is the oracle for both paths in the tests (see
docs/decisions/canonical-json.md).
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import orjson

from phivault.errors import InvalidInput

__all__ = ["MAX_SAFE_INTEGER", "canonical_json", "canonical_json_of_plain_document"]

MAX_SAFE_INTEGER: Final = 2**53 - 1

_encode: Final = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    sort_keys=True,
    separators=(",", ":"),
    # Our own scan runs first and turns a cycle into a RecursionError.
    check_circular=False,
).encode
# UTF-16 and code-point order can only disagree once a surrogate (a supplementary character
# in UTF-16) is compared with U+E000..U+FFFF: keys below U+D800 are safe.
_FIRST_SURROGATE: Final = "\ud800"


class _RefusedError(Exception):
    """Internal: a value JCS cannot encode. ``where`` collects the path, innermost first."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where: list[str] = []


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of ``value``.

    ``value`` is built from ``dict`` (with ``str`` keys), ``list``, ``tuple``, ``str``,
    ``int``, ``float``, ``bool`` and ``None`` (subclasses such as enums encode as their base
    value). Raises :class:`~phivault.errors.InvalidInput`, naming where in the document but
    never the value, for anything else, for integers beyond ±(2**53 - 1), non-finite floats,
    lone surrogates, and documents nested too deeply to walk.
    """
    try:
        if _scan(value):
            try:
                return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
            except orjson.JSONEncodeError:
                pass  # a lone surrogate in a value: the exact path says where
        parts: list[str] = []
        _write(value, parts)
        return "".join(parts).encode("utf-8")
    except _RefusedError as refused:
        path = "/" + "/".join(reversed(refused.where)) if refused.where else None
        raise InvalidInput(f"cannot canonicalize: {refused.reason}", path=path) from None
    except RecursionError:
        raise InvalidInput("cannot canonicalize: nested too deeply (or cyclic)") from None


def canonical_json_of_plain_document(document: dict[str, Any]) -> bytes:
    """JCS bytes of a *plain* document, without the type scan: for the append hot path.

    Plain means: every key and string is ASCII without control characters, every number an
    integer within ±(2**53 - 1), and nothing but ``dict``, ``list``, ``str``, ``int`` and
    ``bool``. :meth:`phivault.ledger.events.AuditEvent.to_document` guarantees that by its
    field grammars, and the ledger adds only indexes and a base64 hash; a test holds this
    function equal to :func:`canonical_json` for every valid event. Anything else must go
    through :func:`canonical_json`.
    """
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def _pointer(key: str) -> str:
    # An RFC 6901 JSON Pointer segment.
    return key.replace("~", "~0").replace("/", "~1")


def _scan(value: Any) -> bool:
    """Check ``value`` can be encoded; True if :mod:`json` alone gives its JCS bytes."""
    kind = type(value)
    if kind is dict:
        fast = True
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise _RefusedError("object key is not a string")
            # Scalars are checked inline: a call per value would double the cost of a leaf.
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if kind is int and -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                continue
            try:
                if not _scan(item):
                    fast = False
            except _RefusedError as refused:
                refused.where.append(_pointer(key))
                raise
        if fast and value:
            keys = "".join(value)
            # isascii() is O(1) in CPython; max() only runs for non-ASCII keys.
            fast = keys.isascii() or max(keys) < _FIRST_SURROGATE
        return fast
    if kind is list or kind is tuple:
        fast = True
        for position, item in enumerate(value):
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if kind is int and -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                continue
            try:
                if not _scan(item):
                    fast = False
            except _RefusedError as refused:
                refused.where.append(str(position))
                raise
        return fast
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return True
        raise _RefusedError("integer outside ±(2**53 - 1)")
    if kind is float:
        if math.isfinite(value):
            return False
        raise _RefusedError("NaN and infinities are not JSON")
    # Subclasses (enums, named tuples, ...): check them as their base type, exactly.
    if isinstance(value, bool | str):
        return True
    if isinstance(value, int):
        return _scan(int(value))
    if isinstance(value, float):
        _scan(float(value))
        return False
    if isinstance(value, dict):
        return _scan(dict(value))
    if isinstance(value, list | tuple):
        return _scan(list(value))
    raise _RefusedError(f"{kind.__name__} is not a JSON type")


def _write(value: Any, out: list[str]) -> None:
    """The exact path: write the JCS text of ``value`` (already scanned or not) to ``out``."""
    if value is None:
        out.append("null")
    elif value is True or value is False:
        out.append("true" if value else "false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise _RefusedError("integer outside ±(2**53 - 1)")
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(_number(float(value)))
    elif isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise _RefusedError("object key is not a string")
            try:
                items.append((key.encode("utf-16-be"), key, item))
            except UnicodeEncodeError:
                raise _RefusedError("object key is not valid Unicode (lone surrogate)") from None
        items.sort(key=lambda entry: entry[0])
        out.append("{")
        for position, (_, key, item) in enumerate(items):
            if position:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            try:
                _write(item, out)
            except _RefusedError as refused:
                refused.where.append(_pointer(key))
                raise
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for position, item in enumerate(value):
            if position:
                out.append(",")
            try:
                _write(item, out)
            except _RefusedError as refused:
                refused.where.append(str(position))
                raise
        out.append("]")
    else:
        raise _RefusedError(f"{type(value).__name__} is not a JSON type")


def _string(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _RefusedError("string is not valid Unicode (lone surrogate)") from None
    # json's escaping with ensure_ascii=False is exactly JCS's: \" \\ \b \f \n \r \t, other
    # controls as lower-case \u00xx, everything else (DEL and U+2028 included) as is.
    return _encode(value)


def _number(value: float) -> str:
    """ECMAScript Number::toString (ECMA-262 7.1.12.1), as RFC 8785 §3.2.2.3 requires."""
    if not math.isfinite(value):
        raise _RefusedError("NaN and infinities are not JSON")
    if value == 0:
        return "0"  # -0 too
    sign = "-" if value < 0 else ""
    # repr() gives the shortest digits that round-trip, which is what ECMAScript asks for;
    # only the layout differs.
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    raw = whole + fraction
    digits = raw.lstrip("0")
    # Now value = 0.<digits> × 10**point, with no leading or trailing zero digits.
    point = len(whole) + (int(exponent) if exponent else 0) - (len(raw) - len(digits))
    digits = digits.rstrip("0")
    count = len(digits)
    if count <= point <= 21:
        text = digits + "0" * (point - count)
    elif 0 < point <= 21:
        text = digits[:point] + "." + digits[point:]
    elif -6 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        power = point - 1
        mark = "+" if power >= 0 else "-"
        head = digits[0] if count == 1 else digits[0] + "." + digits[1:]
        text = f"{head}e{mark}{abs(power)}"
    return sign + text
