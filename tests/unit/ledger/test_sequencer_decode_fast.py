"""The sequencer's fast canonical check (``_plainly_canonical``) changes no verdict.

For every payload, decoding gives what the exact check alone gave before the shortcut: the
same document, or the same refusal with the same reason; and an event marked ``plain`` has
its leaf (with the ledger's fields) written by orjson exactly as the exact encoder writes it.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from phivault.errors import InvalidInput
from phivault.ledger.canonical import (
    MAX_SAFE_INTEGER,
    canonical_json,
    canonical_json_of_plain_document,
)
from phivault.ledger.events import LEDGER_FIELDS
from phivault.ledger.sequencer import (
    InvalidStreamMessage,
    _check_event_shape,
    _decode_one,
    _plainly_canonical,
)
from phivault.ledger.stream import MAX_EVENT_BYTES
from phivault.ledger.testing import sample_event


def _exact_decode(seq: int, encoding: str, data: bytes) -> dict[str, Any]:
    """The decode as it was before the fast check: every payload through canonical_json."""
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidStreamMessage(seq, f"{len(data)} bytes, over {MAX_EVENT_BYTES}")
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidStreamMessage(seq, "not JSON") from None
    if not isinstance(document, dict):
        raise InvalidStreamMessage(seq, "not a JSON object")
    if any(field in document for field in LEDGER_FIELDS):
        raise InvalidStreamMessage(seq, "it sets a field the ledger adds")
    if encoding == "event":
        _check_event_shape(seq, document)
    try:
        canonical = canonical_json(document)
    except InvalidInput:
        raise InvalidStreamMessage(seq, "not canonicalizable") from None
    if canonical != data:
        raise InvalidStreamMessage(seq, "not in canonical form")
    return document


def _verdict(decode: Any, encoding: str, data: bytes) -> tuple[str, Any]:
    try:
        result = decode(5, encoding, data)
    except InvalidStreamMessage as exc:
        return "refused", exc.reason
    return "taken", getattr(result, "document", result)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.integers(min_value=-MAX_SAFE_INTEGER - 2, max_value=MAX_SAFE_INTEGER + 2)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=8)
    | st.sampled_from(["10.0.0.7", "2026-01-01T00:00:00.000Z", 'a"b', "x\\y", "1e5", "\n"])
)
keys = st.text(st.characters(codec="utf-8"), max_size=6) | st.sampled_from(
    ["kind", "seq", "patient", "\U0001f600", "\uffff", "a"]
)
documents = st.dictionaries(
    keys,
    st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)
        ),
        max_leaves=12,
    ),
    max_size=6,
)


def _payloads(document: dict[str, Any]) -> list[bytes]:
    """The canonical bytes (when there are any) and some near misses."""
    out = [orjson.dumps(document), orjson.dumps(document, option=orjson.OPT_SORT_KEYS)]
    try:
        canonical = canonical_json(document)
    except InvalidInput:
        return out
    return [*out, canonical, canonical.replace(b":", b": ", 1), canonical + b" "]


@settings(max_examples=400, deadline=None)
@given(documents)
@example({"a": 1.0})
@example({"a": 1e21, "b": "c"})
@example({"a": -0.0})
@example({"a": 2**53})
@example({"\U0001f600": 1, "\uffff": 2})
@example({"ip": "10.0.0.7", "n": 12})
def test_the_fast_check_changes_no_verdict(document: dict[str, Any]) -> None:
    for data in _payloads(document):
        for encoding in ("document", "event"):
            assert _verdict(_decode_one, encoding, data) == _verdict(_exact_decode, encoding, data)


@settings(max_examples=400, deadline=None)
@given(
    documents,
    st.integers(min_value=0, max_value=MAX_SAFE_INTEGER),
    st.binary(min_size=32, max_size=32),
)
def test_a_plain_entry_gets_the_exact_leaf_from_orjson(
    document: dict[str, Any], seq: int, chain: bytes
) -> None:
    for data in _payloads(document):
        if not _plainly_canonical(orjson.loads(data), data):
            continue
        assert canonical_json(orjson.loads(data)) == data
        leaf = {**orjson.loads(data), "seq": seq, "chain": base64.b64encode(chain).decode()}
        leaf["patient_prev"] = seq // 2
        assert canonical_json_of_plain_document(leaf) == canonical_json(leaf)


def test_every_event_a_sink_publishes_takes_the_fast_check() -> None:
    for n in range(30):
        document = sample_event(n, patient=None if n % 3 else f"Patient/p-{n}").to_document()
        data = canonical_json_of_plain_document(document)
        incoming = _decode_one(n, "event", data)
        assert incoming.plain and incoming.document == document
