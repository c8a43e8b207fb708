"""Tables laid out for the terminal's width: a value is never broken inside a word.

Rich shrinks a table that is too wide by folding its cells wherever the width runs out, which cuts
hashes, paths and numbers into pieces ("0.6123->0." / "2368"). `fit_table` decides the widths itself:
each column at least as wide as its longest word (its whole value when the column is `atomic`); the
columns a row cannot do without always, then each other one, most important first, if it still fits.
What is left out is returned, so the caller can say where to see it (`--json`, piped output, a file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

ALWAYS = 1_000_000  # the `keep` of columns that are shown at any width
MAX_LINES = 3  # a wrapping column is shown only where its widest value takes at most this many lines


@dataclass(frozen=True)
class Column:
    key: str  # key of the row's cell
    head: str  # header; wraps between its words
    keep: int = ALWAYS  # importance: when the width runs out, the column with the lowest is left out first
    atomic: bool = True  # the value stays on one line ("244.4 MB", "4/3 (early stop)"); else it wraps between words


def print_wrapped(console: Console, text: str, style: str | None = None) -> None:
    """`text` wrapped at the console's width between words only: a word wider than the line (a long path) is kept
    whole on a line of its own, for the terminal to wrap, never cut (Rich would fold it)."""
    import textwrap

    lines = textwrap.wrap(text, console.width, break_long_words=False, break_on_hyphens=False) or [""]
    for line in lines:
        console.print(Text(line, style=style or ""), soft_wrap=True)


def _words(text: Text | str) -> list[str]:
    return str(text).split() or [""]


def _need(column: Column, cells: list[Text]) -> tuple[int, int]:
    """The narrowest width that breaks no word (no value, for an atomic column) and the width of the widest value."""
    lines = [line for cell in cells for line in (str(cell).splitlines() or [""])]
    widest = max(cell_len(line) for line in lines)
    longest_word = max(cell_len(w) for cell in [*cells, Text(column.head)] for w in _words(cell))
    # A wrapping column narrower than a third of its widest value makes rows of many lines: not worth showing.
    least = max(widest if column.atomic else -(-widest // MAX_LINES), longest_word)
    return least, max(widest, longest_word)


def _overhead(console: Console, n: int, table_options: dict) -> int:
    """Borders and padding of an `n`-column table: its measured width with every column 1 wide, less n."""
    probe = Table(**table_options)
    for _ in range(n):
        probe.add_column(width=1)
    return Measurement.get(console, console.options, probe).maximum - n


def fit_table(
    console: Console,
    columns: list[Column],
    rows: list[Mapping[str, Text | str]],
    width: int | None = None,
    **table_options,
) -> tuple[Table | None, list[Column]]:
    """A table of `rows` no wider than `width` (the console's by default), and the columns left out.

    None (and every optional column) when even the `ALWAYS` columns do not fit: the caller prints a list.
    """
    width = console.width if width is None else width
    cells = {c.key: [r[c.key] if isinstance(r[c.key], Text) else Text(str(r[c.key])) for r in rows] for c in columns}
    need = {c.key: _need(c, cells[c.key]) for c in columns}

    def spare(cols: list[Column]) -> int:
        return width - _overhead(console, len(cols), table_options) - sum(need[c.key][0] for c in cols)

    chosen = [c for c in columns if c.keep == ALWAYS]
    if spare(chosen) < 0:
        return None, [c for c in columns if c.keep != ALWAYS]
    for extra in sorted((c for c in columns if c.keep != ALWAYS), key=lambda c: -c.keep):  # most important first
        if spare([*chosen, extra]) >= 0:
            chosen.append(extra)
    shown = [c for c in columns if c in chosen]  # in the caller's order
    room = spare(shown)
    widths = {c.key: need[c.key][0] for c in shown}
    while room > 0:  # the room left widens the column whose widest value takes the most lines
        lines = {c.key: -(-need[c.key][1] // widths[c.key]) for c in shown if widths[c.key] < need[c.key][1]}
        if not lines:
            break
        widths[max(lines, key=lines.get)] += 1  # a tie: the first, i.e. the leftmost of them
        room -= 1
    table = Table(**table_options)
    for c in shown:
        table.add_column(Text(c.head), width=widths[c.key], overflow="fold")
    for i in range(len(rows)):
        table.add_row(*(cells[c.key][i] for c in shown))
    return table, [c for c in columns if c not in chosen]
