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


# Columns of `pti weights list`: (key, header when piped, header in a terminal).
_COLUMNS = (
    ("name", "name", "name"),
    ("status", "status", "status"),
    ("bytes", "bytes", "size"),
    ("sha256", "sha256", "sha256"),
    ("checksum", "checksum", None),  # where the sha256 comes from; under the digest in a terminal
    ("format", "format", "format"),
    ("path", "path", "file"),
    ("source", "source", "source"),
    ("license", "license", None),
    ("used_by", "used by", "used by"),
)


def _rows(reg) -> list[dict]:
    """Every value `list` shows, one dict per entry (cheap: a stat and a small record each, no hashing)."""
    from pti.errors import WeightsError

    rows = []
    for e in reg.entries.values():
        status, path = reg.status(e.name), reg.path(e.name)
        try:
            rec, unreadable = (reg.record(e.name) if e.trust_on_first_use else None), False
        except WeightsError:
            rec, unreadable = None, True
        if e.sha256 is not None:
            sha, origin = e.sha256, ["published"]
        elif rec is not None:
            sha, origin = rec.sha256, [f"recorded on first use {rec.recorded}"]
        else:
            sha, origin = ("unknown (first-use record unreadable)" if unreadable else "unknown (recorded on first use)"), []
        if e.sha256 is None and e.sha256_prefix:
            origin.append(f"published prefix {e.sha256_prefix}")
        if status != "missing":
            size = path.stat().st_size
        else:  # the published size, else the first copy's
            size = e.size if e.size is not None or rec is None else rec.size
        rows.append({
            "name": e.name, "status": status, "bytes": size, "sha256": sha, "checksum": ", ".join(origin) or "-",
            "format": f"{e.kind}, runs code when loaded" if e.executes_code else e.kind,
            "path": str(path), "file": e.filename, "source": e.url, "license": e.license, "used_by": e.used_by,
            "kind": e.kind, "executes_code": e.executes_code,
        })
    return rows


def _print_plain(rows: list[dict]) -> None:
    """Tab-separated, a header then one line per entry, every value whole: for pipes, grep and cut."""
    def cell(v) -> str:
        return ("unknown" if v is None else str(v)).replace("\t", " ").replace("\n", " ")

    typer.echo("\t".join(head for _, head, _ in _COLUMNS))
    for r in rows:
        typer.echo("\t".join(cell(r[key]) for key, _, _ in _COLUMNS))


def _print_table(rows: list[dict], cache_dir: Path, console) -> None:
    """A Rich table for a terminal; every column folds, so narrow terminals wrap values instead of cutting them."""
    from rich.table import Table
    from rich.text import Text

    console.print(f"weights cache: {cache_dir}", soft_wrap=True, markup=False, highlight=False)
    table = Table(show_lines=True)  # folded cells run over several lines: rules keep the entries apart
    for key, _, head in _COLUMNS:
        if head is not None:
            table.add_column(head, overflow="fold")
    for r in rows:
        status = r["status"]
        colour = "green" if status == "cached" else "yellow" if status.startswith(("missing", "cached")) else "red"
        cells = {
            **{key: Text(str(value)) for key, value in r.items()},  # Text: no markup parsing of the values
            "status": Text(status, style=colour),
            "bytes": Text(_human(r["bytes"])),
            "sha256": Text(r["sha256"] if r["checksum"] == "-" else f"{r['sha256']}\n({r['checksum']})"),
            "path": Text(r["file"]),
            "format": Text(r["format"], style="bold red" if r["executes_code"] else ""),
        }
        table.add_row(*(cells[key] for key, _, head in _COLUMNS if head is not None))
    console.print(table)
    for r in rows:
        if r["executes_code"]:
            console.print(f"note: {r['name']} ({r['file']}) is {r['kind']}, which is code: loading it runs what the "
                          f"file contains; take it only from {r['source']}", soft_wrap=True, markup=False, highlight=False)


@weights_app.command("list")
def list_cmd() -> None:
    """Show every known file: status, size, checksum, format, where it comes from and what uses it.

    Piped (not a terminal), one tab-separated line per file with every value whole.
    """
    from pti.engine.weights import default_registry

    reg = default_registry()
    rows = _rows(reg)
    if sys.stdout.isatty():
        from rich.console import Console

        _print_table(rows, reg.cache_dir, Console())
    else:
        _print_plain(rows)


@weights_app.command("path")
def path_cmd(name: Annotated[str, typer.Argument(help="Registry name, e.g. ffhq or lpips-alex.")]) -> None:
    """Print the cached file's path (error when it is not cached)."""
    from pti.engine.weights import default_registry

    typer.echo(str(default_registry().resolve(name)))


@weights_app.command("fetch")
def fetch_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="Registry names; none with --all.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Fetch every missing file.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Download again even when cached (a file with a first-use "
                                                        "checksum must still match it).")] = False,
) -> None:
    """Download files into the cache, checking their checksums."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from pti.engine.weights import NEEDS_DOWNLOAD, default_registry
    from pti.errors import WeightsError

    reg = default_registry()
    if all_:
        names = list(reg.entries)
    if not names:
        raise WeightsError("name at least one file to fetch (see `pti weights list`), or pass --all")
    for name in names:
        entry = reg.get(name)
        if not force and reg.status(name) not in NEEDS_DOWNLOAD:
            typer.echo(f"{entry.name}: already cached at {reg.resolve(name)}")  # resolve holds it to its first-use record
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
    force: Annotated[bool, typer.Option("--force", help="Accept a file whose sha256 differs from the one the cache "
                                                        "recorded on first use, replacing the cached copy.")] = False,
) -> None:
    """Copy a file you already have into the cache after checking its checksum.

    Files with no published checksum are held to the one recorded on their first fetch or import;
    pass --force to replace such a file with a different one on purpose.
    """
    from pti.engine.weights import default_registry

    path = default_registry().import_file(file, name=name, force=force)
    typer.echo(f"imported {file} -> {path}")


def register(app: typer.Typer) -> None:
    """Add the `weights` command group to the main app."""
    app.add_typer(weights_app, name="weights")
