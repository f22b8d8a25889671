"""Engines we do not control read the current lake with one documented line (issue 10, lake spec §11).

Each engine test runs the line of docs/engines.md, as written, for every table of a lake where
every read rule is in play (two writers, status changes, a re-save, an artifact saved twice, a
file in an older schema, a compaction, then a deleted prediction and a deleted run), and gets
exactly the rows ``WorkspaceStore`` shows: each row once, in its current version.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from conftest import PipelineIds, record_prediction

from nirslake import WorkspaceStore
from nirslake import query as q
from nirslake.lake import schema as S
from nirslake.lake.storage import Storage
from nirslake.lake.tables import (
    CLOCK,
    COMPACT_PREFIX,
    new_id,
    partition_dir,
    root_schema_file,
    schema_file,
    to_parquet_bytes,
    write_table,
)

ENGINES_DOC = Path(__file__).resolve().parents[2] / "docs" / "engines.md"
TABLES = ("runs", "pipelines", "chains", "predictions", "prediction_arrays", "artifacts", "logs", "deletions", "commits")
DATASETS = ("corn_m5", "123", "a b/é")  # a plain name, one hive would take for a number, one percent-encoded


def documented(engine: str) -> tuple[str, str]:
    """(language, code) of the block docs/engines.md marks with ``<!-- engine: <engine> -->``."""
    found = re.search(rf"<!-- engine: {engine} -->\s*```(\w+)\n(.*?)```", ENGINES_DOC.read_text(encoding="utf-8"), re.S)
    assert found, f"docs/engines.md lost its {engine} line"
    return found.group(1), found.group(2)


def run_python_line(engine: str, table: str, lake: str | None = None, **names) -> object:
    """Run the engine's documented block for ``table`` (and with the workspace at ``lake``, for
    the block that names it in a variable); returns its ``frame``."""
    _, code = documented(engine)
    assert 'table = "predictions"' in code
    code = code.replace('table = "predictions"', f"table = {table!r}")
    if lake is not None:
        assert 'lake = "/data/lake"' in code
        code = code.replace('lake = "/data/lake"', f"lake = {lake!r}")
    scope = dict(names)
    exec(compile(code, f"engines.md:{engine}", "exec"), scope)
    return scope["frame"]


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """``<tmp>/lake``, written as the module doc says; returns the folder holding it."""
    root = tmp_path_factory.mktemp("engines")
    ws = str(root / "lake")
    a = WorkspaceStore(ws)
    b = WorkspaceStore(ws)  # a second writer, open at the same time
    saved = {}

    def sweep(store, name, fail_run=False):
        run_id = store.begin_run(name, {"metric": "rmse"}, [{"name": d} for d in DATASETS])
        for n, dataset in enumerate(DATASETS):
            for p in range(2):
                pipeline_id = store.begin_pipeline(run_id, f"pls_{p}", [{"class": "PLSRegression"}], {"p": p}, dataset, "sha")
                model = store.save_artifact({"coef": [1.0, 2.0], "p": p}, "PLSRegression", "model", "pickle")
                chain_id = store.save_chain(pipeline_id, [], 0, "PLSRegression", "SNV", "KFold(2)", {"0": model}, {})
                store.log_step(pipeline_id, 0, "PLSRegression", "end", duration_ms=3.5)
                for fold in range(2):
                    pid = record_prediction(
                        store, PipelineIds(run_id, pipeline_id, chain_id), dataset_name=dataset, fold_id=str(fold),
                        val_score=0.1 * (n + p + fold + 1), model_name=f"PLS_{p}",
                    )
                    store.save_prediction_arrays(pid, np.arange(4.0) + fold, np.arange(4.0) * 0.9, sample_indices=np.arange(4))
                    saved.setdefault(name, []).append((PipelineIds(run_id, pipeline_id, chain_id), dataset, fold, pid))
                if p == 1 and n == 0:
                    store.fail_pipeline(pipeline_id, "diverged")
                else:
                    store.complete_pipeline(pipeline_id, 0.1, 0.2, "rmse", 10)
            store.flush()  # several files per partition
        if fail_run:
            store.fail_run(run_id, "out of memory")
        else:
            store.complete_run(run_id, {"n": 1})
        return run_id

    kept = sweep(a, "kept")
    failed = sweep(b, "failed", fail_run=True)
    doomed = sweep(b, "doomed")
    ids, dataset, fold, pid = saved["kept"][0]
    record_prediction(a, ids, dataset_name=dataset, fold_id=str(fold), val_score=0.001, model_name="PLS_resaved", prediction_id=pid)
    a.flush()
    b.flush()

    assert a.compact().files_replaced > 0
    # Arrays that a writer of an older version wrote (no y_proba_classes column), after the compaction.
    storage = Storage(ws)
    ids, dataset, fold, old_pid = saved["kept"][5]
    old_schema = pa.schema([f for f in S.PREDICTION_ARRAYS.schema if f.name != "y_proba_classes"])
    old = pa.Table.from_pylist(
        [{"prediction_id": old_pid, "run_id": ids.run_id, "dataset_name": dataset, "y_true": [7.0], "y_pred": [7.5],
          "_version": CLOCK.now_us()}],
        schema=old_schema,
    )
    old_rel = f"{partition_dir(S.PREDICTION_ARRAYS, dataset)}/part-{CLOCK.now_us():014x}-{new_id()}.parquet"
    storage.publish(old_rel, to_parquet_bytes(old))

    a.delete_prediction(saved["kept"][1][3])
    a.delete_run(doomed, delete_artifacts=False)
    b.close()
    a.close()
    # A compaction that crashed before its commit leaves output that no reader may show.
    ghost = pa.Table.from_pylist(
        [{"prediction_id": new_id(), "run_id": kept, "dataset_name": DATASETS[0], "created_at": CLOCK.now_us()}],
        schema=S.PREDICTIONS.schema,
    )
    write_table(storage, S.PREDICTIONS, ghost, prefix=COMPACT_PREFIX)
    return root, {"kept": kept, "failed": failed, "doomed": doomed, "resaved": pid, "old_arrays": old_pid,
                  "deleted": saved["kept"][1][3]}


@pytest.fixture
def in_lake(lake, monkeypatch):
    """The working folder holds ``lake``, as the documented lines expect."""
    root, facts = lake
    monkeypatch.chdir(root)
    return facts


def rows(frame: pl.DataFrame, table: str) -> Counter:
    """The rows of ``frame`` in the table's columns (the hive ``dataset`` column aside), as a
    multiset: a row shown twice counts twice. Timestamps in UTC, lists as tuples."""
    names = S.TABLES[table].schema.names
    missing = set(names) - set(frame.columns)
    assert not missing, f"{table}: columns missing: {missing}"
    frame = frame.select(names)
    fixes = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.Datetime):
            column = pl.col(name).dt.convert_time_zone("UTC") if dtype.time_zone else pl.col(name).dt.replace_time_zone("UTC")
            fixes.append(column.dt.cast_time_unit("us"))
    return Counter(tuple(_frozen(v) for v in row) for row in frame.with_columns(fixes).iter_rows())


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def expected(table: str) -> Counter:
    """What the store shows: ``nirslake.query.scan`` (every read rule; the store's own views agree,
    ``test_the_reference_is_what_the_store_returns``)."""
    return rows(q.scan("lake", table).collect(), table)


def check_engine(table: str, frame: pl.DataFrame, latin1_folders: bool = False) -> None:
    """``frame`` holds exactly the table's current rows, and the hive ``dataset`` column decoded
    from the folder names (``latin1_folders``: each ``%XX`` taken as one character, as Spark does)."""
    got = rows(frame, table)
    want = expected(table)
    assert got == want, f"{table}: {sum((got - want).values())} rows too many, {sum((want - got).values())} missing"
    if S.TABLES[table].partition_by:
        assert "dataset" in frame.columns, f"{table}: the hive column is missing"
        # Every engine decodes the folder's percent-encoding (names over 180 bytes would differ: cut, hashed).
        decoded = {d: d.encode().decode("latin-1") if latin1_folders else d for d in DATASETS}
        assert set(zip(frame["dataset"].cast(pl.String), frame["dataset_name"])) == {(decoded[d], d) for d in DATASETS}


def test_the_lake_has_every_rule_in_play(in_lake):
    """The fixture is what the tests claim: hidden rows in every kind, and resolved copies."""
    raw = {t: pl.scan_parquet(f"lake/tables/{t}/**/*.parquet", missing_columns="insert", hive_partitioning=False).collect() for t in ("runs", "pipelines", "predictions", "prediction_arrays", "artifacts")}
    for table, frame in raw.items():
        assert frame.height > expected(table).total(), f"{table}: no row is hidden, nothing is tested"
    manifest = pl.read_parquet("lake/_current/manifest.parquet")
    assert manifest.filter(pl.col("replaces").is_not_null()).height, "no resolved copy"
    assert manifest.filter(pl.col("file").str.contains("/compact-")).height, "no compacted file"
    assert set(manifest["table"]) == set(TABLES)
    statuses = set(q.scan("lake", "runs").collect()["status"])
    assert statuses == {"completed", "failed"}


def test_the_reference_is_what_the_store_returns(in_lake):
    """``query.scan`` (the reference) shows what the store's API and its DuckDB views show."""
    with WorkspaceStore("lake") as store:
        for table in ("runs", "pipelines", "chains", "predictions", "prediction_arrays", "artifacts", "logs", "deletions"):
            view = store.sql(f"SELECT * FROM {table}")
            scanned = q.scan("lake", table).collect().select(view.columns)
            assert Counter(map(_frozen, view.sort(view.columns[0]).rows())) == Counter(map(_frozen, scanned.sort(view.columns[0]).rows())), table
        assert set(store.list_runs()["run_id"]) == set(q.scan("lake", "runs").collect()["run_id"])
        assert set(store.list_pipelines()["pipeline_id"]) == set(q.scan("lake", "pipelines").collect()["pipeline_id"])
        shown = store.query_predictions()
        assert sorted(shown["prediction_id"]) == sorted(q.scan("lake", "predictions").collect()["prediction_id"])
        arrays = q.scan("lake", "prediction_arrays").collect()
        for pid, y_true in zip(arrays["prediction_id"], arrays["y_true"]):
            assert store.get_prediction(pid, load_arrays=True)["y_true"].tolist() == y_true.to_list()
    assert in_lake["deleted"] not in set(shown["prediction_id"])
    assert in_lake["doomed"] not in set(shown["run_id"])


@pytest.mark.parametrize("table", TABLES)
def test_polars(in_lake, table):
    check_engine(table, run_python_line("polars", table))


@pytest.mark.parametrize("table", TABLES)
def test_pyarrow(in_lake, table):
    check_engine(table, pl.from_arrow(run_python_line("pyarrow", table)))


@pytest.mark.parametrize("table", TABLES)
def test_duckdb_without_the_catalog(in_lake, table):
    language, code = documented("duckdb")
    assert language == "sql" and "'predictions'" in code
    con = duckdb.connect()  # in memory: no catalog, no nirslake
    try:
        *setup, query = [s for s in code.replace("'predictions'", f"'{table}'").split(";") if s.strip()]
        for statement in setup:
            con.execute(statement)
        frame = con.execute(query).pl()
    finally:
        con.close()
    check_engine(table, frame)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_spark(in_lake, spark):
    for table in TABLES:
        frame = run_python_line("spark", table, lake=str(Path("lake").resolve()), spark=spark)
        check_engine(table, pl.from_arrow(frame.toArrow()), latin1_folders=True)


def test_the_older_schema_file_is_read_with_nulls(in_lake):
    """The arrays written without ``y_proba_classes`` are listed as they are, and read with a null there."""
    manifest = pl.read_parquet("lake/_current/manifest.parquet")
    old = [f for f in manifest["file"] if "prediction_arrays" in f and "y_proba_classes" not in pl.read_parquet_schema(f"lake/{f}")]
    assert old, "the older file is listed"
    frame = run_python_line("polars", "prediction_arrays")
    assert frame.filter(pl.col("prediction_id") == in_lake["old_arrays"])["y_proba_classes"].to_list() == [None]


# -- the bare table folders ------------------------------------------------------------------


def _small_lake(ws: str) -> None:
    with WorkspaceStore(ws) as store:
        run_id = store.begin_run("r", {}, [{"name": "corn"}, {"name": "wheat"}])
        for dataset in ("corn", "wheat"):
            pipeline_id = store.begin_pipeline(run_id, "p", {}, {}, dataset, "h")
            chain_id = store.save_chain(pipeline_id, [], 0, "PLS", "", "KFold", {}, {})
            pid = record_prediction(store, PipelineIds(run_id, pipeline_id, chain_id), dataset_name=dataset)
            store.save_prediction_arrays(pid, [1.0, 2.0], [1.5, 2.5])


@pytest.mark.parametrize("table", ["predictions", "prediction_arrays"])
def test_hive_readers_read_the_bare_table_folder(tmp_path, monkeypatch, table):
    """Issue 10: the empty schema file at the table root broke every hive reader of the folder
    (polars ShapeError, DuckDB "key dataset not found"). It lies in ``dataset=__null__/`` now."""
    monkeypatch.chdir(tmp_path)
    _small_lake("lake")
    frame = pl.scan_parquet(f"lake/tables/{table}/", hive_partitioning=True).collect()
    assert sorted(frame["dataset"]) == ["corn", "wheat"]
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('lake/tables/{table}/**/*.parquet', hive_partitioning = true)").fetchone()
    assert count == (2,)
    assert ds.dataset(f"lake/tables/{table}", format="parquet", partitioning="hive").to_table().num_rows == 2


def test_opening_an_older_workspace_moves_its_schema_files(tmp_path, monkeypatch):
    """A workspace made before the move has the schema files at the table roots: opening it writes
    them in ``dataset=__null__/`` and removes the root ones (they hold no rows)."""
    monkeypatch.chdir(tmp_path)
    _small_lake("lake")
    storage = Storage("lake")
    for tdef in (S.PREDICTIONS, S.PREDICTION_ARRAYS):
        storage.publish(root_schema_file(tdef), storage.read_bytes(schema_file(tdef)))
        storage.delete(schema_file(tdef))
    with pytest.raises(Exception, match="height|dataset"):
        pl.scan_parquet("lake/tables/predictions/", hive_partitioning=True).collect()
    WorkspaceStore("lake").close()
    for tdef in (S.PREDICTIONS, S.PREDICTION_ARRAYS):
        assert storage.exists(schema_file(tdef)) and not storage.exists(root_schema_file(tdef))
    assert pl.scan_parquet("lake/tables/predictions/", hive_partitioning=True).collect().height == 2
    for table in ("predictions", "prediction_arrays"):
        assert rows(run_python_line("polars", table), table) == rows(q.scan("lake", table).collect(), table)
