"""Spark reads the same lake and sees what the store sees (issue 5, docs/spark.md).

One local Spark session (``local[2]``, JVM started once) reads a lake written by the store with
every rule in play: awkward dataset names, several runs and flushes, predictions saved again
(latest wins), a deleted run, a deleted prediction and one deleted then saved again, a compaction
(commits hide the files it replaced) with writes after it, and an uncommitted compaction leftover.
"""

from __future__ import annotations

import posixpath

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import PipelineIds, record_prediction

from nirslake import WorkspaceStore
from nirslake import query as q
from nirslake.lake import schema as S
from nirslake import spark as nspark
from nirslake.lake.storage import Storage
from nirslake.lake.tables import CLOCK, COMPACT_PREFIX, new_id, write_table

pytestmark = [
    pytest.mark.slow,
    # pyspark warns on import that pandas 3 is not fully supported; nothing here goes through pandas.
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
]

DATASETS = ["corn_m5", "a b/é", "123", "..", "50%=half", "wheat/" + "long name " * 20]


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """A local workspace (its path has spaces and glob characters) with every read rule in play."""
    ws = str(tmp_path_factory.mktemp("spark") / "lake [1] {v2}")
    rng = np.random.default_rng(5)
    scores = iter(rng.permutation(10_000) / 10_000 + 0.05)  # distinct: no ties in any ranking
    store = WorkspaceStore(ws)
    facts = {"resaved": [], "deleted": [], "revived": []}

    runs, made = {}, {}

    def sweep(name, n_pipelines, best=False):
        """A run over every dataset; ``best``: it holds the best val scores (its deletion shows)."""
        runs[name] = store.begin_run(name, {"metric": "rmse"}, [{"name": ds} for ds in DATASETS])
        made[name] = {}
        for ds in DATASETS:
            for p in range(n_pipelines):
                pipeline_id = store.begin_pipeline(runs[name], f"pls_{p}", [{"class": "PLSRegression"}], {}, ds, "sha")
                chain_id = store.save_chain(pipeline_id, [], 0, "PLSRegression", "", "KFold(3)", {}, {})
                ids = PipelineIds(runs[name], pipeline_id, chain_id)
                store.log_step(pipeline_id, 0, "PLSRegression", "end", duration_ms=12.5)
                for fold in range(3):
                    for partition in ("val", "test"):
                        pid = record_prediction(
                            store, ids, dataset_name=ds, fold_id=str(fold), partition=partition,
                            val_score=float(next(scores)) / (1000 if best else 1), test_score=float(next(scores)),
                            model_name=f"PLS_{p}",
                        )
                        made[name].setdefault(ds, []).append((ids, pid, fold, partition))
                        if fold == 0:
                            store.save_prediction_arrays(pid, [1.0, 2.0, 3.0], [1.1, 1.9, 3.2])
                store.complete_pipeline(pipeline_id, 0.1, 0.2, "rmse", 1000)
            store.flush()  # several files per partition
        store.complete_run(runs[name], {"n": 1})

    sweep("sweep_a", 2)
    sweep("sweep_b", 1)
    sweep("doomed_early", 1, best=True)  # deleted before the compaction, which drops its rows
    store.save_artifact(np.arange(4.0), "PLSRegression", "model", "npz")
    store.save_artifact(np.arange(4.0), "PLSRegression", "model", "npz")  # two rows, one artifact
    store.delete_run(runs["doomed_early"], delete_artifacts=False)

    def resave(entry, val_score):
        ids, pid, fold, partition = entry
        record_prediction(
            store, ids, dataset_name=ids_dataset[pid], fold_id=str(fold), partition=partition,
            val_score=val_score, test_score=0.5, model_name="PLS_resaved", prediction_id=pid,
        )

    ids_dataset = {pid: ds for by_ds in made.values() for ds, rows in by_ds.items() for (_, pid, _, _) in rows}
    for ds in DATASETS:
        val_a = [e for e in made["sweep_a"][ds] if e[3] == "val"]
        # saved again as the new best (0.001..), and as a worse one (0.999..): the latest row wins
        resave(val_a[0], 0.001 + DATASETS.index(ds) / 1e6)
        resave(val_a[1], 0.999 - DATASETS.index(ds) / 1e6)
        facts["resaved"] += [val_a[0][1], val_a[1][1]]
        store.save_prediction_arrays(val_a[0][1], [9.0], [8.0])  # new arrays: latest wins too
    store.flush()

    result = store.compact()  # merges each partition's small files; one commit per table
    assert result.files_replaced > 0
    sweep("doomed_late", 1, best=True)  # deleted after the compaction: only the deletion hides it
    store.delete_run(runs["doomed_late"], delete_artifacts=False)

    for ds in DATASETS:
        val_a = [e for e in made["sweep_a"][ds] if e[3] == "val"]
        store.delete_prediction(val_a[2][1])  # gone
        facts["deleted"].append(val_a[2][1])
        store.delete_prediction(val_a[3][1])
        resave(val_a[3], 0.002 + DATASETS.index(ds) / 1e6)  # deleted, then saved again: shows
        facts["revived"].append(val_a[3][1])
        resave(val_a[4], 0.0005 + DATASETS.index(ds) / 1e6)  # saved again after the compaction
        resave(val_a[4], 0.0006 + DATASETS.index(ds) / 1e6)  # twice: the later one wins
    store.close()

    # A compaction that crashed before its commit leaves output no reader may show.
    storage = Storage(ws)
    ghost = pa.Table.from_pylist(
        [{"prediction_id": new_id(), "run_id": runs["sweep_a"], "dataset_name": DATASETS[0], "partition": "val",
          "val_score": 0.0, "created_at": CLOCK.now_us()}],
        schema=S.PREDICTIONS.schema,
    )
    facts["leftover"] = write_table(storage, S.PREDICTIONS, ghost, prefix=COMPACT_PREFIX)
    facts["runs"] = runs
    return ws, facts


def by_key(frame: pl.DataFrame, key: str, columns: list[str]) -> dict:
    return {row[key]: tuple(row[c] for c in columns) for row in frame.select(key, *columns).to_dicts()}


def spark_rows(frame, key: str, columns: list[str]) -> dict:
    return {row[key]: tuple(row[c] for c in columns) for row in frame.select(key, *columns).collect()}


def test_commits_decide_the_files_spark_reads(lake):
    ws, facts = lake
    storage = Storage(ws)
    files, deletions = nspark.lake_files(ws, "predictions")
    names = {posixpath.basename(f) for f in files}
    on_disk = {posixpath.basename(r) for r in storage.list_files(S.PREDICTIONS.dir)}
    assert any(n.startswith(COMPACT_PREFIX) for n in names), "the committed compaction output is read"
    assert any(n.startswith("part-") and "schema" not in n for n in names), "files written after it too"
    assert not any("-schema-v" in n for n in names), "the empty schema file at the table root is left out"
    leftover = posixpath.basename(facts["leftover"][0])
    assert leftover in on_disk and leftover not in names, "uncommitted compaction output stays invisible"
    replaced = on_disk - names - {leftover} - {n for n in on_disk if "-schema-v" in n}
    assert replaced, "the files the compaction replaced are still on disk (grace period) and not read"
    assert deletions and all("/tables/deletions/" in f for f in deletions)
    assert all(f.startswith("file://") and "\\[1\\]" in f and "\\{v2\\}" in f for f in files), files[:1]
    # Pruning by dataset lists that partition folder only.
    one, _ = nspark.lake_files(ws, "predictions", dataset_name="a b/é")
    assert one and all("/dataset=a%20b%2F%C3%A9/" in f for f in one)


def test_predictions_match_the_store(spark, lake):
    ws, facts = lake
    frame = nspark.read_table(spark, ws, "predictions")
    columns = ["dataset_name", "run_id", "val_score", "model_name", "stamp"]
    got = spark_rows(frame.selectExpr("*", "unix_micros(created_at) AS stamp"), "prediction_id", columns)
    with WorkspaceStore(ws) as store:
        everything = store.query_predictions()
        expected = by_key(everything.with_columns(pl.col("created_at").dt.epoch("us").alias("stamp")), "prediction_id", columns)
        per_dataset = {ds: store.query_predictions(dataset_name=ds).height for ds in DATASETS}
    assert len(got) == everything.height == sum(per_dataset.values())
    assert got == expected  # the same rows, and the same version of each (its stamp and score)
    assert {row[0] for row in got.values()} == set(DATASETS)  # names from the column, exact
    assert not set(facts["deleted"]) & set(got)
    assert all(got[pid][3] == "PLS_resaved" for pid in facts["revived"] + facts["resaved"])
    assert not {facts["runs"]["doomed_early"], facts["runs"]["doomed_late"]} & {row[1] for row in got.values()}
    # Datasets read from their partition folders only.
    assert nspark.read_table(spark, ws, "predictions", dataset_name="a b/é").count() == per_dataset["a b/é"]
    two = nspark.read_table(spark, ws, "predictions", dataset_name=["50%=half", ".."]).count()
    assert two == per_dataset["50%=half"] + per_dataset[".."]


def test_a_dataset_filter_reaches_the_parquet_scan(spark, lake, capsys):
    """Latest-wins partitions by dataset and key, so a later filter is pushed below it."""
    ws, _ = lake
    frame = nspark.read_table(spark, ws, "predictions")
    frame.filter(frame.dataset_name == "a b/é").explain()
    assert "EqualTo(dataset_name,a b/é)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("n", "metric", "ascending", "partition"),
    [(3, "val_score", True, "val"), (1, "val_score", True, "val"), (2, "test_score", False, "test")],
)
def test_top_k_per_dataset_matches_the_store(spark, lake, n, metric, ascending, partition):
    ws, _ = lake
    frame = nspark.read_table(spark, ws, "predictions")
    top = nspark.top_k_per_dataset(frame, n, metric=metric, ascending=ascending, partition=partition)
    got = [(r["dataset_name"], r["rank"], r["prediction_id"], r[metric]) for r in top.collect()]
    with WorkspaceStore(ws) as store:
        best = store.top_predictions(n, metric, ascending, partition, group_by="dataset_name")
    expected = [(r["dataset_name"], r["rank"], r["prediction_id"], r[metric]) for r in best.to_dicts()]
    assert len(got) == n * len(DATASETS)
    assert sorted(got) == sorted(expected)


@pytest.mark.parametrize("table", [t for t in S.TABLES if t != "predictions"])
def test_every_table_matches_the_polars_scan(spark, lake, table):
    """Each table: the same keys as ``nirslake.query.scan``, each in the same version."""
    ws, _ = lake
    tdef = S.TABLES[table]
    frame = nspark.read_table(spark, ws, table)
    assert frame.columns == tdef.schema.names
    expected = q.scan(ws, table).collect()
    names = tdef.schema.names
    # Which version of a row was read: its µs stamp (deletions: the key is (kind, id) and the time).
    stamp = next(c for c in ("_version", "created_at", "deleted_at") if c in names)
    spark_cols = [stamp if stamp == "_version" else f"unix_micros({stamp})"]
    polars_cols = [pl.col(stamp) if stamp == "_version" else pl.col(stamp).dt.epoch("us")]
    extra = {"runs": ["status"], "deletions": ["kind"]}.get(table, [])
    got = sorted(tuple(r) for r in frame.selectExpr(tdef.key, *spark_cols, *extra).collect())
    want = sorted(expected.select(pl.col(tdef.key), *polars_cols, *extra).iter_rows())
    assert len(got) == expected.height > 0
    assert got == want
    if table == "runs":  # status changes resolved to the latest; the deleted run is gone
        assert [status for _, _, status in got] == ["completed", "completed"]


def test_arrays_are_the_latest(spark, lake):
    ws, facts = lake
    frame = nspark.read_table(spark, ws, "prediction_arrays")
    resaved = facts["resaved"][0]
    (row,) = frame.filter(frame.prediction_id == resaved).collect()
    assert row["y_true"] == [9.0] and row["y_pred"] == [8.0]


def test_reading_an_empty_workspace(spark, tmp_path):
    ws = str(tmp_path / "empty")
    WorkspaceStore(ws).close()
    frame = nspark.read_table(spark, ws, "predictions")
    assert frame.count() == 0 and frame.columns == S.PREDICTIONS.schema.names
    assert nspark.top_k_per_dataset(frame, 3).count() == 0
    with pytest.raises(ValueError, match="unknown table"):
        nspark.read_table(spark, ws, "nope")
    with pytest.raises(ValueError, match="Invalid metric column"):
        nspark.top_k_per_dataset(frame, 3, metric="nope")


def test_equal_stamps_resolve_like_the_store(spark, tmp_path):
    """Two versions with one stamp (two machines' clocks): the later file wins, then the later row."""
    ws = str(tmp_path / "ties")
    WorkspaceStore(ws).close()
    storage = Storage(ws)
    stamp = CLOCK.now_us()

    def version(pid, score):
        return {"prediction_id": pid, "run_id": "r", "dataset_name": "a b/é", "partition": "val",
                "val_score": score, "created_at": stamp}

    in_one_file, across_files = new_id(), new_id()
    write_table(storage, S.PREDICTIONS, pa.Table.from_pylist([version(across_files, 1.0)], schema=S.PREDICTIONS.schema))
    rows = [version(in_one_file, 2.0), version(in_one_file, 3.0), version(across_files, 4.0)]
    write_table(storage, S.PREDICTIONS, pa.Table.from_pylist(rows, schema=S.PREDICTIONS.schema))
    write_table(storage, S.PREDICTIONS, pa.Table.from_pylist([version(across_files, 5.0)], schema=S.PREDICTIONS.schema))
    got = {r["prediction_id"]: r["val_score"] for r in nspark.read_table(spark, ws, "predictions").collect()}
    assert got == {in_one_file: 3.0, across_files: 5.0}
    expected = q.scan(ws, "predictions").select("prediction_id", "val_score").collect()
    assert got == dict(expected.iter_rows())


def test_s3_workspaces_hand_spark_s3a_urls(s3_workspace):
    """The driver lists an ``s3://`` workspace through fsspec; Spark gets ``s3a://`` URLs of the same
    keys (S3A itself is not exercised: its jars are not available offline)."""
    with WorkspaceStore(s3_workspace) as store:
        ids = PipelineIds(store.begin_run("r", {}, [{"name": "a b/é"}]), "", "")
        pipeline_id = store.begin_pipeline(ids.run_id, "p", [], {}, "a b/é", "sha")
        ids = PipelineIds(ids.run_id, pipeline_id, store.save_chain(pipeline_id, [], 0, "PLS", "", "KFold", {}, {}))
        record_prediction(store, ids, dataset_name="a b/é")
    files, deletions = nspark.lake_files(s3_workspace, "predictions")
    bucket_path = s3_workspace.removeprefix("s3://")
    assert len(files) == 1 and not deletions
    assert files[0].startswith(f"s3a://{bucket_path}/tables/predictions/dataset=a%20b%2F%C3%A9/part-")
    storage = Storage(s3_workspace)
    assert storage.exists(storage.relative(files[0].replace("s3a://", "s3://", 1)))


def test_racing_datasets_and_orphan_arrays_read_as_the_store_reads(spark, tmp_path):
    """Issue 9 scenarios 12 and 13 in Spark: one prediction_id saved under two datasets by racing
    writers shows in both, read by dataset or not; arrays saved after another process deleted
    their prediction stay hidden (lake spec §5.1, §5.4)."""
    from test_api_safety import race_one_id_into_two_datasets, save_arrays_after_another_process_deleted

    ws = str(tmp_path / "ws")
    pid = race_one_id_into_two_datasets(ws)
    orphan = save_arrays_after_another_process_deleted(ws)

    def rows(table, dataset=None, column="val_score"):
        frame = nspark.read_table(spark, ws, table, dataset_name=dataset)
        return sorted((r["dataset_name"], r[column]) for r in frame.filter(frame.prediction_id == pid).collect())

    assert rows("predictions") == [("corn", 0.9), ("wheat", 0.1)]
    assert rows("predictions", "wheat") == [("wheat", 0.1)] and rows("predictions", "corn") == [("corn", 0.9)]
    assert rows("prediction_arrays", column="y_pred") == [("corn", [0.9, 0.9]), ("wheat", [0.1, 0.1])]
    assert rows("prediction_arrays", "wheat", column="y_pred") == [("wheat", [0.1, 0.1])]
    arrays = nspark.read_table(spark, ws, "prediction_arrays")
    assert arrays.filter(arrays.prediction_id == orphan).count() == 0
