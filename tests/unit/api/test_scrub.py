from __future__ import annotations

import asyncio
import io
import json

from hypothesis import given
from hypothesis import strategies as st

from phivault.api.observability import make_logger
from phivault.privacy.scrub import REDACTED, Scrubber, taint, tainted_scope, tainted_values


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
