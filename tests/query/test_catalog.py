"""The DuckDB catalog (lake spec §8): the shell reads the lake from any folder, sees new files
without a rebuild, agrees with the Python API and the polars scans, is rebuilt when stale, and
stays consistent through compaction (§4, §5)."""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from nirslake import WorkspaceStore, cli
from nirslake.query import catalog
from nirslake.cli.demo import run_demo
from nirslake.query import fold_summary, scan
from nirslake.lake.storage import Storage

BIN = Path(sys.executable).parent
DUCKDB_CLI = BIN / "duckdb"
NIRSLAKE = BIN / "nirslake"

VIEWS = (
    "runs", "pipelines", "chains", "predictions", "prediction_arrays", "artifacts", "logs",
    "deletions", "predictions_with_run", "chain_summary", "leaderboard",
)
MACROS = ("lake_files", "lake_table")
DATA_TABLES = ("runs", "pipelines", "chains", "predictions", "prediction_arrays", "artifacts", "logs")


# --------------------------------------------------------------------------- helpers


def _catalog_file(workspace: str) -> Path:
    storage = Storage(workspace)
    if not storage.is_local:
        pytest.skip("the DuckDB shell opens a local catalog.duckdb file only")
    return Path(storage.root) / catalog.CATALOG_FILE


def _require_duckdb_cli() -> None:
    if not DUCKDB_CLI.exists():
        pytest.skip(f"the DuckDB shell is not installed beside the interpreter ({DUCKDB_CLI}); pip install duckdb-cli")


def shell(workspace: str, query: str, cwd: Path) -> list[list[str]]:
    """Run ``query`` in the DuckDB shell on the workspace's catalog from ``cwd``; CSV rows."""
    _require_duckdb_cli()
    db = _catalog_file(workspace)
    cwd.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        [str(DUCKDB_CLI), "-readonly", "-csv", "-noheader", str(db), "-c", query],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, f"duckdb shell failed ({res.returncode}): {res.stderr}"
    return [line.split(",") for line in res.stdout.splitlines() if line.strip()]


def shell_count(workspace: str, cwd: Path, table: str = "predictions", where: str = "") -> int:
    rows = shell(workspace, f"SELECT count(*) FROM {table} {where}", cwd)
    assert len(rows) == 1 and len(rows[0]) == 1, rows
    return int(rows[0][0])


def catalog_sql(workspace: str, query: str) -> pl.DataFrame:
    """``query`` against the views stored in catalog.duckdb itself (read-only, like the shell)."""
    con = duckdb.connect(str(_catalog_file(workspace)), read_only=True)
    try:
        return con.execute(query).pl()
    finally:
        con.close()


def catalog_identity(workspace: str) -> tuple:
    """Changes whenever catalog.duckdb is rebuilt (a rebuild renames a new file over the old one)."""
    st = os.stat(_catalog_file(workspace))
    return st.st_ino, st.st_mtime_ns


def view_count(workspace: str, view: str) -> int:
    return catalog_sql(workspace, f"SELECT count(*) AS n FROM {view}").item()


@pytest.fixture
def demo_ws(workspace) -> str:
    """The workspace after a quick demo sweep (2 datasets x 4 pipelines x 3 folds x 3 partitions)."""
    run_demo(workspace, quick=True)
    return workspace


def _add_pipeline(store, make_pipeline, add_prediction, dataset="corn_m5", run_name="protein_sweep",
                  n_folds=2, with_arrays=False, complete=True):
    ids = make_pipeline(store, dataset_name=dataset, run_name=run_name)
    written = []
    for fold in range(n_folds):
        for part in ("train", "val", "test"):
            pid = add_prediction(store, ids, dataset_name=dataset, fold_id=str(fold), partition=part,
                                 val_score=0.4 + 0.01 * fold)
            if with_arrays:
                store.save_prediction_arrays(pid, np.arange(4.0), np.arange(4.0) + 0.1, sample_indices=np.arange(4))
            written.append(pid)
    if complete:
        store.complete_pipeline(ids.pipeline_id, 0.4, 0.45, "rmse", 120)
    store.flush()  # publish: readers in other processes (the shell, polars scans) see it from now on
    return ids, written


# --------------------------------------------------------------------------- 1. acceptance


def test_duckdb_shell_counts_the_demo_predictions_from_another_folder(workspace, tmp_path):
    _require_duckdb_cli()
    assert NIRSLAKE.exists(), f"console script missing: {NIRSLAKE}"
    res = subprocess.run([str(NIRSLAKE), "demo", "--quick", "--workspace", workspace],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr

    n = shell_count(workspace, tmp_path / "elsewhere")

    with WorkspaceStore(workspace) as store:
        api = store.query_predictions().height
    assert n > 0
    assert n == api
    assert n == scan(workspace, "predictions").collect().height


# --------------------------------------------------------------------------- 2. new files, no rebuild


def test_new_files_appear_in_the_shell_without_a_catalog_rebuild(demo_ws, tmp_path, make_pipeline, add_prediction):
    elsewhere = tmp_path / "elsewhere"
    before_identity = catalog_identity(demo_ws)
    before = shell_count(demo_ws, elsewhere)
    runs_before = shell_count(demo_ws, elsewhere, "runs")

    with WorkspaceStore(demo_ws) as store:
        ids, written = _add_pipeline(store, make_pipeline, add_prediction, n_folds=3)
        # Published by flush(): the shell sees the rows while the store is still open.
        after = shell_count(demo_ws, elsewhere)
        assert after == before + len(written)
        assert shell_count(demo_ws, elsewhere, "predictions", "WHERE dataset_name = 'corn_m5'") == len(written)
        assert shell_count(demo_ws, elsewhere, "runs") == runs_before + 1
        assert shell(demo_ws, f"SELECT status FROM pipelines WHERE pipeline_id = '{ids.pipeline_id}'", elsewhere) == [["completed"]]
        assert after == store.query_predictions().height

    assert catalog_identity(demo_ws) == before_identity, "catalog.duckdb was rebuilt, but new files need no rebuild"
    assert catalog.is_current(Storage(demo_ws))


# --------------------------------------------------------------------------- 3. views agree with the API


def test_runs_view_shows_the_latest_status_of_each_run(demo_ws):
    with WorkspaceStore(demo_ws) as store:
        done = store.begin_run("done_run", {"metric": "rmse"}, [{"name": "corn_m5"}])
        failed = store.begin_run("failed_run", {}, [])
        running = store.begin_run("running_run", {}, [])
        store.complete_run(done, {"n": 1})
        store.fail_run(failed, "boom")
        api = store.list_runs().select("run_id", "name", "status")

    view = catalog_sql(demo_ws, "SELECT run_id, name, status FROM runs")
    assert view.height == view["run_id"].n_unique(), "a run appears more than once: latest version must win"
    assert sorted(view.rows()) == sorted(api.rows())
    status = dict(zip(view["run_id"], view["status"]))
    assert status[done] == "completed"
    assert status[failed] == "failed"
    assert status[running] == "running"
    assert catalog_sql(demo_ws, f"SELECT error FROM runs WHERE run_id = '{failed}'").item() == "boom"
    assert "nirs_demo_sweep" in view["name"].to_list()


def test_pipelines_view_matches_list_pipelines(demo_ws, make_pipeline, add_prediction):
    with WorkspaceStore(demo_ws) as store:
        failed = make_pipeline(store, dataset_name="corn_m5", run_name="bad_sweep")
        store.fail_pipeline(failed.pipeline_id, "diverged")
        running = make_pipeline(store, dataset_name="corn_m5", run_name="open_sweep")
        store.flush()
        api = store.list_pipelines().select("pipeline_id", "run_id", "name", "dataset_name", "status", "best_val")

    view = catalog_sql(demo_ws, "SELECT pipeline_id, run_id, name, dataset_name, status, best_val FROM pipelines")
    assert view.height == view["pipeline_id"].n_unique()
    assert view.height == api.height == 8 + 2
    assert sorted(view.rows()) == sorted(api.rows())
    status = dict(zip(view["pipeline_id"], view["status"]))
    assert status[failed.pipeline_id] == "failed"
    assert status[running.pipeline_id] == "running"
    assert sum(s == "completed" for s in status.values()) == 8


def test_chain_summary_view_matches_fold_summary(demo_ws):
    view = catalog_sql(
        demo_ws,
        "SELECT chain_id, dataset_name, model_name, partition, val_score_mean, val_score_std, n_folds FROM chain_summary",
    )
    expected = fold_summary(scan(demo_ws, "predictions"))
    assert view.height == expected.height > 0
    assert set(zip(view["chain_id"], view["partition"])) == set(zip(expected["chain_id"], expected["partition"]))

    val = view.filter(pl.col("partition") == "val").sort("chain_id")
    exp = expected.filter(pl.col("partition") == "val").sort("chain_id")
    assert val.height == 8
    assert val["chain_id"].to_list() == exp["chain_id"].to_list()
    assert val["dataset_name"].to_list() == exp["dataset_name"].to_list()
    assert val["model_name"].to_list() == exp["model_name"].to_list()
    assert val["n_folds"].to_list() == exp["n_folds"].to_list() == [3] * 8
    np.testing.assert_allclose(val["val_score_mean"].to_numpy(), exp["val_score_mean"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(val["val_score_std"].to_numpy(), exp["val_score_std"].to_numpy(), rtol=1e-9)


def test_leaderboard_rank_one_is_the_best_chain_by_mean_val_rmse(demo_ws):
    with WorkspaceStore(demo_ws) as store:
        val = store.query_predictions(partition="val")
    best = (
        val.group_by("dataset_name", "chain_id")
        .agg(pl.col("val_score").mean().alias("mean"))
        .sort("mean")
        .group_by("dataset_name", maintain_order=True)
        .first()
        .sort("dataset_name")
    )
    board = catalog_sql(demo_ws, "SELECT dataset_name, chain_id, val_score_mean FROM leaderboard WHERE rank = 1 ORDER BY dataset_name")
    assert board["dataset_name"].to_list() == best["dataset_name"].to_list() == ["corn_moisture", "wheat_protein"]
    assert board["chain_id"].to_list() == best["chain_id"].to_list()
    np.testing.assert_allclose(board["val_score_mean"].to_numpy(), best["mean"].to_numpy(), rtol=1e-12)
    # Ranks are 1..k within each dataset.
    ranks = catalog_sql(demo_ws, "SELECT dataset_name, list(rank ORDER BY rank) AS r FROM leaderboard GROUP BY ALL ORDER BY 1")
    assert ranks["r"].to_list() == [[1, 2, 3, 4], [1, 2, 3, 4]]


def test_leaderboard_ranks_higher_is_better_metrics_descending(workspace, store, make_pipeline, add_prediction):
    scores = {}
    for val_score in (0.80, 0.95, 0.60):
        ids = make_pipeline(store, dataset_name="milk_r2", run_name="r2_sweep")
        for fold in range(2):
            add_prediction(store, ids, dataset_name="milk_r2", metric="r2", fold_id=str(fold), val_score=val_score)
        store.complete_pipeline(ids.pipeline_id, val_score, val_score, "r2", 10)
        scores[ids.chain_id] = val_score
    store.flush()  # publish for the catalog, a reader outside the store
    board = catalog_sql(workspace, "SELECT chain_id FROM leaderboard WHERE dataset_name = 'milk_r2' ORDER BY rank")
    assert board["chain_id"].to_list() == sorted(scores, key=scores.get, reverse=True)


def test_deleted_predictions_and_runs_vanish_from_every_view(demo_ws, make_pipeline, add_prediction):
    with WorkspaceStore(demo_ws) as store:
        ids, written = _add_pipeline(store, make_pipeline, add_prediction, with_arrays=True)
        victim = store.query_predictions(dataset_name="wheat_protein", partition="val").row(0, named=True)["prediction_id"]
        assert store.delete_prediction(victim)
        assert store.delete_run(ids.run_id) > 0
        api = store.query_predictions().height
        api_runs = store.list_runs().height
        api_pipelines = store.list_pipelines().height

    assert api == 72 - 1
    assert view_count(demo_ws, "predictions") == api
    assert view_count(demo_ws, "predictions_with_run") == api
    assert scan(demo_ws, "predictions").collect().height == api
    assert view_count(demo_ws, "prediction_arrays") == scan(demo_ws, "prediction_arrays").collect().height == api
    assert catalog_sql(demo_ws, f"SELECT count(*) FROM predictions WHERE prediction_id = '{victim}'").item() == 0
    assert catalog_sql(demo_ws, f"SELECT count(*) FROM prediction_arrays WHERE prediction_id = '{victim}'").item() == 0
    for view in ("predictions", "prediction_arrays", "pipelines", "chains", "logs", "runs"):
        assert catalog_sql(demo_ws, f"SELECT count(*) FROM {view} WHERE run_id = '{ids.run_id}'").item() == 0, view
    assert view_count(demo_ws, "runs") == api_runs == 1
    assert view_count(demo_ws, "pipelines") == api_pipelines == 8
    kinds = catalog_sql(demo_ws, "SELECT kind, entity_id FROM deletions")
    assert ("prediction", victim) in kinds.rows() and ("run", ids.run_id) in kinds.rows()


def test_a_prediction_saved_again_after_its_deletion_shows_again(workspace, store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    pid = add_prediction(store, ids, prediction_id="pred-0001")
    store.complete_pipeline(ids.pipeline_id, 0.42, 0.45, "rmse", 5)
    assert store.delete_prediction(pid)
    ws = workspace
    assert view_count(ws, "predictions") == store.query_predictions().height == 0
    add_prediction(store, ids, prediction_id="pred-0001", val_score=0.5)
    store.flush()
    assert store.query_predictions()["prediction_id"].to_list() == ["pred-0001"]
    assert catalog_sql(ws, "SELECT prediction_id, val_score FROM predictions").rows() == [("pred-0001", 0.5)]


def test_prediction_arrays_view_counts_one_row_per_prediction_latest_wins(demo_ws):
    with WorkspaceStore(demo_ws) as store:
        n = store.query_predictions().height
        pid = store.query_predictions(dataset_name="corn_moisture", partition="test").row(0, named=True)["prediction_id"]
        old = store.get_prediction(pid, load_arrays=True)
        store.save_prediction_arrays(pid, old["y_true"], np.full(len(old["y_true"]), 7.0),
                                     sample_indices=old["sample_indices"])
        store.flush()
    assert view_count(demo_ws, "prediction_arrays") == scan(demo_ws, "prediction_arrays").collect().height == n == 72
    y_pred = catalog_sql(demo_ws, f"SELECT y_pred FROM prediction_arrays WHERE prediction_id = '{pid}'")["y_pred"].to_list()
    assert len(y_pred) == 1 and set(y_pred[0]) == {7.0}
    # Every array row belongs to a visible prediction, and its dataset is the prediction's.
    orphans = catalog_sql(
        demo_ws,
        "SELECT count(*) FROM prediction_arrays a LEFT JOIN predictions p USING (prediction_id) "
        "WHERE p.prediction_id IS NULL OR p.dataset_name <> a.dataset_name",
    ).item()
    assert orphans == 0


# --------------------------------------------------------------------------- 4. rebuild


@pytest.mark.parametrize(
    "change",
    [{"format_version": 999}, {"lake": "/somewhere/else"}, {"duckdb": "0.9.0"}, {"views": "built-by-an-older-nirslake"}],
    ids=["format", "location", "duckdb", "views"],
)
def test_catalog_is_stale_when_its_stamp_differs_and_rebuild_makes_it_current(store, change):
    storage = store.storage
    assert catalog.is_current(storage)
    stamp = json.loads(storage.read_bytes(catalog.CATALOG_STAMP))
    storage.publish(catalog.CATALOG_STAMP, json.dumps({**stamp, **change}).encode(), overwrite=True)
    assert not catalog.is_current(storage)

    path = store.rebuild_catalog()
    assert catalog.is_current(storage)
    assert json.loads(storage.read_bytes(catalog.CATALOG_STAMP)) == stamp
    assert path == storage.url(catalog.CATALOG_FILE)


def test_catalog_without_its_stamp_is_not_current(store):
    store.storage.delete(catalog.CATALOG_STAMP)
    assert not catalog.is_current(store.storage)
    store.rebuild_catalog()
    assert catalog.is_current(store.storage)


def test_nirslake_catalog_command_rebuilds_a_stale_catalog(demo_ws, tmp_path, capsys):
    storage = Storage(demo_ws)
    storage.publish(catalog.CATALOG_STAMP, b'{"format_version": 0}', overwrite=True)
    before = catalog_identity(demo_ws)
    assert not catalog.is_current(storage)

    assert cli.main(["catalog", "-w", demo_ws]) == 0
    assert catalog.is_current(storage)
    assert catalog_identity(demo_ws) != before
    assert str(_catalog_file(demo_ws)) in capsys.readouterr().out
    assert shell_count(demo_ws, tmp_path / "elsewhere") == 72


def test_opening_a_store_recreates_a_missing_catalog(demo_ws, tmp_path):
    storage = Storage(demo_ws)
    assert storage.delete(catalog.CATALOG_FILE)
    assert not catalog.is_current(storage)
    with WorkspaceStore(demo_ws) as store:
        assert storage.exists(catalog.CATALOG_FILE)
        assert catalog.is_current(storage)
        n = store.query_predictions().height
    assert shell_count(demo_ws, tmp_path / "elsewhere") == n == 72


def test_opening_a_store_rebuilds_a_catalog_built_elsewhere(demo_ws):
    storage = Storage(demo_ws)
    stamp = json.loads(storage.read_bytes(catalog.CATALOG_STAMP))
    storage.publish(catalog.CATALOG_STAMP, json.dumps({**stamp, "lake": "/old/place"}).encode(), overwrite=True)
    before = catalog_identity(demo_ws)
    WorkspaceStore(demo_ws).close()
    assert catalog.is_current(storage)
    assert catalog_identity(demo_ws) != before


def test_opening_a_store_on_a_current_catalog_does_not_rebuild_it(demo_ws):
    before = catalog_identity(demo_ws)
    WorkspaceStore(demo_ws).close()
    assert catalog_identity(demo_ws) == before


def test_catalog_file_holds_only_the_documented_views_and_macros(demo_ws):
    tables = catalog_sql(demo_ws, "SELECT table_name FROM duckdb_tables() WHERE NOT internal")
    assert tables.height == 0, f"catalog.duckdb must hold only views, found tables {tables['table_name'].to_list()}"
    views = set(catalog_sql(demo_ws, "SELECT view_name FROM duckdb_views() WHERE NOT internal")["view_name"])
    assert set(VIEWS) <= views
    macros = set(catalog_sql(
        demo_ws, "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_name IN ('lake_files', 'lake_table')"
    )["function_name"])
    assert macros == set(MACROS)
    for view in VIEWS:
        catalog_sql(demo_ws, f"SELECT * FROM {view} LIMIT 1")  # every view runs
    assert catalog_sql(demo_ws, "SELECT count(*) FROM lake_table('predictions')").item() == 72


# --------------------------------------------------------------------------- 5. compaction


def _counts(store, workspace: str) -> dict:
    counts = {t: (view_count(workspace, t), scan(workspace, t).collect().height) for t in DATA_TABLES}
    counts["api"] = (store.query_predictions().height, store.list_runs().height, store.list_pipelines().height)
    return counts


def _files(storage: Storage, table: str, prefix: str) -> list[str]:
    return [r for r in storage.list_files(f"tables/{table}") if posixpath.basename(r).startswith(prefix)]


def test_vacuum_keeps_duckdb_polars_and_the_store_in_agreement(demo_ws, tmp_path, make_pipeline, add_prediction):
    elsewhere = tmp_path / "elsewhere"
    storage = Storage(demo_ws)
    # grace_seconds=0: the replaced files' bytes go in this same vacuum.
    with WorkspaceStore(demo_ws, grace_seconds=0) as store:
        # More pipelines on one dataset, each flushed on its own, so folders hold several files.
        for i in range(3):
            _add_pipeline(store, make_pipeline, add_prediction, run_name=f"extra_{i}", with_arrays=True)
        # Something for compaction to drop: a deleted prediction and a superseded run version.
        victim = store.query_predictions(dataset_name="wheat_protein", partition="train").row(0, named=True)["prediction_id"]
        store.delete_prediction(victim)
        assert len(_files(storage, "predictions", "part-")) > 4

        before = _counts(store, demo_ws)
        shell_before = shell_count(demo_ws, elsewhere)
        # The folders holding two or more data files are the ones compaction must merge.
        crowded = {}
        for table in ("predictions", "prediction_arrays", "runs", "pipelines", "chains", "logs", "artifacts"):
            for rel in _files(storage, table, "part-"):
                if "-schema-v" not in rel:
                    crowded.setdefault(posixpath.dirname(rel), []).append(posixpath.basename(rel))
        crowded = {folder: names for folder, names in crowded.items() if len(names) >= 2}
        assert "tables/predictions/dataset=corn_m5" in crowded
        store.vacuum()
        after = _counts(store, demo_ws)
    assert after == before
    for table in DATA_TABLES:
        v, s = after[table]
        assert v == s, f"{table}: DuckDB view shows {v} rows, polars scan {s}"
    assert after["api"][0] == after["predictions"][0] == 72 + 3 * 6 - 1
    assert shell_count(demo_ws, elsewhere) == shell_before == after["api"][0]
    with WorkspaceStore(demo_ws) as fresh:
        assert fresh.query_predictions().height == after["api"][0]

    for folder, replaced in crowded.items():
        names = [posixpath.basename(r) for r in storage.list_files(folder)]
        assert [n for n in names if n.startswith("compact-")], f"no compact-* file in {folder}"
        assert not set(replaced) & set(names), f"replaced files left in {folder}"

    # Compaction applied the read rules: the deleted row and superseded versions are gone from the bytes.
    merged = pl.concat([pl.from_arrow(pq.read_table(storage.path(r))) for r in _files(storage, "predictions", "compact-")])
    assert victim not in merged["prediction_id"].to_list()
    runs = pl.concat([pl.from_arrow(pq.read_table(storage.path(r))) for r in _files(storage, "runs", "compact-")])
    assert runs.height == runs["run_id"].n_unique()


def test_a_workspace_path_with_glob_characters_works_everywhere(tmp_path):
    ws = str(tmp_path / "exp[1]*?")
    with WorkspaceStore(ws) as store:
        run = store.begin_run("r", {}, [])
        pipe = store.begin_pipeline(run, "p", {}, {}, "wheat", "h")
        store.save_prediction(pipe, None, "wheat", "m", "M", 0, "val", 0.1, 0.1, 0.1, "rmse", "regression",
                              1, 1, {}, {}, None, None, 0, 0.0)
        assert store.sql("SELECT count(*) AS n FROM predictions")["n"][0] == 1
    assert scan(ws, "predictions").collect().height == 1


def test_a_catalog_made_from_another_workspaces_reads_its_own_lake(tmp_path, make_pipeline, add_prediction):
    """Issue 11: a process binds the views once and makes later catalogs by copying that one and
    replacing the two location macros. Each copy must read its own workspace only, in the shell,
    through ``store.sql`` and in a fresh bind (``connect``), with the same rows and columns."""
    made = {}
    for name, n in (("first", 1), ("second", 3), ("third [x]'s", 2)):
        workspace = str(tmp_path / name)
        with WorkspaceStore(workspace) as store:
            ids = make_pipeline(store, dataset_name=f"ds_{n}")
            for fold in range(n):
                add_prediction(store, ids, dataset_name=f"ds_{n}", fold_id=str(fold))
            store.flush()
            via_store = store.sql("SELECT dataset_name, count(*) AS n FROM predictions GROUP BY ALL").rows()
        made[workspace] = n
        assert via_store == [(f"ds_{n}", n)]
        assert catalog._BUILT, "the first build of the process is kept to copy"
    for workspace, n in made.items():
        stored = catalog_sql(workspace, "SELECT lake_location() AS at, (SELECT count(*) FROM predictions) AS n").row(0)
        assert stored == (str(Path(workspace).resolve()), n)
        assert shell_count(workspace, tmp_path / "elsewhere") == n
        con = catalog.connect(Storage(workspace))  # every view bound afresh on this workspace
        try:
            fresh = con.execute("SELECT * FROM predictions_with_run ORDER BY prediction_id").pl()
        finally:
            con.close()
        assert catalog_sql(workspace, "SELECT * FROM predictions_with_run ORDER BY prediction_id").equals(fresh)
        assert catalog_sql(workspace, "SELECT * FROM array_scores").columns == con_columns(workspace, "array_scores")


def con_columns(workspace: str, view: str) -> list[str]:
    con = catalog.connect(Storage(workspace))
    try:
        return [d[0] for d in con.execute(f"SELECT * FROM {view} LIMIT 0").description]
    finally:
        con.close()


def test_a_copied_catalog_on_s3_reads_the_bucket(s3_workspace, tmp_path, make_pipeline, add_prediction):
    """Issue 11, on S3: a catalog copied from a local one holds the bucket's URL, and ``store.sql``
    (its own copy, with httpfs or fsspec) reads the bucket's rows."""
    WorkspaceStore(str(tmp_path / "local")).close()  # this process's bound catalog, to copy
    assert catalog._BUILT
    with WorkspaceStore(s3_workspace) as store:
        ids = make_pipeline(store, dataset_name="ds_s3")
        for fold in range(2):
            add_prediction(store, ids, dataset_name="ds_s3", fold_id=str(fold))
        store.flush()
        assert store.sql("SELECT lake_location() AS at, count(*) AS n FROM predictions").row(0) == (s3_workspace, 2)
        assert store.sql("SELECT DISTINCT dataset_name FROM predictions_with_run").rows() == [("ds_s3",)]
    copy = tmp_path / "from-bucket.duckdb"
    copy.write_bytes(Storage(s3_workspace).read_bytes(catalog.CATALOG_FILE))
    con = duckdb.connect(str(copy), read_only=True)
    try:
        assert con.execute("SELECT lake_location(), lake_location_glob()").fetchone() == (s3_workspace, s3_workspace)
    finally:
        con.close()
