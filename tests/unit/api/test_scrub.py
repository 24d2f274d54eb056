from __future__ import annotations

import asyncio
import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.api.observability import make_logger
from phivault.privacy.scrub import (
    REDACTED,
    Scrubber,
    taint,
    taint_tree,
    tainted_scope,
    tainted_values,
)


def test_tainted_values_are_redacted_case_insensitively() -> None:
    scrubber = Scrubber()
    with tainted_scope():
        taint("Quackenbush", "peanut allergy", "F", None, 19800101)
        text = scrubber.scrub_text("patient quackenbush has a PEANUT ALLERGY, sex F, born 19800101")
    assert "quackenbush" not in text.lower()
    assert "peanut" not in text.lower()
    assert "19800101" not in text
    assert "sex F" in text  # too short to taint
    assert text.count(REDACTED) >= 3


def test_taint_outside_a_request_does_nothing() -> None:
    taint("Quackenbush")
    assert tainted_values() == frozenset()


def test_scopes_do_not_leak_between_requests() -> None:
    async def request(value: str) -> frozenset[str]:
        with tainted_scope():
            taint(value)
            await asyncio.sleep(0)
            return tainted_values()

    async def main() -> list[frozenset[str]]:
        return list(await asyncio.gather(request("alpha-one"), request("beta-two")))

    assert asyncio.run(main()) == [frozenset({"alpha-one"}), frozenset({"beta-two"})]


def test_patterns_are_redacted_without_taint() -> None:
    text = Scrubber().scrub_text("call 555-867-5309 or mail jane.doe@example.com, ssn 123-45-6789")
    for value in ("555-867-5309", "jane.doe@example.com", "123-45-6789"):
        assert value not in text


def test_nested_values_and_keys_kept() -> None:
    scrubbed = Scrubber().scrub({"a": ["ssn 123-45-6789", {"b": "ok"}], "n": 5})
    assert scrubbed == {"a": [f"ssn {REDACTED}", {"b": "ok"}], "n": 5}


def test_logger_scrubs_every_field() -> None:
    stream = io.StringIO()
    log = make_logger(Scrubber(), stream)
    with tainted_scope():
        taint("Zebulon")
        log.info("event.name", detail="Zebulon called from 555-867-5309", count=3)
    line = json.loads(stream.getvalue())
    assert "Zebulon" not in stream.getvalue() and "555-867-5309" not in stream.getvalue()
    assert line["count"] == 3 and line["event"] == "event.name"


def test_scrub_exception() -> None:
    report = Scrubber().scrub_exception(ValueError("bad ssn 123-45-6789"))
    assert report["type"] == "ValueError"
    assert "123-45-6789" not in report["message"]


@given(
    st.text(min_size=3, max_size=30).filter(lambda s: s.strip() == s),
    st.text(max_size=40),
    st.text(max_size=40),
)
def test_any_tainted_value_never_survives(value: str, before: str, after: str) -> None:
    scrubber = Scrubber()
    with tainted_scope():
        taint(value)
        out = scrubber.scrub_text(before + value + after)
    # Redaction can only remove text; the tainted value cannot reappear from the surroundings
    # unless the surroundings themselves contain it.
    if value.lower() not in (before + after).lower() and value.lower() not in REDACTED.lower():
        assert value.lower() not in out.lower().replace(REDACTED.lower(), "\0")


def test_interleaved_requests_each_redact_their_own_values() -> None:
    """Requests whose log lines interleave (each awaits between lines) never let one of their
    own tainted values through, whichever request logged last or compiled last."""
    stream = io.StringIO()
    log = make_logger(Scrubber(), stream)
    names = [f"Quillfeather{n}x" for n in range(12)]

    async def request(n: int) -> None:
        with tainted_scope():
            taint(names[n], f"{n}0{n}-private-note")
            for step in range(5):
                log.info(
                    "records.read", detail=f"{names[n]} step {step}", note=f"{n}0{n}-private-note"
                )
                assert names[n] not in Scrubber().scrub_text(f"x {names[n].upper()} y")
                await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(request(n) for n in range(len(names))))

    asyncio.run(main())
    text = stream.getvalue()
    assert text.count("records.read") == 5 * len(names)
    for n, name in enumerate(names):
        assert name.lower() not in text.lower()
        assert f"{n}0{n}-private-note" not in text


def test_values_tainted_on_a_storage_thread_belong_to_the_request() -> None:
    """The records repository runs storage calls on its own threads: what is tainted there
    is in the calling request's set (the context goes with the work), and only in it."""
    from phivault.records.storage_threads import _blocking, _reading

    async def request(value: str) -> frozenset[str]:
        with tainted_scope():
            await _blocking(lambda: taint(value))
            await _reading(lambda: taint(value + "-read"))
            return tainted_values()

    async def main() -> list[frozenset[str]]:
        return list(await asyncio.gather(request("thread-one"), request("thread-two")))

    assert asyncio.run(main()) == [
        frozenset({"thread-one", "thread-one-read"}),
        frozenset({"thread-two", "thread-two-read"}),
    ]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=30,
)


@settings(deadline=None)  # a loaded machine must not fail it on time
@given(st.lists(_JSON, max_size=4))
def test_taint_tree_taints_exactly_what_taint_does_per_leaf(roots: list[object]) -> None:
    def leaves(node: object) -> list[object]:
        if isinstance(node, dict):
            return [leaf for value in node.values() for leaf in leaves(value)]
        if isinstance(node, list):
            return [leaf for value in node for leaf in leaves(value)]
        return [node]

    with tainted_scope():
        for root in roots:
            taint(*leaves(root))
        expected = tainted_values()
    with tainted_scope():
        taint_tree(roots)
        assert tainted_values() == expected
    taint_tree(roots)  # outside a request: nothing to taint, no error
    assert tainted_values() == frozenset()
