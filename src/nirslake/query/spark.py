"""Read the lake with Spark: the path for workspaces that outgrow one machine (docs/spark.md).

nirslake decides *which* files to read, on the driver, and Spark reads them, on the cluster:

1. the driver lists the table the way every reader must (lake spec §4): the commits first, then
   the data files, then the deletions (``take_snapshot``), and keeps the visible files only
   (plain ``part-`` files no counting commit removed, ``compact-`` files a counting commit added);
2. Spark reads exactly those files with the table's schema given explicitly (``schema.py``), so
   columns missing from older files read as null and no partition discovery happens: the
   ``dataset`` value comes from the ``dataset_name`` column, never from the folder name;
3. the read rules (lake spec §5) run as Spark operations: latest wins per key, deleted runs
   vanish whole, deleted predictions and artifacts vanish up to their deletion.

pyspark is an optional dependency (``pip install "nirslake[spark]"``); this module imports it
only when a function needs it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from ..lake import schema as S
from ..lake.rules import _ENTITY_DELETIONS, identity, stamp_column
from ..lake.storage import Storage
from ..lake.tables import FileCache, is_schema_file, take_snapshot

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

# fsspec protocols whose Hadoop filesystem has another scheme. The S3A connector (hadoop-aws)
# is the maintained Hadoop client for S3; "s3://" means EMRFS on EMR and nothing on plain Spark.
HADOOP_SCHEMES = {"s3": "s3a", "gcs": "gs"}

# Characters Hadoop's path globbing treats as patterns; Spark globs every path it is given.
_GLOB_CHARS = re.compile(r"([\\{}\[\]*?])")

# Helper columns, dropped before a frame is returned.
_FILE, _ROW, _RANK, _DEAD = "__nirslake_file", "__nirslake_row", "__nirslake_rank", "__nirslake_deleted_us"


def spark_schema(schema: pa.Schema):
    """The Spark ``StructType`` of a lake table's Arrow schema (timestamps with a zone become
    ``TimestampType``, lists ``ArrayType``)."""
    from pyspark.sql import types as T

    def convert(t: pa.DataType):
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return T.StringType()
        if pa.types.is_int64(t):
            return T.LongType()
        if pa.types.is_int32(t):
            return T.IntegerType()
        if pa.types.is_float64(t):
            return T.DoubleType()
        if pa.types.is_boolean(t):
            return T.BooleanType()
        if pa.types.is_timestamp(t):
            return T.TimestampType() if t.tz else T.TimestampNTZType()
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return T.ArrayType(convert(t.value_type), True)
        raise TypeError(f"no Spark type for the Arrow type {t}")

    return T.StructType([T.StructField(f.name, convert(f.type), True) for f in schema])


def spark_url(storage: Storage, rel: str) -> str:
    """The URL Spark (Hadoop) reads a workspace file from.

    Local files become ``file:///abs/path``; ``s3://`` becomes ``s3a://`` (the S3A connector),
    ``gcs://`` ``gs://``; other schemes are kept (Azure's fsspec URLs lack the account Hadoop needs). Glob characters are escaped, since Spark expands
    patterns in every path it is given (a workspace folder named ``runs[1]`` is a literal name).
    Percent signs stay literal: Hadoop never decodes ``%XX`` in a path string, so the
    percent-encoded partition folders (``dataset=a%20b``) are found as they are on disk.
    """
    full = storage.path(rel)
    if storage.is_local:
        url = "file://" + full
    else:
        url = f"{HADOOP_SCHEMES.get(storage.protocol, storage.protocol)}://{full}"
    return _GLOB_CHARS.sub(r"\\\1", url)


def lake_files(
    workspace: str | os.PathLike | Storage,
    table: str,
    storage_options: dict | None = None,
    dataset_name: str | Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """The visible data files of ``table`` and of ``deletions``, as Spark URLs, from one listing.

    The commits are listed before the data files (lake spec §4), so a compaction that commits
    during the listing shows either its inputs or its output, never both or neither. The empty
    schema file at the table root is left out (the schema is passed to Spark explicitly).
    ``dataset_name`` (a name or a list of names) keeps only those datasets' partition folders
    (partitioned tables).
    """
    tdef = _table(table)
    storage = workspace if isinstance(workspace, Storage) else Storage(workspace, storage_options)
    snap = take_snapshot(storage, FileCache(), (tdef.name, S.DELETIONS.name))
    names = _names(dataset_name)
    if names is None or not tdef.partition_by:
        rels = snap.table_files(tdef)
    else:
        rels = [rel for name in dict.fromkeys(names) for rel in snap.table_files(tdef, name)]
    data = [spark_url(storage, r) for r in rels if not is_schema_file(r)]
    deletions = [spark_url(storage, r) for r in snap.table_files(S.DELETIONS) if not is_schema_file(r)]
    return data, deletions


def read_table(
    spark: SparkSession,
    workspace: str | os.PathLike | Storage,
    table: str,
    storage_options: dict | None = None,
    dataset_name: str | Sequence[str] | None = None,
) -> DataFrame:
    """One lake table as a Spark DataFrame, with the lake's read rules applied.

    ``workspace`` is a local folder or an fsspec URL; ``storage_options`` are fsspec's, used by
    the driver to list the files (Spark's own filesystem settings, e.g. ``fs.s3a.*``, are set on
    the session). ``dataset_name`` (a name or a list of names) reads those datasets' partition
    folders only (predictions and prediction_arrays), and filters by the ``dataset_name`` column
    as well. A filter on ``dataset_name`` applied to the result instead reaches the Parquet scan too
    (row groups of other datasets are skipped by their statistics), but every file is opened.

    Latest wins per key by the table's version column; equal stamps are broken by the file name,
    then the row's position in its file (the later wins), as lake spec §5.1 says. Deleted runs hide
    every row with their ``run_id``; a deleted prediction or artifact hides its rows whose stamp is
    not later than the deletion (§5.2, §5.3). The columns are the table's, in schema order.
    """
    tdef = _table(table)
    data_files, deletion_files = lake_files(workspace, table, storage_options, dataset_name)
    frame = _read(spark, tdef, data_files, with_position=tdef.version_column is not None)
    names = _names(dataset_name)
    if names is not None and tdef.partition_by:
        frame = frame.filter(frame[tdef.partition_by].isin(list(names)))
    deletions = _read(spark, S.DELETIONS, deletion_files) if tdef is not S.DELETIONS else None
    frame = resolve(frame, tdef, deletions)
    if tdef is S.PREDICTION_ARRAYS:
        # Arrays are visible only while their prediction is (§5.4); listed after the arrays.
        keys = identity(S.PREDICTIONS)
        predictions = read_table(spark, workspace, S.PREDICTIONS.name, storage_options, dataset_name)
        # A join on named keys moves them first: keep the table's own column order.
        frame = frame.join(predictions.select(*keys), on=keys, how="left_semi").select(*frame.columns)
    return frame


def resolve(frame: DataFrame, tdef: S.TableDef, deletions: DataFrame | None) -> DataFrame:
    """The read rules (lake spec §5) in Spark; the twin of ``nirslake.lake.rules.resolve``.

    ``frame`` holds the table's rows, plus the helper columns of the file name and row position
    when the table has a version column (``read_table`` adds them).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    names = list(tdef.schema.names)
    if tdef.version_column:
        order = [F.col(tdef.version_column).desc_nulls_last()]
        if _FILE in frame.columns:
            order += [F.col(_FILE).desc(), F.col(_ROW).desc()]
        # A key is identified within its partition (spec §5.1), which also lets Spark push a
        # later filter on dataset_name below the window, into the Parquet scan.
        latest = Window.partitionBy(*identity(tdef)).orderBy(*order)
        frame = frame.withColumn(_RANK, F.row_number().over(latest)).filter(F.col(_RANK) == 1)
    frame = frame.select(*names)
    if deletions is None:
        return frame
    if "run_id" in names:
        dead_runs = deletions.filter(F.col("kind") == "run").select(F.col("entity_id").alias("run_id")).distinct()
        frame = frame.join(dead_runs, on="run_id", how="left_anti")
    if tdef.name in _ENTITY_DELETIONS:
        kind, key = _ENTITY_DELETIONS[tdef.name]
        dead = (
            deletions.filter(F.col("kind") == kind)
            .groupBy(F.col("entity_id").alias(key))
            .agg(F.max(F.expr("unix_micros(deleted_at)")).alias(_DEAD))
        )
        column = stamp_column(tdef)
        stamp = F.expr(f"unix_micros({column})") if column == "created_at" else F.col(column)
        frame = (
            frame.join(dead, on=key, how="left")
            .filter(F.col(_DEAD).isNull() | (F.col(_DEAD) < stamp))
            .drop(_DEAD)
        )
    return frame.select(*names)


def top_k_per_dataset(
    predictions: DataFrame,
    n: int,
    metric: str = "val_score",
    ascending: bool = True,
    partition: str | None = "val",
    group_by: str | Sequence[str] | None = "dataset_name",
) -> DataFrame:
    """The best ``n`` predictions of ``partition`` (None: every partition) by the ``metric`` column,
    in each ``group_by`` group (None: overall), with a 1-based ``rank`` column.

    The Spark twin of ``WorkspaceStore.top_predictions(n, metric, ascending, partition,
    group_by="dataset_name")``: nulls rank last; equal scores are ordered by ``prediction_id``
    (ids sort by creation time, so the earlier prediction ranks first), which makes the result
    deterministic where the store's order among ties is not specified.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if metric not in predictions.columns:
        raise ValueError(f"Invalid metric column: {metric!r}")
    keys = [] if group_by is None else [group_by] if isinstance(group_by, str) else list(group_by)
    for key in keys:
        if key not in predictions.columns:
            raise ValueError(f"Invalid group_by column: {key!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    frame = predictions if partition is None else predictions.filter(F.col("partition") == partition)
    score = F.col(metric).asc_nulls_last() if ascending else F.col(metric).desc_nulls_last()
    window = Window.orderBy(score, F.col("prediction_id"))
    if keys:
        window = Window.partitionBy(*keys).orderBy(score, F.col("prediction_id"))
    ranked = frame.withColumn("rank", F.row_number().over(window)).filter(F.col("rank") <= n)
    return ranked.orderBy(*[F.col(k).asc_nulls_last() for k in keys], "rank")


def _names(dataset_name: str | Sequence[str] | None) -> list[str] | None:
    if dataset_name is None:
        return None
    names = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"dataset_name must be a string or a list of strings, got {dataset_name!r}")
    return names


def _table(table: str) -> S.TableDef:
    if table not in S.TABLES:
        raise ValueError(f"unknown table {table!r}: choose one of {', '.join(S.TABLES)}")
    return S.TABLES[table]


def _read(spark: SparkSession, tdef: S.TableDef, files: list[str], with_position: bool = False) -> DataFrame:
    """Exactly ``files``, with the table's schema; optionally the file name and row position."""
    from pyspark.sql import functions as F

    schema = spark_schema(tdef.schema)
    if not files:  # built in the JVM: createDataFrame([]) would start Python workers
        columns = [F.lit(None).cast(f.dataType).alias(f.name) for f in schema.fields]
        if with_position:
            columns += [F.lit(None).cast("string").alias(_FILE), F.lit(None).cast("long").alias(_ROW)]
        return spark.range(0).select(*columns)
    frame = spark.read.schema(schema).parquet(*files)
    if with_position:
        # Hidden per-file metadata (Spark >= 3.5): the lake's tie-break among equal stamps (§5.1).
        frame = frame.select(
            "*", F.col("_metadata.file_name").alias(_FILE), F.col("_metadata.row_index").alias(_ROW)
        )
    return frame
