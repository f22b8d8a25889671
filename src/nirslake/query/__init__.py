"""polars helpers over the lake: lazy scans that apply the read rules, ranking and fold aggregation.

Every helper returns a ``polars.LazyFrame`` or ``DataFrame``; they read the same rows the DuckDB views show.
"""

from __future__ import annotations

import json
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
from . import scores as sc

# Metrics where a smaller value is better (a bias too, by its absolute value); everything else
# (r2, rpd, accuracy, f1, ...) ranks descending. The directions live in nirslake.query.scores.
LOWER_IS_BETTER = sc.LOWER_IS_BETTER | sc.CLOSEST_TO_ZERO


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
    options = polars_options(storage)
    if storage.protocol not in POLARS_NATIVE or options is False:
        return pl.from_arrow(read_files(storage, tdef, FileCache(), list(rels))).lazy()
    return pl.scan_parquet(
        [storage.url(r) for r in rels],
        schema=polars_schema(tdef),
        missing_columns="insert",
        extra_columns="ignore",
        hive_partitioning=False,
        glob=False,  # explicit file names: brackets in a workspace path are not patterns
        storage_options=options or None,
    )


# fsspec's (s3fs's) option names -> polars' (object_store's), for the options docs/remote.md gives.
_S3_OPTIONS = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token",
               "endpoint_url": "aws_endpoint_url", "region_name": "aws_region", "region": "aws_region"}


def polars_options(storage: Storage) -> dict | None | bool:
    """The workspace's fsspec ``storage_options`` as polars takes them (flat text), or False when
    polars cannot take them (another option, a nested value it has no name for): the files are
    then read through fsspec, which takes every option the store does."""
    given = storage.storage_options
    if not given:
        return None
    if storage.protocol not in ("s3", "s3a"):
        return dict(given) if all(isinstance(v, str) for v in given.values()) else False
    flat: dict[str, str] = {}
    for name, value in given.items():
        if name == "client_kwargs" and isinstance(value, dict):
            for inner, inner_value in value.items():
                if inner not in _S3_OPTIONS or not isinstance(inner_value, str):
                    return False
                flat[_S3_OPTIONS[inner]] = inner_value
        elif name in _S3_OPTIONS and isinstance(value, str):
            flat[_S3_OPTIONS[name]] = value
        elif name.startswith("aws_") and isinstance(value, str):
            flat[name] = value  # already polars' own name
        else:
            return False
    if flat.get("aws_endpoint_url", "").startswith("http://"):
        flat["aws_allow_http"] = "true"
    return flat


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
    rmse/mae/mse/sep, higher for r2/rpd/rpiq/accuracy/f1, and a bias ranks by its absolute value
    (``nirslake.query.scores.direction``). ``metric`` names it when ``score`` is a column
    like ``val_score``; without it the column name itself is taken as the metric.
    """
    order: pl.Expr | str = score
    if ascending is None and sc.direction(metric or score) == "zero":  # a bias: the closest to zero first
        order, ascending = pl.col(score).abs(), True
    elif ascending is None:
        ascending = lower_is_better(metric or score)
    rows = predictions.collect() if isinstance(predictions, pl.LazyFrame) else predictions
    keys = ([by] if isinstance(by, str) else list(by)) if by else []
    # Rank row numbers, not rows: a sort moves every column of every row, while only the
    # winners' rows are needed (a third of the first top_predictions of a fresh process).
    frame = (
        rows.lazy()
        .select(pl.int_range(0, pl.len(), dtype=pl.UInt32).alias("_row"), *dict.fromkeys([*keys, score]))
        .sort(order, descending=not ascending, nulls_last=True, maintain_order=True)
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
    arr = arrays.lazy().select("prediction_id", "y_true", "y_pred", "y_proba", "sample_indices", "weights", "sample_ids")
    return predictions.lazy().join(arr, on="prediction_id", how="left")


# --------------------------------------------------------------------------- scores as columns


def with_scores(predictions: pl.LazyFrame | pl.DataFrame, metrics: Sequence[str] | None = None) -> pl.LazyFrame:
    """The predictions with one Float64 column per metric: ``scores[<the row's partition>][metric]``.

    ``metrics`` defaults to every metric any row's ``scores`` holds for its partition. Then
    ``top_k(with_scores(preds), 5, score="r2")`` ranks by R² (higher first). A missing value is null.
    """
    frame = predictions.lazy()
    pairs = frame.select("partition", "scores").unique().collect()
    partitions = [p for p in pairs["partition"].unique().to_list() if p is not None]
    if metrics is None:
        found: set[str] = set()
        for text, partition in zip(pairs["scores"].to_list(), pairs["partition"].to_list()):
            found |= sc.metrics_in([_loads(text)], partition) if partition is not None else set()
        metrics = sorted(found)
    columns = []
    for metric in metrics:
        expr = pl.lit(None, dtype=pl.Float64)
        for partition in partitions:
            expr = pl.when(pl.col("partition") == partition).then(_score_expr(partition, metric)).otherwise(expr)
        columns.append(expr.alias(metric))
    return frame.with_columns(columns) if columns else frame


def _score_expr(partition: str, metric: str) -> pl.Expr:
    if any(c in partition + metric for c in "'\\[]"):  # not safe inside a JSONPath: decode in Python
        return pl.col("scores").map_elements(
            lambda text: sc.score_of(_loads(text), partition, metric), return_dtype=pl.Float64, skip_nulls=True
        )
    return pl.col("scores").str.json_path_match(f"$['{partition}']['{metric}']").cast(pl.Float64, strict=False)


def _loads(text: str | None) -> dict | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def scores_from_arrays(
    predictions: pl.LazyFrame | pl.DataFrame, by_sample: str | None = None, method: str = "mean"
) -> pl.DataFrame:
    """The chemometrics set computed from each prediction's arrays, one column per metric.

    ``predictions`` holds ``y_true`` and ``y_pred`` list columns (``with_arrays``, or a facade's
    ``to_polars()``); a ``task_type`` containing "classif" gives accuracy, balanced_accuracy and
    f1, any other rmse, mse, mae, r2, bias, sep, rpd and rpiq (definitions: docs/scores.md).
    ``by_sample`` (a list column of sample ids, usually ``"sample_ids"``) first folds repeated
    measurements per sample with ``method`` (``mean``, ``median``; ``vote`` for labels).
    Returns the predictions' own columns without the arrays, plus the metrics (and ``n_scored``:
    the rows, or samples, scored). Rank with ``top_k(..., score="r2")``.
    """
    if method not in sc.AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}: use one of {', '.join(sc.AGGREGATIONS)}")
    frame = predictions.lazy()
    names = frame.collect_schema().names()
    arrays = [c for c in ("y_true", "y_pred", "y_proba", "sample_indices", "weights", "sample_ids") if c in names]
    if "task_type" not in names:
        frame = frame.with_columns(pl.lit("regression").alias("task_type"))
    lists = ["y_true", "y_pred"] + ([by_sample] if by_sample else [])
    points = (
        frame.select("prediction_id", "task_type", *lists)
        .filter(pl.all_horizontal(pl.col(c).is_not_null() for c in lists))
        .explode(lists)
        .rename({"y_true": "t", "y_pred": "p"})
        .with_columns(pl.col("task_type").fill_null("regression").str.to_lowercase().str.contains("classif").alias("_clf"))
    )
    if by_sample:
        aggregate = {"mean": pl.col("p").mean(), "median": pl.col("p").median(), "vote": pl.col("p").mode().min()}[method]
        truth = pl.col("t").mode().min() if method == "vote" else pl.col("t").mean()
        points = points.group_by("prediction_id", "_clf", by_sample).agg(truth.alias("t"), aggregate.alias("p"))
    points = points.collect()
    regression = _regression_metrics(points.filter(~pl.col("_clf")))
    classification = _classification_metrics(points.filter(pl.col("_clf")))
    metrics = pl.concat([regression, classification], how="diagonal_relaxed")
    base = frame.drop(arrays).collect()
    joined = base.join(metrics, on="prediction_id", how="left")
    for metric in sc.METRICS:
        if metric not in joined.columns:
            joined = joined.with_columns(pl.lit(None, dtype=pl.Float64).alias(metric))
    return joined


def _regression_metrics(points: pl.DataFrame) -> pl.DataFrame:
    e = pl.col("p") - pl.col("t")
    sep = (e - e.mean()).pow(2).sum().truediv(pl.len() - 1).sqrt()
    ss_tot = (pl.col("t") - pl.col("t").mean()).pow(2).sum()
    iqr = pl.col("t").quantile(0.75, "linear") - pl.col("t").quantile(0.25, "linear")
    return (
        points.group_by("prediction_id")
        .agg(
            e.pow(2).mean().sqrt().alias("rmse"),
            e.pow(2).mean().alias("mse"),
            e.abs().mean().alias("mae"),
            pl.when(ss_tot > 0).then(1 - e.pow(2).sum() / ss_tot).otherwise(float("nan")).alias("r2"),
            e.mean().alias("bias"),
            pl.when(pl.len() > 1).then(sep).otherwise(float("nan")).alias("sep"),
            pl.when(pl.len() > 1).then(pl.col("t").std(ddof=1) / sep).otherwise(float("nan")).alias("rpd"),
            pl.when(pl.len() > 1).then(iqr / sep).otherwise(float("nan")).alias("rpiq"),
            pl.len().alias("n_scored"),
        )
    )


def _classification_metrics(points: pl.DataFrame) -> pl.DataFrame:
    hit = (pl.col("p") == pl.col("t")).cast(pl.Float64)
    per_class = (
        points.group_by("prediction_id", "t")
        .agg(pl.len().alias("support"), hit.sum().alias("tp"))
        .join(
            points.group_by("prediction_id", "p").agg(pl.len().alias("predicted")).rename({"p": "t"}),
            on=["prediction_id", "t"],
            how="left",
        )
        .with_columns(pl.col("predicted").fill_null(0))
        .with_columns(
            (pl.col("tp") / pl.col("support")).alias("recall"),
            (2 * pl.col("tp") / (pl.col("predicted") + pl.col("support"))).alias("f1"),  # 2TP / (2TP + FP + FN)
        )
        .group_by("prediction_id")
        .agg(
            pl.col("recall").mean().alias("balanced_accuracy"),
            ((pl.col("f1") * pl.col("support")).sum() / pl.col("support").sum()).alias("f1"),
        )
    )
    overall = points.group_by("prediction_id").agg(hit.mean().alias("accuracy"), pl.len().alias("n_scored"))
    return overall.join(per_class, on="prediction_id", how="left")
