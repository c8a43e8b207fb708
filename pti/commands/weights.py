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


# Columns of `pti weights list` piped: (key, header). A terminal's table: _TERMINAL below.
_COLUMNS = (
    ("name", "name"),
    ("status", "status"),
    ("bytes", "bytes"),
    ("sha256", "sha256"),
    ("checksum", "checksum"),  # where the sha256 comes from
    ("format", "format"),
    ("path", "path"),
    ("source", "source"),
    ("license", "license"),
    ("used_by", "used by"),
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
            sha, origin = (
                ("unknown (first-use record unreadable)" if unreadable else "unknown (recorded on first use)"),
                [],
            )
        if e.sha256 is None and e.sha256_prefix:
            origin.append(f"published prefix {e.sha256_prefix}")
        if status != "missing":
            size = path.stat().st_size
        else:  # the published size, else the first copy's
            size = e.size if e.size is not None or rec is None else rec.size
        rows.append(
            {
                "name": e.name,
                "status": status,
                "bytes": size,
                "sha256": sha,
                "checksum": ", ".join(origin) or "-",
                "digest": e.sha256
                if e.sha256 is not None
                else None
                if rec is None
                else rec.sha256,  # None: not known yet
                "format": f"{e.kind}, runs code when loaded" if e.executes_code else e.kind,
                "path": str(path),
                "file": e.filename,
                "source": e.url,
                "license": e.license,
                "used_by": e.used_by,
                "kind": e.kind,
                "executes_code": e.executes_code,
            }
        )
    return rows


def _print_plain(rows: list[dict]) -> None:
    """Tab-separated, a header then one line per entry, every value whole: for pipes, grep and cut."""

    def cell(v) -> str:
        return ("unknown" if v is None else str(v)).replace("\t", " ").replace("\n", " ")

    typer.echo("\t".join(head for _, head in _COLUMNS))
    for r in rows:
        typer.echo("\t".join(cell(r[key]) for key, _ in _COLUMNS))


# What a terminal shows (key, header, importance, one line): name, status, size and a digest (prefix) always; then
# while they fit, whether it runs code, what uses it, the file, the checksum's origin, the source (pti.commands.tables).
_TERMINAL = (
    ("name", "name", None, True),
    ("status", "status", None, True),
    ("size", "size", None, True),
    ("digest", "sha256", None, True),
    ("format", "format", 6, False),
    ("used_by", "used by", 5, False),
    ("file", "file", 4, True),
    ("checksum", "checksum", 3, False),
    ("source", "source", 2, True),
)
# Tried in turn: the boxed table, then one without borders (narrow terminals).
_STYLES = (dict(), dict(box=None, pad_edge=False, header_style="bold underline"))
SHA_PREFIX = 12  # hex digits of a digest shown when the whole one does not fit; `--json` and piped output have all 64


def _print_table(rows: list[dict], cache_dir: Path, console) -> None:
    """A table laid out for the terminal's width: no value is broken inside a word; a digest is shortened and the
    columns that do not fit are left out (named under the table: `--json` and piped output have every value)."""
    from rich.text import Text

    from pti.commands.tables import ALWAYS, Column, fit_table, print_wrapped

    console.print(f"weights cache: {cache_dir}", soft_wrap=True, markup=False, highlight=False)
    columns = [Column(key, head, ALWAYS if keep is None else keep, atomic) for key, head, keep, atomic in _TERMINAL]

    def cells(full_digest: bool) -> list[dict]:
        out = []
        for r in rows:
            status, sha = r["status"], r["digest"]
            colour = "green" if status == "cached" else "yellow" if status.startswith(("missing", "cached")) else "red"
            short = sha is not None and not full_digest
            unknown = r["sha256"].partition(" ")[2].strip("()")  # "unknown (recorded on first use)": the reason
            out.append(
                {
                    **{
                        key: Text(str(r.get(key, ""))) for key, *_ in _TERMINAL
                    },  # Text: no markup parsing of the values
                    "status": Text(status, style=colour),
                    "size": Text(_human(r["bytes"])),
                    "digest": Text("unknown" if sha is None else sha[:SHA_PREFIX] + "\u2026" if short else sha),
                    "checksum": Text(
                        ", ".join(
                            filter(
                                None, [unknown if sha is None else "", "" if r["checksum"] == "-" else r["checksum"]]
                            )
                        )
                        or "-"
                    ),
                    "format": Text(r["format"], style="bold red" if r["executes_code"] else ""),
                }
            )
        return out

    table, left_out = fit_table(console, columns, cells(full_digest=True))
    shortened = table is None or left_out
    for style in _STYLES if shortened else ():  # the whole digest only once everything else fits
        table, left_out = fit_table(console, columns, cells(full_digest=False), **style)
        if table is not None:
            break
    if table is None:  # narrower than name, status, size and digest: every value on a line of its own, whole
        for r, c in zip(rows, cells(full_digest=True)):
            console.print(Text(r["name"], style="bold"))
            for key, head, *_ in _TERMINAL[1:]:
                console.print(Text.assemble(f"  {head}: ", c[key]), soft_wrap=True)
    else:
        console.print(table)
    if table is not None and shortened:
        what = ", ".join(c.head for c in left_out)
        print_wrapped(
            console,
            f"sha256 shortened{'; not shown at this width: ' + what if what else ''}. "
            "`pti weights list --json` (or piped output) has every value whole.",
            style="dim",
        )
    for r in rows:
        if r["executes_code"]:
            source = (
                r["source"] if len(r["source"]) <= console.width else f"{_host(r['source'])} (the URL is in --json)"
            )
            print_wrapped(
                console,
                f"note: {r['name']} ({r['file']}) is {r['kind']}, which is code: loading it runs "
                f"what the file contains; take it only from {source}",
            )


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


def _print_json(rows: list[dict], cache_dir: Path) -> None:
    """Every value whole, typed: bytes a number, sha256 the digest or null when no checksum is known yet."""
    import json

    keys = (
        "name",
        "status",
        "bytes",
        "checksum",
        "format",
        "kind",
        "executes_code",
        "path",
        "file",
        "source",
        "license",
        "used_by",
    )
    weights = [{**{k: r[k] for k in keys}, "sha256": r["digest"]} for r in rows]
    typer.echo(json.dumps({"cache_dir": str(cache_dir), "weights": weights}, indent=2))


@weights_app.command("list")
def list_cmd(
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print every value whole as JSON (the full sha256, source URL and license included)."
        ),
    ] = False,
) -> None:
    """Show every known file: status, size, checksum, format, where it comes from and what uses it.

    In a terminal, a table fitted to its width; piped, one tab-separated line per file, every value whole; --json: JSON.
    """
    from pti.engine.weights import default_registry

    reg = default_registry()
    rows = _rows(reg)
    if as_json:
        _print_json(rows, reg.cache_dir)
    elif sys.stdout.isatty():
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
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Download again even when cached (a file with a first-use checksum must still match it)."
        ),
    ] = False,
) -> None:
    """Download files into the cache, checking their checksums."""
    from rich.markup import escape
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
            typer.echo(
                f"{entry.name}: already cached at {reg.resolve(name)}"
            )  # resolve holds it to its first-use record
            continue
        columns = (TextColumn(escape(entry.filename)), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(entry.filename, total=entry.size)

            def report(done: int, total: int | None, task=task, bar=bar) -> None:
                bar.update(task, completed=done, total=total)

            path = reg.fetch(name, progress=report, force=force)
        typer.echo(f"{entry.name}: saved {path}")


@weights_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="A copy of a known weights file.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Registry name (guessed from the filename or checksum).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Accept a file whose sha256 differs from the one the cache "
            "recorded on first use, replacing the cached copy.",
        ),
    ] = False,
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
