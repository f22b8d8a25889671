"""How the command prints, in-process: readable tables, the progress bar only on a terminal."""

from __future__ import annotations

import io

import polars as pl

from nirslake.cli.output import MAX_CELL, Progress, csv_text, table


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_is_drawn_on_a_terminal_only(capsys):
    term, pipe = Terminal(), io.StringIO()
    for stream in (term, pipe):
        progress = Progress("demo", stream=stream)
        progress("[1/4] first")
        progress("[2/4] second")
        progress.close()
    out = capsys.readouterr().out
    assert out.count("[1/4] first") == 2 and out.count("[2/4] second") == 2, "the lines are printed either way"
    drawn = term.getvalue()
    assert "demo [#######" in drawn and "1/4" in drawn and "2/4" in drawn
    assert drawn.endswith("\r\x1b[2K"), "the bar is cleared at the end"
    assert pipe.getvalue() == "", "no bar off a terminal"


def test_wide_tables_cut_cells_and_name_the_columns_left_out():
    frame = pl.DataFrame({f"column_{i}": ["x" * 80, None] for i in range(12)} | {"n": [1.234567891, float("nan")]})
    text, hidden = table(frame, max_width=120)
    lines = text.splitlines()
    assert all(len(line) <= 120 for line in lines) and len(lines) == 4
    assert "x" * (MAX_CELL - 1) + "…" in lines[2] and "x" * MAX_CELL not in lines[2]
    assert "null" in lines[3]
    assert hidden[-1] == "n" and len(hidden) == 13 - 3
    whole, none_hidden = table(frame.select("n"), max_width=120)
    assert none_hidden == [] and "1.23457" in whole and "NaN" in whole


def test_csv_writes_nested_values_as_json():
    frame = pl.DataFrame({"id": ["a"], "values": [[1.0, 2.0]]})
    assert csv_text(frame).splitlines() == ["id,values", 'a,"[1.0,2.0]"']
