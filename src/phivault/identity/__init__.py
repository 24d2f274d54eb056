"""Identity: who is asking, proven. Token validation (OIDC/JWT, DPoP), sessions, MFA, step-up.

The public surface is below; :mod:`phivault.identity.dev_provider` (development only) is
deliberately not re-exported, so using it is always a visible, named import.
"""

from phivault.identity.authenticator import Authenticated, Authenticator
from phivault.identity.dpop import DPoPVerifier, MemoryReplayCache, RedisReplayCache, ReplayCache
from phivault.identity.errors import (
    AuthenticationError,
    DPoPError,
    IdentityUnavailable,
    InsufficientAuthentication,
    InvalidToken,
    MissingCredentials,
    SessionExpired,
)
from phivault.identity.jwks import JwksCache, KeySource, StaticKeySource
from phivault.identity.principal import AuthContext, ClaimNames, Principal, Role
from phivault.identity.scopes import Permission, ScopeContext, SmartScope
from phivault.identity.sessions import (
    MemorySessionStore,
    RedisSessionStore,
    SessionPolicy,
    SessionStore,
    require_step_up,
)
from phivault.identity.tokens import TokenValidator, TrustedIssuerKeys

__all__ = [
    "AuthContext",
    "Authenticated",
    "AuthenticationError",
    "Authenticator",
    "ClaimNames",
    "DPoPError",
    "DPoPVerifier",
    "IdentityUnavailable",
    "InsufficientAuthentication",
    "InvalidToken",
    "JwksCache",
    "KeySource",
    "MemoryReplayCache",
    "MemorySessionStore",
    "MissingCredentials",
    "Permission",
    "Principal",
    "RedisReplayCache",
    "RedisSessionStore",
    "ReplayCache",
    "Role",
    "ScopeContext",
    "SessionExpired",
    "SessionPolicy",
    "SessionStore",
    "SmartScope",
    "StaticKeySource",
    "TokenValidator",
    "TrustedIssuerKeys",
    "require_step_up",
]
