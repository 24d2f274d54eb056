"""Why a caller was not let in, as precise types the API maps to RFC 6750 / RFC 9470 answers.

Every authentication failure carries a short ``reason`` code (for the audit event and metrics)
and the OAuth ``error`` code that goes into ``WWW-Authenticate``. Messages describe the rule
that failed, never the token, a claim value, or anything the caller sent.
"""

from __future__ import annotations

from phivault.errors import PhivaultError, StoreUnavailable

__all__ = [
    "AuthenticationError",
    "DPoPError",
    "IdentityUnavailable",
    "InsufficientAuthentication",
    "InvalidToken",
    "MissingCredentials",
    "SessionExpired",
]


class AuthenticationError(PhivaultError):
    """The caller could not be authenticated: answer 401 with a ``WWW-Authenticate`` challenge.

    ``reason`` is a code (``expired``, ``bad-signature``, ``dpop-replay``...) safe to record
    in audit events and metrics; ``error`` is the OAuth error code for the challenge.
    """

    error: str = "invalid_token"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class MissingCredentials(AuthenticationError):
    """No access token was presented (RFC 6750 §3.1: no error code in the challenge)."""

    error = ""

    def __init__(self) -> None:
        super().__init__("no-credentials", "an access token is required")


class InvalidToken(AuthenticationError):
    """The access token is malformed, unsigned, mis-signed, expired, or not for us."""


class DPoPError(AuthenticationError):
    """The DPoP proof is missing, malformed, replayed, or does not bind to the token."""

    error = "invalid_dpop_proof"


class SessionExpired(AuthenticationError):
    """The session behind the token is too old or was idle too long: sign in again."""


class InsufficientAuthentication(AuthenticationError):
    """The token is valid but its authentication is too weak or too old (RFC 9470).

    ``acr_values`` and ``max_age`` tell the client what to ask the identity provider for.
    """

    error = "insufficient_user_authentication"

    def __init__(
        self, reason: str, message: str, *, acr_values: str | None, max_age: int | None
    ) -> None:
        super().__init__(reason, message)
        self.acr_values = acr_values
        self.max_age = max_age


class IdentityUnavailable(StoreUnavailable):
    """A dependency of authentication (JWKS endpoint, replay cache, session store) is down.

    The request fails closed with 503: nobody is let in on a guess.
    """
