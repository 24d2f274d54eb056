"""Settings: environment variables (``PHIVAULT_*``) over defaults; built once, passed down.

Nothing reads settings at import time. Each part owns a section; production settings refuse
development-only adapters (the dev unseal file, the dev identity provider) and
benchmark-only switches, failing closed with a :class:`~phivault.errors.ConfigurationError`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Environment", "LedgerSettings", "Settings"]


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class LedgerSettings(BaseModel):
    # C2SP checkpoints are issued at most this long after an event arrives.
    checkpoint_interval_s: float = Field(default=1.0, gt=0, le=60)
    # How long a group commit may wait to gather more appends before its fsync.
    group_commit_window_s: float = Field(default=0.0, ge=0, le=0.1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PHIVAULT_", env_nested_delimiter="__", extra="forbid"
    )

    environment: Environment = Environment.DEVELOPMENT
    data_dir: Path = Path("./phivault-data")
    ledger: LedgerSettings = LedgerSettings()

    @property
    def is_production(self) -> bool:
        return self.environment is Environment.PRODUCTION
