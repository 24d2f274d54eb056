"""``phivault token``: sign a development access token with the dev identity provider.

For the demo and for tests only. It works in a data directory made with ``phivault init
--dev`` and refuses production settings: the dev provider signs whatever it is asked to, so
its tokens prove nothing about who holds them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from phivault.cli._common import (
    DataDirOption,
    JsonOption,
    Output,
    fail,
    load_settings_or_fail,
    open_data_dir,
)
from phivault.datadir import default_data_dir
from phivault.errors import PhivaultError

__all__ = ["token"]


def token(
    *,
    role: Annotated[
        list[str],
        typer.Option("--role", help="A job function (repeatable): clinician, nurse, admin, ..."),
    ],
    user: Annotated[
        str | None, typer.Option("--user", help="The subject (default: the role's demo user).")
    ] = None,
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant id.")] = "default",
    fhir_user: Annotated[
        str | None, typer.Option("--fhir-user", help="e.g. Practitioner/123 or Patient/456.")
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="A SMART v2 scope (repeatable; default: the role's)."),
    ] = None,
    mfa: Annotated[bool, typer.Option("--mfa", help="Claim a multi-factor sign-in now.")] = False,
    purpose: Annotated[
        list[str] | None, typer.Option("--purpose", help="Purpose of use code (repeatable).")
    ] = None,
    ttl: Annotated[int, typer.Option("--ttl", min=1, max=86400, help="Lifetime in seconds.")] = 900,
    dpop_key: Annotated[
        Path | None,
        typer.Option("--dpop-key", help="Bind the token to this key (JWK or PEM file; RFC 9449)."),
    ] = None,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
) -> None:
    """Print a development access token (dev data directories only)."""
    output = Output(json_mode=json_mode)
    from phivault.identity.dev_provider import (
        DEMO_USERS,
        DevIdentityProvider,
        DevProviderWarning,
        dpop_thumbprint,
    )
    from phivault.identity.principal import Role

    settings = load_settings_or_fail(output)
    try:
        roles = [Role(name) for name in role]
    except ValueError:
        fail(output, "unknown role; use one of: " + ", ".join(r.value for r in Role), kind="usage")
    demo = DEMO_USERS[roles[0]]
    jkt = None
    try:
        if dpop_key is not None:
            try:
                jkt = dpop_thumbprint(dpop_key.read_text())
            except OSError:
                fail(output, f"cannot read {dpop_key}", kind="usage")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DevProviderWarning)  # said below, once
            provider = DevIdentityProvider.open(open_data_dir(output, data_dir), settings)
        subject = user or demo.user
        access_token = provider.mint(
            user=subject,
            roles=roles,
            audience=settings.identity.audience,
            tenant=tenant,
            fhir_user=fhir_user if fhir_user is not None else (None if user else demo.fhir_user),
            scopes=scope if scope else demo.scopes,
            mfa=mfa,
            purpose_of_use=purpose or (),
            ttl_s=ttl,
            dpop_jkt=jkt,
        )
    except PhivaultError as exc:
        fail(output, str(exc), kind="token")
    if json_mode:
        output.json(
            {
                "ok": True,
                "access_token": access_token,
                "token_type": "DPoP" if jkt else "Bearer",
                "expires_in": ttl,
                "issuer": provider.issuer,
                "subject": subject,
                "roles": [r.value for r in roles],
            }
        )
        return
    output.err.print("[yellow]development token: signed by the dev identity provider[/]")
    typer.echo(access_token)
