"""``show ID``: find what an id names (run, pipeline, chain or prediction) and gather what a
person wants to see of it, arrays summarised rather than dumped."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ..lake.arrays import ARRAY_FIELDS

if TYPE_CHECKING:
    from ..store import WorkspaceStore

KINDS = ("run", "pipeline", "chain", "prediction")
HEAD = 5  # leading values shown of each array


def array_summary(value: np.ndarray | None) -> dict[str, Any] | None:
    """Shape, dtype, range, mean, NaN count and the leading values of one array (None stays None)."""
    if value is None:
        return None
    arr = np.asarray(value)
    out: dict[str, Any] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "head": arr.ravel()[:HEAD].tolist()}
    if arr.size and np.issubdtype(arr.dtype, np.number):
        finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
        out["nan"] = int(arr.size - finite.size)
        if finite.size:
            out.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()))
    return out


def find(store: WorkspaceStore, entity_id: str, arrays: bool = False) -> tuple[str, dict[str, Any]]:
    """``(kind, details)`` of what ``entity_id`` names; ``KeyError`` when nothing does.

    A run comes with its pipelines by status; a pipeline with its chains; a chain with its score
    per fold and over folds; a prediction with a summary of each array (``arrays=True``: also the
    values themselves)."""
    run = store.get_run(entity_id)
    if run is not None:
        pipelines = store.list_pipelines(run_id=entity_id)
        counts = pipelines.group_by("status").len().sort("status")
        run["pipelines"] = dict(zip(counts["status"].to_list(), counts["len"].to_list()))
        run["datasets_used"] = sorted(pipelines["dataset_name"].unique().to_list())
        run["predictions"] = store.query_predictions(run_id=entity_id).height
        return "run", run
    pipeline = store.get_pipeline(entity_id)
    if pipeline is not None:
        chains = store.get_chains_for_pipeline(entity_id)
        pipeline["chains"] = chains.select("chain_id", "model_class", "preprocessings", "fold_strategy").to_dicts()
        return "pipeline", pipeline
    chain = store.get_chain(entity_id)
    if chain is not None:
        folds = store.query_predictions(pipeline_id=chain["pipeline_id"]).filter(pl.col("chain_id") == entity_id)
        chain["folds"] = folds.sort("partition", "fold_id").select(
            "prediction_id", "fold_id", "partition", "metric", "val_score", "test_score", "train_score", "n_samples"
        ).to_dicts()
        chain["over_folds"] = (
            folds.group_by("partition").agg(
                pl.col("metric").first(),
                pl.col("val_score").mean().alias("val_score_mean"), pl.col("val_score").std().alias("val_score_std"),
                pl.col("test_score").mean().alias("test_score_mean"), pl.len().alias("n_folds"),
            ).sort("partition").to_dicts()
        )
        return "chain", chain
    prediction = store.get_prediction(entity_id, load_arrays=True)
    if prediction is not None:
        for field in ARRAY_FIELDS:
            value = prediction.pop(field, None)
            prediction[field] = value if arrays else array_summary(value)
        return "prediction", prediction
    raise KeyError(f"no run, pipeline, chain or prediction has id {entity_id!r} in this workspace")
