"""Workspaces on S3 (a real local endpoint: moto's server): many writers, the DuckDB shell, pruning.

The rest of the store suite runs on S3 too: the ``workspace`` fixture is parametrised
(tests/conftest.py), so every test that takes it runs on a local folder and on ``s3://``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import let_object_times_pass

from nirslake import WorkspaceStore
from nirslake.lake import schema as S
from nirslake.query.catalog import shell_init_sql
from nirslake.lake.storage import Storage

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from nirslake import WorkspaceStore

    workspace, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = WorkspaceStore(workspace)
    run = store.begin_run(f"worker {worker}", {}, [{"name": "corn"}, {"name": "wheat"}])
    for i in range(n):
        dataset = ("corn", "wheat")[i % 2]
        pipe = store.begin_pipeline(run, f"w{worker}p{i}", {}, {}, dataset, "h")
        model = store.save_artifact({"worker": worker, "i": i}, "PLS", "model", "pickle")
        chain = store.save_chain(pipe, [], 0, "PLS", "SNV", "kfold", {"fold_0": model}, {})
        for k in range(15):
            pid = store.save_prediction(pipe, chain, dataset, "PLS", "PLS", k // 3, ("train", "val", "test")[k % 3],
                                        worker + i / 100 + k / 10000, 0.2, 0.3, "rmse", "regression", 8, 10,
                                        {}, {}, None, None, 0, 0.0)
            store.save_prediction_arrays(pid, np.full(8, float(worker)), np.full(8, float(i * 100 + k)))
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
    store.complete_run(run, {})
    store.close()
    """
)


def fill(store, pipelines=3, datasets=("corn", "wheat")) -> None:
    run = store.begin_run("r", {}, [{"name": d} for d in datasets])
    for i in range(pipelines):
        for dataset in datasets:
            pipe = store.begin_pipeline(run, f"p{i}", {}, {}, dataset, "h")
            chain = store.save_chain(pipe, [], 0, "PLS", "SNV", "kfold", {}, {})
            for k in range(5):
                pid = store.save_prediction(pipe, chain, dataset, "PLS", "PLS", k, "val", i + k / 10, 0.2, 0.3, "rmse",
                                            "regression", 4, 10, {}, {}, None, None, 0, 0.0)
                store.save_prediction_arrays(pid, np.arange(4.0), np.arange(4.0) + k)
            store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
    store.complete_run(run, {})
    store.flush()


@pytest.mark.slow
def test_four_processes_write_one_s3_workspace_at_once(s3_workspace):
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, s3_workspace, str(w), "10"], stderr=subprocess.PIPE, text=True)
        for w in range(4)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    with WorkspaceStore(s3_workspace) as store:
        frame = store.query_predictions()
        assert frame.height == 4 * 10 * 15 == frame["prediction_id"].n_unique()
        assert Counter(frame["run_id"].to_list()).most_common()[-1][1] == 150  # every worker's 150
        assert store.list_pipelines().filter(store.list_pipelines()["status"] == "completed").height == 40
        assert store.sql("SELECT count(*) AS n FROM predictions")["n"][0] == 600
        for row in frame.sample(20, seed=1).iter_rows(named=True):
            arrays = store.get_prediction(row["prediction_id"], load_arrays=True)
            assert arrays["y_true"].tolist() == [arrays["y_true"][0]] * 8
        chains = store.sql("SELECT fold_artifacts FROM chains")["fold_artifacts"].to_list()
        loaded = {tuple(sorted(store.load_artifact(json.loads(f)["fold_0"]).items())) for f in chains}
        assert len(loaded) == 40
        assert store.check().ok


def test_nirslake_shell_answers_a_query_on_s3(s3_workspace):
    with WorkspaceStore(s3_workspace) as store:
        fill(store)
        expected = store.query_predictions().height
    done = subprocess.run(
        [sys.executable, "-m", "nirslake.cli", "shell", s3_workspace, "-c", "SELECT count(*) AS n FROM predictions"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert expected == 30
    assert f"│ {expected:>5} │" in done.stdout.replace("  ", " ") or f" {expected} " in done.stdout, done.stdout


def test_the_shell_init_sql_loads_httpfs_and_a_secret_for_the_endpoint(s3_workspace, s3_endpoint):
    with WorkspaceStore(s3_workspace) as store:
        init = shell_init_sql(store.storage)
    host = s3_endpoint.split("://", 1)[1]
    assert "httpfs" in init and "LOAD" in init
    assert f"ENDPOINT '{host}'" in init and "URL_STYLE 'path'" in init and "USE_SSL false" in init
    assert "KEY_ID 'testing'" in init
    # The views reach the lake through the location macros (lake spec §9).
    assert f"lake_location() AS '{s3_workspace}';" in init and "lake_location() || '/tables/'" in init


@contextmanager
def s3_requests(fs):
    """Records (operation, key or prefix) of every request the s3fs filesystem sends."""
    calls: list[tuple[str, str]] = []
    original = fs._call_s3

    async def counting(method, *args, **kwargs):
        calls.append((method, kwargs.get("Key", "") or kwargs.get("Prefix", "")))
        return await original(method, *args, **kwargs)

    fs._call_s3 = counting
    try:
        yield calls
    finally:
        del fs._call_s3


def test_reading_one_dataset_on_s3_fetches_only_its_partition(s3_workspace):
    """Partition pruning on S3: count the GET requests of a one-dataset query."""
    with WorkspaceStore(s3_workspace) as store:
        fill(store, datasets=("corn", "wheat", "rye"))
    with WorkspaceStore(s3_workspace) as store:
        with s3_requests(store.storage.fs) as calls:
            frame = store.query_predictions(dataset_name="wheat")
    assert frame.height == 15 and set(frame["dataset_name"]) == {"wheat"}
    read = [key for method, key in calls if method == "get_object"]
    assert read, calls
    assert not [key for key in read if "dataset=corn" in key or "dataset=rye" in key], read
    listings = [key for method, key in calls if method == "list_objects_v2"]
    assert len(listings) <= len(S.TABLES), listings  # the commits, then each table once: no listing per file


def test_a_first_read_on_s3_is_one_get_per_file_and_no_head(s3_workspace):
    """s3fs asks an object's size (HEAD) before a plain GET unless the GET has a range; the
    store sends open-ended ranges, and fetches the files of one read together."""
    with WorkspaceStore(s3_workspace) as store:
        fill(store, pipelines=4)
    with WorkspaceStore(s3_workspace) as store:
        with s3_requests(store.storage.fs) as calls:
            frame = store.query_predictions()
            runs = store.list_runs()
    assert frame.height == 40 and runs.height == 1
    operations = Counter(method for method, _ in calls)
    read = [key for method, key in calls if method == "get_object"]
    assert operations["head_object"] == 0, calls
    assert len(read) == len(set(read)) > 8, read  # each file once: predictions (8 pipelines), runs, commits
    assert all("/tables/" in key for key in read), read


def test_storage_reads_empty_and_missing_objects_on_s3(s3_workspace):
    storage = Storage(s3_workspace)
    storage.publish("x/empty.bin", b"")
    storage.publish("x/full.bin", b"abc")
    assert storage.read_bytes("x/empty.bin") == b""  # no byte 0 to range over: read without one
    assert storage.read_many(["x/empty.bin", "x/full.bin"]) == {"x/empty.bin": b"", "x/full.bin": b"abc"}
    with pytest.raises(FileNotFoundError):
        storage.read_many(["x/full.bin", "x/missing.bin"])
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("x/missing.bin")


def test_gc_on_s3_lists_the_objects_once_instead_of_a_head_each(s3_workspace):
    with WorkspaceStore(s3_workspace, grace_seconds=0) as store:
        fill(store, pipelines=1, datasets=("corn",))
        kept = store.save_artifact({"kept": True}, "PLS", "model", "pickle")
        pipe = store.list_pipelines()["pipeline_id"][0]
        store.save_chain(pipe, [], 0, "PLS", "SNV", "kfold", {"fold_0": kept}, {})
        orphans = [store.save_artifact({"orphan": i}, "PLS", "model", "pickle") for i in range(6)]
        store.flush()
        let_object_times_pass(s3_workspace)
        with s3_requests(store.storage.fs) as calls:
            removed = store.gc_artifacts()
        assert removed == 6
        assert store.load_artifact(kept) == {"kept": True}
        for artifact_id in orphans:
            with pytest.raises(KeyError):
                store.load_artifact(artifact_id)
    operations = Counter(method for method, _ in calls)
    object_listings = [key for method, key in calls if method == "list_objects_v2" and "/objects" in key]
    assert len(object_listings) == 1, calls
    # HEADs only to re-check, right before deleting, that nobody saved the object again
    assert operations["head_object"] <= len(orphans), calls
    assert operations["delete_object"] + operations["delete_objects"] >= 1, calls
