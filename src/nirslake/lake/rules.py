"""The read rules of the lake spec (§5): latest version wins, deletions hide rows, arrays follow
their prediction. Every reader of the lake (polars helpers, Spark, compaction, the store) applies these.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import polars as pl
import pyarrow as pa

from . import schema as S

# Which deletion kinds hide rows of which table, and the key they match.
_ENTITY_DELETIONS = {
    "predictions": ("prediction", "prediction_id"),
    "prediction_arrays": ("prediction", "prediction_id"),
    "artifacts": ("artifact", "artifact_id"),
}


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
        if deletions.num_rows == 0:  # the common case; the first cast of a process costs ~1 ms
            return cls(frozenset(), {})
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
