"""How the ``nirslake`` command prints: result frames as text tables, warnings as one line each.

The commands decide what to show; this module alone decides how it looks.
"""

from __future__ import annotations

import sys

import polars as pl


def print_frame(frame: pl.DataFrame, title: str | None = None) -> None:
    if title:
        print(title)
    if frame.height == 0:
        print("(no rows)")
        return
    with pl.Config(tbl_rows=200, tbl_cols=20, fmt_str_lengths=40, tbl_width_chars=200, tbl_hide_dataframe_shape=True):
        print(frame)


def print_warning(message: Warning | str, *_where: object, **_how: object) -> None:
    print(f"nirslake: warning: {message}", file=sys.stderr)
