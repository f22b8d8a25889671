"""polars helpers over the lake: lazy scans that apply the read rules, ranking and fold aggregation.

Every helper returns a ``polars.LazyFrame`` or ``DataFrame``; they read the same rows the DuckDB views show.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import polars as pl
import pyarrow as pa

from . import schema as S
from . import scores as sc
from .storage import Storage
from .tables import FileCache, commit_state, read_files, visible_files

# Metrics where a smaller value is better (a bias too, by its absolute value); everything else
# (r2, rpd, accuracy, f1, ...) ranks descending. The directions live in nirslake.scores.
LOWER_IS_BETTER = sc.LOWER_IS_BETTER | sc.CLOSEST_TO_ZERO

# Which deletion kinds hide rows of which table, and the key they match.
_ENTITY_DELETIONS = {
    "predictions": ("prediction", "prediction_id"),
    "prediction_arrays": ("prediction", "prediction_id"),
    "artifacts": ("artifact", "artifact_id"),
}


def polars_schema(tdef: S.TableDef) -> pl.Schema:
    return pl.from_arrow(tdef.schema.empty_table()).schema


def lower_is_better(metric: str) -> bool:
    """True when a smaller score is better for ``metric`` (rmse, mae, mse ...).

    scikit-learn's ``neg_*`` scorers are negated errors, so higher is better for them.
    """
    return metric.lower() in LOWER_IS_BETTER


def stamp_column(tdef: S.TableDef) -> str:
    """The column a deletion's time is compared with (lake spec §5.3)."""
    return "created_at" if "created_at" in tdef.schema.names else "_version"


def _row_stamp(tdef: S.TableDef) -> pl.Expr:
    column = pl.col(stamp_column(tdef))
    return column.dt.epoch("us") if stamp_column(tdef) == "created_at" else column


def identity(tdef: S.TableDef) -> list[str]:
    """The columns latest-wins groups by (lake spec §5.1): in a partitioned table a key is
    identified within its partition, so a read pruned to some partitions resolves each row as an
    unpruned read does, even when two writers raced to save one key under two datasets."""
    return [tdef.partition_by, tdef.key] if tdef.partition_by else [tdef.key]


def with_visible_prediction(arrays: pl.LazyFrame, predictions: pl.LazyFrame) -> pl.LazyFrame:
    """The arrays whose prediction is visible (lake spec §5.4); both frames already resolved."""
    return arrays.join(predictions.select(identity(S.PREDICTIONS)), on=identity(S.PREDICTIONS), how="semi")


def resolve(frame: pl.LazyFrame, tdef: S.TableDef, deletions: pl.LazyFrame, keys_unique: bool = False) -> pl.LazyFrame:
    """Apply the read rules of the lake spec: latest version wins, deleted entities vanish.

    ``keys_unique`` (the caller checked that no key repeats) skips the latest-wins step.
    """
    if tdef.version_column and not keys_unique:
        # A stable sort keeps file-name, then row order among equal stamps: the same tie-break
        # as the SQL views (lake spec §5.1).
        frame = frame.sort(tdef.version_column, maintain_order=True).unique(subset=identity(tdef), keep="last")
    if "run_id" in tdef.schema.names:
        dead_runs = deletions.filter(pl.col("kind") == "run").select(pl.col("entity_id").alias("run_id"))
        frame = frame.join(dead_runs, on="run_id", how="anti")
    if tdef.name in _ENTITY_DELETIONS:
        kind, key = _ENTITY_DELETIONS[tdef.name]
        dead = (
            deletions.filter(pl.col("kind") == kind)
            .group_by("entity_id")
            .agg(pl.col("deleted_at").max().dt.epoch("us").alias("_deleted_us"))
            .rename({"entity_id": key})
        )
        frame = (
            frame.join(dead, on=key, how="left")
            .filter(pl.col("_deleted_us").is_null() | (pl.col("_deleted_us") < _row_stamp(tdef)))
            .drop("_deleted_us")
        )
    return frame


@dataclass(frozen=True)
class Deleted:
    """The deletion records, indexed: dead run ids, and the latest deletion of each entity (µs)."""

    runs: frozenset[str]
    entities: dict[tuple[str, str], int]

    @classmethod
    def from_table(cls, deletions: pa.Table) -> "Deleted":
        kinds = deletions.column("kind").to_pylist()
        ids = deletions.column("entity_id").to_pylist()
        stamps = deletions.column("deleted_at").cast(pa.int64()).to_pylist()
        entities: dict[tuple[str, str], int] = {}
        for kind, entity, stamp in zip(kinds, ids, stamps):
            if kind != "run":
                entities[(kind, entity)] = max(stamp, entities.get((kind, entity), stamp))
        return cls(frozenset(e for k, e in zip(kinds, ids) if k == "run"), entities)


def resolve_one(rows: pa.Table, tdef: S.TableDef, deleted: Deleted) -> dict | None:
    """The current row among all stored rows of one key (in file, then row order), or None.

    The same rules as ``resolve``, for single-key lookups that must not scan a table.
    """
    if rows.num_rows == 0:
        return None
    best = rows.num_rows - 1
    if tdef.version_column:
        stamps = rows.column(tdef.version_column).cast(pa.int64()).to_pylist()
        best = max(range(rows.num_rows), key=lambda i: (stamps[i], i))  # ties: the later row wins
    # Lists stay Arrow scalars (arrays convert straight to numpy); everything else becomes Python.
    row = {
        name: (col[best] if pa.types.is_list(col.type) else col[best].as_py())
        for name, col in zip(rows.column_names, rows.columns)
    }
    if "run_id" in tdef.schema.names and row["run_id"] in deleted.runs:
        return None
    if tdef.name in _ENTITY_DELETIONS:
        kind, key = _ENTITY_DELETIONS[tdef.name]
        died = deleted.entities.get((kind, row[key]))
        stamp = rows.column(stamp_column(tdef)).cast(pa.int64())[best].as_py()
        if died is not None and died >= stamp:
            return None
    return row


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
    rmse/mae/mse/sep, higher for r2/rpd/rpiq/accuracy/f1, and a bias ranks by its absolute value
    (``nirslake.scores.direction``). ``metric`` names it when ``score`` is a column
    like ``val_score``; without it the column name itself is taken as the metric.
    """
    if ascending is None and sc.direction(metric or score) == "zero":  # a bias: the closest to zero first
        frame = predictions.lazy().sort(pl.col(score).abs(), nulls_last=True, maintain_order=True)
    else:
        if ascending is None:
            ascending = lower_is_better(metric or score)
        frame = predictions.lazy().sort(score, descending=not ascending, nulls_last=True, maintain_order=True)
    position = pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
    if by:
        keys = [by] if isinstance(by, str) else list(by)
        ranked = frame.with_columns(position.over(keys).alias("rank"))
        return ranked.filter(pl.col("rank") <= n).sort([*keys, "rank"], nulls_last=True).collect()
    return frame.head(n).with_columns(position.alias("rank")).collect()


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
