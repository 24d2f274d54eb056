"""Settings: environment variables (``PHIVAULT_*``) over defaults; built once, passed down.

Nothing reads settings at import time. Each part owns a section; production settings refuse
development-only adapters (the dev unseal file, the dev identity provider) and
benchmark-only switches, failing closed with a :class:`~phivault.errors.ConfigurationError`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "AccessSettings",
    "ApiSettings",
    "Environment",
    "IdentitySettings",
    "KeyProviderKind",
    "KeySettings",
    "LedgerSettings",
    "RecordsSettings",
    "Settings",
    "TrustedIssuer",
]


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class LedgerSettings(BaseModel):
    # C2SP checkpoints are issued at most this long after an event arrives.
    checkpoint_interval_s: float = Field(default=1.0, gt=0, le=60)
    # How long a group commit may wait to gather more appends before its fsync.
    group_commit_window_s: float = Field(default=0.0, ge=0, le=0.1)


class TrustedIssuer(BaseModel):
    issuer: str = Field(min_length=1)
    # None: found through OIDC discovery at <issuer>/.well-known/openid-configuration.
    jwks_url: str | None = None


_PHI_ROLES = ("clinician", "nurse", "front-desk", "billing", "researcher", "patient")


class IdentitySettings(BaseModel):
    """Token validation, DPoP and sessions (phivault.identity)."""

    issuers: list[TrustedIssuer] = []
    audience: str = "phivault"
    # Asymmetric only: "none" and HMAC algorithms are refused (see phivault.identity.tokens).
    algorithms: list[str] = ["ES256", "ES384", "RS256", "PS256", "Ed25519"]
    dpop_algorithms: list[str] = ["ES256", "ES384", "RS256", "PS256", "Ed25519"]
    clock_skew_s: int = Field(default=60, ge=0, le=300)
    dpop_proof_max_age_s: int = Field(default=60, gt=0, le=600)
    jwks_cache_ttl_s: float = Field(default=300.0, gt=0)
    jwks_min_refresh_s: float = Field(default=10.0, ge=0)
    max_token_age_s: int = Field(default=3600, gt=0)
    max_session_age_s: int = Field(default=12 * 3600, gt=0)
    # Idle timeout per role in seconds (None: no idle timeout). PCI DSS 8.2.8: 15 minutes.
    idle_timeout_s: dict[str, int | None] = {
        **dict.fromkeys(_PHI_ROLES, 900),
        "privacy-officer": 900,
        "admin": 900,
        "service": None,
    }
    mfa_roles: list[str] = ["admin", "privacy-officer"]
    mfa_acr_values: list[str] = ["http://schemas.openid.net/pape/policies/2007/06/multi-factor"]
    step_up_window_s: int = Field(default=300, gt=0)
    default_tenant: str | None = "default"


class ApiSettings(BaseModel):
    """The ASGI front door (phivault.api)."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    rate_limit_per_address: str = "1200/minute"
    rate_limit_per_principal: str = "600/minute"
    shared_state: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "phivault"
    # The external base URL (behind proxies), for DPoP htu checks; None: from the request.
    public_url: str | None = None


class AccessSettings(BaseModel):
    """Access control (phivault.access): the policy file, break-glass time box and review
    deadline."""

    # An operator's policy (TOML, as `phivault policy check FILE` validates it); None: the
    # shipped default. An invalid policy stops the server at start with every problem listed.
    policy_file: Path | None = None

    # How long a break-glass grant lasts, on the server's clock.
    break_glass_minutes: int = Field(default=60, gt=0, le=24 * 60)
    # Grants not reviewed this long after they were made are reported as overdue.
    break_glass_overdue_hours: float = Field(default=24.0, gt=0, le=24 * 90)
    # Where break-glass alerts are POSTed besides the log (PHI-free payload; queued and
    # retried in the background). None: the log only.
    break_glass_webhook_url: str | None = None


class KeyProviderKind(StrEnum):
    SEALED = "sealed"  # Shamir-shared root key (embedded default)
    PKCS11 = "pkcs11"  # an HSM through PKCS#11
    AWSKMS = "awskms"  # AWS KMS


class KeySettings(BaseModel):
    """Key custody (phivault.crypto). Production refuses the dev unseal file."""

    provider: KeyProviderKind = KeyProviderKind.SEALED
    pkcs11_module: Path = Path("/usr/lib/softhsm/libsofthsm2.so")
    pkcs11_token_label: str = "phivault"  # noqa: S105 (a label, not a secret)
    pkcs11_key_label: str = "phivault-root"
    pkcs11_pin: SecretStr | None = None
    pkcs11_sessions: int = Field(default=4, ge=1, le=64)
    awskms_key_id: str | None = None
    awskms_region: str | None = None
    dek_cache_size: int = Field(default=10_000, ge=0)
    dek_cache_ttl_s: float = Field(default=300.0, ge=0)


class RecordsSettings(BaseModel):
    """The records service (phivault.records): where records live and how FHIR pages."""

    # None: the embedded SQLite database in the data directory's records/ folder. Otherwise a
    # SQLAlchemy URL (postgresql://... for the scaled shape).
    store_url: str | None = None
    # PostgreSQL only: the schema that holds the records tables (it must exist).
    store_schema: str | None = None
    max_bundle_entries: int = Field(default=10_000, gt=0, le=100_000)
    default_count: int = Field(default=50, gt=0, le=1000)
    # Benchmark-only switches (bench/fhir_bench.py measures what the controls cost).
    # Production refuses any of them.
    bench_audit_off: bool = False
    bench_encryption_off: bool = False
    bench_policy_off: bool = False

    @property
    def controls_off(self) -> bool:
        return self.bench_audit_off or self.bench_encryption_off or self.bench_policy_off


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PHIVAULT_", env_nested_delimiter="__", extra="forbid"
    )

    environment: Environment = Environment.DEVELOPMENT
    data_dir: Path = Path("./phivault-data")
    ledger: LedgerSettings = LedgerSettings()
    identity: IdentitySettings = IdentitySettings()
    api: ApiSettings = ApiSettings()
    access: AccessSettings = AccessSettings()
    keys: KeySettings = KeySettings()
    records: RecordsSettings = RecordsSettings()

    @model_validator(mode="after")
    def _production_keeps_every_control(self) -> Settings:
        if self.environment is Environment.PRODUCTION and self.records.controls_off:
            raise ValueError(
                "production settings refuse the benchmark-only switches that turn off audit, "
                "encryption or the access policy (records.bench_*)"
            )
        hook = self.access.break_glass_webhook_url
        if self.environment is Environment.PRODUCTION and hook and not hook.startswith("https://"):
            raise ValueError("production sends break-glass alerts over HTTPS only")
        return self

    @property
    def is_production(self) -> bool:
        return self.environment is Environment.PRODUCTION
