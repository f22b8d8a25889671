"""polars helpers over the lake: lazy scans that apply the read rules, ranking and fold aggregation.

Every helper returns a ``polars.LazyFrame`` or ``DataFrame``; they read the same rows the DuckDB views show.
"""

from __future__ import annotations

import os
from typing import Sequence

import polars as pl

from ..lake import schema as S
from ..lake.rules import (  # noqa: F401  (the read rules are part of this module's public names)
    _ENTITY_DELETIONS,
    Deleted,
    identity,
    resolve,
    resolve_one,
    stamp_column,
    with_visible_prediction,
)
from ..lake.storage import Storage
from ..lake.tables import FileCache, commit_state, polars_schema, read_files, visible_files

# Metrics where a smaller value is better; everything else (r2, accuracy, f1, ...) ranks descending.
LOWER_IS_BETTER = frozenset({"rmse", "mse", "mae", "mape", "rmsecv", "sep", "bias", "log_loss", "logloss", "loss"})




def lower_is_better(metric: str) -> bool:
    """True when a smaller score is better for ``metric`` (rmse, mae, mse ...).

    scikit-learn's ``neg_*`` scorers are negated errors, so higher is better for them.
    """
    return metric.lower() in LOWER_IS_BETTER


def scan(
    workspace: str | os.PathLike | Storage,
    table: str,
    dataset_name: str | None = None,
    storage_options: dict | None = None,
) -> pl.LazyFrame:
    """A lazy scan of one lake table with the read rules applied.

    ``dataset_name`` prunes partitioned tables (predictions, prediction_arrays) to one folder.
    Columns missing from older files read as nulls (schema evolution by appended columns).
    """
    if table not in S.TABLES:
        raise ValueError(f"unknown table {table!r}: choose one of {', '.join(S.TABLES)}")
    storage = workspace if isinstance(workspace, Storage) else Storage(workspace, storage_options)
    tdef = S.TABLES[table]
    cache = FileCache()
    state = commit_state(storage, cache)
    part = dataset_name if (dataset_name is not None and tdef.partition_by) else ...
    frame = _scan_files(storage, tdef, visible_files(storage, tdef, cache, part, state))
    if part is not ...:
        frame = frame.filter(pl.col("dataset_name") == dataset_name)
    deletions = _scan_files(storage, S.DELETIONS, visible_files(storage, S.DELETIONS, cache, state=state))
    frame = resolve(frame, tdef, deletions)
    if tdef is S.PREDICTION_ARRAYS:
        # Listed after the arrays: a prediction is always published before its arrays.
        predictions = _scan_files(storage, S.PREDICTIONS, visible_files(storage, S.PREDICTIONS, cache, part, state))
        if part is not ...:
            predictions = predictions.filter(pl.col("dataset_name") == dataset_name)
        frame = with_visible_prediction(frame, resolve(predictions, S.PREDICTIONS, deletions))
    return frame


# URL schemes polars reads natively; other fsspec filesystems are read through pyarrow.
POLARS_NATIVE = frozenset({"file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https"})


def _scan_files(storage: Storage, tdef: S.TableDef, rels: Sequence[str]) -> pl.LazyFrame:
    if not rels:
        return pl.LazyFrame(schema=polars_schema(tdef))
    if storage.protocol not in POLARS_NATIVE:
        return pl.from_arrow(read_files(storage, tdef, FileCache(), list(rels))).lazy()
    return pl.scan_parquet(
        [storage.url(r) for r in rels],
        schema=polars_schema(tdef),
        missing_columns="insert",
        extra_columns="ignore",
        hive_partitioning=False,
        glob=False,  # explicit file names: brackets in a workspace path are not patterns
        storage_options=storage.storage_options or None,
    )


def top_k(
    predictions: pl.LazyFrame | pl.DataFrame,
    n: int,
    score: str = "val_score",
    by: str | Sequence[str] | None = None,
    ascending: bool | None = None,
    metric: str | None = None,
) -> pl.DataFrame:
    """The best ``n`` rows (of each ``by`` group) by ``score``; nulls rank last.

    The direction follows ``ascending`` when given, else the metric: lower is better for
    rmse/mae/mse, higher for r2/accuracy/f1. ``metric`` names it when ``score`` is a column
    like ``val_score``; without it the column name itself is taken as the metric.
    """
    if ascending is None:
        ascending = lower_is_better(metric or score)
    rows = predictions.collect() if isinstance(predictions, pl.LazyFrame) else predictions
    keys = ([by] if isinstance(by, str) else list(by)) if by else []
    # Rank row numbers, not rows: a sort moves every column of every row, while only the
    # winners' rows are needed (a third of the first top_predictions of a fresh process).
    frame = (
        rows.lazy()
        .select(pl.int_range(0, pl.len(), dtype=pl.UInt32).alias("_row"), *dict.fromkeys([*keys, score]))
        .sort(score, descending=not ascending, nulls_last=True, maintain_order=True)
    )
    position = pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
    if keys:
        ranked = frame.with_columns(position.over(keys).alias("rank"))
        ranked = ranked.filter(pl.col("rank") <= n).sort([*keys, "rank"], nulls_last=True)
    else:
        ranked = frame.head(n).with_columns(position.alias("rank"))
    winners = ranked.select("_row", "rank").collect()
    return rows[winners["_row"]].with_columns(winners["rank"])


def fold_summary(predictions: pl.LazyFrame | pl.DataFrame, score: str = "val_score") -> pl.DataFrame:
    """Mean, std and count of ``score`` over folds, per chain and partition."""
    return (
        predictions.lazy()
        .group_by(["chain_id", "dataset_name", "model_name", "partition"])
        .agg(
            pl.col(score).mean().alias(f"{score}_mean"),
            pl.col(score).std().alias(f"{score}_std"),
            pl.col(score).count().alias("n_folds"),
        )
        .sort(["dataset_name", "chain_id", "partition"])
        .collect()
    )


def with_arrays(predictions: pl.LazyFrame | pl.DataFrame, arrays: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """Predictions joined to their arrays (y_true, y_pred, y_proba, sample_indices, weights)."""
    arr = arrays.lazy().select("prediction_id", "y_true", "y_pred", "y_proba", "sample_indices", "weights")
    return predictions.lazy().join(arr, on="prediction_id", how="left")
