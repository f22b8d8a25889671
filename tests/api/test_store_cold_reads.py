"""The first read of a fresh process takes faster paths than it used to (issue 11): data files
decoded by polars, schema files not opened, keys found by binary search, rankings sorted by row
number, no pandas import. These tests hold them to the answer of the plain reads: a cold read
after reopening equals the warm read and an answer computed here from what was saved, on both
backends (conftest runs this module on a local folder and on S3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from nirslake import WorkspaceStore
from nirslake.lake import schema as S
from nirslake.lake import tables
from nirslake.query import top_k
from nirslake.lake.storage import Storage
from nirslake.lake.tables import CLOCK, FileCache, take_snapshot, to_parquet_bytes

DATASETS = ("corn", "wheat", "soy")


def build_lake(workspace: str) -> dict:
    """Three datasets written by two stores (several files per table), with tied and missing
    scores, a prediction saved again under its id (latest wins), a deleted prediction and a
    deleted run. Returns what a reader must see: the live predictions by id, and their arrays."""
    live: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(11)
    doomed_run = None
    for writer in range(2):
        with WorkspaceStore(workspace, flush_rows=20) as store:  # small flushes: several files a table
            run = store.begin_run(f"run{writer}", {}, [{"name": d} for d in DATASETS])
            for p in range(6):
                dataset = DATASETS[p % 3]
                pipe = store.begin_pipeline(run, f"p{p}", {}, {}, dataset, "h")
                chain = store.save_chain(pipe, [], 0, "PLS", "SNV", "KFold", {}, {})
                for fold in range(2):
                    for partition in ("train", "val", "test"):
                        # Few distinct scores: ties, whose order must not change
                        score = None if (p + fold) % 5 == 4 else float(rng.integers(0, 4))
                        pid = store.save_prediction(
                            pipe, chain, dataset, f"PLS_{p}", ("PLS", "RF")[p % 2], str(fold), partition,
                            score, float(rng.integers(0, 3)), 0.5, "rmse", "regression", 10, 5,
                            {"val": {"rmse": score}}, {"k": p}, None, None, 0, 0.0, "SNV",
                        )
                        y = rng.normal(size=4 + p)
                        store.save_prediction_arrays(pid, y, y + 1)
                        live[pid] = {"run": run, "dataset": dataset, "partition": partition, "val": score,
                                     "model_class": ("PLS", "RF")[p % 2], "fold": str(fold)}
                        arrays[pid] = y
                store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 10)
            store.complete_run(run, {})
            if writer == 0:
                doomed_run = run
    with WorkspaceStore(workspace) as store:
        # Saved again under its id with a better score: the newer version wins.
        pid = next(k for k, v in live.items() if v["partition"] == "val" and v["run"] != doomed_run)
        row = store.get_prediction(pid)
        store.save_prediction(
            row["pipeline_id"], row["chain_id"], row["dataset_name"], row["model_name"], row["model_class"],
            row["fold_id"], "val", -5.0, 0.0, 0.0, "rmse", "regression", 10, 5, {}, {}, None, None, 0, 0.0, "SNV", pid,
        )
        live[pid]["val"] = -5.0
        gone = next(k for k, v in live.items() if v["run"] != doomed_run and k != pid)
        assert store.delete_prediction(gone)
        del live[gone]
        store.delete_run(doomed_run)
    live = {k: v for k, v in live.items() if v["run"] != doomed_run}
    return {"live": live, "arrays": arrays, "resaved": pid, "gone": gone, "doomed_run": doomed_run}


def expected_top(live: dict, n: int, partition: str = "val") -> list[tuple[str, float | None]]:
    """(dataset, score) of the best ``n`` per dataset, ascending, missing scores last."""
    out = []
    for dataset in sorted({v["dataset"] for v in live.values()}):
        scores = [v["val"] for v in live.values() if v["dataset"] == dataset and v["partition"] == partition]
        scores.sort(key=lambda s: (s is None, s if s is not None else 0.0))
        out += [(dataset, s) for s in scores[:n]]
    return out


def reads(store: WorkspaceStore, facts: dict) -> dict:
    """Every read the fast paths serve, as plain Python values."""
    some = sorted(facts["live"])[:12] + [facts["resaved"], facts["gone"], "no-such-id"]
    out = {
        "top_by_dataset": store.top_predictions(3, group_by="dataset_name").to_dicts(),
        "top_by_class_desc": store.top_predictions(4, metric="test_score", ascending=False, group_by="model_class").to_dicts(),
        "top_overall_test": store.top_predictions(5, partition="test").to_dicts(),
        "top_one_dataset": store.top_predictions(2, dataset_name="wheat").to_dicts(),
        "query_all": store.query_predictions().to_dicts(),
        "query_val": store.query_predictions(dataset_name="soy", partition="val").to_dicts(),
        "runs": store.list_runs().to_dicts(),
        "pipelines": store.list_pipelines().to_dicts(),
    }
    for pid in some:
        row = store.get_prediction(pid, load_arrays=True)
        if row is not None:
            row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}
        out[f"get {pid}"] = row
    for pipe in out["pipelines"][:3]:
        out[f"pipeline {pipe['pipeline_id']}"] = store.get_pipeline(pipe["pipeline_id"])
        for chain in store.get_chains_for_pipeline(pipe["pipeline_id"]).to_dicts():
            out[f"chain {chain['chain_id']}"] = store.get_chain(chain["chain_id"])
    return out


def test_a_cold_read_after_reopening_equals_the_warm_read_and_what_was_saved(workspace):
    facts = build_lake(workspace)
    with WorkspaceStore(workspace) as store:
        cold = reads(store, facts)
        warm = reads(store, facts)
    with WorkspaceStore(workspace) as reopened:
        again = reads(reopened, facts)
    assert cold == warm == again
    live = facts["live"]
    top = [(r["dataset_name"], r["val_score"]) for r in cold["top_by_dataset"]]
    assert top == expected_top(live, 3)
    assert [r["rank"] for r in cold["top_by_dataset"]] == [1, 2, 3] * 3
    assert {r["prediction_id"] for r in cold["query_all"]} == set(live)
    assert cold[f"get {facts['gone']}"] is None and cold["get no-such-id"] is None
    assert cold[f"get {facts['resaved']}"]["val_score"] == -5.0
    assert cold["top_one_dataset"][0]["prediction_id"] == facts["resaved"] or live[facts["resaved"]]["dataset"] != "wheat"
    for key, row in cold.items():
        if key.startswith("get ") and row is not None:
            pid = key[4:]
            assert row["y_true"] == pytest.approx(facts["arrays"][pid].tolist())
            assert row["y_pred"] == pytest.approx((facts["arrays"][pid] + 1).tolist())
            assert row["dataset_name"] == live[pid]["dataset"]


def test_polars_decoding_gives_the_rows_and_types_of_the_pyarrow_read(workspace):
    """Every visible data file of every table, decoded both ways: same schema, same rows. One
    predictions file is written the way an older or foreign writer might (a column missing, an
    extra one, int32 and millisecond timestamps): polars cannot take it as it is and the read
    falls back to pyarrow's conform, which casts."""
    build_lake(workspace)
    storage = Storage(workspace)
    now = CLOCK.now_us()
    foreign = pa.table({
        "prediction_id": ["foreign-1"], "dataset_name": ["corn"], "partition": ["val"],
        "val_score": pa.array([0.25], pa.float64()), "n_samples": pa.array([3], pa.int32()),
        "created_at": pa.array([now // 1000], pa.timestamp("ms", tz="UTC")), "unknown": ["dropped"],
    })
    storage.publish(f"{tables.partition_dir(S.PREDICTIONS, 'corn')}/part-{now:014x}-{'f' * 32}.parquet", to_parquet_bytes(foreign))
    snap = take_snapshot(storage, FileCache())
    checked = 0
    for tdef in S.TABLES.values():
        rels = tables.with_rows(snap.table_files(tdef))
        fast = FileCache().frames(storage, rels, tdef)
        for rel, frame in zip(rels, fast):
            reference = pl.from_arrow(FileCache().read(storage, rel, tdef.schema))
            assert frame.schema == reference.schema, rel
            assert frame.equals(reference), rel
            checked += 1
    assert checked > 20
    with WorkspaceStore(workspace) as store:
        row = store.get_prediction("foreign-1")
        assert row["n_samples"] == 3 and row["val_score"] == 0.25 and row["model_name"] is None
        assert round(row["created_at"].timestamp() * 1000) == now // 1000


def test_tables_read_together_equal_each_read_alone(workspace):
    """``LakeReads.frames`` (one decoding round, one rules query for several tables: a nirs4all
    reload) gives each table's current rows exactly as its own ``frame`` does, on a lake with
    re-saved rows, deletions and a deleted run; a partition's rows too, and the files of mixed
    tables decoded in one round (``FileCache.frames_of``) are those decoded table by table."""
    build_lake(workspace)
    tdefs = (S.PREDICTIONS, S.PREDICTION_ARRAYS, S.RUNS, S.PIPELINES, S.CHAINS, S.LOGS)
    with WorkspaceStore(workspace) as alone, WorkspaceStore(workspace) as together:
        for dataset in (None, "wheat"):
            snap = together._reads.snapshot()
            batched = together._reads.frames(tdefs, snap, dataset)
            for tdef, frame in zip(tdefs, batched):
                expected = alone._reads.frame(tdef, dataset).collect()
                assert frame.equals(expected), (tdef.name, dataset)
            assert batched[0].height > 0 and set(batched[0]["dataset_name"]) == ({"wheat"} if dataset else set(DATASETS))
        storage = Storage(workspace)
        files = [(rel, tdef) for tdef in tdefs for rel in tables.with_rows(snap.table_files(tdef))]
        mixed = FileCache().frames_of(storage, files)
        for (rel, tdef), frame in zip(files, mixed):
            assert frame.equals(FileCache().frames(storage, [rel], tdef)[0]), rel


def test_a_partition_read_keeps_only_its_rows_whatever_a_file_holds(workspace):
    """A partition's files hold its rows only, as written, and its read then skips the filter; a
    file put there by hand with rows of another dataset still gives only the partition's rows."""
    facts = build_lake(workspace)
    storage = Storage(workspace)
    now = CLOCK.now_us()
    stray = pa.table({"prediction_id": ["stray-1"], "dataset_name": ["soy"], "partition": ["val"],
                      "run_id": [next(iter(facts["live"].values()))["run"]],
                      "created_at": pa.array([now], pa.timestamp("us", tz="UTC"))})
    storage.publish(f"{tables.partition_dir(S.PREDICTIONS, 'corn')}/part-{now:014x}-{'e' * 32}.parquet", to_parquet_bytes(stray))
    with WorkspaceStore(workspace) as store:
        corn = store._reads.frame(S.PREDICTIONS, "corn").collect()  # the partition read every query builds on
        assert corn.height > 0 and set(corn["dataset_name"]) == {"corn"}
        assert "stray-1" not in corn["prediction_id"].to_list()
        assert {r["prediction_id"] for r in store.query_predictions(dataset_name="wheat").to_dicts()} == {
            k for k, v in facts["live"].items() if v["dataset"] == "wheat"}


def test_a_damaged_file_is_named_by_the_polars_read_too(workspace):
    build_lake(workspace)
    storage = Storage(workspace)
    damaged = tables.with_rows(storage.list_files(tables.partition_dir(S.PREDICTIONS, "soy")))[0]
    storage.publish(damaged.replace("part-", "part-0"), b"PAR1 this is not parquet PAR1")  # a second, bad file
    with WorkspaceStore(workspace) as store:
        with pytest.raises(tables.CorruptFileError, match=f"data file {damaged.replace('part-', 'part-0')} cannot be read"):
            store.top_predictions(3, group_by="dataset_name")
        assert store.list_runs().height == 1  # other tables stay readable


def test_ranking_by_row_number_keeps_the_order_of_ties():
    """top_k sorts row numbers, not rows; the answer must be the full-row sort's, ties included."""
    rng = np.random.default_rng(5)
    frame = pl.DataFrame({
        "g": rng.choice(["a", "b", None], 500).tolist(),
        "h": rng.integers(0, 3, 500),
        "s": [None if x == 0 else float(x) for x in rng.integers(0, 4, 500)],
        "rank": np.zeros(500, dtype=np.int64),  # a column the result's rank replaces
        "i": np.arange(500),
    })

    def full_row_sort(by, n, ascending):
        sorted_ = frame.lazy().sort("s", descending=not ascending, nulls_last=True, maintain_order=True)
        position = pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
        if by:
            keys = [by] if isinstance(by, str) else by
            ranked = sorted_.with_columns(position.over(keys).alias("rank"))
            return ranked.filter(pl.col("rank") <= n).sort([*keys, "rank"], nulls_last=True).collect()
        return sorted_.head(n).with_columns(position.alias("rank")).collect()

    for by in (None, "g", ["g", "h"], "s"):
        for n in (0, 1, 7, 600):
            for ascending in (True, False):
                assert top_k(frame, n, score="s", by=by, ascending=ascending).equals(full_row_sort(by, n, ascending))
                assert top_k(frame.lazy(), n, score="s", by=by, ascending=ascending).equals(full_row_sort(by, n, ascending))


def test_the_read_path_does_not_import_pandas(workspace, tmp_path):
    """pyarrow imports pandas (about 0.15 s) for ``pq.read_table``, ``pa.array`` from Python,
    timestamps ``as_py`` and ``to_numpy``: that was most of the first top_predictions of a
    process. A fresh process runs the reads here and must not have imported it."""
    pytest.importorskip("pandas")  # otherwise there is nothing to check
    facts = build_lake(workspace)
    pid = sorted(facts["live"])[0]
    script = textwrap.dedent(f"""
        import sys
        from nirslake import WorkspaceStore
        from nirslake.query import fold_summary
        store = WorkspaceStore({workspace!r})
        store.top_predictions(3, group_by="dataset_name")
        store.query_predictions(dataset_name="corn", partition="val")
        row = store.get_prediction({pid!r}, load_arrays=True)
        assert row["y_true"] is not None and row["created_at"] is not None
        fold_summary(store.query_predictions())
        store.get_run(store.list_runs()["run_id"][0])
        store.get_pipeline(store.list_pipelines()["pipeline_id"][0])
        store.close()
        print("pandas" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_read_lists_only_the_tables_it_reads(workspace, monkeypatch):
    """Each listing is a LIST request on an object store: a read lists the commits, its tables
    (children before parents) and the deletions, not all nine tables."""
    facts = build_lake(workspace)
    with WorkspaceStore(workspace) as store:
        listed: list[str] = []
        real = store.storage.list_files

        def listing(rel_dir, *args, **kwargs):
            listed.append(rel_dir)
            return real(rel_dir, *args, **kwargs)

        monkeypatch.setattr(store.storage, "list_files", listing)
        expected = {
            "top": (lambda: store.top_predictions(3), ["commits", "predictions", "deletions"]),
            "arrays": (lambda: store.get_prediction(sorted(facts["live"])[0], load_arrays=True),
                       ["commits", "prediction_arrays", "predictions", "deletions"]),
            "runs": (lambda: store.list_runs(), ["commits", "runs", "deletions"]),
        }
        for name, (read, tables_listed) in expected.items():
            listed.clear()
            read()
            assert listed == [f"tables/{t}" for t in tables_listed], name
