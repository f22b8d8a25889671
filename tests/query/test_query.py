"""polars helpers (nirslake.query) and the partition naming rules of the lake spec §2."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import let_object_times_pass

import nirslake.query as q
from nirslake import WorkspaceStore
from nirslake.lake.schema import PREDICTIONS
from nirslake.lake.tables import encode_partition_value, new_file_name, partition_dir


def _sweep(store: WorkspaceStore, datasets=("wheat", "corn"), chains=3, folds=4) -> None:
    """Chains whose val rmse grows with their index, so the best chain is known."""
    run = store.begin_run("sweep", {}, [{"name": d} for d in datasets])
    for d in datasets:
        for c in range(chains):
            pipe = store.begin_pipeline(run, f"{d}-{c}", {}, {}, d, "h")
            chain = store.save_chain(pipe, [], 0, "PLS", "", "kfold", {}, {})
            for fold in range(folds):
                for part in ("train", "val", "test"):
                    pid = store.save_prediction(pipe, chain, d, f"PLS-{c}", "PLS", fold, part, 1.0 + c + 0.01 * fold,
                                                2.0, 0.5, "rmse", "regression", 30, 10, {}, {}, None, None, 0, 0.0)
                    store.save_prediction_arrays(pid, np.arange(30.0), np.arange(30.0) + c)
            store.complete_pipeline(pipe, 1.0 + c, 2.0, "rmse", 5)
    store.flush()  # publish, so scans from outside the store see the sweep


def test_scan_returns_the_same_rows_as_the_store(store, workspace):
    _sweep(store)
    lazy = q.scan(workspace, "predictions")
    assert isinstance(lazy, pl.LazyFrame)
    assert lazy.collect().height == store.query_predictions().height == 2 * 3 * 4 * 3
    wheat = q.scan(workspace, "predictions", dataset_name="wheat").collect()
    assert set(wheat["dataset_name"]) == {"wheat"} and wheat.height == 36


def test_scan_applies_latest_wins_and_deletions(store, workspace):
    _sweep(store, datasets=("wheat",), chains=1, folds=1)
    run_id = store.list_runs()["run_id"][0]
    store.complete_run(run_id, {"best": 1.0})
    store.flush()
    runs = q.scan(workspace, "runs").collect()
    assert runs.height == 1 and runs["status"][0] == "completed"
    victim = store.query_predictions()["prediction_id"][0]
    assert store.delete_prediction(victim)
    assert victim not in q.scan(workspace, "predictions").collect()["prediction_id"].to_list()
    assert victim not in q.scan(workspace, "prediction_arrays").collect()["prediction_id"].to_list()


def test_scan_reads_old_files_missing_a_column_as_nulls(store, workspace):
    _sweep(store, datasets=("wheat",), chains=1, folds=1)
    store.flush()
    # A file from an older writer without the `preprocessings` column.
    old = pa.table({"prediction_id": ["old1"], "run_id": [store.list_runs()["run_id"][0]], "dataset_name": ["wheat"],
                    "partition": ["val"], "val_score": [0.5], "created_at": pa.array([0], pa.timestamp("us", tz="UTC"))})
    folder = os.path.join(workspace, partition_dir(PREDICTIONS, "wheat"))
    pq.write_table(old, os.path.join(folder, new_file_name()))
    frame = q.scan(workspace, "predictions").collect()
    old_row = frame.filter(pl.col("prediction_id") == "old1")
    assert old_row.height == 1 and old_row["preprocessings"][0] is None and old_row["val_score"][0] == 0.5


def test_scan_rejects_an_unknown_table(workspace):
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        q.scan(workspace, "nope")


@pytest.mark.parametrize(
    "metric, expected",
    [("rmse", True), ("MAE", True), ("mse", True), ("r2", False), ("accuracy", False), ("f1", False), ("neg_rmse", False)],
)
def test_direction_follows_the_metric(metric, expected):
    assert q.lower_is_better(metric) is expected


def test_top_k_per_dataset_picks_lowest_rmse_and_highest_r2():
    frame = pl.DataFrame({"dataset_name": ["a", "a", "a", "b", "b"], "rmse": [0.3, 0.1, None, 0.5, 0.2], "r2": [0.7, 0.9, 0.1, 0.4, 0.8]})
    best_rmse = q.top_k(frame, 1, score="rmse", by="dataset_name")
    assert best_rmse["rmse"].to_list() == [0.1, 0.2]
    best_r2 = q.top_k(frame, 2, score="r2", by="dataset_name")
    assert best_r2["r2"].to_list() == [0.9, 0.7, 0.8, 0.4]
    # nulls rank last, after every real score
    assert q.top_k(frame, 3, score="rmse", by="dataset_name").filter(pl.col("dataset_name") == "a")["rmse"].to_list() == [0.1, 0.3, None]


def test_fold_summary_and_arrays_join(store, workspace):
    _sweep(store, datasets=("wheat",), chains=2, folds=4)
    val = q.scan(workspace, "predictions").filter(pl.col("partition") == "val")
    summary = q.fold_summary(val)
    assert summary.height == 2 and summary["n_folds"].to_list() == [4, 4]
    assert sorted(summary["val_score_mean"].round(6).to_list()) == [1.015, 2.015]
    joined = q.with_arrays(val, q.scan(workspace, "prediction_arrays")).collect()
    assert joined.height == 8 and all(len(y) == 30 for y in joined["y_pred"])


@pytest.mark.parametrize("name", ["a/b", "..", ".", "x=y", "50%", "with space", "été 日本", "", "../../etc", "a" * 400])
def test_partition_folders_stay_inside_and_round_trip(store, workspace, name):
    run = store.begin_run("names", {}, [{"name": name}])
    pipe = store.begin_pipeline(run, "p", {}, {}, name, "h")
    pid = store.save_prediction(pipe, None, name, "m", "M", 0, "val", 0.1, 0.1, 0.1, "rmse", "regression",
                                1, 1, {}, {}, None, None, 0, 0.0)
    store.save_prediction_arrays(pid, [1.0], [2.0])
    store.flush()
    enc = encode_partition_value(name)
    assert "/" not in enc and enc not in ("", ".", "..") and len(enc.encode()) <= 200
    tables = os.path.realpath(os.path.join(workspace, "tables", "predictions"))
    for root, _dirs, files in os.walk(tables):
        assert os.path.realpath(root).startswith(tables)
    assert store.query_predictions(dataset_name=name)["prediction_id"].to_list() == [pid]
    assert q.scan(workspace, "predictions", dataset_name=name).collect()["dataset_name"].to_list() == [name]
    assert store.get_prediction(pid, load_arrays=True)["y_pred"].tolist() == [2.0]


def test_a_prediction_saved_again_under_its_id_replaces_it_in_every_reader(store, workspace):
    run = store.begin_run("r", {}, [])
    pipe = store.begin_pipeline(run, "p", {}, {}, "wheat", "h")
    for score in (0.9, 0.4):
        store.save_prediction(pipe, None, "wheat", "m", "M", 0, "val", score, 0.1, 0.1, "rmse", "regression",
                              1, 1, {}, {}, None, None, 0, 0.0, prediction_id="fixed-id")
    assert store.query_predictions()["val_score"].to_list() == [0.4]
    assert q.scan(workspace, "predictions").collect()["val_score"].to_list() == [0.4]
    assert store.sql("SELECT val_score FROM predictions")["val_score"].to_list() == [0.4]


def test_one_object_recorded_by_two_writers_is_one_artifact(workspace):
    first, second = WorkspaceStore(workspace, grace_seconds=0), WorkspaceStore(workspace)
    try:
        ids = {s.save_artifact({"coef": [1, 2]}, "Ridge", "model", "pickle") for s in (first, second)}
        first.flush()
        second.flush()
        assert len(ids) == 1
        assert q.scan(workspace, "artifacts").collect().height == 1
        assert first.sql("SELECT count(*) AS n FROM artifacts")["n"][0] == 1
        let_object_times_pass(workspace)
        assert first.gc_artifacts() == 1  # unreferenced, and counted once, not once per record
    finally:
        first.close()
        second.close()
