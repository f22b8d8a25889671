"""polars helpers over the lake: lazy scans that apply the read rules, ranking and fold aggregation.

Every helper returns a ``polars.LazyFrame`` or ``DataFrame``; they read the same rows the DuckDB views show.
"""

from __future__ import annotations

import os
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

import polars as pl
import pyarrow as pa

from . import schema as S
from .storage import Storage
from .tables import FileCache, commit_state, polars_schema, read_files, visible_files

# Metrics where a smaller value is better; everything else (r2, accuracy, f1, ...) ranks descending.
LOWER_IS_BETTER = frozenset({"rmse", "mse", "mae", "mape", "rmsecv", "sep", "bias", "log_loss", "logloss", "loss"})

# Which deletion kinds hide rows of which table, and the key they match.
_ENTITY_DELETIONS = {
    "predictions": ("prediction", "prediction_id"),
    "prediction_arrays": ("prediction", "prediction_id"),
    "artifacts": ("artifact", "artifact_id"),
}




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
    return arrays.join(predictions.select(identity(S.PREDICTIONS)), on=identity(S.PREDICTIONS), how="semi", maintain_order="left")


def resolve(
    frame: pl.LazyFrame, tdef: S.TableDef, deletions: pl.LazyFrame | None, keys_unique: bool = False
) -> pl.LazyFrame:
    """Apply the read rules of the lake spec: latest version wins, deleted entities vanish.

    ``keys_unique`` (the caller checked that no key repeats) skips the latest-wins step;
    ``deletions`` None (the caller knows there is no deletion record) skips the deletions.
    """
    if tdef.version_column and not keys_unique:
        # A stable sort keeps file-name, then row order among equal stamps: the same tie-break
        # as the SQL views (lake spec §5.1).
        # maintain_order: rows (and so ties of a later ranking) keep one order in every process.
        frame = frame.sort(tdef.version_column, maintain_order=True).unique(
            subset=identity(tdef), keep="last", maintain_order=True
        )
    if deletions is None:
        return frame
    if "run_id" in tdef.schema.names:
        dead_runs = deletions.filter(pl.col("kind") == "run").select(pl.col("entity_id").alias("run_id"))
        frame = frame.join(dead_runs, on="run_id", how="anti", maintain_order="left")
    if tdef.name in _ENTITY_DELETIONS:
        kind, key = _ENTITY_DELETIONS[tdef.name]
        dead = (
            deletions.filter(pl.col("kind") == kind)
            .group_by("entity_id")
            .agg(pl.col("deleted_at").max().dt.epoch("us").alias("_deleted_us"))
            .rename({"entity_id": key})
        )
        frame = (
            frame.join(dead, on=key, how="left", maintain_order="left")
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


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _as_py(column: pa.ChunkedArray, i: int) -> Any:
    """``column[i].as_py()``; for a µs timestamp with a time zone computed here, the same value
    (an aware datetime in that zone), since pyarrow imports pandas to convert one (about 0.15 s,
    the first time in a process)."""
    kind = column.type
    if pa.types.is_timestamp(kind) and kind.unit == "us" and kind.tz and column[i].is_valid:
        try:
            zone = zoneinfo.ZoneInfo(kind.tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            return column[i].as_py()
        micros = column.chunk(0).cast(pa.int64())[i] if column.num_chunks == 1 else column.cast(pa.int64())[i]
        return (_EPOCH + timedelta(microseconds=micros.as_py())).astimezone(zone)
    return column[i].as_py()


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
        name: (col[best] if pa.types.is_list(col.type) else _as_py(col, best))
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
