"""Issue 9: what the store API acknowledges, every reader sees, also across processes whose
clocks disagree, writers that race on one prediction id, and workspace paths that look like SQL.

Each test starts a real second process (``subprocess``, or a fork) where the scenario needs one,
and checks the store API, the DuckDB views and the polars scan alike.
"""

from __future__ import annotations

import json
import math
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


# --------------------------------------------------------------------------- scenario 18

SURROGATE = "model-\udcff"  # what Python makes of a file name that is not UTF-8


def test_a_lone_surrogate_in_artifact_ids_or_a_path_is_refused_at_the_call(local_workspace):
    """Issue 9 scenario 18: a lone surrogate in a chain's artifact ids (fold, shared, step) or in
    a registered artifact's path used to be acknowledged, and from then on every flush, read,
    ``WorkspaceStore()`` and ``check`` of the workspace failed with UnicodeEncodeError. Each call
    must raise ValueError naming the field, and everything stored before must stay readable."""
    store = WorkspaceStore(local_workspace)
    _, pipe, chain = parents(store)
    kept = store.save_prediction(pipe, chain, "wheat", val_score=0.1, **PRED)
    calls = {
        "fold_artifacts['fold_0']": lambda: store.save_chain(pipe, [], 0, "M", "", "kfold", {"fold_0": SURROGATE}, {}),
        "shared_artifacts['0']": lambda: store.save_chain(pipe, [], 0, "M", "", "kfold", {}, {"0": ["a", SURROGATE]}),
        "steps[1]['artifact_id']": lambda: store.save_chain(pipe, [{}, {"artifact_id": SURROGATE}], 0, "M", "", "kfold", {}, {}),
        "path": lambda: store.register_existing_artifact("a" * 64, f"/models/{SURROGATE}.pkl", "a" * 64, "M", "model", "pickle", 3),
    }  # fmt: skip
    for field, call in calls.items():
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value).startswith(f"{field} is not valid Unicode text"), raised.value
    store.close()
    seen = run_child(
        """
        with WorkspaceStore(sys.argv[1]) as store:
            report = store.check()
            print(json.dumps({"ok": report.ok, "chains": store.sql("SELECT count(*) FROM chains").item(),
                              "predictions": store.query_predictions()["prediction_id"].to_list()}))
        """,
        local_workspace,
    )  # fmt: skip
    assert seen == {"ok": True, "chains": 1, "predictions": [kept]}


# --------------------------------------------------------------------------- scenario 25


def test_a_single_shared_artifact_id_is_a_list_of_one(workspace):
    """Issue 9 scenario 25 (first half): the seed store accepts ``shared_artifacts`` with one id
    per step (``{"0": "<id>"}``) and its own tests pass it so; the chain keeps it as a list of one,
    holds the artifact against gc, and replays with it."""
    with WorkspaceStore(workspace) as store:
        _, pipe, _ = parents(store)
        scaler = store.save_artifact({"mean": np.ones(2)}, "StandardScaler", "transformer", "pickle")
        chain = store.save_chain(pipe, [], 1, "PLS", "SNV", "kfold", {}, {"0": scaler, "2": [scaler]})
        assert store.get_chain(chain)["shared_artifacts"] == {"0": [scaler], "2": [scaler]}
        assert store.sql("SELECT artifact_ids FROM lake_table('chains') WHERE chain_id = ?", [chain]).item().to_list() == [scaler]


class _Methods:
    """Every method of the protocol, no ``workspace_path``."""


for _name in [n for n in dir(WorkspaceStoreProtocol) if not n.startswith("_") and callable(getattr(WorkspaceStoreProtocol, n))]:
    setattr(_Methods, _name, lambda self, *a, **k: None)


class _Conforming(_Methods):
    workspace_path = "somewhere"


def test_the_protocol_answers_isinstance_and_issubclass(local_workspace):
    """Issue 9 scenario 25 (second half): ``issubclass(WorkspaceStore, WorkspaceStoreProtocol)``
    raised TypeError (a protocol with a property member); callers use it. Both checks must
    answer, and both must see a missing method or a missing ``workspace_path``."""
    assert issubclass(WorkspaceStore, WorkspaceStoreProtocol)
    with WorkspaceStore(local_workspace) as store:
        assert isinstance(store, WorkspaceStoreProtocol)
    assert issubclass(_Conforming, WorkspaceStoreProtocol) and isinstance(_Conforming(), WorkspaceStoreProtocol)
    assert not issubclass(_Methods, WorkspaceStoreProtocol) and not isinstance(_Methods(), WorkspaceStoreProtocol)
    assert not issubclass(dict, WorkspaceStoreProtocol) and not isinstance({}, WorkspaceStoreProtocol)


# --------------------------------------------------------------------------- scenario 22

DUCKDB_CLI = Path(sys.executable).with_name("duckdb")
HOSTILE_FOLDERS = {
    "newline + SQL": "ws\n; CREATE TABLE pwned AS SELECT 42 AS x; --",
    "backslash": "back\\slash",
    "quote": "it's",
    "brackets and a glob": "runs[1]*?",
    "a placeholder": "{lake}{lower_is_better}",
}


@pytest.mark.parametrize("folder", HOSTILE_FOLDERS.values(), ids=HOSTILE_FOLDERS.keys())
def test_a_workspace_path_is_a_path_in_sql(tmp_path, folder):
    """Issue 9 scenario 22: the workspace path was pasted into the view SQL unescaped (also into
    its comments): a path holding a newline ran its SQL when the store opened, and one with a
    backslash could not be opened. A sibling folder the glob could also match (``?`` for the
    backslash) must not leak in. The store, its SQL and the DuckDB shell on catalog.duckdb must
    all count exactly this workspace's rows."""
    sibling = tmp_path / (folder.replace("\\", "_") if "\\" in folder else "neighbour")
    workspace = tmp_path / folder
    for ws, n in ((sibling, 3), (workspace, 2)):
        with WorkspaceStore(ws) as store:
            _, pipe, chain = parents(store)
            for _ in range(n):
                store.save_prediction(pipe, chain, "wheat", val_score=0.1, **PRED)
    with WorkspaceStore(workspace) as store:
        assert store.query_predictions().height == 2
        assert store.sql("SELECT count(*) FROM predictions").item() == 2
        assert store.sql("SELECT count(*) FROM information_schema.tables WHERE table_name = 'pwned'").item() == 0
        store.rebuild_catalog()
    shell = subprocess.run(
        [str(DUCKDB_CLI), "-readonly", "-csv", "-noheader", str(workspace / "catalog.duckdb"),
         "SELECT (SELECT count(*) FROM predictions), (SELECT count(*) FROM runs),"
         " (SELECT count(*) FROM information_schema.tables WHERE table_name = 'pwned')"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip() == "2,1,0"


# --------------------------------------------------------------------------- scenario 12


def _save_in_dataset(workspace, pipe, chain, dataset, pid, score, wait_before, set_after, wait_after):
    """A writer process: saves ``pid`` with arrays under ``dataset`` (after ``wait_before``, if
    any), sets ``set_after``, and publishes only at close, after ``wait_after`` (if any)."""
    if wait_before is not None:
        assert wait_before.wait(30)
    store = WorkspaceStore(workspace)
    store.save_prediction(pipe, chain, dataset, val_score=score, prediction_id=pid, **PRED)
    store.save_prediction_arrays(pid, [1.0, 2.0], [score, score])
    set_after.set()
    if wait_after is not None:
        assert wait_after.wait(30)
    store.close()


def race_one_id_into_two_datasets(workspace: str) -> str:
    """Two forked writer processes save one prediction_id (with arrays) under ``wheat`` (0.1),
    then under ``corn`` (0.9), and publish only once both saved; returns the id."""
    with WorkspaceStore(workspace) as store:
        _, pipe, chain = parents(store)
    pid = "shared-prediction-id"
    fork = multiprocessing.get_context("fork")
    first_saved, second_saved = fork.Event(), fork.Event()
    writers = [
        fork.Process(target=_save_in_dataset, args=(workspace, pipe, chain, "wheat", pid, 0.1, None, first_saved, second_saved)),
        fork.Process(target=_save_in_dataset, args=(workspace, pipe, chain, "corn", pid, 0.9, first_saved, second_saved, None)),
    ]  # fmt: skip
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    return pid


def test_one_prediction_id_saved_in_two_datasets_by_racing_writers(local_workspace):
    """Issue 9 scenario 12: two writer processes save one prediction_id under two datasets within
    flush_seconds; neither can see the other's save, so both are accepted. Every reader must then
    agree on where it lives: a read by dataset and an unfiltered read (store, DuckDB, polars) show
    the same rows for each dataset; get_prediction returns the later save; delete removes both.
    (tests/query/test_spark.py checks Spark on the same race.)"""
    pid = race_one_id_into_two_datasets(local_workspace)
    with WorkspaceStore(local_workspace) as store:
        everywhere = store.query_predictions().select("dataset_name", "val_score").sort("dataset_name").rows()
        assert everywhere == [("corn", 0.9), ("wheat", 0.1)]
        sql = "SELECT dataset_name, val_score FROM {} WHERE prediction_id = ? {}ORDER BY 1"
        for dataset, score in everywhere:
            by_dataset = store.query_predictions(dataset_name=dataset).select("dataset_name", "val_score").rows()
            assert by_dataset == [(dataset, score)]
            assert store.top_predictions(5, dataset_name=dataset)["val_score"].to_list() == [score]
            assert store.sql(sql.format("predictions", "AND dataset_name = ? "), [pid, dataset]).rows() == [(dataset, score)]
            scanned = query.scan(local_workspace, "predictions", dataset_name=dataset).collect()
            assert scanned.select("dataset_name", "val_score").rows() == [(dataset, score)]
            arrays = query.scan(local_workspace, "prediction_arrays", dataset_name=dataset).collect()
            assert arrays["y_pred"].to_list() == [[score, score]]
        assert store.sql(sql.format("predictions", ""), [pid]).rows() == everywhere
        assert store.sql(sql.format("prediction_arrays", "").replace("val_score", "y_pred[1]"), [pid]).rows() == everywhere
        scanned = query.scan(local_workspace, "predictions").collect().sort("dataset_name")
        assert scanned.select("dataset_name", "val_score").rows() == everywhere
        latest = store.get_prediction(pid, load_arrays=True)
        assert (latest["dataset_name"], latest["val_score"], latest["y_pred"].tolist()) == ("corn", 0.9, [0.9, 0.9])
        assert store.delete_prediction(pid) is True
        assert store.query_predictions().height == 0 and store.get_prediction(pid) is None
        assert store.sql("SELECT (SELECT count(*) FROM predictions) + (SELECT count(*) FROM prediction_arrays)").item() == 0


# --------------------------------------------------------------------------- scenario 13


def delete_in_another_process(workspace: str, *prediction_ids: str) -> None:
    seen = run_child(
        """
        with WorkspaceStore(sys.argv[1]) as other:
            print(json.dumps([other.delete_prediction(p) for p in sys.argv[2:]]))
        """,
        workspace, *prediction_ids,
    )  # fmt: skip
    assert seen == [True] * len(prediction_ids)


def save_arrays_after_another_process_deleted(workspace: str) -> str:
    """Arrays acknowledged for a prediction another process deleted meanwhile; returns its id."""
    with WorkspaceStore(workspace) as store:
        _, pipe, chain = parents(store)
        pid = store.save_prediction(pipe, chain, "wheat", val_score=0.1, **PRED)
        store.flush()
        delete_in_another_process(workspace, pid)
        store.save_prediction_arrays(pid, [1.0, 2.0], [1.5, 2.5])  # this store has not read since
    return pid


def test_arrays_saved_for_a_prediction_another_process_deleted_stay_hidden(local_workspace):
    """Issue 9 scenario 13: a writer saves arrays for a prediction that another process deleted
    meanwhile. The writer cannot know (it has not read since), so the save is acknowledged, but
    the arrays must not show anywhere without their prediction (views, polars, the store; Spark
    in tests/query/test_spark.py). A writer that has read the deletion refuses such arrays at once."""
    stale = save_arrays_after_another_process_deleted(local_workspace)
    with WorkspaceStore(local_workspace) as reader:
        assert reader.sql("SELECT count(*) FROM prediction_arrays").item() == 0
        assert query.scan(local_workspace, "prediction_arrays").collect().height == 0
        assert query.scan(local_workspace, "prediction_arrays", dataset_name="wheat").collect().height == 0
        assert reader.get_prediction(stale, load_arrays=True) is None
    store = WorkspaceStore(local_workspace)
    _, pipe, chain = parents(store)
    read_since = store.save_prediction(pipe, chain, "wheat", val_score=0.1, **PRED)
    store.flush()
    delete_in_another_process(local_workspace, read_since)
    assert store.get_prediction(read_since) is None
    with pytest.raises(KeyError, match="unknown prediction_id"):
        store.save_prediction_arrays(read_since, [1.0, 2.0], [1.5, 2.5])
    store.close()


# --------------------------------------------------------------------------- scenario 24


def test_small_values_fail_clearly_or_keep_their_shape(local_workspace, capsys):
    """Issue 9 scenario 24: values that ended in OverflowError or AttributeError, settings checked
    in the wrong order, and arrays that lost their shape or mask. Each call now either works (a
    huge limit is no limit; y_proba of 0 samples x 3 classes comes back (0, 3)) or raises an error
    naming the field (the CLI exits 2 with it); nothing stored changes."""
    from nirslake.cli import main

    with WorkspaceStore(local_workspace) as store:
        _, pipe, chain = parents(store)
        pid = store.save_prediction(pipe, chain, "wheat", val_score=0.1, **PRED)
        with pytest.raises(ValueError, match="^val_score is out of range for a 64-bit float"):
            store.save_prediction(pipe, chain, "wheat", val_score=10**400, **PRED)
        assert store.query_predictions(limit=2**70)["prediction_id"].to_list() == [pid]
        assert store.list_runs(limit=2**70, offset=2**70).height == 0
        assert store.top_predictions(2**70)["prediction_id"].to_list() == [pid]
        with pytest.raises(ValueError, match="^target_file_mb must be a positive number, and finite: got inf"):
            store.compact(target_file_mb=math.inf)
        store.save_prediction_arrays(pid, [], [], y_proba=np.empty((0, 3)))
        assert store.get_prediction(pid, load_arrays=True)["y_proba"].shape == (0, 3)
        masked = np.ma.masked_array([1.0, 2.0], mask=[False, True])
        with pytest.raises(TypeError, match=r"^y_pred is a masked array, whose mask would be lost: pass y_pred.filled\(np.nan\)"):
            store.save_prediction_arrays(pid, [1.0, 2.0], masked)
        assert store.get_prediction(pid, load_arrays=True)["y_proba"].shape == (0, 3)
    for name, value in (("grace_seconds", -1), ("flush_seconds", math.nan), ("flush_bytes", 0), ("flush_rows", 2.5)):
        with pytest.raises(ValueError, match=f"^{name} must be a "):
            WorkspaceStore(local_workspace, listing_ttl_seconds=0, **{name: value})
    capsys.readouterr()
    for argv, message in (
        (["compact", "--target-mb", "inf"], "target_file_mb must be a positive number, and finite: got inf"),
        (["check", "--grace-seconds", "-5"], "grace_seconds must be a finite number >= 0, got -5.0"),
        (["sql", ""], "the query holds no SQL statement: ''"),
        (["sql", "-- only a comment"], "the query holds no SQL statement"),
    ):
        assert main([*argv, "-w", local_workspace]) == 2
        assert message in capsys.readouterr().err
    with WorkspaceStore(local_workspace) as store:
        assert store.query_predictions()["val_score"].to_list() == [0.1]
