"""Issue 9: what the store API acknowledges, every reader sees, also across processes whose
clocks disagree, writers that race on one prediction id, and workspace paths that look like SQL.

Each test starts a real second process (``subprocess``, or a fork) where the scenario needs one,
and checks the store API, the DuckDB views and the polars scan alike.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nirslake import WorkspaceStore, query
from nirslake.protocol import WorkspaceStoreProtocol

PRED = dict(model_name="PLS", model_class="PLSRegression", fold_id=0, partition="val", test_score=0.2,
            train_score=0.1, metric="rmse", task_type="regression", n_samples=3, n_features=2, scores={},
            best_params={}, branch_id=None, branch_name=None, exclusion_count=0, exclusion_rate=0.0)  # fmt: skip


def parents(store: WorkspaceStore, dataset: str = "wheat") -> tuple[str, str, str]:
    """A run, a pipeline on ``dataset`` and a chain: (run_id, pipeline_id, chain_id)."""
    run = store.begin_run("sweep", {}, [{"name": dataset}])
    pipe = store.begin_pipeline(run, "pls", {}, {}, dataset, "h")
    chain = store.save_chain(pipe, [], 0, "PLSRegression", "", "kfold", {}, {})
    return run, pipe, chain


def run_child(code: str, *args: str, skew_seconds: float = 0.0) -> dict:
    """Run ``code`` in a new Python process (with ``args`` as ``sys.argv[1:]``), its wall clock
    ``skew_seconds`` off; it prints one JSON line, returned here."""
    prologue = textwrap.dedent(
        f"""
        import json, sys, time
        _real_time_ns = time.time_ns
        time.time_ns = lambda: _real_time_ns() + {int(skew_seconds * 1e9)}
        from nirslake import WorkspaceStore
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- scenario 14


def test_a_clock_behind_still_deletes_and_resaves_what_it_read(local_workspace):
    """Issue 9 scenario 14: a process whose clock is 5 s behind deletes a prediction another
    process (right clock) just saved, and re-saves a second one with a new score. Both calls are
    acknowledged (delete returns True); the deleted prediction must be gone and the re-save must
    read back its new value, in that process and in every other reader."""
    with WorkspaceStore(local_workspace) as store:
        _, pipe, chain = parents(store)
        doomed = store.save_prediction(pipe, chain, "wheat", val_score=0.1, **PRED)
        kept = store.save_prediction(pipe, chain, "wheat", val_score=0.1, **PRED)
        store.save_prediction_arrays(doomed, [1.0, 2.0], [1.5, 2.5])
        pipe_args = (pipe, chain)
    seen = run_child(
        """
        ws, doomed, kept, pipe, chain = sys.argv[1:]
        with WorkspaceStore(ws) as store:
            deleted = store.delete_prediction(doomed)
            still_there = store.get_prediction(doomed) is not None
            store.save_prediction(pipe, chain, "wheat", "PLS", "PLSRegression", 0, "val", 0.9, 0.2, 0.1, "rmse",
                                  "regression", 3, 2, {}, {}, None, None, 0, 0.0, prediction_id=kept)
            resaved = store.get_prediction(kept)["val_score"]
        print(json.dumps({"deleted": deleted, "still_there": still_there, "resaved": resaved}))
        """,
        local_workspace, doomed, kept, *pipe_args,
        skew_seconds=-5,
    )  # fmt: skip
    assert seen == {"deleted": True, "still_there": False, "resaved": 0.9}
    with WorkspaceStore(local_workspace) as store:
        assert store.get_prediction(doomed) is None
        assert store.get_prediction(kept)["val_score"] == 0.9
        assert store.query_predictions()["prediction_id"].to_list() == [kept]
        assert store.sql("SELECT prediction_id, val_score FROM predictions").rows() == [(kept, 0.9)]
        assert store.sql("SELECT count(*) FROM prediction_arrays").item() == 0
