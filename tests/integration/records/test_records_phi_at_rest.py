"""No direct identifier in clear at rest (invariant 3; issue 5), through the real repository.

Synthea bundles go through :class:`RecordsRepository` exactly as ``POST /fhir`` sends them
(the wasee11 companions first, as batches; then patients as transactions) into a fresh SQLite
file and a fresh PostgreSQL schema. Then every value the fixtures hold in an element the
classification (``element_groups.toml``) puts in ``direct-identifiers`` or
``free-text-and-attachments`` -- names, identifiers (MRN, SSN, driver's licence, passport),
telecom, addresses, birth dates, narrative ``text.div``, notes, attachment data (as sent, in
base64, and decoded) -- is looked for in the raw bytes of the SQLite files (database, ``-wal``
and ``-shm``, before and after a checkpoint) and of a ``pg_dump`` of the schema: no hit.

Which values are looked for (the needles), and why:

* every string in a protected element (top-level extensions by URL, contained resources by
  type, the rest by element path with the nested rules), and the decoded text of attachments;
* skipped: values under :data:`MIN_LENGTH` characters. A 4-byte string turns up by chance in
  ~20 MB of uniformly random ciphertext with probability ~0.5 % (2**-32 per position), and the
  fixtures hold hundreds of 4-letter names: that would be a flaky test, not evidence;
* skipped: coded leaves of protected elements (``telecom.system`` = ``email``, ``use``,
  ``status``, a coding's ``display``, an extension's ``url``): vocabulary, not identifying;
* skipped: values that the same fixtures also hold where a clear index may keep them by
  design, ignoring case and possibly inside a longer value: a ``system``, ``code`` or
  ``value`` outside the protected groups (token indexes), or any unprotected string of a
  directory resource (Organization, Location, Practitioner, PractitionerRole: their names and
  addresses are clear string indexes). So a patient's city that is also a clinic's city, or
  ``Massachusetts`` inside an organization's name, is not a needle: found, it would say nothing
  about a patient;
* each needle is looked for as UTF-8, as it would appear inside JSON (escaped), lower-cased
  (what a normalized name index would hold), and, in the dump, hex-encoded (how ``pg_dump``
  writes a ``bytea``: plaintext in a binary column would be missed otherwise);
* a hit is explained, not a leak, when it lies inside a machine string the store holds by
  design: a blind-index token (base64url of an HMAC), a resource id or key subject (UUIDs), or
  a ``bytea`` hex literal in the dump (ciphertext); digits-only needles (postal codes) count
  only when no digit is next to them (they occur inside clear integers: dates, sequences).

The control: LOINC codes and the ``http://loinc.org`` system, stored in clear as token index
values by design, are found by the same search, so the grep can see clear text.
"""

from __future__ import annotations

import base64
import binascii
import functools
import glob
import re
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql
from records_store_support import StoreFactory

from phivault.access.decision import AccessContext, compile_policy
from phivault.access.policy import default_policy
from phivault.crypto.keyring import KeyRing
from phivault.crypto.keystore import SqliteKeyStore
from phivault.crypto.providers.sealed import SealedLocalProvider
from phivault.identity.principal import Role
from phivault.identity.scopes import parse_scopes
from phivault.ledger.testing import InMemoryAuditSink
from phivault.records.classification import (
    ENVELOPE_ELEMENTS,
    Classification,
    ElementGroup,
    default_classification,
)
from phivault.records.repository import RecordsRepository
from phivault.records.results import Caller
from phivault.records.store import SqlRecordStore
from phivault.records.testing import FixedCallerTrail
from postgres_support import ADMIN_CONNINFO

TENANT = "t-at-rest"
LOADER_SCOPES = (
    "system/*.cu system/Practitioner.rs system/Organization.rs system/Location.rs "
    "system/PractitionerRole.rs"
)
COMPANIONS = ("wasee11_hospitalInformation.json", "wasee11_practitionerInformation.json")
PATIENTS = (
    "wasee11_Breana975_Harvey63.json",
    "wasee11_Ellsworth48_Kihn564.json",
    "sof2019_Clemente_Kreiger.json",
)
PROTECTED = frozenset({ElementGroup.DIRECT_IDENTIFIERS, ElementGroup.FREE_TEXT})
#: Leaves that hold a code from a value set, not a value about someone.
VOCABULARY = frozenset({"system", "use", "code", "status", "contentType", "language", "url"})
#: Types whose unprotected strings may be index values in clear (names, addresses).
DIRECTORY = frozenset({"Organization", "Location", "Practitioner", "PractitionerRole"})
#: Leaves that clear token indexes hold: codes, their systems, identifier values.
INDEXED_KEYS = frozenset({"system", "code", "value"})
MIN_LENGTH = 5
#: How much of a decoded attachment is a needle (its first line is a clear, unique sentence).
DECODED_CHARS = 48
_CONDITIONAL = re.compile(r"(?:Practitioner|Organization|Location)\?identifier=([^\"]+)")
_MACHINE = re.compile(rb"[A-Za-z0-9_-]+")
_HEX = re.compile(rb"[0-9a-f]*")


# --- the caller --------------------------------------------------------------------------


def _trail(sink: InMemoryAuditSink) -> FixedCallerTrail:
    """The audit trail the front door would build for a loader, over an in-memory sink."""
    return FixedCallerTrail(
        sink, "loader", tenant=TENANT, observer="phi-at-rest-test", request_id="req-at-rest",
        purposes=("HOPERAT",),
    )  # fmt: skip


def _loader(sink: InMemoryAuditSink) -> Caller:
    access = AccessContext(
        subject="loader",
        tenant=TENANT,
        roles=frozenset({Role.SERVICE}),
        scopes=parse_scopes(LOADER_SCOPES)[0],
        purposes=("HOPERAT",),
    )
    return Caller(access, _trail(sink))


@pytest.fixture
async def ring(tmp_path: Path) -> AsyncIterator[KeyRing]:
    keys_dir = tmp_path / "keys"
    _, shares = SealedLocalProvider.initialize(keys_dir, threshold=2, shares=2)
    keystore = SqliteKeyStore(keys_dir / SqliteKeyStore.FILENAME)
    ring = KeyRing(
        store=keystore,
        provider=SealedLocalProvider(keys_dir),
        audit=InMemoryAuditSink(),
        observer="phi-at-rest-test",
    )
    await ring.unseal(shares)
    try:
        yield ring
    finally:
        keystore.close()


def _bundle(fixtures_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((fixtures_dir / "synthea" / name).read_bytes())
    return data


# --- the needles -------------------------------------------------------------------------


def _strings(value: object, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every string leaf under ``value`` with its element path (no indexes)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, path)


def _classified(
    table: Classification, resource: dict[str, Any]
) -> Iterator[tuple[ElementGroup, tuple[str, ...], str]]:
    """(group, path, value) of every string of a resource, grouped as the store groups it."""
    rtype = resource["resourceType"]
    for element, value in resource.items():
        if element in ENVELOPE_ELEMENTS:
            continue
        if element in ("extension", "modifierExtension"):
            for item in value:
                group = table.extension_group(item.get("url"))
                for path, text in _strings(item, (element,)):
                    yield group, path, text
        elif element == "contained":
            for item in value:
                group = table.contained_group(item.get("resourceType"))
                for path, text in _strings(item, (element,)):
                    yield group, path, text
        else:
            for path, text in _strings(value, (element,)):
                bare = tuple(p.removeprefix("_") for p in path)
                yield table.group_of_path(rtype, ".".join(bare)), path, text


def _decoded(path: tuple[str, ...], text: str) -> str | None:
    """The text of an attachment's ``data`` (a clinical note), if it is text."""
    if path[-1] != "data":
        return None
    try:
        raw = base64.b64decode(text, validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class Needles:
    values: frozenset[str]  # protected values to look for
    clear: str  # every value held in an unprotected element, lower-cased, NUL-separated

    def looked_for(self, value: str) -> bool:
        return len(value) >= MIN_LENGTH and value.lower() not in self.clear


def _vocabulary(path: tuple[str, ...]) -> bool:
    """A coded leaf (``telecom.system`` = "email", a coding's display): not identifying."""
    return path[-1] in VOCABULARY or (path[-1] == "display" and "coding" in path)


def needles(resources: Iterable[dict[str, Any]]) -> Needles:
    table = default_classification()
    protected: set[str] = set()
    clear: set[str] = set()
    for resource in resources:
        for group, path, text in _classified(table, resource):
            if group not in PROTECTED:
                if resource["resourceType"] in DIRECTORY or path[-1] in INDEXED_KEYS:
                    clear.add(text)
                continue
            if _vocabulary(path):
                continue
            protected.add(text)
            decoded = _decoded(path, text)
            if decoded is not None:
                protected.add(decoded.strip()[:DECODED_CHARS])
    found = Needles(frozenset(), "\x00".join(sorted(clear)).lower())
    return Needles(frozenset(v for v in protected if found.looked_for(v)), found.clear)


def variants(value: str) -> set[bytes]:
    """The lower-cased forms a value could be stored in, UTF-8 and JSON-escaped (the haystack
    is lower-cased too, so this finds the value as is and lower-cased)."""
    texts = {value.encode(), orjson.dumps(value)[1:-1]}
    return {t.lower() for t in texts if len(t) >= MIN_LENGTH}


def hex_variants(value: str) -> set[bytes]:
    """How ``pg_dump`` would write those forms, and the lower-cased ones, in a ``bytea``."""
    texts = {value.encode(), orjson.dumps(value)[1:-1]}
    texts |= {t.lower() for t in texts}
    return {binascii.hexlify(t) for t in texts if len(t) >= MIN_LENGTH}


# --- the search --------------------------------------------------------------------------


@dataclass
class Haystack:
    name: str
    raw: bytes
    machine: frozenset[bytes]  # blind tokens and ids the store holds by design
    dump: bool = False  # pg_dump text (bytea as hex literals)

    def _explained(self, start: int, needle: bytes) -> bool:
        """A chance hit inside a machine string (see the module's docstring)."""
        end = start + len(needle)
        if needle.isdigit() and (
            self.raw[start - 1 : start].isdigit() or self.raw[end : end + 1].isdigit()
        ):
            return True
        for run in _MACHINE.finditer(self.raw, max(0, start - 300), end + 300):
            if run.start() <= start and end <= run.end():
                if self._machine_covers(run.group(), start - run.start(), end - run.start()):
                    return True
                break
        if self.dump:
            literal = self.raw.rfind(b"\\\\x", 0, start)
            if literal != -1 and _HEX.fullmatch(self.raw, literal + 3, end):
                return True
        return False

    def _machine_covers(self, word: bytes, start: int, end: int) -> bool:
        for size in self._sizes:
            for at in range(max(0, end - size), min(start, len(word) - size) + 1):
                if word[at : at + size] in self.machine:
                    return True
        return False

    @functools.cached_property
    def _sizes(self) -> frozenset[int]:
        return frozenset(len(m) for m in self.machine)

    def leaks(self, values: Iterable[str]) -> dict[str, str]:
        """The values found, each with where and what is around it, unless explained."""
        lowered = self.raw.lower()  # ASCII only: offsets stay the same
        found: dict[str, str] = {}
        for value in sorted(values):
            forms = [(f, lowered, True) for f in variants(value)]
            if self.dump:  # plaintext in a bytea: no explanation holds for these
                forms += [(f, self.raw, False) for f in hex_variants(value)]
            for form, text, explainable in forms:
                at = text.find(form)
                while at != -1 and explainable and self._explained(at, form):
                    at = text.find(form, at + 1)
                if at != -1:
                    around = self.raw[max(0, at - 40) : at + len(form) + 40]
                    found[value] = f"{self.name}@{at}: {around!r}"
                    break
        return found


def _sqlite_machine(path: Path) -> frozenset[bytes]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT token FROM rec_idx_blind UNION SELECT resource_id FROM rec_versions "
            "UNION SELECT key_subject FROM rec_versions"
        ).fetchall()
    return frozenset(str(r[0]).encode() for r in rows)


def _postgres_machine(schema: str) -> frozenset[bytes]:
    with psycopg.connect(ADMIN_CONNINFO) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        rows = conn.execute(
            "SELECT token FROM rec_idx_blind UNION SELECT resource_id FROM rec_versions "
            "UNION SELECT key_subject FROM rec_versions"
        ).fetchall()
    return frozenset(str(r[0]).encode() for r in rows)


def pg_dump_binary() -> str:
    found = shutil.which("pg_dump")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_dump"))
    if not candidates:
        pytest.fail("pg_dump is not installed (postgresql-client)", pytrace=False)
    return candidates[-1]


def _sqlite_files(path: Path) -> bytes:
    files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
    return b"".join(p.read_bytes() for p in files if p.exists())


# --- the test ----------------------------------------------------------------------------


def referenced(docs: Iterable[dict[str, Any]]) -> set[str]:
    """``system|value`` of every conditional reference in ``docs``."""
    found: set[str] = set()
    for doc in docs:
        found |= set(_CONDITIONAL.findall(orjson.dumps(doc).decode()))
    return found


def only_referenced(companion: dict[str, Any], wanted: set[str]) -> dict[str, Any]:
    """The companion entries the patients refer to, and their practitioners' roles (loading
    all 621 entries as batches takes ~25 s per engine and adds no other kind of value)."""

    def keys(identifiers: object) -> set[str]:
        items = identifiers if isinstance(identifiers, list) else [identifiers]
        return {f"{i['system']}|{i['value']}" for i in items if isinstance(i, dict)}

    entries = [e for e in companion["entry"] if keys(e["resource"].get("identifier")) & wanted]
    entries += [
        e
        for e in companion["entry"]
        if e["resource"]["resourceType"] == "PractitionerRole"
        and keys(e["resource"]["practitioner"].get("identifier")) & wanted
    ]
    return {**companion, "entry": entries}


async def load(repo: RecordsRepository, caller: Caller, fixtures_dir: Path) -> list[dict]:
    """Companions as batches, patients as transactions; returns every resource sent."""
    patients = [_bundle(fixtures_dir, name) for name in PATIENTS]
    wanted = referenced(patients)
    companions = [only_referenced(_bundle(fixtures_dir, name), wanted) for name in COMPANIONS]
    sent: list[dict[str, Any]] = []
    for doc in companions:
        assert len(doc["entry"]) >= 4
        outcome = await repo.batch(caller, doc)
        assert {e.status for e in outcome.entries} == {201}
        sent += [entry["resource"] for entry in doc["entry"]]
    for doc in patients:
        outcome = await repo.transaction(caller, doc)
        assert len(outcome.entries) == len(doc["entry"])
        assert {e.status for e in outcome.entries} == {201}
        sent += [entry["resource"] for entry in doc["entry"]]
    return sent


async def test_no_direct_identifier_or_free_text_in_clear_at_rest(
    stores: StoreFactory, ring: KeyRing, fixtures_dir: Path
) -> None:
    store = stores.open()
    sink = InMemoryAuditSink()
    repo = RecordsRepository(store, ring, compile_policy(default_policy()))
    sent = await load(repo, _loader(sink), fixtures_dir)
    found = needles(sent)
    values = found.values
    # the needles cover every kind the issue names (a test that silently looked for nothing
    # would pass)
    patient = next(r for r in sent if r["resourceType"] == "Patient")
    must = {
        patient["name"][0]["family"],
        *patient["name"][0]["given"],
        patient["birthDate"],
        patient["telecom"][0]["value"],
        patient["address"][0]["line"][0],
        patient["address"][0]["city"],
        *(i["value"] for i in patient["identifier"]),
        patient["text"]["div"],
    }
    # (a patient's city may also be a clinic's: see the module's rule)
    assert {v for v in must if found.looked_for(v)} <= values
    ssn = next(i["value"] for i in patient["identifier"] if i["system"].endswith("us-ssn"))
    assert {patient["name"][0]["family"], patient["birthDate"], ssn} <= values
    assert any(v.startswith("<div") for v in values)  # narratives
    assert any(len(v) > 1000 for v in values)  # attachment data (notes, base64)
    assert len(values) > 400
    # the control: clear index values, found by the same search
    controls = {"http://loinc.org", "8302-2", "29463-7"}
    assert all(c.lower() in found.clear for c in controls)

    for haystack in _haystacks(stores, store):
        assert len(haystack.raw) > 1_000_000, haystack.name
        assert haystack.leaks(values) == {}, haystack.name
        assert haystack.leaks(controls).keys() == controls, haystack.name


def test_the_search_finds_a_planted_value_and_explains_only_machine_strings() -> None:
    """The explanations cannot hide a value stored next to an id, as SQLite packs a row."""
    uuid = b"bc863816-f308-4970-a370-848468c796e8"
    token = b"suWQrxZMC3FMP-jfKKsmithQ"
    raw = b"\x00\x17t1Patient" + uuid + b"familysmith\x03" + token + b"\x00" * 64
    haystack = Haystack("planted", raw, frozenset({uuid, token}))
    assert haystack.leaks({"Smith", "Jfkks", "02134"}).keys() == {"Smith"}
    assert Haystack("digits", b"x1021345x 02134 ", frozenset()).leaks({"02134"}).keys() == {"02134"}
    dump = b"t1\tPatient\t\\\\x00ffab02134abcd\t\\\\x" + binascii.hexlify(b"Quackenbush") + b"\n"
    found = Haystack("dump", dump, frozenset(), dump=True).leaks({"Quackenbush", "02134"})
    assert found.keys() == {"Quackenbush"}  # in a bytea: hex of the plaintext


def _haystacks(stores: StoreFactory, store: SqlRecordStore) -> list[Haystack]:
    if stores.path is not None:
        machine = _sqlite_machine(stores.path)
        before = Haystack("sqlite (before checkpoint)", _sqlite_files(stores.path), machine)
        assert Path(f"{stores.path}-wal").stat().st_size > 0  # the WAL holds pages yet
        with sqlite3.connect(stores.path) as conn:  # a second connection, as an operator's
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
        after = Haystack("sqlite (after checkpoint)", _sqlite_files(stores.path), machine)
        return [before, after]
    assert stores.schema is not None
    return [
        Haystack("pg_dump", _pg_dump(stores.schema), _postgres_machine(stores.schema), dump=True)
    ]


def _pg_dump(schema: str) -> bytes:
    """The schema's dump. pg_dump reads the whole catalog, and the other tests running beside
    this one create and drop schemas all the time: a dump can fail on an object dropped while
    it looked ("cache lookup failed"), which says nothing about this schema. Tried again."""
    for attempt in range(3):
        done = subprocess.run(
            [pg_dump_binary(), "--no-owner", "--schema", schema, "-d", ADMIN_CONNINFO],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout
        if attempt == 2:
            pytest.fail(f"pg_dump failed: {done.stderr.decode(errors='replace')[-500:]}")
    raise AssertionError("unreachable")
