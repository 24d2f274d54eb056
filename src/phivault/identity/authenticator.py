"""The authentication step of the front door: from HTTP credentials to a :class:`Principal`.

Framework-free on purpose (method, URL and header values in; a principal or a typed error
out), so the same rules hold behind FastAPI, in tests, and in any other transport. The steps:

1. ``Authorization: Bearer <token>`` or ``Authorization: DPoP <token>`` (RFC 6750, RFC 9449).
2. The token is validated (:class:`~phivault.identity.tokens.TokenValidator`).
3. A DPoP-bound token (``cnf.jkt``) is accepted only with the ``DPoP`` scheme and exactly one
   valid proof from its key; the ``DPoP`` scheme with an unbound token is refused too.
4. The principal is built, then the session rules apply: token and session age, MFA for the
   roles that need it, and the idle timeout kept in the session store.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from phivault.identity.dpop import DPoPVerifier
from phivault.identity.errors import DPoPError, InvalidToken, MissingCredentials, SessionExpired
from phivault.identity.principal import ClaimNames, Principal, principal_from_claims
from phivault.identity.sessions import (
    SessionGate,
    SessionPolicy,
    SessionState,
    SessionStore,
    session_key,
)
from phivault.identity.tokens import TokenValidator

__all__ = ["Authenticated", "Authenticator"]

_CACHE_SIZE = 10_000
_CREDENTIALS = re.compile(r"^(?P<scheme>[A-Za-z]+) +(?P<token>[A-Za-z0-9\-._~+/]+=*)$")


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A successful authentication. ``new_session`` is True on a session's first request."""

    principal: Principal
    new_session: bool


class Authenticator:
    """Turns the credentials of one request into a principal, or raises AuthenticationError."""

    def __init__(
        self,
        validator: TokenValidator,
        dpop: DPoPVerifier,
        policy: SessionPolicy,
        sessions: SessionStore,
        *,
        claim_names: ClaimNames | None = None,
        default_tenant: str | None = None,
    ) -> None:
        self._validator = validator
        self._dpop = dpop
        self._policy = policy
        self._sessions = sessions
        self._names = claim_names or ClaimNames()
        self._default_tenant = default_tenant
        self._principals: OrderedDict[str, tuple[dict[str, Any], Principal]] = OrderedDict()

    def _principal(self, token: str, claims: dict[str, Any]) -> Principal:
        # A principal is a pure function of verified claims; the validator hands back the same
        # claims object for a token it remembers, so the principal can be remembered with it.
        cached = self._principals.get(token)
        if cached is not None and cached[0] is claims:
            return cached[1]
        principal = principal_from_claims(
            claims, names=self._names, default_tenant=self._default_tenant
        )
        self._principals[token] = (claims, principal)
        if len(self._principals) > _CACHE_SIZE:
            self._principals.popitem(last=False)
        return principal

    @property
    def policy(self) -> SessionPolicy:
        return self._policy

    async def authenticate(
        self,
        *,
        method: str,
        url: str,
        authorization: str | None,
        dpop_proofs: Sequence[str],
        now: float,
        gate: SessionGate | None = None,
    ) -> Authenticated:
        """The principal behind the credentials, or AuthenticationError / IdentityUnavailable.

        ``gate`` is run by the session store right before (and atomically with) the session
        touch; if it refuses, :class:`~phivault.identity.sessions.GateRefused` is raised and
        the session is not touched."""
        if authorization is None or not authorization.strip():
            raise MissingCredentials()
        match = _CREDENTIALS.match(authorization.strip())
        if match is None:
            raise InvalidToken("malformed", "the Authorization header is malformed")
        scheme = match["scheme"].lower()
        token = match["token"]
        if scheme not in ("bearer", "dpop"):
            raise InvalidToken("unsupported-scheme", "use the Bearer or DPoP scheme")
        claims = await self._validator.validate(token, now=now)
        principal = self._principal(token, claims)
        if principal.dpop_jkt is not None:
            if scheme != "dpop":
                raise DPoPError("dpop-missing", "this token is bound to a key: use DPoP")
            if len(dpop_proofs) != 1:
                raise DPoPError("dpop-missing", "send exactly one DPoP proof")
            await self._dpop.verify(
                dpop_proofs[0],
                method=method,
                url=url,
                access_token=token,
                expected_jkt=principal.dpop_jkt,
                now=now,
            )
        elif scheme == "dpop":
            raise InvalidToken("not-dpop-bound", "the DPoP scheme needs a DPoP-bound token")
        self._policy.check(principal, now=now)
        idle = self._policy.idle_timeout(principal)
        keep = max(self._policy.max_session_age_s, self._policy.max_token_age_s)
        state = await self._sessions.touch(
            session_key(principal, claims.get("sid")),
            now=now,
            idle_s=1e15 if idle is None else idle,  # finite: Redis scripts compare numbers
            keep_s=keep,
            gate=gate,
        )
        if state is SessionState.ENDED:
            raise SessionExpired("idle-timeout", "the session ended after being idle")
        return Authenticated(principal=principal, new_session=state is SessionState.NEW)
