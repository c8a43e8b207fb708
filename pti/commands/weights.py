"""`pti weights list|path|fetch|import`: the weights cache from the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

weights_app = typer.Typer(
    name="weights",
    help="Known weight files: list them, find them, download them, or import a copy you already have.",
    no_args_is_help=True,
)


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@weights_app.command("list")
def list_cmd() -> None:
    """Show every known file: name, size, whether it is cached, and where it comes from."""
    from rich.console import Console
    from rich.table import Table

    from pti.engine.weights import default_registry

    reg = default_registry()
    table = Table(title=f"weights cache: {reg.cache_dir}")
    for col in ("name", "file", "size", "status", "source", "used by"):
        table.add_column(col, overflow="fold")
    for e in reg.entries.values():
        status = reg.status(e.name)
        colour = {"cached": "green", "missing": "yellow"}.get(status, "red")
        size = reg.path(e.name).stat().st_size if status != "missing" else e.size
        table.add_row(e.name, e.filename, _human(size), f"[{colour}]{status}[/]", e.url, e.used_by)
    # Wide enough for the URLs when piped; the terminal's own width otherwise.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@weights_app.command("path")
def path_cmd(name: Annotated[str, typer.Argument(help="Registry name, e.g. ffhq or lpips-alex.")]) -> None:
    """Print the cached file's path (error when it is not cached)."""
    from pti.engine.weights import default_registry

    typer.echo(str(default_registry().resolve(name)))


@weights_app.command("fetch")
def fetch_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="Registry names; none with --all.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Fetch every missing file.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Download again even when cached.")] = False,
) -> None:
    """Download files into the cache, checking their checksums."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from pti.engine.weights import default_registry
    from pti.errors import WeightsError

    reg = default_registry()
    if all_:
        names = list(reg.entries)
    if not names:
        raise WeightsError("name at least one file to fetch (see `pti weights list`), or pass --all")
    for name in names:
        entry = reg.get(name)
        if not force and reg.status(name) == "cached":
            typer.echo(f"{entry.name}: already cached at {reg.path(name)}")
            continue
        columns = (TextColumn(entry.filename), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(entry.filename, total=entry.size)

            def report(done: int, total: int | None, task=task, bar=bar) -> None:
                bar.update(task, completed=done, total=total)

            path = reg.fetch(name, progress=report, force=force)
        typer.echo(f"{entry.name}: saved {path}")


@weights_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="A copy of a known weights file.")],
    name: Annotated[str | None, typer.Option("--name", help="Registry name (guessed from the filename or checksum).")] = None,
) -> None:
    """Copy a file you already have into the cache after checking its checksum."""
    from pti.engine.weights import default_registry

    path = default_registry().import_file(file, name=name)
    typer.echo(f"imported {file} -> {path}")


def register(app: typer.Typer) -> None:
    """Add the `weights` command group to the main app."""
    app.add_typer(weights_app, name="weights")
