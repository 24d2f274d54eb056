"""The embedded development identity provider. DEVELOPMENT ONLY: it signs whatever it is told.

For the demo and the tests, phivault can mint its own access tokens: ``phivault init --dev``
creates an ES256 signing key under ``<data-dir>/identity/``, the API publishes the public half
at ``/.well-known/jwks.json`` (with OIDC discovery), and ``phivault token`` signs a token for
any user and role asked for. Anyone who can read the data directory can therefore become
anyone, which is why :meth:`DevIdentityProvider.open` refuses a data directory not made with
``--dev`` and refuses production settings outright, and why every use warns.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from joserfc import jwk, jwt
from joserfc.errors import JoseError

from phivault.datadir import DataDir
from phivault.errors import ConfigurationError
from phivault.identity.jwks import StaticKeySource
from phivault.identity.principal import Role
from phivault.settings import Settings

__all__ = [
    "DEMO_USERS",
    "DemoUser",
    "DevIdentityProvider",
    "DevProviderRefused",
    "DevProviderWarning",
    "dpop_thumbprint",
]

ALGORITHM = "ES256"
KEY_FILE = "signing-key.jwk"
CLIENT_ID = "phivault-dev-cli"
MFA_ACR = "http://schemas.openid.net/pape/policies/2007/06/multi-factor"


class DevProviderRefused(ConfigurationError):
    """The dev identity provider was asked for where it must not run."""


class DevProviderWarning(UserWarning):
    """Emitted whenever the dev identity provider is used: tokens it signs prove nothing."""


@dataclass(frozen=True, slots=True)
class DemoUser:
    user: str
    fhir_user: str | None
    scopes: tuple[str, ...]


# One demo user for every role, so the demo and the tests can sign in as any job function.
DEMO_USERS: dict[Role, DemoUser] = {
    Role.CLINICIAN: DemoUser("dr-alice", "Practitioner/dr-alice", ("user/*.cruds",)),
    Role.NURSE: DemoUser("nurse-bob", "Practitioner/nurse-bob", ("user/*.rs",)),
    Role.FRONT_DESK: DemoUser(
        "desk-carol", "Practitioner/desk-carol", ("user/Patient.crus", "user/Appointment.cruds")
    ),
    Role.BILLING: DemoUser(
        "billing-dan", "Practitioner/billing-dan", ("user/Patient.rs", "user/Claim.cruds")
    ),
    Role.RESEARCHER: DemoUser("researcher-erin", None, ("user/Observation.rs",)),
    Role.PATIENT: DemoUser("patient-frank", "Patient/patient-frank", ("patient/*.rs",)),
    Role.PRIVACY_OFFICER: DemoUser("privacy-grace", None, ("user/AuditEvent.rs",)),
    Role.ADMIN: DemoUser("admin-heidi", None, ("user/Practitioner.cruds",)),
    Role.SERVICE: DemoUser("service-loader", None, ("system/*.cruds",)),
}


def dpop_thumbprint(key_text: str) -> str:
    """The RFC 7638 thumbprint (``cnf.jkt``) of a JWK (JSON) or PEM key, public or private."""
    try:
        stripped = key_text.strip()
        if stripped.startswith("{"):
            key = jwk.import_key(json.loads(stripped))
        else:
            key = _import_pem(stripped.encode())
    except (JoseError, ValueError, TypeError) as exc:
        raise ConfigurationError("the DPoP key is not a JWK or PEM key") from exc
    if not isinstance(key, (jwk.ECKey, jwk.RSAKey, jwk.OKPKey)):
        raise ConfigurationError("the DPoP key must be an asymmetric key")
    return key.thumbprint()


def _import_pem(pem: bytes) -> jwk.ECKey | jwk.RSAKey | jwk.OKPKey:
    for key_type in (jwk.ECKey, jwk.OKPKey, jwk.RSAKey):
        try:
            return key_type.import_key(pem)
        except (JoseError, ValueError, TypeError):
            continue
    raise ValueError("not a PEM key phivault can use")


class DevIdentityProvider:
    """Signs development access tokens with the key in ``<data-dir>/identity/``."""

    def __init__(self, key: jwk.ECKey, issuer: str) -> None:
        self._key = key
        self.issuer = issuer

    @staticmethod
    def issuer_for(data_dir: DataDir) -> str:
        # A reserved top-level domain (RFC 2606): this issuer can never be a real provider.
        return f"https://dev-idp.phivault.invalid/{data_dir.node_id}"

    @classmethod
    def initialize(cls, data_dir: DataDir) -> DevIdentityProvider:
        """Create the signing key (``phivault init --dev``). Refuses non-dev data dirs."""
        if not data_dir.dev:
            raise DevProviderRefused(
                "the dev identity provider needs a data directory made with --dev"
            )
        folder = data_dir.identity_dir
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / KEY_FILE
        if path.exists():
            raise DevProviderRefused(f"{path} already exists; refusing to replace the dev key")
        key = jwk.ECKey.generate_key(
            "P-256", parameters={"use": "sig", "alg": ALGORITHM}, auto_kid=True
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(key.as_dict(private=True)) + "\n")
        return cls(key, cls.issuer_for(data_dir))

    @classmethod
    def open(cls, data_dir: DataDir, settings: Settings) -> DevIdentityProvider:
        """Load the provider; refuses production settings and non-dev data directories."""
        if settings.is_production:
            raise DevProviderRefused("production settings refuse the dev identity provider")
        if not data_dir.dev:
            raise DevProviderRefused(
                f"{data_dir.path} was not made with `phivault init --dev`; "
                "the dev identity provider works only there"
            )
        path = data_dir.identity_dir / KEY_FILE
        try:
            key = jwk.import_key(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise DevProviderRefused(f"{path} is missing (run `phivault init --dev`)") from exc
        except (JoseError, ValueError, TypeError) as exc:
            raise ConfigurationError(f"{path} is damaged") from exc
        if not isinstance(key, jwk.ECKey):
            raise ConfigurationError(f"{path} is not an EC key")
        warnings.warn(
            "the DEVELOPMENT identity provider is enabled: its tokens prove nothing",
            DevProviderWarning,
            stacklevel=2,
        )
        return cls(key, cls.issuer_for(data_dir))

    @property
    def kid(self) -> str:
        return str(self._key.kid)

    def jwks(self) -> dict[str, Any]:
        """The public key set, as served at ``/.well-known/jwks.json``."""
        return {"keys": [self._key.as_dict(private=False)]}

    def key_source(self) -> StaticKeySource:
        public = jwk.ECKey.import_key(self._key.as_dict(private=False))
        return StaticKeySource({self.kid: public})

    def discovery(self, base_url: str) -> dict[str, Any]:
        """A minimal OIDC discovery document (this provider has no authorization endpoint)."""
        return {
            "issuer": self.issuer,
            "jwks_uri": base_url.rstrip("/") + "/.well-known/jwks.json",
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "token_endpoint_auth_methods_supported": ["none"],
            "dpop_signing_alg_values_supported": ["ES256", "ES384", "RS256", "PS256", "Ed25519"],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
        }

    def mint(
        self,
        *,
        user: str,
        roles: Sequence[Role],
        audience: str,
        tenant: str = "default",
        fhir_user: str | None = None,
        scopes: Sequence[str] = (),
        mfa: bool = False,
        purpose_of_use: Sequence[str] = (),
        ttl_s: int = 900,
        dpop_jkt: str | None = None,
        now: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Sign an access token (RFC 9068 shape) for ``user``."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user,
            "aud": audience,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl_s,
            "auth_time": issued,
            "jti": secrets.token_urlsafe(16),
            "sid": secrets.token_urlsafe(12),
            "client_id": CLIENT_ID,
            "tenant": tenant,
            "roles": [role.value for role in roles],
            "scope": " ".join(["openid", "fhirUser", *scopes]),
            "amr": ["pwd", "otp", "mfa"] if mfa else ["pwd"],
        }
        if mfa:
            claims["acr"] = MFA_ACR
        if fhir_user is not None:
            claims["fhirUser"] = fhir_user
        if purpose_of_use:
            claims["purpose_of_use"] = list(purpose_of_use)
        if dpop_jkt is not None:
            claims["cnf"] = {"jkt": dpop_jkt}
        if extra:
            claims.update(extra)
        header = {"alg": ALGORITHM, "kid": self.kid, "typ": "at+jwt"}
        return jwt.encode(header, claims, self._key, algorithms=[ALGORITHM])
