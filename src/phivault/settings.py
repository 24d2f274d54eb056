"""Settings: environment variables (``PHIVAULT_*``) over defaults; built once, passed down.

Nothing reads settings at import time. Each part owns a section; production settings refuse
development-only adapters (the dev unseal file, the dev identity provider) and
benchmark-only switches, failing closed with a :class:`~phivault.errors.ConfigurationError`.

The ``[shape]`` section picks the adapters (docs/deploy/): the embedded shape (SQLite, the
local ledger, per-process state, sealed keys) by default, or the scaled one (PostgreSQL,
the JetStream audit stream and its sequencer, Redis, an HSM or KMS). A settings file
(:func:`load_settings`, ``phivault serve --config FILE``) holds the same sections as TOML;
environment variables override it.
"""

from __future__ import annotations

import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from phivault.errors import ConfigurationError

__all__ = [
    "CONFIG_ENV_VAR",
    "AccessSettings",
    "ApiSettings",
    "Environment",
    "IdentitySettings",
    "KeyProviderKind",
    "KeySettings",
    "LedgerKind",
    "LedgerSettings",
    "RecordsSettings",
    "Settings",
    "ShapeSettings",
    "SharedStateKind",
    "StoreKind",
    "TrustedIssuer",
    "describe_invalid_settings",
    "load_settings",
]


#: How long a worker of the scaled shape keeps a patient's cipher (keys.dek_cache_ttl_s).
SHARED_KEY_CACHE_TTL_S = 30.0

#: Names the settings file that :func:`load_settings` reads when not given one.
CONFIG_ENV_VAR = "PHIVAULT_CONFIG"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class StoreKind(StrEnum):
    SQLITE = "sqlite"  # the embedded database in the data directory
    POSTGRES = "postgres"  # records.store_url, with optional streaming replicas


class LedgerKind(StrEnum):
    LOCAL = "local"  # the embedded ledger files, written by the one server process
    JETSTREAM = "jetstream"  # workers publish to a JetStream stream; `phivault sequencer` appends


class SharedStateKind(StrEnum):
    MEMORY = "memory"  # rate limits, DPoP replay cache, sessions per process
    REDIS = "redis"  # shared by every worker


class LedgerSettings(_Section):
    # C2SP checkpoints are issued at most this long after an event arrives.
    checkpoint_interval_s: float = Field(default=1.0, gt=0, le=60)
    # How long a group commit may wait to gather more appends before its fsync.
    group_commit_window_s: float = Field(default=0.0, ge=0, le=0.1)
    # --- the scaled shape (shape.ledger = "jetstream") ---
    # Where the sequencer keeps the ledger and workers read it (libpq conninfo or URL).
    postgres_url: str | None = None
    postgres_schema: str = Field(default="phivault_ledger", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    nats_urls: list[str] = ["nats://127.0.0.1:4222"]
    stream: str = Field(default="PHIVAULT_AUDIT", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # File storage replicas of the stream: 3 in production (a 3-node cluster), 1 in tests.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # How long a worker waits for the stream's acknowledgement before answering 503.
    publish_timeout_s: float = Field(default=2.0, gt=0, le=30)
    # How long a publish keeps trying, instead, while the stream exists and NATS is reachable
    # but the stream has no leader: JetStream elects a new one 4 to 9 s after its leader's
    # node dies (Raft election timeout), and losing one node must fail no request.
    leader_election_wait_s: float = Field(default=10.0, ge=0, le=60)


class TrustedIssuer(_Section):
    issuer: str = Field(min_length=1)
    # None: found through OIDC discovery at <issuer>/.well-known/openid-configuration.
    jwks_url: str | None = None


_PHI_ROLES = ("clinician", "nurse", "front-desk", "billing", "researcher", "patient")


class IdentitySettings(_Section):
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


class ApiSettings(_Section):
    """The ASGI front door (phivault.api)."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    rate_limit_per_address: str = "1200/minute"
    rate_limit_per_principal: str = "600/minute"
    shared_state: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "phivault"
    # The external base URL (behind proxies), for DPoP htu checks; None: from the request.
    public_url: str | None = None


class AccessSettings(_Section):
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


class KeySettings(_Section):
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
    # shape.store = postgres: the wrapped data keys live in the records database, in this
    # schema, shared by every worker (embedded: keys/ in the data directory).
    postgres_schema: str = Field(default="phivault_keys", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # Scaled shape (shape.store = postgres, shape.ledger = jetstream): a worker uses its cipher
    # cache only while it holds a lease of this length in NATS (the longest a worker that did
    # not confirm a shred may go on using its cache); a shred waits this long for every live
    # worker to confirm it dropped the patient's cipher, else it is pending propagation.
    invalidation_lease_s: float = Field(default=10.0, gt=0, le=300)
    shred_confirm_timeout_s: float = Field(default=2.0, gt=0, le=60)


class RecordsSettings(_Section):
    """The records service (phivault.records): where records live and how FHIR pages."""

    # None: the embedded SQLite database in the data directory's records/ folder. Otherwise a
    # SQLAlchemy URL (postgresql://... for the scaled shape).
    store_url: str | None = None
    # PostgreSQL only: the schema that holds the records tables (it must exist).
    store_schema: str | None = None
    # Streaming replicas (SQLAlchemy URLs) that PHI and display reads may use when their
    # replication lag is under replica_max_lag_ms; authorization state and writes never do.
    replica_urls: list[str] = []
    replica_max_lag_ms: float = Field(default=100.0, gt=0, le=60_000)
    # PostgreSQL: connections each worker keeps per pool (the primary's writes, its reads,
    # each replica); a unit of work finding them all busy waits for one, none is made extra.
    pool_size: int = Field(default=10, gt=0, le=200)
    # Several workers: how often open write intents are looked for, and how old one must
    # be before it is settled (longer than any request lives).
    reconcile_every_s: float = Field(default=15.0, gt=0, le=3600)
    settle_intents_after_s: float = Field(default=120.0, gt=0, le=24 * 3600)
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


class ShapeSettings(_Section):
    """Which adapter each port gets (issue 7): the same domain code in every shape."""

    store: StoreKind = StoreKind.SQLITE
    ledger: LedgerKind = LedgerKind.LOCAL
    shared_state: SharedStateKind = SharedStateKind.MEMORY
    keys: KeyProviderKind = KeyProviderKind.SEALED

    @property
    def scaled(self) -> bool:
        """Several workers may serve: nothing that matters lives in one process."""
        return (
            self.store is StoreKind.POSTGRES
            and self.ledger is LedgerKind.JETSTREAM
            and self.shared_state is SharedStateKind.REDIS
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PHIVAULT_", env_nested_delimiter="__", extra="forbid"
    )

    environment: Environment = Environment.DEVELOPMENT
    shape: ShapeSettings = ShapeSettings()
    data_dir: Path = Path("./phivault-data")
    ledger: LedgerSettings = LedgerSettings()
    identity: IdentitySettings = IdentitySettings()
    api: ApiSettings = ApiSettings()
    access: AccessSettings = AccessSettings()
    keys: KeySettings = KeySettings()
    records: RecordsSettings = RecordsSettings()

    @model_validator(mode="after")
    def _one_source_per_choice(self) -> Settings:
        # `api.shared_state` and `keys.provider` predate [shape]; shape is the source of truth,
        # but a setting made the old way is still honoured if the shape does not say.
        shape_set = self.shape.model_fields_set
        if "shared_state" not in shape_set and "shared_state" in self.api.model_fields_set:
            self.shape.shared_state = SharedStateKind(self.api.shared_state)
        if "keys" not in shape_set and "provider" in self.keys.model_fields_set:
            self.shape.keys = self.keys.provider
        self.api.shared_state = self.shape.shared_state.value
        self.keys.provider = self.shape.keys
        return self

    @model_validator(mode="after")
    def _shared_keys_are_cached_briefly(self) -> Settings:
        # Several workers share the key store: a worker keeps a patient's cipher cached until
        # its lifetime ends even after another worker shredded that patient, so the scaled
        # shape caches for 30 s unless the operator chose otherwise (embedded: 300 s).
        if self.shape.store is StoreKind.POSTGRES and "dek_cache_ttl_s" not in (
            self.keys.model_fields_set
        ):
            self.keys.dek_cache_ttl_s = SHARED_KEY_CACHE_TTL_S
        return self

    @model_validator(mode="after")
    def _shape_has_what_it_needs(self) -> Settings:
        url = self.records.store_url or ""
        if self.shape.store is StoreKind.POSTGRES and not url.startswith("postgresql"):
            raise ValueError("shape.store = postgres needs records.store_url = postgresql://...")
        if self.shape.store is StoreKind.SQLITE and url and not url.startswith("sqlite"):
            raise ValueError("records.store_url is not SQLite: set shape.store = postgres")
        if self.records.replica_urls and self.shape.store is not StoreKind.POSTGRES:
            raise ValueError("records.replica_urls need shape.store = postgres")
        if self.shape.ledger is LedgerKind.JETSTREAM:
            if not self.ledger.postgres_url:
                raise ValueError(
                    "shape.ledger = jetstream needs ledger.postgres_url (where the sequencer "
                    "keeps the ledger and workers read it)"
                )
            if not self.ledger.nats_urls:
                raise ValueError("shape.ledger = jetstream needs ledger.nats_urls")
            if self.is_production and self.ledger.stream_replicas < 3:
                raise ValueError(
                    "production keeps the audit stream on 3 replicas (ledger.stream_replicas)"
                )
        return self

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


class _FileSettings(Settings):
    """Settings read from a TOML file, with environment variables over it."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(
            settings_cls, toml_file=settings_cls.model_config.get("toml_file")
        )
        return (init_settings, env_settings, toml, file_secret_settings)


def load_settings(config_file: Path | None = None) -> Settings:
    """The settings: environment variables over ``config_file`` (TOML, the same sections as
    the environment's ``PHIVAULT_SECTION__KEY`` names) over the defaults.

    With no ``config_file``, the file named by ``PHIVAULT_CONFIG`` if that is set.
    Raises :class:`ConfigurationError` naming every problem (file, section and key; never a
    value, which may be a secret).
    """
    if config_file is None and os.environ.get(CONFIG_ENV_VAR):
        config_file = Path(os.environ[CONFIG_ENV_VAR])
    if config_file is None:
        try:
            return Settings()
        except ValidationError as exc:
            raise ConfigurationError(describe_invalid_settings(exc, "the environment")) from None
    try:
        with config_file.open("rb") as handle:
            tomllib.load(handle)  # a clear error for bad TOML before pydantic sees it
    except OSError as exc:
        raise ConfigurationError(
            f"the settings file {config_file} cannot be read ({exc.strerror})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(
            f"the settings file {config_file} is not valid TOML: {exc}"
        ) from None
    reader = type(
        "_FromFile",
        (_FileSettings,),
        {"model_config": {**_FileSettings.model_config, "toml_file": config_file}},
    )
    try:
        loaded = reader()
        return Settings.model_validate(loaded.model_dump())
    except ValidationError as exc:
        raise ConfigurationError(describe_invalid_settings(exc, str(config_file))) from None


def describe_invalid_settings(exc: ValidationError, source: str) -> str:
    """Every problem in ``exc`` as ``section.key: message`` lines, without the values."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        problems.append(f"{where}: {error['msg']}")
    return f"invalid settings in {source}:\n  " + "\n  ".join(problems)
