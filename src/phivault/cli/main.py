"""The ``phivault`` command: assembles the command groups of each part (one module each)."""

from __future__ import annotations

import typer

from phivault.cli import breakglass as breakglass_cmd
from phivault.cli import init as init_cmd
from phivault.cli import keys as keys_cmd
from phivault.cli import ledger as ledger_cmd
from phivault.cli import load as load_cmd
from phivault.cli import policy as policy_cmd
from phivault.cli import sequencer as sequencer_cmd
from phivault.cli import serve as serve_cmd
from phivault.cli import token as token_cmd

app = typer.Typer(
    name="phivault",
    help="phivault: PHI with compliance as a property of the architecture.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # never print locals (they may hold PHI or keys)
)
app.command("init")(init_cmd.init)
app.add_typer(ledger_cmd.app, name="ledger")
app.add_typer(keys_cmd.app, name="keys")
app.command("token")(token_cmd.token)
app.command("serve")(serve_cmd.serve)
app.add_typer(policy_cmd.app, name="policy")
app.command("load")(load_cmd.load)
app.add_typer(breakglass_cmd.app, name="breakglass")
app.command("sequencer")(sequencer_cmd.sequencer)


def run() -> None:
    app()


if __name__ == "__main__":
    run()
