"""Offline evidence bundles: the ledger as one JSON document that verifies with nothing else.

Format (stable; auditors' tools parse it)::

    {"origin": "<checkpoint origin>",
     "verifier_key": "<C2SP note verifier key>",      # a hint only, never trusted
     "entries": [{"index": 0, "leaf": "<base64 of the exact leaf bytes>"}, ...],
     "checkpoints": ["<signed checkpoint note>", ...]}

A bundle holds the entries covered by its newest checkpoint. Verification trusts only the
verifier key the *verifier* supplies: a history rewritten and re-signed with another key
fails, and so does a bundle whose embedded key differs from the trusted one.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from phivault.errors import InvalidInput
from phivault.ledger.checkpoint import unverified_checkpoint
from phivault.ledger.errors import InvalidProof, LedgerError, LedgerTampered, TamperKind
from phivault.ledger.note import NoteVerifier
from phivault.ledger.ports import LedgerStore
from phivault.ledger.verify import Damaged, VerificationReport, verify_ledger

__all__ = ["Bundle", "read_bundle", "verify_bundle", "write_bundle"]

_CHUNK = 4096


@dataclass(frozen=True)
class Bundle:
    origin: str
    verifier_key: str
    entries: list[bytes | Damaged]
    checkpoints: list[str]


def write_bundle(
    out: IO[str],
    store: LedgerStore,
    *,
    origin: str,
    verifier_key: str,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stream a bundle of every entry covered by the newest checkpoint; return its size.

    Any store: the embedded files or the scaled shape's PostgreSQL tables (opened read-only).
    """
    notes = store.checkpoints()
    if not notes:
        raise InvalidInput(
            "the ledger has no checkpoint yet (its writer signs one within a second of an "
            "event; for the embedded ledger, `phivault ledger checkpoint` issues one)"
        )
    size = unverified_checkpoint(notes[-1]).size
    if size > store.size():
        raise LedgerError(
            f"the newest checkpoint covers {size} entries but only {store.size()} can be read; "
            "run `phivault ledger verify` for a diagnosis"
        )
    out.write("{")
    out.write(f'"origin":{json.dumps(origin)},"verifier_key":{json.dumps(verifier_key)},')
    out.write('"entries":[')
    for start in range(0, size, _CHUNK):
        leaves = store.read(start, min(start + _CHUNK, size))
        parts = (
            f'{{"index":{start + offset},"leaf":"{base64.b64encode(leaf).decode("ascii")}"}}'
            for offset, leaf in enumerate(leaves)
        )
        out.write(("," if start else "") + ",".join(parts))
        if progress is not None:
            progress(start + len(leaves))
    out.write('],"checkpoints":')
    out.write(json.dumps(notes, ensure_ascii=False))
    out.write("}\n")
    return size


def read_bundle(path: Path) -> Bundle:
    """Parse a bundle file; damaged entries become :class:`Damaged` so verify names them."""
    try:
        doc: Any = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise InvalidInput(f"no bundle at {path}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path} is not a JSON document") from exc
    if not isinstance(doc, dict):
        raise InvalidInput("a bundle is a JSON object")
    unknown = set(doc) - {"origin", "verifier_key", "entries", "checkpoints"}
    if unknown:
        raise InvalidInput(f"unknown bundle fields: {', '.join(sorted(unknown))}")
    for field, kind in (
        ("origin", str),
        ("verifier_key", str),
        ("entries", list),
        ("checkpoints", list),
    ):
        if not isinstance(doc.get(field), kind):
            raise InvalidInput(f"the bundle's {field!r} is missing or not a {kind.__name__}")
    if not all(isinstance(note, str) for note in doc["checkpoints"]):
        raise InvalidInput("every checkpoint in a bundle is a string")
    return Bundle(
        origin=doc["origin"],
        verifier_key=doc["verifier_key"],
        entries=list(_entries(doc["entries"])),
        checkpoints=doc["checkpoints"],
    )


def _entries(items: list[Any]) -> Iterator[bytes | Damaged]:
    for position, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"index", "leaf"}:
            yield Damaged("bundle entry is not {index, leaf}")
        elif item["index"] != position:
            yield Damaged(f"bundle entry at position {position} is labelled {item['index']!r}")
        else:
            try:
                yield base64.b64decode(item["leaf"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                yield Damaged("leaf is not base64")


def verify_bundle(
    bundle: Bundle,
    trusted_key: str,
    *,
    trusted_checkpoint: str | None = None,
    progress: Callable[[int], None] | None = None,
    thorough: bool = False,
) -> VerificationReport:
    """Verify a bundle against a verifier key the caller trusts. Raises LedgerTampered.

    ``thorough`` runs the structural checks on every entry (see ``verify_ledger``).
    """
    try:
        verifier = NoteVerifier.from_verifier_key(trusted_key)
    except (InvalidProof, ValueError) as exc:
        raise InvalidInput(
            f"the trusted verifier key is not a valid note verifier key: {exc}"
        ) from exc
    if bundle.verifier_key != verifier.verifier_key:
        raise LedgerTampered(
            0,
            TamperKind.BAD_SIGNATURE,
            "the bundle names a different verifier key than the one trusted",
        )
    if bundle.origin != verifier.name:
        raise LedgerTampered(
            0, TamperKind.MODIFIED, "the bundle's origin does not match the trusted key's name"
        )
    report = verify_ledger(
        bundle.entries,
        bundle.checkpoints,
        verifier,
        origin=bundle.origin,
        trusted_checkpoint=trusted_checkpoint,
        progress=progress,
        thorough=thorough,
    )
    if report.uncovered:
        raise LedgerTampered(
            report.covered,
            TamperKind.MODIFIED,
            f"{report.uncovered} entries in the bundle are not covered by any checkpoint",
        )
    if not report.checkpoints:
        raise LedgerTampered(0, TamperKind.BAD_SIGNATURE, "the bundle carries no checkpoint")
    return report
