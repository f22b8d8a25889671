"""The ``nirslake`` command: every command's real output, one-line errors with exit code 2,
no side effects on a missing workspace, and the installed console script."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from nirslake import WorkspaceStore, cli
from nirslake.query import catalog
from nirslake.cli.demo import run_demo
from nirslake.lake.storage import Storage

BIN = Path(sys.executable).parent
NIRSLAKE = BIN / "nirslake"
COMMANDS = ("demo", "runs", "pipelines", "chains", "predictions", "show", "top", "leaderboard", "compare", "sql", "catalog",
            "shell", "export", "import", "predict", "delete", "gc", "vacuum", "compact", "checkpoint", "check",
            "mark-failed", "serve", "plot", "push", "pull")
ID = re.compile(r"\b[0-9a-f]{32}\b")


@pytest.fixture
def demo_ws(workspace) -> str:
    """The workspace after a quick demo sweep: 2 datasets, 8 pipelines, 72 predictions."""
    run_demo(workspace, quick=True)
    return workspace


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{err}"
    assert lines[0].startswith("nirslake: error: "), lines[0]
    return lines[0]


def _exists(workspace: str) -> bool:
    storage = Storage(workspace)
    return storage.fs.exists(storage.root)


# --------------------------------------------------------------------------- demo


def test_demo_quick_prints_progress_leaderboard_and_counts(workspace, capsys):
    code, out, err = run(["demo", "--quick", "-w", workspace], capsys)
    assert code == 0, err
    with WorkspaceStore(workspace) as store:
        n = store.query_predictions().height
        board = store.leaderboard(1)
        runs = store.list_runs()
    assert n == 72
    assert runs["name"].to_list() == ["nirs_demo_sweep"] and runs["status"].to_list() == ["completed"]
    assert "[1/8] wheat_protein" in out and "[8/8] corn_moisture" in out
    assert "Leaderboard" in out
    for dataset in ("wheat_protein", "corn_moisture"):
        assert dataset in out
    for row in board.rows(named=True):  # each dataset's winner is in the printed leaderboard
        assert row["model_name"] in out and row["preprocessings"] in out
    assert f"8 pipelines, {n} predictions written" in out
    assert f"the workspace now holds {n} predictions" in out
    catalog_path = os.path.join(Storage(workspace).root, "catalog.duckdb")
    assert f"-readonly {catalog_path}" in out.strip().splitlines()[-1]


def test_demo_twice_adds_a_second_run(demo_ws, capsys):
    code, out, err = run(["demo", "--quick", "-w", demo_ws], capsys)
    assert code == 0, err
    assert "the workspace now holds 144 predictions" in out


# --------------------------------------------------------------------------- runs


def test_runs_lists_names_ids_and_statuses_newest_first(demo_ws, capsys, make_pipeline):
    with WorkspaceStore(demo_ws) as store:
        demo_run = store.list_runs()["run_id"].item()
        ids = make_pipeline(store, dataset_name="corn_m5", run_name="protein_sweep")
        store.fail_run(ids.run_id, "out of memory")

    code, out, err = run(["runs", "-w", demo_ws], capsys)
    assert code == 0, err
    assert demo_run in out and ids.run_id in out
    assert "nirs_demo_sweep" in out and "protein_sweep" in out
    assert "completed" in out and "failed" in out
    assert out.index("protein_sweep") < out.index("nirs_demo_sweep"), "runs must be listed newest first"

    code, out, _ = run(["runs", "-w", demo_ws, "--status", "failed"], capsys)
    assert code == 0
    assert "protein_sweep" in out and "nirs_demo_sweep" not in out

    code, out, _ = run(["runs", "-w", demo_ws, "--dataset", "wheat_protein"], capsys)
    assert code == 0
    assert ID.findall(out) == [demo_run]

    code, out, _ = run(["runs", "-w", demo_ws, "--limit", "1"], capsys)
    assert code == 0
    assert ID.findall(out) == [ids.run_id]


def test_runs_on_an_empty_workspace_says_no_rows(store, workspace, capsys):
    code, out, err = run(["runs", "-w", workspace], capsys)
    assert code == 0, err
    assert out.strip() == "no runs"


# --------------------------------------------------------------------------- top


def _best_val(workspace: str, descending: bool = False) -> pl.DataFrame:
    """Per dataset, the val prediction with the best val_score, computed with polars."""
    with WorkspaceStore(workspace) as store:
        val = store.query_predictions(partition="val")
    return (
        val.sort("val_score", descending=descending)
        .group_by("dataset_name", maintain_order=True)
        .first()
        .sort("dataset_name")
    )


def test_top_prints_the_best_prediction_of_each_dataset(demo_ws, capsys):
    best = _best_val(demo_ws)
    code, out, err = run(["top", "-w", demo_ws, "-n", "1", "--per-fold"], capsys)
    assert code == 0, err
    assert sorted(ID.findall(out)) == sorted(best["prediction_id"].to_list())
    for row in best.rows(named=True):
        assert row["dataset_name"] in out and row["model_name"] in out
    assert "val_score" in out


def test_top_filters_one_dataset_and_honours_descending(demo_ws, capsys):
    code, out, err = run(["top", "-w", demo_ws, "-n", "3", "--dataset", "corn_moisture", "--per-fold"], capsys)
    assert code == 0, err
    assert len(ID.findall(out)) == 3
    assert "corn_moisture" in out and "wheat_protein" not in out

    worst = _best_val(demo_ws, descending=True)
    code, out, err = run(["top", "-w", demo_ws, "-n", "1", "--descending", "--per-fold"], capsys)
    assert code == 0, err
    assert sorted(ID.findall(out)) == sorted(worst["prediction_id"].to_list())


def test_top_test_partition_lists_only_test_rows(demo_ws, capsys):
    code, out, err = run(["top", "-w", demo_ws, "-n", "2", "--partition", "test", "--metric", "test_score", "--per-fold"], capsys)
    assert code == 0, err
    with WorkspaceStore(demo_ws) as store:
        test_ids = set(store.query_predictions(partition="test")["prediction_id"])
    found = ID.findall(out)
    assert len(found) == 4 and set(found) <= test_ids
    assert "test_score" in out


@pytest.mark.parametrize(
    "extra",
    [["--metric", "val_score; drop table x"], ["--by", "dataset_name; drop table x"], ["-n", "-1"]],
    ids=["metric-injection", "by-injection", "negative-n"],
)
def test_top_rejects_bad_arguments_with_a_one_line_error(demo_ws, capsys, extra):
    code, out, err = run(["top", "-w", demo_ws, *extra], capsys)
    assert code == 2
    assert out == ""
    assert_one_line_error(err)
    with WorkspaceStore(demo_ws) as store:
        assert store.query_predictions().height == 72


# --------------------------------------------------------------------------- sql


def test_sql_prints_the_query_result(demo_ws, capsys):
    code, out, err = run(
        ["sql", "-w", demo_ws, "SELECT dataset_name, count(*) AS n_predictions FROM predictions GROUP BY ALL ORDER BY 1"],
        capsys,
    )
    assert code == 0, err
    assert "n_predictions" in out
    assert re.search(r"corn_moisture\s+36", out), out
    assert re.search(r"wheat_protein\s+36", out), out


def test_sql_reads_the_derived_views(demo_ws, capsys):
    code, out, err = run(["sql", "-w", demo_ws, "SELECT run_name, count(*) AS n FROM predictions_with_run GROUP BY ALL"], capsys)
    assert code == 0, err
    assert re.search(r"nirs_demo_sweep\s+72", out), out


def test_sql_with_no_rows_says_so(demo_ws, capsys):
    code, out, err = run(["sql", "-w", demo_ws, "SELECT * FROM runs WHERE name = 'nope'"], capsys)
    assert code == 0, err
    assert "no rows" in out


@pytest.mark.parametrize("query", ["select * from nope", "select * frm predictions"], ids=["unknown-table", "syntax"])
def test_sql_error_exits_2_with_a_one_line_error(demo_ws, capsys, query):
    code, out, err = run(["sql", "-w", demo_ws, query], capsys)
    assert code == 2
    assert out == ""
    line = assert_one_line_error(err)
    assert "query failed" in line


# --------------------------------------------------------------------------- catalog


def test_catalog_command_rebuilds_and_prints_the_path(demo_ws, capsys):
    storage = Storage(demo_ws)
    path = os.path.join(storage.root, "catalog.duckdb")
    before = os.stat(path).st_ino, os.stat(path).st_mtime_ns
    code, out, err = run(["catalog", "-w", demo_ws], capsys)
    assert code == 0, err
    assert f"catalog rebuilt: {path}" in out
    assert f"-readonly {path}" in out
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) != before
    assert catalog.is_current(storage)
    with WorkspaceStore(demo_ws) as store:
        assert store.sql("SELECT count(*) FROM predictions").item() == 72


# --------------------------------------------------------------------------- missing workspace, help


@pytest.mark.parametrize(
    "argv",
    [["runs"], ["top"], ["sql", "SELECT 1"], ["catalog"]],
    ids=["runs", "top", "sql", "catalog"],
)
def test_a_missing_workspace_exits_2_telling_to_run_the_demo_and_creates_nothing(workspace, capsys, argv):
    assert not _exists(workspace)
    code, out, err = run([argv[0], "-w", workspace, *argv[1:]], capsys)
    assert code == 2
    assert out == ""
    line = assert_one_line_error(err)
    assert f"nirslake demo --workspace {workspace}" in line
    assert not _exists(workspace), "a read command created the workspace"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    parser_commands = set()
    for action in cli.build_parser()._actions:
        if getattr(action, "choices", None) and isinstance(action.choices, dict):
            parser_commands |= set(action.choices)
    assert parser_commands == set(COMMANDS)
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", out, re.MULTILINE), f"{command!r} missing from --help:\n{out}"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "usage: nirslake" in capsys.readouterr().err


# --------------------------------------------------------------------------- the console script


def test_console_script_demo_ends_with_a_working_duckdb_command_line(workspace, tmp_path):
    assert NIRSLAKE.exists(), f"console script missing: {NIRSLAKE}"
    res = subprocess.run([str(NIRSLAKE), "demo", "--quick", "-w", workspace],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stdout.strip().splitlines()[-1]
    catalog_path = os.path.join(Storage(workspace).root, "catalog.duckdb")
    argv = shlex.split(last)
    assert os.path.basename(argv[0]) == "duckdb", last
    assert argv[1:3] == ["-readonly", catalog_path], last
    assert argv[3] == "-c" and "leaderboard" in argv[4], last

    # The printed command works as printed, from another folder.
    if shutil.which(argv[0]) is None:
        pytest.skip(f"the printed DuckDB shell {argv[0]!r} is not installed here")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shell = subprocess.run(argv, cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0, shell.stderr
    assert "wheat_protein" in shell.stdout and "corn_moisture" in shell.stdout
