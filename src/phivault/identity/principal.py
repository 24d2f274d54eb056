"""Who is asking: the :class:`Principal` built from a validated access token.

The principal is what the rest of phivault trusts (access decisions, audit events), so it is
built only from claims whose signature, issuer, audience and lifetime were checked, and every
field is reduced to a safe shape: ids match the audit event's id grammar, roles are the job
functions phivault knows (unknown role names grant nothing and are dropped), scopes are parsed
SMART v2 scopes, and ``fhirUser`` is a relative FHIR reference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import TypeAdapter, ValidationError

from phivault.errors import InvalidInput
from phivault.identity.errors import InvalidToken
from phivault.identity.scopes import Permission, SmartScope, parse_scopes
from phivault.ledger.events import Agent, OpaqueId, Reference

__all__ = ["AuthContext", "ClaimNames", "Principal", "Role", "principal_from_claims"]

_OPAQUE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@\-]{0,127}$")
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
_REFERENCE = re.compile(r"(?:^|/)(?P<ref>[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64})$")
# RFC 8176 authentication method references that are each one factor.
_FACTORS = frozenset(
    {"pwd", "pin", "otp", "sms", "tel", "hwk", "swk", "fpt", "face", "iris", "retina", "vbm"}
    | {"kba", "sc", "pop", "user"}
)


class Role(StrEnum):
    """Roles as job functions (what a person does), not as permissions."""

    CLINICIAN = "clinician"
    NURSE = "nurse"
    FRONT_DESK = "front-desk"
    BILLING = "billing"
    RESEARCHER = "researcher"
    PATIENT = "patient"
    PRIVACY_OFFICER = "privacy-officer"
    ADMIN = "admin"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class AuthContext:
    """How and when the person authenticated (OIDC ``amr``, ``acr``, ``auth_time``)."""

    amr: tuple[str, ...] = ()
    acr: str | None = None
    auth_time: int | None = None

    def multi_factor(self, mfa_acr_values: frozenset[str] = frozenset()) -> bool:
        """MFA if ``amr`` says ``mfa``, names two distinct factors, or ``acr`` is an MFA level."""
        if "mfa" in self.amr or (self.acr is not None and self.acr in mfa_acr_values):
            return True
        return len(_FACTORS.intersection(self.amr)) >= 2


@dataclass(frozen=True, slots=True)
class ClaimNames:
    """Which claims carry phivault's attributes (identity providers differ)."""

    roles: str = "roles"
    tenant: str = "tenant"
    purpose_of_use: str = "purpose_of_use"
    fhir_user: str = "fhirUser"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. Immutable; safe to log by ``subject`` (an opaque id)."""

    subject: str
    issuer: str
    tenant: str
    roles: frozenset[Role]
    scopes: tuple[SmartScope, ...]
    other_scopes: frozenset[str]
    fhir_user: str | None
    purpose_of_use: tuple[str, ...]
    auth: AuthContext
    client_id: str | None
    token_id: str | None
    issued_at: int
    expires_at: int
    dpop_jkt: str | None = None

    def has_role(self, *roles: Role) -> bool:
        return not self.roles.isdisjoint(roles)

    def scope_grants(self, resource_type: str, permission: Permission) -> bool:
        """Whether any resource scope covers ``permission`` on ``resource_type``."""
        return any(scope.grants(resource_type, permission) for scope in self.scopes)


def principal_from_claims(
    claims: Mapping[str, Any],
    *,
    names: ClaimNames = ClaimNames(),
    default_tenant: str | None = None,
) -> Principal:
    """Build a principal from verified claims. Raises :class:`InvalidToken` on a bad shape."""
    subject = _opaque(claims.get("sub"), "sub")
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise InvalidToken("bad-claim", "the token has no issuer")
    tenant_claim = claims.get(names.tenant, default_tenant)
    if tenant_claim is None:
        raise InvalidToken("missing-tenant", "the token names no tenant")
    tenant = _opaque(tenant_claim, "tenant")
    roles = frozenset(Role(r) for r in _strings(claims.get(names.roles), "roles") if r in _ROLES)
    scope_claim = claims.get("scope", claims.get("scp", ""))
    if not isinstance(scope_claim, (str, list)):
        raise InvalidToken("bad-claim", "the scope claim is not a string or list")
    try:
        scopes, other = parse_scopes(scope_claim)
    except InvalidInput as exc:
        raise InvalidToken("bad-scope", "the token carries a malformed scope") from exc
    purposes = tuple(
        _code(p, "purpose_of_use")
        for p in _strings(claims.get(names.purpose_of_use), "purpose_of_use")
    )
    amr = tuple(_code(m, "amr") for m in _strings(claims.get("amr"), "amr"))
    acr = claims.get("acr")
    if acr is not None and not isinstance(acr, str):
        raise InvalidToken("bad-claim", "acr is not a string")
    auth_time = _optional_int(claims.get("auth_time"), "auth_time")
    client_id = claims.get("client_id", claims.get("azp"))
    jti = claims.get("jti")
    cnf = claims.get("cnf")
    jkt: str | None = None
    if cnf is not None:
        if not isinstance(cnf, dict) or not isinstance(cnf.get("jkt"), str):
            raise InvalidToken("bad-claim", "cnf must carry a jkt thumbprint")
        jkt = cnf["jkt"]
    principal = Principal(
        subject=subject,
        issuer=issuer,
        tenant=tenant,
        roles=roles,
        scopes=scopes,
        other_scopes=other,
        fhir_user=_fhir_user(claims.get(names.fhir_user)),
        purpose_of_use=purposes,
        auth=AuthContext(amr=amr, acr=acr, auth_time=auth_time),
        client_id=None if client_id is None else _opaque(client_id, "client_id"),
        token_id=_token_id(jti),
        issued_at=_optional_int(claims.get("iat"), "iat") or 0,
        expires_at=_optional_int(claims.get("exp"), "exp") or 0,
        dpop_jkt=jkt,
    )
    _check_auditable(principal)
    return principal


_TENANT = TypeAdapter(OpaqueId)


def _check_auditable(principal: Principal) -> None:
    # Every principal ends up in audit events; the event model refuses ids that have the shape
    # of PHI (an e-mail address as a subject, a date as a tenant). Refuse such a token here,
    # with a 401, rather than fail later while recording what the caller did.
    try:
        Agent(
            who=principal.subject,
            roles=tuple(role.value for role in principal.roles),
            client_id=principal.client_id,
            purpose_of_use=principal.purpose_of_use,
        )
        _TENANT.validate_python(principal.tenant)
        if principal.fhir_user is not None:
            _REFERENCE_ADAPTER.validate_python(principal.fhir_user)
    except ValidationError as exc:
        raise InvalidToken(
            "unauditable-claim", "the token carries an id phivault cannot audit"
        ) from exc


_REFERENCE_ADAPTER = TypeAdapter(Reference)


_ROLES = frozenset(r.value for r in Role)


def _opaque(value: object, claim: str) -> str:
    if not isinstance(value, str) or not _OPAQUE_ID.match(value):
        raise InvalidToken("bad-claim", f"the {claim} claim is missing or not an opaque id")
    return value


def _token_id(value: object) -> str | None:
    # Only used to tell sessions apart (hashed), never recorded: any short string will do.
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise InvalidToken("bad-claim", "the jti claim is not a short string")
    return value


def _code(value: str, claim: str) -> str:
    if not _CODE.match(value):
        raise InvalidToken("bad-claim", f"the {claim} claim holds a value that is not a code")
    return value


def _strings(value: object, claim: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidToken("bad-claim", f"the {claim} claim is not a string or a list of strings")


def _optional_int(value: object, claim: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken("bad-claim", f"the {claim} claim is not a number")
    return int(value)


def _fhir_user(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidToken("bad-claim", "fhirUser is not a string")
    match = _REFERENCE.search(value)
    if match is None or "/_history/" in value:
        raise InvalidToken("bad-claim", "fhirUser is not a FHIR resource reference")
    return match["ref"]
