"""IntentScan, the reconciler's memo between passes: passes that take the ledger in pieces,
their cursor staying put or moving on, find exactly what one scan from the cursor finds (the
same open intents, in ledger order), an outcome settles only the oldest open intent of its key
recorded before it, and the memo is dropped whenever it cannot be reused."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from phivault.ledger.events import Action, Agent, AuditEvent, EventKind, Source
from phivault.records.repository import _MEMO_MAX_EVENTS, IntentScan

_EVENT = AuditEvent(
    kind=EventKind.REST,
    subtype="create",
    action=Action.CREATE,
    recorded=datetime(2027, 1, 15, tzinfo=UTC),
    outcome_reason="intent",
    tenant="t1",
    agents=(Agent(who="user-1"),),
    source=Source(observer="node-1"),
)

_Key = tuple[str | None, tuple[str, ...]]
_keys = st.builds(
    lambda r, v: (r, (f"Observation/o/_history/{v}",)),
    st.none() | st.sampled_from("ab"),
    st.integers(1, 3),
)
_entries = st.lists(st.tuples(st.booleans(), _keys), max_size=40)  # (is an intent, key)


def _one_scan(entries: list[tuple[bool, _Key]], start: int, end: int) -> list[tuple[_Key, int]]:
    """One scan from the cursor, the simplest way: each outcome takes the oldest intent of
    its key that came before it and is still open."""
    open_intents: list[tuple[_Key, int]] = []
    for index in range(start, end):
        is_intent, key = entries[index]
        if is_intent:
            open_intents.append((key, index))
        else:
            earlier = [found for found in open_intents if found[0] == key]
            if earlier:
                open_intents.remove(earlier[0])
    return open_intents


def test_an_outcome_settles_only_an_earlier_intent_of_its_key() -> None:
    """A client retried an update with the same X-Request-ID: same key (request id, version
    written). The first try's outcome (rolled back) must not settle the retry's intent, which
    came after it; an outcome settles one intent, not every intent of its key."""
    key = ("req-1", ("Organization/o/_history/2",))
    ledger = object()
    found = IntentScan()
    found.resume(ledger, 0, 5)
    found.add(0, key, _EVENT)  # the first try's intent
    found.add(1, key, None)  # its outcome: rolled back
    found.add(2, key, _EVENT)  # the retry's intent; the worker dies before its outcome
    found.stop = 3
    assert [index for index, _event in found.open_intents()] == [2]
    found.add(3, key, None)  # an outcome settles one intent: the oldest still open
    found.add(4, key, _EVENT)
    found.stop = 5
    assert [index for index, _event in found.open_intents()] == [4]


@given(_entries, st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=5))
def test_passes_that_take_a_range_in_pieces_find_what_one_scan_finds(
    entries: list[tuple[bool, _Key]], passes: list[tuple[int, int]]
) -> None:
    """Passes whose cursor stays put or moves forward, over a ledger that grows."""
    ledger = object()
    found = IntentScan()
    start = end = 0
    for cursor_step, growth in [*passes, (0, len(entries))]:
        end = min(len(entries), end + growth)
        start = min(end, start + cursor_step)
        found.resume(ledger, start, end)
        for index in range(found.stop, end):
            is_intent, key = entries[index]
            found.add(index, key, _EVENT if is_intent else None)
        found.stop = end
        got = [index for index, _event in found.open_intents()]  # an index names its key
        assert got == [index for _key, index in _one_scan(entries, start, end)]


def test_the_memo_is_dropped_when_it_cannot_be_reused() -> None:
    ledger, other = object(), object()
    found = IntentScan()
    found.resume(ledger, 5, 10)
    found.add(6, (None, ("A/1/_history/1",)), _EVENT)
    found.stop = 10
    found.resume(ledger, 5, 12)  # same ledger, same cursor, grown: kept
    assert (found.start, found.stop, len(found.open_intents())) == (5, 10, 1)
    found.resume(ledger, 7, 12)  # the cursor moved past the intent: kept from there on
    assert (found.start, found.stop, found.open_intents()) == (7, 10, [])
    for ledger_now, start, end in ((other, 6, 12), (ledger, 5, 12), (ledger, 6, 9)):
        found.resume(ledger, 6, 12)
        found.add(7, (None, ("A/1/_history/1",)), _EVENT)
        found.stop = 10
        # another ledger, a cursor gone back, a ledger shorter than what was scanned
        found.resume(ledger_now, start, end)
        assert (found.start, found.stop, found.open_intents()) == (start, start, [])


def test_a_memo_grown_too_large_serves_its_pass_but_is_not_kept() -> None:
    ledger = object()
    found = IntentScan()
    found.resume(ledger, 0, _MEMO_MAX_EVENTS + 2)
    for index in range(_MEMO_MAX_EVENTS + 1):
        found.add(index, (str(index), ()), _EVENT)
    assert len(found.open_intents()) == _MEMO_MAX_EVENTS + 1
    found.stop = _MEMO_MAX_EVENTS + 1
    found.resume(ledger, 0, _MEMO_MAX_EVENTS + 2)
    assert found.stop == 0 and not found.open_intents()
