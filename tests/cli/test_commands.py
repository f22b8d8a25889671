"""Every ``nirslake`` command run as a user runs it: a subprocess (``python -m nirslake.cli``,
this worktree's code) on one small demo workspace per module, its output checked in text and in
``--json`` against what the Python API says."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import nirslake
from nirslake import WorkspaceStore

SRC = Path(__file__).resolve().parents[2] / "src"
ID = re.compile(r"\b[0-9a-f]{32}\b")
SHOWING = re.compile(r"showing (\d+)-(\d+) of (\d+) (\w+)")


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def nl(*argv: str, ok: int | None = 0, timeout: float = 120, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``nirslake ARGV``; check the exit code when ``ok`` is given."""
    done = subprocess.run([sys.executable, "-m", "nirslake.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=cwd, stdin=subprocess.DEVNULL)
    if ok is not None:
        assert done.returncode == ok, f"nirslake {' '.join(argv)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
    return done


def js(*argv: str) -> dict | list:
    """``nirslake ARGV --json``, parsed strictly (NaN or Infinity would be refused)."""
    out = nl(*argv, "--json").stdout
    return json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in {argv}"))


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("nirslake: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """One quick demo sweep for the module (2 datasets, 8 pipelines, 72 predictions), made by
    the command itself; tests that change the workspace work on a copy."""
    ws = str(tmp_path_factory.mktemp("cli") / "ws")
    return ws, nl("demo", "--quick", "-w", ws)


@pytest.fixture(scope="module")
def ws(demo) -> str:
    return demo[0]


@pytest.fixture(scope="module")
def facts(ws) -> dict:
    with WorkspaceStore(ws) as store:
        preds = store.query_predictions()
        return {
            "run": store.list_runs()["run_id"].item(),
            "pipelines": store.list_pipelines(),
            "chains": store.list_chains(),
            "predictions": preds,
            "board": store.leaderboard(3),
        }


@pytest.fixture
def copy(ws, tmp_path) -> str:
    target = str(tmp_path / "copy")
    shutil.copytree(ws, target)
    return target


def showing(text: str) -> tuple[int, int, int, str]:
    found = SHOWING.search(text)
    assert found, f"no 'showing A-B of N' line in:\n{text}"
    return int(found[1]), int(found[2]), int(found[3]), found[4]


# --------------------------------------------------------------------------- demo


def test_demo_progress_shows_the_mean_over_folds_the_leaderboard_ranks(demo, facts):
    _, done = demo
    out = done.stdout
    assert "[1/8] wheat_protein" in out and "[8/8] corn_moisture" in out
    # Each pipeline's progress line shows the mean over folds, as the leaderboard does.
    means = {(m[1], m[2].strip(), m[3].strip()): float(m[4])
             for m in re.finditer(r"\] (\w+)\s+(\S+) \| (\S+)\s+val rmse ([\d.]+) mean over 3 folds", out)}
    assert len(means) == 8
    for row in facts["board"].rows(named=True):
        assert means[(row["dataset_name"], row["preprocessings"], row["model_name"])] == pytest.approx(row["val_score_mean"], abs=6e-4)
    assert "by mean validation score over folds" in out
    assert "8 pipelines, 72 predictions written" in out
    assert f"-readonly {os.path.join(demo[0], 'catalog.duckdb')}" in out.strip().splitlines()[-1]


def test_demo_json_adds_a_run_and_reports_it(copy):
    body = js("demo", "--quick", "-w", copy)
    assert body["n_pipelines"] == 8 and body["n_predictions"] == 72 and body["predictions_in_workspace"] == 144
    assert {row["dataset_name"] for row in body["leaderboard"]} == {"wheat_protein", "corn_moisture"}
    with WorkspaceStore(copy) as store:
        assert store.get_run(body["run_id"])["status"] == "completed"


@pytest.mark.slow  # ~25 s: the quick sweep written to the local S3 endpoint
def test_demo_on_s3_ends_with_a_shell_command_for_the_url(s3_workspace):
    done = nl("demo", "--quick", "-w", s3_workspace, timeout=300)
    last = done.stdout.strip().splitlines()[-1].strip()
    assert last.startswith(f"nirslake shell {s3_workspace} -c"), last
    assert "s3:/" not in last.replace("s3://", ""), "a mangled local path"
    assert os.getcwd() not in last


# --------------------------------------------------------------------------- listings


def test_runs_text_json_csv_and_paging(ws, facts):
    done = nl("runs", "-w", ws)
    assert facts["run"] in done.stdout and "nirs_demo_sweep" in done.stdout and "completed" in done.stdout
    assert showing(done.stdout) == (1, 1, 1, "runs")
    body = js("runs", "-w", ws)
    assert body["total"] == 1 and body["items"][0]["run_id"] == facts["run"]
    assert body["items"][0]["config"]["quick"] is True, "JSON columns come decoded"
    csv = nl("runs", "-w", ws, "--csv").stdout
    assert pl.read_csv(csv.encode())["run_id"].to_list() == [facts["run"]]
    assert "no runs from 2: there are 1" in nl("runs", "-w", ws, "--offset", "1", "--status", "completed").stdout


def test_pipelines_listing_pages_with_the_total(ws, facts):
    first = nl("pipelines", "-w", ws, "--limit", "3")
    assert showing(first.stdout) == (1, 3, 8, "pipelines") and "--offset 3 for the next" in first.stdout
    rest = js("pipelines", "-w", ws, "--offset", "3", "--limit", "10")
    assert rest["total"] == 8 and len(rest["items"]) == 5 and rest["offset"] == 3
    shown = ID.findall(first.stdout)
    expected = facts["pipelines"]["pipeline_id"].to_list()
    assert [i for i in shown if i in expected] == expected[:3]
    assert [item["pipeline_id"] for item in rest["items"]] == expected[3:]


def test_chains_listing(ws, facts):
    done = nl("chains", "-w", ws, "--dataset", "wheat_protein")
    assert showing(done.stdout) == (1, 4, 4, "chains") and "KFold(3)" in done.stdout
    body = js("chains", "-w", ws)
    assert body["total"] == 8
    assert [c["chain_id"] for c in body["items"]] == facts["chains"]["chain_id"].to_list()
    assert isinstance(body["items"][0]["fold_artifacts"], dict)


def test_predictions_listing_and_a_wrong_filter_lists_what_exists(ws, facts):
    done = nl("predictions", "-w", ws, "--partition", "test", "--limit", "5")
    assert showing(done.stdout) == (1, 5, 24, "predictions")
    body = js("predictions", "-w", ws, "--dataset", "wheat_protein", "--limit", "100")
    assert body["total"] == 36 and {p["dataset_name"] for p in body["items"]} == {"wheat_protein"}
    wrong = nl("predictions", "-w", ws, "--partition", "validation", ok=2)
    line = one_error_line(wrong)
    assert "no partition 'validation'" in line and "test, train, val" in line


def test_json_is_strict_with_nan_and_infinity(copy):
    with WorkspaceStore(copy) as store:
        pipeline = store.list_pipelines().row(0, named=True)
        chain_id = store.get_chains_for_pipeline(pipeline["pipeline_id"])["chain_id"][0]
        pid = store.save_prediction(pipeline["pipeline_id"], chain_id, pipeline["dataset_name"], "m", "M", "9", "val",
                                    float("nan"), float("inf"), None, "rmse", "regression", 3, 2,
                                    {"val": {"rmse": float("nan")}}, {}, None, None, 0, 0.0)
        store.save_prediction_arrays(pid, [1.0, float("nan"), 3.0], [1.0, 2.0, float("inf")])
    body = js("predictions", "-w", copy, "--fold", "9")
    item = body["items"][0]
    assert item["val_score"] is None and item["test_score"] is None and item["scores"]["val"]["rmse"] is None
    shown = js("show", pid, "-w", copy, "--arrays")
    assert shown["y_true"] == [1.0, None, 3.0] and shown["y_pred"] == [1.0, 2.0, None]
    assert re.search(r"rmse\s+null\s+inf\s", nl("predictions", "-w", copy, "--fold", "9").stdout)


# --------------------------------------------------------------------------- show


def test_show_each_kind_in_text_and_json(ws, facts):
    run = js("show", facts["run"], "-w", ws)
    assert run["kind"] == "run" and run["pipelines"] == {"completed": 8} and run["predictions"] == 72
    assert f"run {facts['run']}" in nl("show", facts["run"], "-w", ws).stdout

    pipeline_id = facts["pipelines"]["pipeline_id"][0]
    pipeline = js("show", pipeline_id, "-w", ws)
    assert pipeline["kind"] == "pipeline" and len(pipeline["chains"]) == 1

    chain_id = facts["chains"]["chain_id"][0]
    chain = js("show", chain_id, "-w", ws)
    assert chain["kind"] == "chain" and len(chain["folds"]) == 9
    val = next(p for p in chain["over_folds"] if p["partition"] == "val")
    expected = facts["predictions"].filter((pl.col("chain_id") == chain_id) & (pl.col("partition") == "val"))["val_score"].mean()
    assert val["val_score_mean"] == pytest.approx(expected) and val["n_folds"] == 3

    pred = facts["predictions"].row(0, named=True)
    body = js("show", pred["prediction_id"], "-w", ws)
    with WorkspaceStore(ws) as store:
        arrays = store.get_prediction(pred["prediction_id"], load_arrays=True)
    assert body["kind"] == "prediction" and body["y_true"]["shape"] == [pred["n_samples"]]
    assert body["y_pred"]["mean"] == pytest.approx(float(np.mean(arrays["y_pred"])))
    assert body["y_true"]["head"] == pytest.approx(arrays["y_true"][:5].tolist())
    text = nl("show", pred["prediction_id"], "-w", ws).stdout
    assert "y_true:" in text and f"shape: [{pred['n_samples']}]" in text and "y_proba: null" in text

    unknown = nl("show", "0" * 32, "-w", ws, ok=2)
    assert "no run, pipeline, chain or prediction" in one_error_line(unknown)


# --------------------------------------------------------------------------- rankings


def _chain_means(facts, metric_expr, partition="val"):
    preds = facts["predictions"].filter(pl.col("partition") == partition)
    return preds.with_columns(metric_expr.alias("m")).group_by("chain_id", "dataset_name").agg(pl.col("m").mean())


def test_top_ranks_chains_by_their_mean_over_folds_and_names_the_metric(ws, facts):
    done = nl("top", "-w", ws, "-n", "2")
    assert "ranked by mean rmse over folds per chain on the val partition" in done.stdout and "lower is better" in done.stdout
    means = _chain_means(facts, pl.col("val_score"))
    expected = means.sort("m").group_by("dataset_name", maintain_order=True).head(2).sort("dataset_name", "m")
    shown = ID.findall(done.stdout)
    assert shown == expected["chain_id"].to_list(), "each chain once, best mean first, per dataset"
    body = js("top", "-w", ws, "-n", "2")
    assert body["ranked_by"]["metric"] == "rmse" and body["ranked_by"]["level"] == "chain"
    assert [i["val_score_mean"] for i in body["items"]] == pytest.approx(expected["m"].to_list())


def test_top_by_r2_ranks_higher_first(ws, facts):
    body = js("top", "-w", ws, "-n", "1", "--metric", "r2")
    assert body["ranked_by"]["direction"] == "max"
    r2 = pl.col("scores").str.json_path_match("$.val.r2").cast(pl.Float64)
    best = _chain_means(facts, r2).sort("m", descending=True).group_by("dataset_name", maintain_order=True).first()
    assert sorted(i["chain_id"] for i in body["items"]) == sorted(best["chain_id"].to_list())
    assert "higher is better" in nl("top", "-w", ws, "-n", "1", "--metric", "r2").stdout


def test_top_per_fold_and_a_wrong_dataset(ws, facts):
    body = js("top", "-w", ws, "-n", "3", "--per-fold", "--dataset", "corn_moisture")
    val = facts["predictions"].filter((pl.col("partition") == "val") & (pl.col("dataset_name") == "corn_moisture"))
    assert [i["prediction_id"] for i in body["items"]] == val.sort("val_score")["prediction_id"][:3].to_list()
    assert "of single folds" in body["ranked_by"]["text"]
    wrong = nl("top", "-w", ws, "--dataset", "nope", "--partition", "vall", ok=2)
    line = one_error_line(wrong)
    assert "no dataset 'nope' here; it holds: corn_moisture, wheat_protein" in line and "it holds: test, train, val" in line


def test_leaderboard_matches_the_store(ws, facts):
    board = facts["board"]
    done = nl("leaderboard", "-w", ws, "-n", "3")
    assert ID.findall(done.stdout) == board.sort("dataset_name", "rank")["chain_id"].to_list()
    assert "mean validation score over folds (rmse: lower is better)" in done.stdout
    body = js("leaderboard", "-w", ws, "-n", "3", "--dataset", "wheat_protein")
    assert body["total"] == 3 and [i["rank"] for i in body["items"]] == [1, 2, 3]


def test_compare_two_runs(copy):
    second = js("demo", "--quick", "-w", copy)["run_id"]
    with WorkspaceStore(copy) as store:
        first = store.list_runs(status="completed")["run_id"].to_list()[-1]
    done = nl("compare", first, second, "-w", copy)
    assert showing(done.stdout)[2] == 8 and "val_a" in done.stdout and "change" in done.stdout
    body = js("compare", first, second, "-w", copy)
    # The same seed and sweep: every chain scores the same in both runs.
    assert body["total"] == 8 and all(i["change"] == 0 for i in body["items"])
    assert body["run_a"] == first and body["run_b"] == second


# --------------------------------------------------------------------------- SQL and shell


def test_sql_says_how_many_rows_when_it_cuts_and_keeps_select_star_readable(ws):
    done = nl("sql", "-w", ws, "SELECT * FROM predictions", "--limit", "10")
    assert showing(done.stdout) == (1, 10, 72, "rows")
    assert max(len(line) for line in done.stdout.splitlines()) <= 200 + 200  # the note line may be long
    table = done.stdout.split("(")[0].splitlines()
    assert max(len(line) for line in table) <= 200, "table rows fit 200 columns"
    assert "more column(s) not shown" in done.stdout
    body = js("sql", "-w", ws, "SELECT * FROM predictions ORDER BY prediction_id", "--limit", "5", "--offset", "5")
    assert body["total"] == 72 and len(body["items"]) == 5 and "scores" in body["items"][0]
    csv = pl.read_csv(nl("sql", "-w", ws, "SELECT dataset_name, count(*) AS n FROM predictions GROUP BY 1 ORDER BY 1", "--csv").stdout.encode())
    assert csv.rows() == [("corn_moisture", 36), ("wheat_protein", 36)]


def test_sql_named_queries(ws):
    names = js("sql", "-w", ws, "--list-queries")
    assert "fold_stability" in {q["name"] for q in names}
    body = js("sql", "-w", ws, "--query", "leaderboard", "--param", "top=1")
    assert body["total"] == 2
    assert showing(nl("sql", "-w", ws, "--query", "fold_stability").stdout)[2] == 8


def test_shell_runs_sql_in_the_duckdb_cli(ws):
    if shutil.which("duckdb", path=os.path.dirname(sys.executable)) is None and shutil.which("duckdb") is None:
        pytest.skip("the DuckDB shell (duckdb-cli) is not installed here")
    done = nl("shell", ws, "-c", "SELECT count(*) AS n FROM predictions")
    assert "72" in done.stdout
    rows = json.loads(nl("shell", ws, "--json", "-c", "SELECT count(*) AS n FROM predictions").stdout)
    assert rows == [{"n": 72}]


def test_catalog_and_checkpoint(copy):
    path = os.path.join(copy, "catalog.duckdb")
    assert f"catalog rebuilt: {path}" in nl("catalog", "-w", copy).stdout
    assert js("catalog", "-w", copy)["catalog"] == path
    text = nl("checkpoint", "-w", copy).stdout
    body = js("checkpoint", "-w", copy)
    assert re.match(rf"checkpoint {body['number']} ", text) and "engines read _current/manifest.parquet" in text
    assert body["landed"] is False, "the second checkpoint finds nothing changed"
    manifest = pl.read_parquet(os.path.join(copy, "_current", "manifest.parquet"))
    assert manifest.height == body["files"]


# --------------------------------------------------------------------------- export, import, predict


def test_export_each_kind(ws, facts, tmp_path):
    chain_id = facts["board"]["chain_id"][0]
    done = nl("export", "chain", chain_id, "-o", str(tmp_path / "best.n4a"), "-w", ws)
    assert f"wrote {tmp_path / 'best.n4a'}" in done.stdout and (tmp_path / "best.n4a").stat().st_size > 0
    body = js("export", "run", facts["run"], "-o", str(tmp_path / "run.yaml"), "-w", ws)
    assert body["path"] == str(tmp_path / "run.yaml") and facts["run"] in (tmp_path / "run.yaml").read_text()
    body = js("export", "pipeline", facts["pipelines"]["pipeline_id"][0], "-o", str(tmp_path / "p"), "-w", ws)
    assert json.loads(Path(body["path"]).read_text())
    body = js("export", "predictions", "-o", str(tmp_path / "val.parquet"), "--partition", "val", "-w", ws)
    assert pl.read_parquet(body["path"]).height == 24


def test_import_and_predict(ws, facts, copy, tmp_path):
    from nirslake.cli.demo import make_spectra

    chain_id = facts["board"].filter(pl.col("dataset_name") == "wheat_protein")["chain_id"][0]
    bundle = str(tmp_path / "wheat.n4a")
    nl("export", "chain", chain_id, "-o", bundle, "-w", ws)
    X, _, _ = make_spectra("wheat_protein", 5, 140, seed=7)
    np.savetxt(tmp_path / "X.csv", X, delimiter=",", header=",".join(f"w{i}" for i in range(X.shape[1])), comments="")
    np.save(tmp_path / "X.npy", X)
    expected = nirslake.predict(bundle, X)

    text = nl("predict", bundle, "-i", str(tmp_path / "X.csv")).stdout.split()
    assert np.allclose([float(v) for v in text], expected, rtol=1e-8)
    body = js("predict", chain_id, "-i", str(tmp_path / "X.npy"), "-w", ws)
    assert body["n"] == 5 and np.allclose(body["predictions"], expected)

    imported = js("import", bundle, "-w", copy)
    with WorkspaceStore(copy) as store:
        assert store.get_chain(imported["chain_id"]) is not None
    assert "imported chain" in nl("import", bundle, "-w", copy).stdout
    done = nl("predict", imported["chain_id"], "-i", str(tmp_path / "X.npy"), "-o", str(tmp_path / "y.csv"), "-w", copy)
    assert "5 predictions" in done.stdout
    assert np.allclose(np.loadtxt(tmp_path / "y.csv", delimiter=","), expected)


# --------------------------------------------------------------------------- delete, gc, vacuum


def _lake_bytes(ws: str) -> int:
    return sum(f.stat().st_size for d in ("tables", "objects") for f in Path(ws, d).rglob("*") if f.is_file())


def test_delete_a_prediction_then_a_run_and_vacuum_reclaims_at_once(copy, facts):
    pid = facts["predictions"]["prediction_id"][0]
    body = js("delete", pid, "-w", copy)
    assert body == {"kind": "prediction", "id": pid, "deleted_records": 1}
    assert js("predictions", "-w", copy, "--limit", "1")["total"] == 71
    done = nl("delete", facts["run"], "-w", copy)
    assert f"deleted run {facts['run']}" in done.stdout and "vacuum" in done.stdout
    assert js("runs", "-w", copy)["total"] == 0
    before = _lake_bytes(copy)
    kept = js("vacuum", "-w", copy)  # the default grace keeps the bytes for an hour
    assert kept["bytes_after"] >= kept["bytes_before"] * 0.9
    done = nl("vacuum", "--grace", "0", "-w", copy)
    assert "vacuumed" in done.stdout
    after = _lake_bytes(copy)
    assert after < before / 3, (before, after)
    assert not list(Path(copy, "objects").rglob("*.*")) and not [f for f in Path(copy, "objects").rglob("*") if f.is_file()]
    assert "no run or prediction" in one_error_line(nl("delete", facts["run"], "-w", copy, ok=2))
    with WorkspaceStore(copy) as store:
        assert store.check().ok


def test_vacuum_grace_0_is_refused_while_a_run_is_being_written(copy):
    with WorkspaceStore(copy) as store:  # this process is alive: its run is being written
        store.begin_run("live", {}, [{"name": "d"}])
        store.flush()
        line = one_error_line(nl("vacuum", "--grace", "0", "-w", copy, ok=2))
        assert "being written" in line and "--force" in line
        assert js("vacuum", "--grace", "0", "--force", "-w", copy)["grace_seconds"] == 0


def test_gc(copy):
    with WorkspaceStore(copy) as store:
        pipeline = store.list_pipelines()["pipeline_id"][0]
        store.fail_pipeline(pipeline, "boom")  # its chain stops holding its artifacts
    assert js("gc", "-w", copy)["artifacts_removed"] == 0, "the default grace keeps fresh artifacts"
    body = js("gc", "--grace", "0", "-w", copy)
    assert body["artifacts_removed"] > 0
    assert "removed 0 artifact(s)" in nl("gc", "-w", copy).stdout


def test_compact(copy):
    js("demo", "--quick", "-w", copy)  # a second run: two small files per partition
    body = js("compact", "-w", copy)
    assert body["files_replaced"] > body["files_written"] > 0
    assert "nothing to compact" in nl("compact", "-w", copy).stdout


# --------------------------------------------------------------------------- check and runs left running


WRITER = """
import os, sys
from nirslake import WorkspaceStore
store = WorkspaceStore(sys.argv[1])
run_id = store.begin_run("doomed", {}, [{"name": "d"}])
store.flush()
print(run_id, flush=True)
os._exit(0)  # gone without completing or failing the run, as after a SIGKILL
"""


def test_check_reports_a_run_left_running_and_mark_failed_fixes_it(copy):
    assert "no problem found" in nl("check", "-w", copy).stdout
    assert js("check", "-w", copy)["ok"] is True
    run_id = subprocess.run([sys.executable, "-c", WRITER, copy], capture_output=True, text=True, env=env(),
                            check=True).stdout.strip()
    done = nl("check", "-w", copy, ok=1)
    assert run_id in done.stdout and "is gone" in done.stdout and "mark-failed" in done.stdout
    body = json.loads(nl("check", "-w", copy, "--json", ok=1).stdout)
    assert body["ok"] is False and body["problems"] == [] and len(body["left_running"]) == 1
    marked = js("mark-failed", "-w", copy)
    assert marked["marked_failed"] == [run_id] and marked["still_running"] == []
    assert nl("check", "-w", copy).returncode == 0
    assert "no run left running" in nl("mark-failed", "-w", copy).stdout
    with WorkspaceStore(copy) as store:
        assert store.get_run(run_id)["status"] == "failed"


# --------------------------------------------------------------------------- serve, plot, sync


def test_serve_answers_the_api_and_stops_on_ctrl_c(ws, facts):
    for as_json in (False, True):
        argv = [sys.executable, "-m", "nirslake.cli", "serve", "-w", ws, "--port", "0", *(["--json"] if as_json else [])]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        try:
            first = proc.stdout.readline()
            line = json.loads(first)["message"] if as_json else first
            url = re.search(r"http://\S+/", line)[0]
            body = json.loads(urllib.request.urlopen(url + "api/runs", timeout=30).read())
            assert body["total"] == 1 and body["items"][0]["run_id"] == facts["run"]
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "server stopped" in out


def test_plot_writes_images(ws, facts, tmp_path):
    pytest.importorskip("matplotlib")
    done = nl("plot", "leaderboard", "--dataset", "wheat_protein", "-o", str(tmp_path / "b.png"), "-w", ws)
    assert "wrote" in done.stdout and (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    body = js("plot", "predicted", "--chain", facts["chains"]["chain_id"][0], "-o", str(tmp_path / "c.svg"), "-w", ws)
    assert body["bytes"] > 1000 and (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_push_and_pull(ws, tmp_path):
    done = nl("push", ws, str(tmp_path / "mirror"))
    assert "pushed" in done.stdout
    with WorkspaceStore(str(tmp_path / "mirror")) as store:
        assert store.query_predictions().height == 72
    body = js("pull", str(tmp_path / "mirror"), str(tmp_path / "back"))
    assert body["ok"] is True and body["files_copied"] > 0


# --------------------------------------------------------------------------- the command itself


def test_version_help_and_usage_errors(ws, tmp_path):
    assert nl("--version").stdout.strip() == f"nirslake {nirslake.__version__}"
    helptext = nl("--help").stdout
    for command in ("runs", "pipelines", "chains", "predictions", "show", "top", "leaderboard", "compare", "sql", "shell",
                    "export", "import", "predict", "delete", "gc", "vacuum", "compact", "check", "mark-failed", "serve",
                    "plot", "demo", "catalog", "checkpoint", "push", "pull"):
        assert re.search(rf"^\s+{command}\s+\S", helptext, re.MULTILINE), command
    assert "Exit codes: 0" in helptext
    assert "usage: nirslake" in nl("runs", "--limit", "-3", "-w", ws, ok=2).stderr
    missing = nl("runs", "-w", str(tmp_path / "none"), ok=2)
    assert "nirslake demo --workspace" in one_error_line(missing)
    assert not (tmp_path / "none").exists()


def _interrupt(tmp_path, sig: int) -> tuple[subprocess.CompletedProcess, str]:
    ws = str(tmp_path / "ws")
    proc = subprocess.Popen([sys.executable, "-m", "nirslake.cli", "demo", "-w", ws], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    try:
        line = proc.stdout.readline()  # the first pipeline is done: the run is being written
        assert line.startswith("[1/"), line
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), ws


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_ends_with_one_line_its_exit_code_and_the_run_marked_failed(tmp_path, sig, code, word):
    done, ws = _interrupt(tmp_path, sig)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f"nirslake: {word}"), done.stderr
    with WorkspaceStore(ws) as store:
        runs = store.list_runs()
        assert runs["status"].to_list() == ["failed"], "the run is not left running"
        assert store.list_pipelines().filter(pl.col("status") == "running").height == 0
        assert store.check().ok
