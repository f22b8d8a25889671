"""The API under the new CLI commands: chains ranked by their mean over folds, ``show``'s
lookup, ``list_chains``, strict JSON, and ``vacuum(grace_seconds=0)`` reclaiming a deleted run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from nirslake import WorkspaceStore
from nirslake.api import describe, rankings
from nirslake.api.jsonable import dumps, jsonable
from nirslake.cli.demo import run_demo


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory) -> str:
    ws = str(tmp_path_factory.mktemp("api") / "ws")
    run_demo(ws, quick=True)
    return ws


def test_top_chains_is_the_mean_over_folds_in_the_metric_direction(demo_ws):
    with WorkspaceStore(demo_ws) as store:
        ranking = rankings.top_chains(store, 2)
        preds = store.query_predictions(partition="val")
        r2 = rankings.top_chains(store, 1, metric="r2", dataset_name="wheat_protein")
    means = preds.group_by("chain_id", "dataset_name").agg(pl.col("val_score").mean().alias("m"))
    expected = means.sort("m").group_by("dataset_name", maintain_order=True).head(2).sort("dataset_name", "m")
    assert ranking.frame["chain_id"].to_list() == expected["chain_id"].to_list()
    assert ranking.frame["val_score_mean"].to_list() == pytest.approx(expected["m"].to_list())
    assert ranking.frame["n_folds"].to_list() == [3, 3, 3, 3]
    assert (ranking.metric, ranking.direction, ranking.level) == ("rmse", "min", "chain")
    assert "mean rmse over folds" in ranking.describe() and "lower is better" in ranking.describe()
    wheat = preds.filter(pl.col("dataset_name") == "wheat_protein").with_columns(
        pl.col("scores").str.json_path_match("$.val.r2").cast(pl.Float64).alias("r2"))
    best = wheat.group_by("chain_id").agg(pl.col("r2").mean()).sort("r2", descending=True).row(0)
    assert r2.frame["chain_id"].to_list() == [best[0]] and r2.direction == "max"
    assert r2.frame["r2_mean"][0] == pytest.approx(best[1])


def test_nothing_matched_names_what_exists(demo_ws):
    with WorkspaceStore(demo_ws) as store:
        assert rankings.nothing_matched(store, dataset_name="wheat_protein", partition="val") is None
        said = rankings.nothing_matched(store, dataset_name="rice", partition="holdout")
    assert "no dataset 'rice' here; it holds: corn_moisture, wheat_protein" in said
    assert "no partition 'holdout' here; it holds: test, train, val" in said


def test_describe_finds_each_kind(demo_ws):
    with WorkspaceStore(demo_ws) as store:
        run_id = store.list_runs()["run_id"][0]
        chain = store.list_chains().row(0, named=True)
        pred = store.query_predictions(partition="val").row(0, named=True)
        assert describe.find(store, run_id)[0] == "run"
        assert describe.find(store, chain["pipeline_id"])[0] == "pipeline"
        kind, found = describe.find(store, chain["chain_id"])
        assert kind == "chain" and len(found["folds"]) == 9
        kind, found = describe.find(store, pred["prediction_id"])
        full = store.get_prediction(pred["prediction_id"], load_arrays=True)
        with pytest.raises(KeyError, match="no run, pipeline, chain or prediction"):
            describe.find(store, "f" * 32)
    assert kind == "prediction"
    assert found["y_true"]["shape"] == [pred["n_samples"]] and found["y_proba"] is None
    assert found["y_pred"]["min"] == pytest.approx(float(full["y_pred"].min()))
    summary = describe.array_summary(np.array([1.0, np.nan, np.inf, 3.0]))
    assert summary["nan"] == 2 and summary["mean"] == 2.0


def test_list_chains_filters_and_carries_the_dataset(demo_ws):
    with WorkspaceStore(demo_ws) as store:
        every = store.list_chains()
        corn = store.list_chains(dataset_name="corn_moisture")
        pipeline = store.list_pipelines().row(0, named=True)
        one = store.list_chains(pipeline_id=pipeline["pipeline_id"])
    assert every.height == 8 and corn.height == 4 and set(corn["dataset_name"]) == {"corn_moisture"}
    assert "artifact_ids" not in every.columns
    assert one["dataset_name"].to_list() == [pipeline["dataset_name"]]


def test_jsonable_is_strict():
    value = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": np.float32(2.0), "d": np.array([np.nan, 1.0])}
    assert jsonable(value) == {"a": None, "b": [None, None, 1.5], "c": 2.0, "d": [None, 1.0]}
    assert json.loads(dumps(value), parse_constant=lambda c: pytest.fail(c)) == jsonable(value)
    assert math.isnan(float("nan"))  # (the input was not changed in place)


def _bytes(ws: str) -> int:
    return sum(f.stat().st_size for d in ("tables", "objects") for f in Path(ws, d).rglob("*") if f.is_file())


def test_vacuum_with_no_grace_reclaims_a_deleted_run_at_once(local_workspace):
    run_demo(local_workspace, quick=True)
    with WorkspaceStore(local_workspace) as store:
        full = _bytes(local_workspace)
        store.delete_run(store.list_runs()["run_id"][0])
        store.vacuum()  # the default grace: nothing is reclaimed yet
        assert _bytes(local_workspace) >= full * 0.9
    with WorkspaceStore(local_workspace, grace_seconds=0) as store:
        store.gc_artifacts()
        store.vacuum()
        assert store.check().ok and store.query_predictions().height == 0
    # Every partition held a single file (one run): they are rewritten too, not only merged pairs.
    assert _bytes(local_workspace) < full / 5, (full, _bytes(local_workspace))
