"""Creating a data directory: every part's state, in order, or nothing at all.

``phivault init`` is the usual caller; benchmarks and tests call :func:`initialize_data_dir`
too, so that what they run on is exactly what a user's ``init`` creates.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from phivault.crypto.custody import KeystoreInit, check_keystore_settings, initialize_keystore
from phivault.datadir import DataDir
from phivault.ledger.service import initialize_ledger
from phivault.settings import Settings

__all__ = ["Initialized", "initialize_data_dir"]


@dataclass(frozen=True)
class Initialized:
    data_dir: DataDir
    ledger_verifier_key: str
    keystore: KeystoreInit = field(repr=False)  # carries the unseal shares: shown once
    dev_identity_issuer: str | None


def initialize_data_dir(
    path: Path,
    *,
    dev: bool,
    settings: Settings | None = None,
    origin: str | None = None,
    threshold: int = 3,
    shares: int = 5,
) -> Initialized:
    """Create the data directory: the ledger and its signing key, the keystore (root key split
    ``threshold`` of ``shares``; PostgreSQL tables for ``shape.store = postgres``), and with
    ``dev`` the dev identity provider's key.

    Settings are checked before anything is written; if a later step fails, the directory
    this call created is removed again, so a failed ``init`` can simply be retried (an empty
    keystore schema it created in PostgreSQL stays: creating it is idempotent).
    """
    settings = settings or Settings()
    check_keystore_settings(settings.keys, threshold=threshold, shares=shares)
    existed = path.exists()
    created = DataDir.create(path, dev=dev, origin=origin)  # refuses an existing one
    try:
        verifier_key = initialize_ledger(created)
        # The scaled shape's keystore is a schema in the records database (created if missing);
        # the root key provider and its public facts stay in this directory's keys/.
        keystore = initialize_keystore(created, settings, threshold=threshold, shares=shares)
        dev_issuer = None
        if dev:
            from phivault.identity.dev_provider import DevIdentityProvider

            dev_issuer = DevIdentityProvider.initialize(created).issuer
    except BaseException:
        # Only what this call made: an existing (empty) folder is emptied, not removed.
        if existed:
            for child in path.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return Initialized(created, verifier_key, keystore, dev_issuer)
