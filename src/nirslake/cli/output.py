"""How the ``nirslake`` command prints: tables that stay readable (cells cut, columns that do
not fit named), listings with their total, ``--json`` and ``--csv``, warnings as one line each,
and progress on a terminal.

The commands decide what to show; this module alone decides how it looks.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
import sys
import time
from typing import Any

import polars as pl

from ..api.jsonable import dumps, rows

MAX_CELL = 34  # an id (32 hex characters) fits whole; longer text is cut with "…"
GAP = "  "


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        value = "[" + ", ".join(_cell(v) for v in value) + "]"
    elif isinstance(value, (list, dict)):
        value = json.dumps(value, default=str)
    text = " ".join(str(value).split())  # one line per row, whatever the cell holds
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def width() -> int:
    """The terminal's width; 200 when the output is not a terminal (a file, a pipe, a test)."""
    return shutil.get_terminal_size((200, 24)).columns if sys.stdout.isatty() else 200


def table(frame: pl.DataFrame, max_width: int | None = None) -> tuple[str, list[str]]:
    """``frame`` as aligned text, every cell on one line and cut to ``MAX_CELL`` characters;
    columns are kept from the left while they fit in ``max_width``. Returns the text and the
    names of the columns left out."""
    max_width = max_width or width()
    cells = [[_cell(v) for v in frame.get_column(c).to_list()] for c in frame.columns]
    shown, used = [], 0
    for i, name in enumerate(frame.columns):
        w = max([len(name[:MAX_CELL])] + [len(v) for v in cells[i]])
        if shown and used + len(GAP) + w > max_width:
            break
        shown.append((i, w))
        used += w + (len(GAP) if len(shown) > 1 else 0)
    names = [frame.columns[i][:MAX_CELL] for i, _ in shown]
    numeric = [frame.dtypes[i].is_numeric() for i, _ in shown]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, (_, w), num in zip(values, shown, numeric)]
        return GAP.join(parts).rstrip()

    out = [line(names), line(["-" * w for _, w in shown])]
    out += [line([cells[i][r] for i, _ in shown]) for r in range(frame.height)]
    return "\n".join(out), frame.columns[len(shown):]


def hidden_note(hidden: list[str], room: int = 120) -> str:
    """The line under a table that names the columns left out: as many names as fit in ``room``
    characters, then how many more, so the line stays short however wide the table is."""
    names, used = [], 0
    for name in hidden:
        if names and used + len(name) + 2 > room:
            break
        names.append(name)
        used += len(name) + 2
    rest = f" and {len(hidden) - len(names)} more" if len(names) < len(hidden) else ""
    return f"({len(hidden)} more column(s) not shown: {', '.join(names)}{rest}; --json or --csv shows them all)"


def print_frame(frame: pl.DataFrame, title: str | None = None) -> None:
    """A whole frame as a table (what the demo prints)."""
    if title:
        print(title)
    if frame.height == 0:
        print("(no rows)")
        return
    text, hidden = table(frame)
    print(text)
    if hidden:
        print(hidden_note(hidden))


def csv_text(frame: pl.DataFrame) -> str:
    """CSV of ``frame``; nested values (lists, structs) as JSON text, which CSV cannot hold."""
    nested = [c for c, t in frame.schema.items() if t.is_nested() or t == pl.Object]
    if nested:
        frame = frame.with_columns(
            pl.Series(c, [None if v is None else dumps(v) for v in frame.get_column(c).to_list()], dtype=pl.String)
            for c in nested
        )
    return frame.write_csv()


def listing(frame: pl.DataFrame, args: Any, what: str = "rows", total: int | None = None,
            note: str | None = None, extra: dict | None = None, paged: bool = True) -> None:
    """One page of a listing: ``frame`` holds every row (or ``total`` says how many there are);
    ``args.limit``/``args.offset`` pick the page, ``args.json``/``args.csv`` the format.

    Text ends with ``showing A-B of TOTAL <what>`` (and how to see more); JSON is
    ``{"total", "offset", "limit", "items"}`` plus ``extra``, as the web API pages are."""
    offset = getattr(args, "offset", 0) or 0
    limit = getattr(args, "limit", None)
    total = frame.height if total is None else total
    page = frame.slice(offset, limit) if paged else frame
    if getattr(args, "json", False):
        print(dumps({"total": total, "offset": offset, "limit": limit, **(extra or {}), "items": rows(page)}, indent=1))
        return
    if getattr(args, "csv", False):
        sys.stdout.write(csv_text(page))
        return
    if note:
        print(note)
    if page.height:
        text, hidden = table(page)
        print(text)
        if hidden:
            print(hidden_note(hidden))
    if total == 0:
        print(f"no {what}")
    elif page.height == 0:
        print(f"no {what} from {offset + 1}: there are {total}")
    else:
        more = total - offset - page.height
        hint = f" (--offset {offset + page.height} for the next, --limit to show more)" if more > 0 else ""
        print(f"showing {offset + 1}-{offset + page.height} of {total} {what}{hint}")


def record(kind: str, value: dict, args: Any) -> None:
    """One record (``show``): JSON with ``--json``, else ``field: value`` lines, nested parts indented."""
    if getattr(args, "json", False):
        print(dumps({"kind": kind, **value}, indent=1))
        return
    print(f"{kind} {value.get(kind + '_id', '')}".rstrip())
    _lines(value, "  ")


def _lines(value: dict, indent: str) -> None:
    for key, item in value.items():
        if isinstance(item, dict) and item:
            print(f"{indent}{key}:")
            _lines(item, indent + "  ")
        elif isinstance(item, list) and item and all(isinstance(x, dict) for x in item):
            print(f"{indent}{key}: {len(item)}")
            text, hidden = table(pl.DataFrame(item, infer_schema_length=None), width() - len(indent) - 2)
            for line in text.splitlines():
                print(f"{indent}  {line}")
            if hidden:
                print(f"{indent}  ({len(hidden)} more column(s): --json shows them)")
        else:
            print(f"{indent}{key}: {_cell(item) if not isinstance(item, str) else item}")


def print_warning(message: Warning | str, *_where: object, **_how: object) -> None:
    print(f"nirslake: warning: {message}", file=sys.stderr)


STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]")


class Progress:
    """Progress lines of long work. Each line is printed (stdout); on a terminal, a bar on stderr
    below them shows how far the work is (``[i/N]`` at a line's start moves it; other lines only
    print). Off a terminal (a pipe, a file, a test) nothing but the lines is written."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.on = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.total, self.started = 0, 0, time.monotonic()
        self.drawn = False

    def __call__(self, line: str) -> None:
        self._clear()
        print(line, flush=True)
        step = STEP.match(line)
        if step:
            self.done, self.total = int(step.group(1)), int(step.group(2))
        self._draw()

    def _clear(self) -> None:
        if self.on and self.drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.drawn = False

    def _draw(self) -> None:
        if not self.on or not self.total:
            return
        cols = 30
        filled = int(cols * self.done / self.total)
        elapsed = time.monotonic() - self.started
        self.stream.write(f"{self.label} [{'#' * filled}{'.' * (cols - filled)}] {self.done}/{self.total} {elapsed:.0f} s")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        self._clear()
