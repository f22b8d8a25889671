"""Durability points survive SIGKILL; readers never meet a half-written file (lake spec §3, §6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq

import nirslake.query as q
from nirslake import WorkspaceStore
from nirslake.query import catalog
from nirslake.lake.storage import Storage

# A writer that saves one whole pipeline, reports once complete_pipeline has returned, then keeps
# writing (unflushed) until it is killed.
KILLED_WRITER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from nirslake import WorkspaceStore

    store = WorkspaceStore(sys.argv[1])
    run = store.begin_run("killed", {"seed": 1}, [{"name": "wheat"}])
    pipe = store.begin_pipeline(run, "SNV | PLS", {"steps": ["SNV", "PLS"]}, {}, "wheat", "h1")
    model = store.save_artifact({"coef": [1.0, 2.0, 3.0]}, "PLSRegression", "model", "pickle")
    chain = store.save_chain(pipe, [{"step_idx": 0, "operator_class": "PLS", "params": {}, "artifact_id": model, "stateless": False}],
                             0, "PLSRegression", "SNV", "kfold", {"fold_0": model}, {})
    rng = np.random.default_rng(7)
    ids = []
    for fold in range(5):
        for part in ("train", "val", "test"):
            pid = store.save_prediction(pipe, chain, "wheat", "PLS", "PLSRegression", fold, part, 0.1 + fold, 0.2, 0.3,
                                        "rmse", "regression", 40, 100, {"val": {"rmse": 0.1}}, {}, None, None, 0, 0.0)
            store.save_prediction_arrays(pid, rng.normal(size=40), rng.normal(size=40), sample_indices=np.arange(40))
            ids.append(pid)
    store.log_step(pipe, 0, "PLSRegression", "end", duration_ms=12.5)
    store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1234)
    print(json.dumps({"run": run, "pipeline": pipe, "chain": chain, "model": model, "ids": ids}), flush=True)
    other = store.begin_pipeline(run, "late", {}, {}, "wheat", "h2")
    while True:
        store.save_prediction(other, chain, "wheat", "PLS", "PLSRegression", 0, "val", 0.5, 0.5, 0.5,
                              "rmse", "regression", 40, 100, {}, {}, None, None, 0, 0.0)
        time.sleep(0.001)
    """
)

# A writer of N complete pipelines of 15 predictions each, as fast as it can.
STREAM_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from nirslake import WorkspaceStore

    # Publish every few pipelines, so readers meet files landing all the time.
    store = WorkspaceStore(sys.argv[1], flush_seconds=0.02)
    run = store.begin_run("stream", {}, [{"name": "corn"}])
    for i in range(int(sys.argv[2])):
        pipe = store.begin_pipeline(run, f"p{i}", {}, {}, "corn", "h")
        chain = store.save_chain(pipe, [], 0, "Ridge", "", "kfold", {}, {})
        for fold in range(5):
            for part in ("train", "val", "test"):
                pid = store.save_prediction(pipe, chain, "corn", "Ridge", "Ridge", fold, part, float(i), 0.0, 0.0,
                                            "rmse", "regression", 200, 50, {}, {}, None, None, 0, 0.0)
                store.save_prediction_arrays(pid, np.zeros(200), np.ones(200))
        store.complete_pipeline(pipe, float(i), 0.0, "rmse", 1)
    store.close()
    """
)


def _python(script: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True, **kw)


def test_sigkill_right_after_complete_pipeline_loses_nothing_it_saved(workspace):
    WorkspaceStore(workspace).close()  # create the workspace before the race starts
    proc = _python(KILLED_WRITER, workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    time.sleep(0.05)  # let it buffer some unflushed rows past the durability point
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = json.loads(line)

    with WorkspaceStore(workspace) as store:
        pipeline = store.get_pipeline(saved["pipeline"])
        assert pipeline["status"] == "completed" and pipeline["duration_ms"] == 1234
        assert store.get_run(saved["run"])["status"] == "running"
        assert store.get_chain(saved["chain"])["fold_artifacts"] == {"fold_0": saved["model"]}
        assert store.load_artifact(saved["model"]) == {"coef": [1.0, 2.0, 3.0]}
        preds = store.query_predictions(pipeline_id=saved["pipeline"])
        assert sorted(preds["prediction_id"].to_list()) == sorted(saved["ids"])
        for pid in saved["ids"]:
            row = store.get_prediction(pid, load_arrays=True)
            assert row["y_true"].shape == (40,) and row["y_pred"].dtype == np.float64
            assert np.array_equal(row["sample_indices"], np.arange(40))
        log = store.get_pipeline_log(saved["pipeline"])
        assert log["duration_ms"].to_list() == [12.5]


def _read_every_data_file(root: Path) -> int:
    """Open every Parquet file under tables/ completely; a half-written one would raise."""
    rows = 0
    for path in sorted((root / "tables").rglob("*.parquet")):
        try:
            rows += pq.read_table(path).num_rows
        except FileNotFoundError:
            continue  # removed by compaction between listing and reading: not a torn file
    return rows


def test_readers_never_meet_a_half_written_file(workspace):
    n_pipelines = 40
    WorkspaceStore(workspace).close()
    writer = _python(STREAM_WRITER, workspace, str(n_pipelines), stderr=subprocess.PIPE)
    storage = Storage(workspace)
    con = catalog.connect(storage)
    counts = []
    try:
        while True:
            finished = writer.poll() is not None
            _read_every_data_file(Path(workspace))
            n_polars = q.scan(workspace, "predictions").select(q.pl.len()).collect().item()
            n_duckdb = con.execute("SELECT count(*) FROM predictions").fetchone()[0]
            n_arrays = con.execute("SELECT count(*) FROM prediction_arrays").fetchone()[0]
            # A pipeline's predictions land in one file: readers see whole pipelines only.
            assert n_polars % 15 == 0 and n_duckdb % 15 == 0 and n_arrays % 15 == 0
            counts.append(n_polars)
            if finished:
                break
    finally:
        con.close()
        writer.wait(timeout=120)
    assert writer.returncode == 0, writer.stderr.read()
    assert counts == sorted(counts), "a reader saw the count go down"
    assert counts[-1] == n_pipelines * 15
    assert len(counts) >= 3, "the reader loop never overlapped the writer"


LEFT_OPEN = textwrap.dedent(
    """
    import sys
    from nirslake import WorkspaceStore

    store = WorkspaceStore(sys.argv[1])
    run = store.begin_run("left open", {}, [])
    pipe = store.begin_pipeline(run, "p", {}, {}, "wheat", "h")
    store.save_prediction(pipe, None, "wheat", "m", "M", 0, "val", 0.1, 0.1, 0.1, "rmse", "regression",
                          1, 1, {}, {}, None, None, 0, 0.0, prediction_id="kept-at-exit")
    # no close(), no durability point: the exit hook must write it, and the exit must be clean
    """
)


def test_a_store_left_open_is_flushed_at_exit_without_crashing(workspace):
    WorkspaceStore(workspace).close()
    done = subprocess.run([sys.executable, "-c", LEFT_OPEN, workspace], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    with WorkspaceStore(workspace) as store:
        assert store.get_prediction("kept-at-exit")["val_score"] == 0.1


def test_a_dropped_store_writes_what_it_buffered(workspace):
    import gc

    store = WorkspaceStore(workspace)
    run = store.begin_run("dropped", {}, [])
    del store
    gc.collect()
    with WorkspaceStore(workspace) as reopened:
        assert reopened.get_run(run)["name"] == "dropped"


READ_AND_EXIT = textwrap.dedent(
    """
    import sys
    from nirslake import WorkspaceStore

    store = WorkspaceStore(sys.argv[1])
    ids = store.query_predictions()["prediction_id"].to_list()
    for pid in ids[:5]:
        store.get_prediction(pid, load_arrays=True)
    store.compact()
    store.check()
    store.close()
    """
)


@pytest.mark.slow
def test_processes_that_read_and_compact_exit_cleanly(workspace, tmp_path):
    """pyarrow fed from Python file objects or bytes aborted about one exit in ten here
    ("terminate called without an active exception"): its I/O threads released Python-backed
    buffers during interpreter shutdown (5 of 40 such processes aborted before the fix, 0 of 40
    after). Files are now read natively or into Arrow memory."""
    import shutil

    from test_compaction import fill

    fill(workspace, runs=3, pipelines=10)  # one set of small files per pipeline: many reads
    for i in range(30):
        copy = str(tmp_path / f"copy{i}")
        shutil.copytree(workspace, copy)  # a fresh, uncompacted lake for each process
        done = subprocess.run([sys.executable, "-c", READ_AND_EXIT, copy], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"exit {done.returncode} on run {i}: {done.stderr[-2000:]}"
        assert "terminate called" not in done.stderr
