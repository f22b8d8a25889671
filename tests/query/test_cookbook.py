"""The cookbook's named queries (sql/queries/): each returns rows on a demo workspace through the
store, through `nirslake sql --query`, and pasted as it stands into the real DuckDB shell."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nirslake import WorkspaceStore
from nirslake.query import cookbook
from nirslake.query.catalog import CATALOG_FILE, sql_dir
from nirslake.cli.demo import run_demo

BIN = Path(sys.executable).parent
DUCKDB_CLI = BIN / "duckdb"
NIRSLAKE = BIN / "nirslake"
ASKED_FOR = {"leaderboard", "fold_stability", "overfitting_gap", "best_preprocessing", "hard_samples", "compare_runs"}


def require_duckdb_cli() -> None:
    if DUCKDB_CLI.exists():
        return
    message = f"the DuckDB shell is not installed beside the interpreter ({DUCKDB_CLI}); pip install duckdb-cli"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI installs it with the package (duckdb-cli is a dependency)
    pytest.skip(message)


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory) -> str:
    """Two quick demo runs with different seeds, so two runs can be compared."""
    ws = str(tmp_path_factory.mktemp("cookbook") / "ws")
    run_demo(ws, quick=True, seed=0)
    run_demo(ws, quick=True, seed=1)
    return ws


@pytest.fixture(scope="module")
def store(demo_ws):
    with WorkspaceStore(demo_ws) as s:
        yield s


def paste_into_duckdb_shell(workspace: str, sql: str) -> list[list[str]]:
    """``sql`` typed into the DuckDB shell on the workspace's catalog, from another folder; CSV rows."""
    require_duckdb_cli()
    done = subprocess.run(
        [str(DUCKDB_CLI), "-readonly", "-csv", os.path.join(workspace, CATALOG_FILE)],
        input=sql, cwd="/", capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and not done.stderr, f"duckdb shell failed ({done.returncode}): {done.stderr}"
    return [line.split(",") for line in done.stdout.splitlines() if line.strip()]


def test_the_asked_for_queries_are_shipped_with_descriptions():
    assert ASKED_FOR <= set(cookbook.query_names())
    assert not (sql_dir() / "cookbook.sql").exists(), "the old single-file cookbook was folded into sql/queries/"
    for name in cookbook.query_names():
        query = cookbook.named_query(name)
        assert query.description and query.sql.rstrip().endswith(";"), name


@pytest.mark.parametrize("name", cookbook.query_names())
def test_named_query_returns_rows_through_the_store_and_in_the_duckdb_shell(demo_ws, store, name):
    frame = cookbook.run_query(store, name)
    assert frame.height > 0, name
    text = (sql_dir() / "queries" / f"{name}.sql").read_text(encoding="utf-8")
    rows = paste_into_duckdb_shell(demo_ws, text)
    header, body = rows[0], rows[1:]
    assert header == frame.columns, name
    assert len(body) == frame.height, f"{name}: {len(body)} rows in the shell, {frame.height} through the store"


def test_compare_runs_takes_its_runs_as_variables_in_python_the_shell_and_the_cli(demo_ws, store):
    newest, older = store.list_runs()["run_id"].to_list()
    default = cookbook.run_query(store, "compare_runs")
    assert set(default["run_a"]) == {older} and set(default["run_b"]) == {newest}, "default: the two newest, a older"
    swapped = cookbook.run_query(store, "compare_runs", run_a=newest, run_b=older)
    forward = {tuple(r[:3]): r[6] for r in default.rows()}
    backward = {tuple(r[:3]): r[6] for r in swapped.rows()}
    assert forward.keys() == backward.keys() and len(forward) == 8
    assert all(math.isclose(forward[k], -backward[k], abs_tol=1e-9) for k in forward)
    assert any(v != 0 for v in forward.values()), "different seeds give different scores"

    shell = paste_into_duckdb_shell(
        demo_ws, f"SET VARIABLE run_a = '{newest}'; SET VARIABLE run_b = '{older}';\n"
        + cookbook.named_query("compare_runs").sql)
    assert {row[-2] for row in shell[1:]} == {newest} and len(shell) == 9

    done = subprocess.run([str(NIRSLAKE), "sql", "-w", demo_ws, "--query", "compare_runs",
                           "--param", f"run_a={newest}", "--param", f"run_b={older}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wheat_protein" in done.stdout and "corn_moisture" in done.stdout and "change" in done.stdout


def test_sql_query_command_runs_a_named_query_and_lists_them(demo_ws):
    done = subprocess.run([str(NIRSLAKE), "sql", "-w", demo_ws, "--query", "leaderboard", "--param", "top=1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "PLS(5)" in line or "Ridge(1)" in line]
    assert len(lines) == 2, done.stdout  # the best chain of each of the two datasets
    listed = subprocess.run([str(NIRSLAKE), "sql", "-w", demo_ws, "--list-queries"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0
    for name in cookbook.query_names():
        assert f"{name}: " in listed.stdout
    assert "compare_runs: " in listed.stdout and "[parameters: run_a, run_b]" in listed.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--query", "nope"], "no query named 'nope': choose one of artifact_storage,"),
        (["--query", "leaderboard", "--param", "tops=3"], "query 'leaderboard' has no parameter 'tops': it takes top"),
        (["--query", "leaderboard", "--param", "top"], "--param takes NAME=VALUE, got 'top'"),
        (["SELECT 1", "--param", "top=1"], "--param sets a named query's variables: use it with --query NAME"),
        (["SELECT 1", "--query", "leaderboard"], "give a query"),
        ([], "give a query"),
    ],
)
def test_sql_query_command_errors_in_one_line(demo_ws, argv, message, capsys):
    from nirslake import cli

    assert cli.main(["sql", "-w", demo_ws, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nirslake: error: " + message) and err.count("\n") == 1, err


def test_parameter_values_are_sql_literals_not_sql(store):
    text = cookbook.query_sql("compare_runs", {"run_a": "x'; DROP VIEW runs; --", "run_b": "y"})
    assert text.startswith("SET VARIABLE run_a = 'x''; DROP VIEW runs; --';\nSET VARIABLE run_b = 'y';\n")
    frame = store.sql(text)
    assert frame.height == 0  # no such runs: nothing compared, nothing dropped
    assert store.list_runs().height == 2 and cookbook.run_query(store, "run_status").height > 0
