"""Detectors for values that look like PHI: the last screen before text leaves phivault.

Invariant 4 of the design says logs, errors, metrics, audit events and alerts carry opaque
ids or keyed tokens, never PHI. The code that builds those should never put PHI there in the
first place; this module is the guard behind it. The log scrubber redacts what it finds here,
and :mod:`phivault.ledger.fhir` refuses incoming audit events whose free text looks like PHI.

Because it guards what leaves the system, **recall matters more than precision**: a sentence
that starts with two capitalized words is reported as a person name, and a seven-digit number
standing on its own as a medical record number. What is deliberately *not* reported:

* digit runs that are part of a compound code or id (``req-20240131093000``,
  ``urn:oid:2.16.840.1.113883``, ``v1.2.3``, UUIDs): those are opaque by construction;
* names written in capitals only (``JOHN SMITH``), and a single given name without a title.

Every pattern is compiled once at import and is linear by construction: each repetition is
bounded, except a few repetitions of one character class that can only start where the
previous character is outside that class (a negative lookbehind), so a scan never restarts
inside a run. Adversarial input (long runs of digits, letters, dots, ``@``) costs time
proportional to its length; ``tests/unit/privacy/test_patterns.py`` checks this structure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = ["PhiKind", "PhiMatch", "find_phi", "looks_like_phi", "redact"]


class PhiKind(StrEnum):
    """What a match looks like. Values are stable: the log scrubber and error messages use them."""

    SSN = "ssn"
    PHONE = "phone"
    EMAIL = "email"
    DATE = "date"
    STREET_ADDRESS = "street-address"
    MRN = "mrn"
    PERSON_NAME = "person-name"


@dataclass(frozen=True)
class PhiMatch:
    """A span ``text[start:end]`` that looks like PHI of the given kind."""

    kind: PhiKind
    start: int
    end: int


# What a pass found: the kind and the span (a tuple: cheaper than a PhiMatch while scanning).
_Found = tuple[PhiKind, int, int]

# --- how the patterns are written, and why ---------------------------------------------------
#
# Speed: each pass is one compiled pattern that starts with a single character class, and only
# then looks at the character *before* it with a two-character negative lookbehind:
# ``[0-9](?<!\w.)`` rather than ``(?<!\w)[0-9]``. The engine then skips, in C, every position
# whose character cannot start a match (a pattern that starts with an assertion is tried at
# every position). Alternatives that begin differently look back at the consumed first
# character: ``(?<=\()``, ``(?<=1)``. Five passes cover every kind.
#
# Safety: every repetition is bounded ({0,30}), except the digit run of the number pass, a
# repetition of one class that cannot restart inside a run (its lookbehind refuses a digit
# before it). A match that a check in code refuses is retried one character later; a match is
# at most a few hundred characters long, so the work stays proportional to the input.

# Letters: ASCII, Latin-1 and Latin Extended-A/B (names such as "Villaseñor", "Łukasz").
_UP: Final = "A-Z\u00c0-\u00d6\u00d8-\u00de\u0100-\u024f"
_LO: Final = "a-z\u00df-\u00f6\u00f8-\u00ff\u0100-\u024f"
_LETTER: Final = _UP + _LO
_APOS: Final = "'\u2019"

_END: Final = r"(?!\w)"
# Digits that continue a compound code ("req-2024...", "urn:oid:2.16.840", "v1.2.3") are not
# PHI: these two are written right after the first (consumed) character of a number.
# "SSN:999342070" and "MRN:1234567" are labels, not codes: a colon after a letter is no joiner.
_NOT_AFTER_JOINER: Final = r"(?<![A-Za-z_][-./].)(?<![0-9][-./:].)"
_NOT_AFTER_NUMBER: Final = r"(?<![0-9][-./:].)"
_NOT_BEFORE_JOINER: Final = r"(?![-./:]\w)"

# A month name whose first letter was already consumed by [ADFJMNOS].
_MONTH_REST: Final = (
    r"(?:(?<=J)(?:an(?:uary)?|une?|uly?)|(?<=F)eb(?:ruary)?|(?<=M)(?:ar(?:ch)?|ay)"
    r"|(?<=A)(?:pr(?:il)?|ug(?:ust)?)|(?<=S)ep(?:t(?:ember)?)?|(?<=O)ct(?:ober)?"
    r"|(?<=N)ov(?:ember)?|(?<=D)ec(?:ember)?)"
)
_MONTH: Final = "[ADFJMNOS]" + _MONTH_REST
_TIME: Final = r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?(?:Z|[+\-]\d{2}:?\d{2})?)?"
_ORDINAL: Final = r"(?:st|nd|rd|th)?"

# --- pass 1: numbers (phones, SSNs, numeric dates, long digit runs) ---------------------------
_NUMBER: Final = re.compile(
    r"[+(0-9](?<![\w+].)(?:"
    # US phones: 555-450-5873, (555) 450-5873, 555.450.5873, 5554505873, +1 555 450 5873
    r"(?P<phone>" + _NOT_AFTER_NUMBER + r"(?:(?<=\+)1[ .\-]?(?:\(\d{3}\)|\d{3})"
    r"|(?<=1)[ .\-]?(?:\(\d{3}\)|\d{3})|(?<=\()\d{3}\)|(?<=[0-9])\d{2})"
    r"[ .\-]?\d{3}[ .\-]?\d{4}(?:[ ]?(?:x|ext\.?)[ ]?\d{1,6})?" + _END + _NOT_BEFORE_JOINER + ")"
    # SSNs with separators: 123-45-6789, 123 45 6789 (bare ones are digit runs, below)
    r"|(?P<ssn>(?<=[0-9])" + _NOT_AFTER_NUMBER + r"\d{2}(?:-\d{2}-|[ ]\d{2}[ ])\d{4}"
    r"" + _END + _NOT_BEFORE_JOINER + ")"
    # Dates: 2024-01-31, 2024-01-31T09:30:00Z, 2024/01/31, 01/31/2024, 1/31/24, 31.01.2024,
    # 31 Jan 2024, 31st January, 2024
    r"|(?P<date>(?<=[0-9])" + _NOT_AFTER_NUMBER + r"(?:"
    r"\d{3}[-/](?:0?[1-9]|1[0-2])[-/](?:0?[1-9]|[12]\d|3[01])" + _TIME + r"|"
    r"\d?[/.\-]\d{1,2}[/.\-](?:\d{4}|\d{2})|"
    r"\d?" + _ORDINAL + r"[ ]{1,3}" + _MONTH + r"\.?,?[ ]{1,3}\d{4}"
    r")" + _END + r"(?![-/.:]\d))"
    # Digit runs of four or more (what they are is decided by their length, in code)
    r"|(?P<run>(?<=[0-9])"
    + _NOT_AFTER_JOINER
    + r"\d{3,}(?:-\d{4})?"
    + _END
    + _NOT_BEFORE_JOINER
    + r")"
    r")"
)
_RUN_DIGITS: Final = re.compile(r"\d+")
_ZIP_LENGTH: Final = 5
_SSN_LENGTH: Final = 9
_MRN_MIN_LENGTH: Final = 7
# A ZIP code is an address only right after a state (and a city): "Sterling, MA 01564".
# A ZIP code is an address only right after a state (and maybe a city). The text before the
# ZIP code is read backwards: the reversed patterns below match it in one step, where a
# forward search would try every position of the window.
_STATES: Final = (
    "AK AL AR AZ CA CO CT DC DE FL GA HI IA ID IL IN KS KY LA MA MD ME MI MN MO MS MT NC ND NE "
    "NH NJ NM NV NY OH OK OR PA PR RI SC SD TN TX UT VA VI VT WA WI WV WY "
    "Alabama Alaska Arizona Arkansas California Colorado Connecticut Delaware Florida Georgia "
    "Hawaii Idaho Illinois Indiana Iowa Kansas Kentucky Louisiana Maine Maryland Massachusetts "
    "Michigan Minnesota Mississippi Missouri Montana Nebraska Nevada New_Hampshire New_Jersey "
    "New_Mexico New_York North_Carolina North_Dakota Ohio Oklahoma Oregon Pennsylvania "
    "Puerto_Rico Rhode_Island South_Carolina South_Dakota Tennessee Texas Utah Vermont Virginia "
    "Washington West_Virginia Wisconsin Wyoming"
)
_STATE_BEFORE: Final = re.compile(
    r"[ ]{1,3},?(?:"
    + "|".join(
        re.escape(state.replace("_", " ")[::-1])
        for state in sorted(_STATES.split(), key=len, reverse=True)
    )
    + r")(?!\w)"
)
_CITY_LETTER: Final = _LETTER + _APOS + "\\-"  # Manchester-by-the-Sea, Coeur d'Alene
_CITY_BEFORE: Final = re.compile(
    rf"[ ]{{1,3}},?[{_CITY_LETTER}]{{1,30}}[{_UP}]"
    rf"(?:[ ][{_CITY_LETTER}]{{1,30}}[{_UP}]){{0,2}}(?!\w)"
)
_ZIP_REACH: Final = 120  # a state and a city of three long words, with their separators


def _number(text: str, m: re.Match[str]) -> _Found | None:
    group = m.lastgroup
    if group == "phone":
        return (PhiKind.PHONE, m.start(), m.end())
    if group == "ssn":
        return (PhiKind.SSN, m.start(), m.end())
    if group == "date":
        return (PhiKind.DATE, m.start(), m.end())
    digits = _RUN_DIGITS.match(text, m.start())
    length = 0 if digits is None else digits.end() - digits.start()
    if length == _ZIP_LENGTH:
        before = text[max(0, m.start() - _ZIP_REACH) : m.start()][::-1]
        state = _STATE_BEFORE.match(before)
        if state is not None:
            city = _CITY_BEFORE.match(before, state.end())
            start = m.start() - (state.end() if city is None else city.end())
            return (PhiKind.STREET_ADDRESS, start, m.end())
        return None
    if length == _SSN_LENGTH:
        return (PhiKind.SSN, m.start(), m.end())
    if length >= _MRN_MIN_LENGTH:
        return (PhiKind.MRN, m.start(), m.end())
    return None


# --- pass 2: street addresses ----------------------------------------------------------------
_STREET_SUFFIXES_TEXT: Final = (
    "alley|aly|annex|anx|arcade|arc|avenue|ave|av|bayou|byu|beach|bch|bend|bnd|bluff|blf|"
    "bluffs|blfs|bottom|btm|boulevard|blvd|branch|br|bridge|brg|brook|brk|brooks|burg|bypass|"
    "byp|camp|cp|canyon|cyn|cape|cpe|causeway|cswy|center|centre|ctr|circle|cir|circles|cliff|"
    "clf|cliffs|club|clb|common|commons|corner|cor|corners|cors|course|crse|court|ct|courts|"
    "cts|cove|cv|coves|creek|crk|crescent|cres|crest|crst|crossing|xing|crossroad|xrd|curve|"
    "curv|dale|dl|dam|dm|divide|dv|drive|dr|drives|estate|est|estates|ests|expressway|expy|"
    "extension|ext|falls|fls|ferry|fry|field|fld|fields|flds|flat|flt|flats|ford|frd|forest|"
    "frst|forge|frg|fork|frk|forks|fort|ft|freeway|fwy|garden|gdn|gardens|gdns|gateway|gtwy|"
    "glen|gln|green|grn|grove|grv|harbor|hbr|haven|hvn|heights|hts|highway|hwy|hill|hl|hills|"
    "hls|hollow|holw|inlet|inlt|island|islands|iss|isle|junction|jct|key|ky|keys|knoll|knl|"
    "knolls|lake|lk|lakes|lks|land|landing|lndg|lane|ln|light|lgt|lights|loaf|lf|lock|lck|"
    "locks|lodge|ldg|loop|mall|manor|mnr|manors|meadow|mdw|meadows|mdws|mews|mill|ml|mills|"
    "mission|msn|motorway|mtwy|mount|mt|mountain|mtn|neck|nck|orchard|orch|oval|overpass|opas|"
    "parade|park|parks|parkway|pkwy|pass|passage|psge|path|pike|pine|pne|pines|pnes|place|pl|"
    "plain|pln|plains|plns|plaza|plz|point|pt|points|pts|port|prt|ports|prairie|pr|promenade|"
    "radial|radl|ramp|ranch|rnch|rapid|rpd|rapids|rpds|rest|rst|ridge|rdg|ridges|river|riv|"
    "road|rd|roads|rds|route|rte|row|rue|run|shoal|shl|shoals|shore|shr|shores|skyway|skwy|"
    "spring|spg|springs|spgs|spur|square|sq|squares|station|sta|stravenue|stra|stream|strm|"
    "street|st|streets|sts|summit|smt|terrace|ter|throughway|trwy|trace|trce|track|trak|"
    "trafficway|trfy|trail|trl|trailer|trlr|tunnel|tunl|turnpike|tpke|underpass|upas|union|"
    "unions|valley|vly|valleys|viaduct|via|view|vw|views|village|vlg|villages|ville|vl|"
    "vista|vis|walk|walks|wall|way|wy|ways|well|wl|wells"
)
_STREET_SUFFIXES: Final = frozenset(_STREET_SUFFIXES_TEXT.split("|"))
_ADDRESS_WORD: Final = rf"[{_LETTER}0-9][{_LETTER}0-9{_APOS}\-]{{0,30}}"
_ADDRESS: Final = re.compile(
    # A house number (123, 12B, 10-12), an optional direction, then up to four words.
    r"[0-9](?<![\w.,/:\-].)\d{0,5}[A-Za-z]?(?:-\d{1,4})?[ ]{1,3}"
    r"(?:(?:[NSEW]|N[EW]|S[EW]|North|South|East|West)\.?[ ]{1,3})?"
    rf"(?P<words>{_ADDRESS_WORD}(?:[ ]{{1,3}}{_ADDRESS_WORD}){{0,3}})" + _END
)
_ADDRESS_WORDS: Final = re.compile(_ADDRESS_WORD)
_UNIT: Final = re.compile(
    r",?[ ]{1,3}(?:(?i:apt|apartment|suite|ste|unit|rm|room|fl|floor|bldg|building|lot|dept)"
    r"\.?(?!\w)[ ]{0,3}#?|\#)[ ]{0,2}[A-Za-z0-9\-]{1,8}" + _END
)


def _address(text: str, m: re.Match[str]) -> _Found | None:
    # "123 Main St", "12 5th ave": the words up to a street suffix; "690 Raynor Overpass":
    # two or more capitalized words. Then an optional unit: "Apt 3", "Suite 44", "# 5".
    words = list(_ADDRESS_WORDS.finditer(text, m.start("words"), m.end("words")))
    end = None
    for i, word in enumerate(words):
        if i > 0 and word.group().lower() in _STREET_SUFFIXES:
            end = word.end()
            break
    if end is None:
        capitalized = 0
        for word in words:
            if not word.group()[0].isupper():
                break
            capitalized += 1
        if capitalized < 2 or all(
            w.group().lower() in _NOT_NAMES for w in words[:capitalized]
        ):  # "404 Not Found" is no address
            return None
        end = words[capitalized - 1].end()
    unit = _UNIT.match(text, end)
    return (PhiKind.STREET_ADDRESS, m.start(), end if unit is None else unit.end())


# --- pass 3: words (month-name dates, labelled MRNs, P.O. boxes, person names) ---------------
# The rest of a capitalized word whose first letter is already consumed, in the forms real
# names take: O'Keefe, McDermott, Smith-Jones, Villaseñor, Synthea's digit suffixes (Alvin56).
_NAME_WORD_REST: Final = (
    rf"(?:[{_LO}][{_LETTER}]{{0,30}}|[{_APOS}][{_UP}][{_LETTER}]{{1,30}})"
    rf"(?:-[{_UP}][{_LETTER}]{{1,30}})?\d{{0,4}}"
)
_NAME_WORD: Final = rf"[{_UP}]{_NAME_WORD_REST}"
# A name word must end its token: not followed by more of a word, an e-mail or a dotted id.
_NAME_END: Final = rf"(?![\w{_APOS}@])(?![.\-]\w)"
_INITIAL: Final = rf"[{_UP}]\.?{_NAME_END}"
_PARTICLES: Final = (
    r"(?:(?:van|von|der|den|de|del|della|di|da|du|la|le|bin|ibn|al|el)[ ]{1,3}){0,2}"
)
# A title whose first letter is already consumed: Mr, Mrs, Ms, Miss, Mx, Dr, Prof, Rev, ...
_TITLE_REST: Final = (
    r"(?:(?<=M)(?:rs|r|s|iss|x|me|lle)|(?<=D)(?:r|ame)|(?<=P)rof|(?<=R)ev|(?<=F)r"
    r"|(?<=S)(?:rta|ra|r|ir)|(?<=L)(?:ady|ord)|(?<=H)on)\.?"
)
_NAME_TAIL: Final = rf"(?:,?[ ]{{1,3}}(?:{_INITIAL}[ ]{{1,3}})?{_PARTICLES}{_NAME_WORD}{_NAME_END})"
_WORDS: Final = re.compile(
    rf"[{_UP}m](?<!\w.)(?:"
    # Jan 31, 2024 / January 31st 2024 / Jan. 31 / January 2024
    rf"(?P<date>{_MONTH_REST}\.?(?:[ ]{{1,3}}\d{{1,2}}{_ORDINAL}(?:,?[ ]{{1,3}}\d{{4}})?"
    rf"|,?[ ]{{1,3}}\d{{4}}){_END}(?![-/.:]\d))"
    # MRN 1234567, MRN: A12345, MR# 0042, Medical Record Number 77-1234
    r"|(?P<mrn>(?<=[Mm])(?i:rn|r\#|ed(?:ical)?[ ]rec(?:ord)?(?:[ ](?:number|num|no\.?|\#))?)"
    r"[ ]{0,3}[:#=\-]?[ ]{0,3}[A-Za-z0-9][A-Za-z0-9\-]{2,63}" + _END + r")"
    # P.O. Box 123, PO Box 5
    r"|(?P<pobox>(?<=P)(?:\.[ ]?O\.|O|o)[ ]{0,2}(?i:box)[ ]{0,3}#?\d{1,8}" + _END + r")"
    # Mr. Smith, Dr. Jane Q. Public, Beatrice Aufderhar, Alvin56 Jerde200, Ludwig van Beethoven
    rf"|(?P<name>(?<![@.\-].)(?<=[{_UP}])(?:"
    rf"{_TITLE_REST}[ ]{{1,3}}(?:{_INITIAL}[ ]{{1,3}})?{_PARTICLES}{_NAME_WORD}{_NAME_END}"
    rf"{_NAME_TAIL}{{0,4}}"
    rf"|{_NAME_WORD_REST}{_NAME_END}{_NAME_TAIL}{{1,4}}))"
    r")"
)
_NOT_NAMES_TEXT: Final = """
    a an and at by for from in of on or the to with is are was were be been has have had not no
    this that these those it its we our you your he she they them his her their there here
    i if then when while after before during since until about above below over under into
    ok error errors warning warn info debug trace fatal critical exception traceback failed
    failure success internal server client service unavailable bad request requests response
    not found forbidden unauthorized conflict gone precondition unprocessable content entity
    too many method allowed gateway timeout created accepted moved permanently temporarily
    redirect continue payload large unsupported media type version http https get post put
    patch delete head options true false null none yes
    patient practitioner practitionerrole organization location encounter observation
    condition procedure diagnosticreport documentreference medicationrequest medication
    medicationadministration immunization allergyintolerance careplan careteam claim
    explanationofbenefit device imagingstudy supplydelivery provenance bundle auditevent
    operationoutcome capabilitystatement resource resources reference identifier
    record records ledger event events audit key keys tenant access policy role roles user
    users admin administrator system break glass grant review export import search read
    write update create vread history transaction batch metadata checkpoint index
    monday tuesday wednesday thursday friday saturday sunday
    january february march april may june july august september october november december
    jan feb mar apr jun jul aug sep sept oct nov dec
    """
_NOT_NAMES: Final = frozenset(_NOT_NAMES_TEXT.split())
_NOT_IN_WORD: Final = "0123456789,.\u2019'"


def _words(text: str, m: re.Match[str]) -> _Found | None:
    group = m.lastgroup
    if group == "date":
        return (PhiKind.DATE, m.start(), m.end())
    if group == "mrn":
        return (PhiKind.MRN, m.start(), m.end())
    if group == "pobox":
        return (PhiKind.STREET_ADDRESS, m.start(), m.end())
    # A run of capitalized words is a name unless every word is a common non-name word.
    for word in m.group().split():
        if word.strip(_NOT_IN_WORD).lower() not in _NOT_NAMES:
            return (PhiKind.PERSON_NAME, m.start(), m.end())
    return None


# --- passes 4 and 5: e-mail addresses and international phone numbers ------------------------
# Found from the "@" (a literal the engine finds fast), then the local part is read backwards.
_EMAIL: Final = re.compile(
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}" + _END
)
# The local part, read backwards from the "@" (see _STATE_BEFORE for why).
_EMAIL_LOCAL_BEFORE: Final = re.compile(r"[A-Za-z0-9._%+\-]{1,64}(?![\w.%+\-])")
_EMAIL_LOCAL_REACH: Final = 65
# E.164 and its printed forms: +15554505873, +44 20 7946 0958, +44 (0)20 7946 0958.
_INTL_PHONE: Final = re.compile(r"\+(?<![\w+].)[1-9](?:[ .\-]?(?:\(\d{1,4}\)[ ]?)?\d){6,14}" + _END)


def _email(text: str, m: re.Match[str]) -> _Found | None:
    at = m.start()
    local = _EMAIL_LOCAL_BEFORE.match(text[max(0, at - _EMAIL_LOCAL_REACH) : at][::-1])
    return None if local is None else (PhiKind.EMAIL, at - local.end(), m.end())


def _intl_phone(text: str, m: re.Match[str]) -> _Found | None:
    return (PhiKind.PHONE, m.start(), m.end())


_Classify = Callable[[str, "re.Match[str]"], "_Found | None"]


@dataclass(frozen=True)
class _Pass:
    pattern: re.Pattern[str]
    classify: _Classify  # confirms a match and names it, or refuses it (None)
    gate: str | None = None  # a character the text must contain for the pass to run
    rescan: bool = False  # whether to look inside a refused match for shorter ones


_PASSES: Final[tuple[_Pass, ...]] = (
    _Pass(_NUMBER, _number),
    _Pass(_ADDRESS, _address),
    _Pass(_WORDS, _words, rescan=True),
    _Pass(_EMAIL, _email, gate="@"),
    _Pass(_INTL_PHONE, _intl_phone, gate="+"),
)
_ADDRESS_GLUE: Final = frozenset({" ", ",", ", "})
# The order of PhiKind, most specific first, names merged spans.
_PRIORITY: Final = {kind: rank for rank, kind in enumerate(PhiKind)}


def _scan(text: str) -> Iterator[_Found]:
    for p in _PASSES:
        if p.gate is not None and p.gate not in text:
            continue
        for m in p.pattern.finditer(text):
            found = p.classify(text, m)
            if found is not None:
                yield found
            elif p.rescan:
                # Refused ("Internal Server Error Jan 31" is no name): what starts inside it
                # may still be PHI. A match is short, so this stays proportional to the input.
                pos, stop = m.start() + 1, m.end()
                while (inner := p.pattern.search(text, pos)) is not None and inner.start() < stop:
                    found = p.classify(text, inner)
                    if found is None:
                        pos = inner.start() + 1
                    else:
                        yield found
                        pos = found[2]


def find_phi(text: str) -> list[PhiMatch]:
    """Every span of ``text`` that looks like PHI: non-overlapping, ordered by start.

    The passes run independently; where their spans overlap, the spans are merged into one
    (so that redacting the result covers everything any pass found), labelled with the most
    specific kind that went into it (the order of :class:`PhiKind`: an SSN inside a run of
    words is reported as an SSN, an address that also reads as a name as an address).
    """
    raw = sorted(_scan(text), key=lambda f: (f[1], _PRIORITY[f[0]]))
    merged: list[PhiMatch] = []
    if not raw:
        return merged
    kind, start, end = raw[0]
    for next_kind, next_start, next_end in raw[1:]:
        joined = next_start < end or (
            # "542 Friesen Parade" + ", " + "Sterling, MA 01564": one address, one span.
            kind is next_kind is PhiKind.STREET_ADDRESS and text[end:next_start] in _ADDRESS_GLUE
        )
        if joined:
            if _PRIORITY[next_kind] < _PRIORITY[kind]:
                kind = next_kind
            end = max(end, next_end)
            continue
        merged.append(PhiMatch(kind, start, end))
        kind, start, end = next_kind, next_start, next_end
    merged.append(PhiMatch(kind, start, end))
    return merged


def looks_like_phi(text: str) -> bool:
    """Whether anything in ``text`` looks like PHI (cheaper than :func:`find_phi`)."""
    return next(_scan(text), None) is not None


def redact(text: str, replacement: str = "[REDACTED]") -> str:
    """``text`` with every span :func:`find_phi` reports replaced by ``replacement``."""
    matches = find_phi(text)
    if not matches:
        return text
    parts: list[str] = []
    pos = 0
    for m in matches:
        parts.append(text[pos : m.start])
        parts.append(replacement)
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts)
