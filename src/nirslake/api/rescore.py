"""rescore: the chemometrics set computed from stored arrays, saved into each prediction's
``scores`` (``WorkspaceStore.rescore``). The metric definitions live in ``nirslake.query.scores``.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from .. import query as q
from ..query.scores import METRICS, compute


def rescore(
    store: Any,
    dataset_name: str | None = None,
    run_id: str | None = None,
    pipeline_id: str | None = None,
    partition: str | None = None,
    save: bool = True,
) -> Any:
    """``WorkspaceStore.rescore``: the metric set of each matching prediction's arrays, saved into its ``scores``."""
    predictions = store.query_predictions(dataset_name=dataset_name, run_id=run_id, pipeline_id=pipeline_id, partition=partition)
    arrays: dict[str, dict] = {}
    ids = predictions["prediction_id"].to_list()
    for dataset in predictions["dataset_name"].unique().to_list():
        stored = q.scan(store.storage, "prediction_arrays", dataset_name=dataset).filter(pl.col("prediction_id").is_in(ids))
        for row in stored.select("prediction_id", "y_true", "y_pred").collect().iter_rows(named=True):
            arrays[row["prediction_id"]] = row
    computed, records = [], []
    for row in predictions.iter_rows(named=True):
        found = arrays.get(row["prediction_id"])
        if found is None or found["y_true"] is None or found["y_pred"] is None:
            continue
        values = compute(found["y_true"], found["y_pred"], row["task_type"])
        computed.append({"prediction_id": row["prediction_id"], "dataset_name": row["dataset_name"],
                         "partition": row["partition"], "task_type": row["task_type"], **values})
        if save:
            stored_scores = json.loads(row["scores"]) if row["scores"] else {}
            stored_scores = stored_scores if isinstance(stored_scores, dict) else {}
            own = stored_scores.get(row["partition"])
            stored_scores[row["partition"]] = {**(own if isinstance(own, dict) else {}), **values}
            fields = ("pipeline_id", "chain_id", "dataset_name", "model_name", "model_class", "fold_id", "partition",
                      "val_score", "test_score", "train_score", "metric", "task_type", "n_samples", "n_features",
                      "branch_id", "branch_name", "exclusion_count", "exclusion_rate", "preprocessings", "prediction_id")
            best_params = json.loads(row["best_params"]) if row["best_params"] else None
            records.append({**{f: row[f] for f in fields}, "scores": stored_scores, "best_params": best_params})
    if records:
        store.save_predictions(records)
    schema = {"prediction_id": pl.String, "dataset_name": pl.String, "partition": pl.String, "task_type": pl.String,
              **{m: pl.Float64 for m in METRICS}}
    return pl.DataFrame(computed, schema=schema)
