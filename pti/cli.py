"""The `pti` command line.

Thin by design: each command lives in `pti/commands/<name>.py`, imports torch and the engine
inside the command body (so `pti --help` appears in well under a second), maps its options onto
the engine's config dataclasses, and lets `PTIError`s become one-line messages.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from pti import __version__

app = typer.Typer(
    name="pti",
    help="Pivotal Tuning Inversion on StyleGAN2: align, invert, tune, edit and render real photos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module exposes `register(app)`. Order is the order in `pti --help`.
COMMAND_MODULES = [
    "pti.commands.demo",
    "pti.commands.tune",
    "pti.commands.align",
    "pti.commands.generate",
    "pti.commands.info",
    "pti.commands.convert",
    "pti.commands.weights",
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"pti {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    if debug:
        os.environ["PTI_DEBUG"] = "1"


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Console-script entry: runs the app and turns PTIErrors into one-line messages."""
    from pti.errors import PTIError

    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except PTIError as e:
        if debug:
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(1)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if debug:
            raise
        typer.secho(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
