"""The `pti` command line.

Thin by design: each command lives in `pti/commands/<name>.py`, imports torch and the engine
inside the command body (so `pti --help` appears in well under a second) and maps its options
onto the engine's config dataclasses.

One contract for every command, kept by `run()`:
- a usage error (unknown option, bad or out-of-range value, missing argument) prints the usage
  message and exits 2;
- a `PTIError` prints one line and exits 1;
- Ctrl-C or SIGTERM prints "interrupted" and the complete files that were kept, and exits 130;
  temporary files are removed on the way out, so nothing half-written is ever left;
- nothing prints a traceback unless `--debug` is given (anywhere on the command line).
"""

from __future__ import annotations

import errno
import importlib
import sys
import traceback

import typer

from pti._version import __version__

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
    "pti.commands.render",
    "pti.commands.export",
    "pti.commands.studio",
    "pti.commands.directions",
    "pti.commands.align",
    "pti.commands.generate",
    "pti.commands.info",
    "pti.commands.convert",
    "pti.commands.import_",
    "pti.commands.weights",
    "pti.commands.bench",
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"pti {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks for errors (accepted anywhere on the command line)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """`--debug` is taken out of the arguments by `run()` before parsing; this option documents it."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def _click_exceptions():
    """Click's exception module: Typer >= 0.26 ships its own copy of click, older Typer uses click."""
    try:
        from typer._click import exceptions
    except ImportError:  # Typer < 0.26
        from click import exceptions
    return exceptions


def _error(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def _show_usage_error(e) -> None:
    try:
        from typer import rich_utils

        rich_utils.rich_format_error(e)
    except Exception:  # noqa: BLE001  older Typer, or no rich: click's plain format
        e.show()


def _interrupted(start: int) -> int:
    from pti.signals import how_interrupted
    from pti.errors import Interrupted
    from pti.fsutil import discard_pending, written_since

    discard_pending()  # a temporary file the interrupt caught before its own cleanup could run
    typer.secho(str(Interrupted(written_since(start), how_interrupted())), fg=typer.colors.YELLOW, err=True)
    return 130


def run(argv: list[str]) -> int:
    """Run the CLI on `argv` (without the program name) and return the exit code. A command that
    fails or is interrupted leaves none of the folders it created empty."""
    from pti.fsutil import created_mark, remove_empty_created

    position = created_mark()
    code = _run(argv)
    if code != 0:
        remove_empty_created(position)
    return code


def _run(argv: list[str]) -> int:
    from pti.errors import Interrupted, PTIError
    from pti.fsutil import mark

    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:cut]
    argv = [a for i, a in enumerate(argv) if not (i < cut and a == "--debug")]
    click_exc = _click_exceptions()
    start = mark()
    try:
        rv = app(args=argv, prog_name="pti", standalone_mode=False)
        # Typer turns a KeyboardInterrupt inside a command into Exit(130) and, outside standalone
        # mode, returns that code.
        return _interrupted(start) if rv == 130 else (rv if isinstance(rv, int) else 0)
    except click_exc.UsageError as e:  # NoSuchOption, BadParameter, MissingParameter, no args = help
        _show_usage_error(e)
        return e.exit_code
    except click_exc.ClickException as e:
        e.show()
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        _error("aborted")
        return 1
    except (KeyboardInterrupt, Interrupted):  # the ledger knows every complete file of this run
        if debug:
            traceback.print_exc()
        return _interrupted(start)
    except PTIError as e:
        if debug:
            traceback.print_exc()
        _error(str(e))
        return e.exit_code
    except BrokenPipeError:  # `pti ... | head`: the reader left; say nothing more
        _silence_stdout()
        return 1
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        _error(f"{e.strerror or errno.errorcode.get(e.errno or 0, type(e).__name__)}{where}")
        return 1
    except Exception as e:  # a bug of ours: still one line, the traceback on request
        if debug:
            traceback.print_exc()
        _error(f"{type(e).__name__}: {e} (this is a bug in pti; run with --debug for the traceback)")
        return 1


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
