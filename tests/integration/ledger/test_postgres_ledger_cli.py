"""`phivault ledger verify` and `export` on the scaled shape's PostgreSQL ledger.

The same events are recorded, with the same signing key, into an embedded ledger (a data
directory) and into a PostgreSQL ledger (as the sequencer writes it): the commands must
answer alike, and the two exported bundles are byte for byte the same and verify offline.
Tampering is a superuser bypassing the append-only trigger (see test_postgres_support).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_ledger_view_support import superuser_change
from test_postgres_support import PgLedger, pg_fixture  # noqa: F401
from typer.testing import CliRunner, Result

from phivault.cli.main import app
from phivault.crypto.signing import Ed25519NoteSigner
from phivault.datadir import DataDir
from phivault.ledger.service import (
    Ledger,
    initialize_ledger,
    open_ledger,
    open_ledger_on,
    signer_path,
    verifier_key_of,
)
from phivault.ledger.testing import sample_event
from phivault.settings import LedgerSettings

pytestmark = pytest.mark.integration

ORIGIN = "phivault.test/ledger-cli"
EVENTS = 12
CHECKPOINTS = (6, 12)


@dataclass(frozen=True)
class Ledgers:
    """The same history in a data directory and in PostgreSQL."""

    data_dir: Path
    key: str
    pg: PgLedger

    def pg_args(self) -> list[str]:
        return ["--postgres", self.pg.app, "--schema", self.pg.schema]


async def _fill(opening: contextlib.AbstractAsyncContextManager[Ledger]) -> None:
    async with opening as ledger:
        for i in range(EVENTS):
            await ledger.record(sample_event(i, patient=f"Patient/p-{i % 2}"))
            if i + 1 in CHECKPOINTS:
                await ledger.checkpoint()


@pytest.fixture
def ledgers(pg: PgLedger, tmp_path: Path) -> Ledgers:
    directory = DataDir.create(tmp_path / "data", dev=True, origin=ORIGIN)
    initialize_ledger(directory)
    signer = Ed25519NoteSigner.load(signer_path(directory))
    quiet = LedgerSettings(checkpoint_interval_s=60)
    asyncio.run(_fill(open_ledger(directory, quiet)))
    asyncio.run(_fill(open_ledger_on(pg.store, signer, ORIGIN, quiet)))
    return Ledgers(directory.path, verifier_key_of(directory), pg)


def run(args: Sequence[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, ["ledger", *args], env=env)


def _json(result: Result) -> dict[str, object]:
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def test_verify_on_postgres_answers_as_on_the_embedded_ledger(ledgers: Ledgers) -> None:
    embedded = run(["verify", "--data-dir", str(ledgers.data_dir), "--json"])
    scaled = run(["verify", *ledgers.pg_args(), "--key", ledgers.key, "--json"])
    assert embedded.exit_code == scaled.exit_code == 0, scaled.output
    assert _json(scaled) == _json(embedded)
    assert (_json(scaled)["entries"], _json(scaled)["covered"]) == (EVENTS, EVENTS)
    # Without --key, the data directory's verifier key is the trusted one.
    default_key = run(["verify", *ledgers.pg_args(), "--data-dir", str(ledgers.data_dir)])
    assert default_key.exit_code == 0, default_key.output
    assert f"verified PostgreSQL schema {ledgers.pg.schema}: 12 entries" in default_key.stdout
    assert ledgers.pg.app not in default_key.output  # a conninfo may hold a password


def test_the_settings_select_the_postgres_ledger(ledgers: Ledgers, tmp_path: Path) -> None:
    env = {
        "PHIVAULT_SHAPE__LEDGER": "jetstream",
        "PHIVAULT_LEDGER__POSTGRES_URL": ledgers.pg.app,
        "PHIVAULT_LEDGER__POSTGRES_SCHEMA": ledgers.pg.schema,
    }
    result = run(["verify", "--key", ledgers.key, "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert _json(result)["entries"] == EVENTS
    # The settings file works the same way (--config).
    config = tmp_path / "phivault.toml"
    config.write_text(
        f'[shape]\nledger = "jetstream"\n[ledger]\npostgres_url = "{ledgers.pg.app}"\n'
        f'postgres_schema = "{ledgers.pg.schema}"\n'
    )
    bundle = tmp_path / "from-settings.json"
    exported = run(
        ["export", "--config", str(config), "--key", ledgers.key, "--out", str(bundle), "--json"]
    )
    assert exported.exit_code == 0, exported.output
    assert _json(exported)["entries"] == EVENTS


def test_bundles_exported_from_postgres_verify_offline_exactly_as_embedded_ones(
    ledgers: Ledgers, tmp_path: Path
) -> None:
    embedded, scaled = tmp_path / "embedded.json", tmp_path / "scaled.json"
    one = run(["export", "--data-dir", str(ledgers.data_dir), "--out", str(embedded), "--json"])
    two = run(["export", *ledgers.pg_args(), "--key", ledgers.key, "--out", str(scaled)])
    assert one.exit_code == two.exit_code == 0, two.output
    assert f"exported {EVENTS} entries" in two.stdout
    # Same events, same key: the same leaves, the same signed checkpoints, the same bundle.
    assert scaled.read_bytes() == embedded.read_bytes()
    offline = run(["verify", "--bundle", str(scaled), "--key", ledgers.key, "--json"])
    assert offline.exit_code == 0, offline.output
    assert _json(offline)["entries"] == EVENTS
    # FHIR NDJSON too.
    fhir_embedded, fhir_scaled = tmp_path / "embedded.ndjson", tmp_path / "scaled.ndjson"
    args = ["--format", "fhir", "--json"]
    base = run(["export", "--data-dir", str(ledgers.data_dir), "--out", str(fhir_embedded), *args])
    assert base.exit_code == 0, base.output
    fhir = run(
        ["export", *ledgers.pg_args(), "--key", ledgers.key, "--out", str(fhir_scaled), *args]
    )
    assert fhir.exit_code == 0, fhir.output
    assert fhir_scaled.read_text() == fhir_embedded.read_text()
    assert len(fhir_scaled.read_text().splitlines()) == EVENTS
    # A bundle from a tampered PostgreSQL ledger fails offline, like an embedded one.
    superuser_change(ledgers.pg, 4, b'"req-4"', b'"req-X"')
    later = tmp_path / "later.json"
    after = run(["export", *ledgers.pg_args(), "--key", ledgers.key, "--out", str(later)])
    assert after.exit_code == 0, after.output
    refused = run(["verify", "--bundle", str(later), "--key", ledgers.key, "--json"])
    assert refused.exit_code == 2
    assert (_json(refused)["kind"], _json(refused)["index"]) == ("modified", 4)


@pytest.mark.parametrize(
    "args",
    [
        ["prove", "--index", "3"],
        ["prove", "--from", "6", "--to", "12"],
        ["report", "--patient", "p-1", "--json"],
        ["report", "--patient", "p-0", "--from", "2026-01-01T00:00:04Z", "--json"],
    ],
)
def test_proofs_and_reports_from_postgres_equal_the_embedded_ones(
    ledgers: Ledgers, args: list[str]
) -> None:
    embedded = run([*args, "--data-dir", str(ledgers.data_dir)])
    scaled = run([*args, *ledgers.pg_args()])
    assert embedded.exit_code == scaled.exit_code == 0, scaled.output
    assert _json(scaled) == _json(embedded)


@pytest.mark.parametrize(
    ("tamper", "kind", "index"),
    [
        # Leaf and stored hash rewritten together: entry 5 no longer chains to entry 4.
        ("rewrite-4", "modified", 4),
        # The leaf changed, its stored hash not: the row itself is named.
        ("leaf-only-7", "modified", 7),
        ("delete-5", "missing", 5),
        ("cut-from-9", "truncated", 9),
        # The newest entry rewritten: nothing chains to it, but entries 6.. no longer hash to
        # the root signed at 12 (those up to 6 still match theirs).
        ("rewrite-11", "forked", 6),
    ],
)
def test_verify_names_tampering_in_postgres_precisely(
    ledgers: Ledgers, tamper: str, kind: str, index: int
) -> None:
    pg = ledgers.pg
    if tamper == "rewrite-4":
        superuser_change(pg, 4, b'"req-4"', b'"req-X"')
    elif tamper == "leaf-only-7":
        superuser_change(pg, 7, b'"req-7"', b'"req-Y"', hash_too=False)
    elif tamper == "rewrite-11":
        superuser_change(pg, 11, b'"req-11"', b'"req-XX"')
    else:
        where = "idx = 5" if tamper == "delete-5" else "idx >= 9"
        pg.admin_sql(
            "ALTER TABLE {s}.leaves DISABLE TRIGGER leaves_append_only",
            f"DELETE FROM {{s}}.leaves WHERE {where}",
            "ALTER TABLE {s}.leaves ENABLE ALWAYS TRIGGER leaves_append_only",
        )
    result = run(["verify", *ledgers.pg_args(), "--key", ledgers.key, "--json"])
    assert result.exit_code == 2, result.output
    finding = _json(result)
    assert (finding["ok"], finding["error"]) == (False, "tampered")
    assert (finding["kind"], finding["index"]) == (kind, index)
    human = run(["verify", *ledgers.pg_args(), "--key", ledgers.key])
    assert human.exit_code == 2
    assert f"FAILED ledger {kind} at index {index}" in human.stderr


def test_a_checkpoint_by_another_key_is_a_bad_signature(ledgers: Ledgers) -> None:
    other = Ed25519NoteSigner.generate(ORIGIN).verifier_key
    result = run(["verify", *ledgers.pg_args(), "--key", other, "--json"])
    assert result.exit_code == 2
    assert _json(result)["kind"] == "bad-signature"


def test_export_refuses_what_it_cannot_read_whole(ledgers: Ledgers, tmp_path: Path) -> None:
    ledgers.pg.admin_sql(
        "ALTER TABLE {s}.leaves DISABLE TRIGGER leaves_append_only",
        "DELETE FROM {s}.leaves WHERE idx >= 9",
        "ALTER TABLE {s}.leaves ENABLE ALWAYS TRIGGER leaves_append_only",
    )
    out = tmp_path / "cut.json"
    result = run(["export", *ledgers.pg_args(), "--key", ledgers.key, "--out", str(out), "--json"])
    assert result.exit_code == 1
    assert "run `phivault ledger verify`" in _json(result)["message"]  # type: ignore[operator]
    assert not out.exists() and not out.with_name("cut.json.partial").exists()


def test_clear_errors_for_an_unreachable_or_unset_ledger(pg: PgLedger, tmp_path: Path) -> None:
    key = Ed25519NoteSigner.generate(ORIGIN).verifier_key
    secret = "host=127.0.0.1 port=1 dbname=test user=nobody password=hunter2 connect_timeout=2"
    down = run(["verify", "--postgres", secret, "--key", key, "--json"])
    assert down.exit_code == 1
    assert _json(down)["error"] == "unavailable"
    assert "hunter2" not in down.output and "Traceback" not in down.output
    missing = run(["verify", "--postgres", pg.app, "--schema", "no_such_ledger", "--key", key])
    assert missing.exit_code == 1 and "not set up" in missing.stderr
    no_key = run(["verify", *["--postgres", pg.app, "--schema", pg.schema], "--data-dir", "/nope"])
    assert no_key.exit_code == 1 and "give --key" in no_key.stderr
    bad_schema = run(["verify", "--postgres", pg.app, "--schema", "Bad-Name", "--key", key])
    assert bad_schema.exit_code == 1 and "schema name" in bad_schema.stderr
    alone = run(["verify", "--schema", pg.schema, "--data-dir", str(tmp_path)])
    assert alone.exit_code == 1 and "--schema needs --postgres" in alone.stderr
    out = str(tmp_path / "empty.json")
    empty = run(["export", "--postgres", pg.app, "--schema", pg.schema, "--key", key, "--out", out])
    assert empty.exit_code == 1 and "no checkpoint yet" in empty.stderr
