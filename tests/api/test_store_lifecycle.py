"""A store's life: an empty workspace, close, reopen, read-your-writes and threads sharing one store."""

from __future__ import annotations

import threading

import numpy as np
import polars as pl
import pytest

import nirslake
from conftest import create_pipeline, new_bucket, record_prediction
from nirslake import WorkspaceStore

# --------------------------------------------------------------------------- empty workspace

GETTERS = {
    "get_run": lambda s: s.get_run("no-such-run"),
    "get_pipeline": lambda s: s.get_pipeline("no-such-pipeline"),
    "get_chain": lambda s: s.get_chain("no-such-chain"),
    "get_prediction": lambda s: s.get_prediction("no-such-prediction"),
    "get_prediction(load_arrays)": lambda s: s.get_prediction("no-such-prediction", load_arrays=True),
}

LISTINGS = {
    "list_runs": lambda s: s.list_runs(),
    "list_runs(filtered)": lambda s: s.list_runs(status="completed", dataset="corn_m5"),
    "list_pipelines": lambda s: s.list_pipelines(),
    "list_pipelines(filtered)": lambda s: s.list_pipelines(run_id="r", dataset_name="corn_m5"),
    "get_chains_for_pipeline": lambda s: s.get_chains_for_pipeline("no-such-pipeline"),
    "query_predictions": lambda s: s.query_predictions(),
    "query_predictions(filtered)": lambda s: s.query_predictions(dataset_name="corn%", partition="val"),
    "top_predictions": lambda s: s.top_predictions(5),
    "top_predictions(group_by)": lambda s: s.top_predictions(5, group_by="model_class"),
    "get_pipeline_log": lambda s: s.get_pipeline_log("no-such-pipeline"),
    "get_run_log_summary": lambda s: s.get_run_log_summary("no-such-run"),
}


def backend_workspace(request, tmp_path_factory) -> str:
    """A fresh workspace on the backend of ``request.param`` (as the ``workspace`` fixture makes),
    for a module-scoped store that many read-only tests share."""
    if request.param == "local":
        return str(tmp_path_factory.mktemp("ws") / "ws")
    return f"s3://{new_bucket(request.getfixturevalue('s3_endpoint'))}/ws"


@pytest.fixture(scope="module", params=["local", "s3"])
def empty_store(request, tmp_path_factory):
    """One store on an empty workspace per backend: the getters and listings below only read."""
    s = WorkspaceStore(backend_workspace(request, tmp_path_factory), grace_seconds=0)
    yield s
    s.close()


@pytest.mark.parametrize("name", GETTERS)
def test_empty_workspace_getters_return_none(empty_store, name):
    assert GETTERS[name](empty_store) is None


@pytest.mark.parametrize("name", LISTINGS)
def test_empty_workspace_listings_are_empty_dataframes(empty_store, name):
    frame = LISTINGS[name](empty_store)
    assert isinstance(frame, pl.DataFrame)
    assert frame.height == 0


def test_empty_workspace_has_nothing_to_delete_or_collect(store):
    assert store.delete_prediction("no-such-prediction") is False
    assert store.delete_run("no-such-run") == 0
    assert store.gc_artifacts() == 0


def test_workspace_path_is_the_one_given(store, workspace):
    assert str(store.workspace_path) == workspace


def test_store_satisfies_the_protocol(store):
    assert isinstance(store, nirslake.WorkspaceStoreProtocol)


def test_an_unrelated_object_does_not_satisfy_the_protocol():
    assert not isinstance(object(), nirslake.WorkspaceStoreProtocol)


# --------------------------------------------------------------------------- close


def test_close_is_idempotent_and_keeps_workspace_path(store, workspace):
    store.close()
    store.close()
    assert str(store.workspace_path) == workspace


def close_after_writing(store, out) -> dict:
    """Write one of everything, close the store; returns the ids written before close."""
    ids = create_pipeline(store)
    prediction_id = record_prediction(store, ids)
    artifact_id = store.save_artifact({"coef": [1.0, 2.0]}, "Ridge", "model", "pickle")
    store.close()
    return {"ids": ids, "prediction_id": prediction_id, "artifact_id": artifact_id, "out": out}


@pytest.fixture
def closed(store, tmp_path):
    """A store closed after writing one of everything; returns the ids written before close."""
    return close_after_writing(store, tmp_path / "out")


@pytest.fixture(scope="module", params=["local", "s3"])
def closed_store(request, tmp_path_factory):
    """(store, ids): one closed store per backend, shared by the calls below that must each
    raise without touching it (``test_calls_after_close_change_nothing_on_disk`` checks the disk)."""
    store = WorkspaceStore(backend_workspace(request, tmp_path_factory), grace_seconds=0)
    return store, close_after_writing(store, tmp_path_factory.mktemp("out") / "out")


X10 = np.zeros((10, 3))
STEP = [{"step_idx": 0, "operator_class": "Ridge", "params": {}, "artifact_id": None, "stateless": False}]

AFTER_CLOSE = {
    "begin_run": lambda s, c: s.begin_run("r", {}, []),
    "complete_run": lambda s, c: s.complete_run(c["ids"].run_id, {}),
    "fail_run": lambda s, c: s.fail_run(c["ids"].run_id, "boom"),
    "get_run": lambda s, c: s.get_run(c["ids"].run_id),
    "list_runs": lambda s, c: s.list_runs(),
    "begin_pipeline": lambda s, c: s.begin_pipeline(c["ids"].run_id, "p", [], {}, "corn_m5", "h"),
    "complete_pipeline": lambda s, c: s.complete_pipeline(c["ids"].pipeline_id, 0.1, 0.2, "rmse", 5),
    "fail_pipeline": lambda s, c: s.fail_pipeline(c["ids"].pipeline_id, "boom"),
    "get_pipeline": lambda s, c: s.get_pipeline(c["ids"].pipeline_id),
    "list_pipelines": lambda s, c: s.list_pipelines(),
    "save_chain": lambda s, c: s.save_chain(c["ids"].pipeline_id, STEP, 0, "Ridge", "", "KFold", {}, {}),
    "get_chain": lambda s, c: s.get_chain(c["ids"].chain_id),
    "get_chains_for_pipeline": lambda s, c: s.get_chains_for_pipeline(c["ids"].pipeline_id),
    "save_prediction": lambda s, c: s.save_prediction(
        c["ids"].pipeline_id, c["ids"].chain_id, "corn_m5", "PLS", "PLSRegression", "0", "val",
        0.1, 0.2, 0.05, "rmse", "regression", 10, 3, {}, {}, None, None, 0, 0.0,
    ),  # fmt: skip
    "save_prediction_arrays": lambda s, c: s.save_prediction_arrays(c["prediction_id"], np.ones(10), np.ones(10)),
    "get_prediction": lambda s, c: s.get_prediction(c["prediction_id"]),
    "query_predictions": lambda s, c: s.query_predictions(),
    "top_predictions": lambda s, c: s.top_predictions(3),
    "delete_prediction": lambda s, c: s.delete_prediction(c["prediction_id"]),
    "save_artifact": lambda s, c: s.save_artifact({"coef": [3.0]}, "Ridge", "model", "pickle"),
    "register_existing_artifact": lambda s, c: s.register_existing_artifact(
        "ext", "/tmp/none.pkl", "0" * 64, "Ridge", "model", "pickle", 1
    ),
    "load_artifact": lambda s, c: s.load_artifact(c["artifact_id"]),
    "get_artifact_path": lambda s, c: s.get_artifact_path(c["artifact_id"]),
    "gc_artifacts": lambda s, c: s.gc_artifacts(),
    "log_step": lambda s, c: s.log_step(c["ids"].pipeline_id, 0, "SNV", "start"),
    "get_pipeline_log": lambda s, c: s.get_pipeline_log(c["ids"].pipeline_id),
    "get_run_log_summary": lambda s, c: s.get_run_log_summary(c["ids"].run_id),
    "export_chain": lambda s, c: s.export_chain(c["ids"].chain_id, c["out"] / "chain"),
    "export_pipeline_config": lambda s, c: s.export_pipeline_config(c["ids"].pipeline_id, c["out"] / "cfg"),
    "export_run": lambda s, c: s.export_run(c["ids"].run_id, c["out"] / "run"),
    "export_predictions_parquet": lambda s, c: s.export_predictions_parquet(c["out"] / "p.parquet"),
    "delete_run": lambda s, c: s.delete_run(c["ids"].run_id),
    "vacuum": lambda s, c: s.vacuum(),
    "replay_chain": lambda s, c: s.replay_chain(c["ids"].chain_id, X10),
}


@pytest.mark.parametrize("name", AFTER_CLOSE)
def test_every_method_raises_runtime_error_after_close(closed_store, name):
    store, closed = closed_store
    with pytest.raises(RuntimeError):
        AFTER_CLOSE[name](store, closed)


def test_calls_after_close_change_nothing_on_disk(store, closed, workspace):
    for call in AFTER_CLOSE.values():
        with pytest.raises(RuntimeError):
            call(store, closed)
    reopened = WorkspaceStore(workspace)
    try:
        assert reopened.get_run(closed["ids"].run_id)["status"] == "running"
        assert reopened.get_prediction(closed["prediction_id"]) is not None
        assert reopened.list_runs().height == 1
    finally:
        reopened.close()


# --------------------------------------------------------------------------- durability and visibility


def test_reopened_workspace_sees_everything_written_before_close(store, workspace, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    store.complete_pipeline(ids.pipeline_id, 0.41, 0.47, "rmse", 820)
    store.complete_run(ids.run_id, {"best_rmse": 0.41})
    prediction_id = add_prediction(store, ids, val_score=0.41)
    y_true = np.linspace(8.0, 12.0, 20)
    store.save_prediction_arrays(prediction_id, y_true, y_true + 0.1)
    artifact_id = store.save_artifact({"coef": np.arange(4.0)}, "Ridge", "model", "joblib")
    store.log_step(ids.pipeline_id, 0, "SNV", "end", duration_ms=3.0)
    store.close()

    reopened = WorkspaceStore(workspace)
    try:
        assert reopened.get_run(ids.run_id)["summary"] == {"best_rmse": 0.41}
        assert reopened.get_pipeline(ids.pipeline_id)["status"] == "completed"
        assert reopened.get_chain(ids.chain_id)["model_class"] == "PLSRegression"
        loaded = reopened.get_prediction(prediction_id, load_arrays=True)
        assert loaded["val_score"] == pytest.approx(0.41)
        np.testing.assert_allclose(loaded["y_pred"], y_true + 0.1)
        np.testing.assert_array_equal(reopened.load_artifact(artifact_id)["coef"], np.arange(4.0))
        assert reopened.get_pipeline_log(ids.pipeline_id).height == 1
        assert reopened.top_predictions(1)["prediction_id"].to_list() == [prediction_id]
    finally:
        reopened.close()


def test_reads_see_earlier_writes_without_a_flush(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    first = add_prediction(store, ids, val_score=0.5)
    assert store.top_predictions(1)["prediction_id"].to_list() == [first]

    better = add_prediction(store, ids, val_score=0.2)
    assert store.top_predictions(1)["prediction_id"].to_list() == [better]
    assert store.query_predictions(pipeline_id=ids.pipeline_id).height == 2

    store.save_prediction_arrays(better, np.ones(12), np.full(12, 0.9))
    np.testing.assert_allclose(store.get_prediction(better, load_arrays=True)["y_pred"], np.full(12, 0.9))

    store.complete_run(ids.run_id, {"n": 2})
    assert store.list_runs(status="completed")["run_id"].to_list() == [ids.run_id]

    assert store.delete_prediction(first) is True
    assert store.query_predictions().height == 1


# --------------------------------------------------------------------------- threads


def test_two_threads_writing_predictions_into_one_store(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    per_thread = 25
    start = threading.Barrier(2)
    written: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def writer(model_class: str) -> None:
        try:
            start.wait()
            mine = []
            for fold in range(per_thread):
                prediction_id = add_prediction(store, ids, model_class=model_class, fold_id=str(fold), val_score=fold / 10)
                store.save_prediction_arrays(prediction_id, np.full(10, fold, float), np.full(10, fold + 0.5))
                mine.append(prediction_id)
            written[model_class] = mine
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(m,)) for m in ("PLSRegression", "Ridge")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert not errors
    assert all(not t.is_alive() for t in threads)
    all_ids = written["PLSRegression"] + written["Ridge"]
    assert len(set(all_ids)) == 2 * per_thread
    assert store.query_predictions().height == 2 * per_thread
    assert store.query_predictions(model_class="PLSRegression").height == per_thread
    assert store.query_predictions(model_class="Ridge").height == per_thread
    assert store.top_predictions(100, group_by="model_class").height == 2 * per_thread
    last = store.get_prediction(written["Ridge"][-1], load_arrays=True)
    np.testing.assert_allclose(last["y_pred"], np.full(10, per_thread - 0.5))


def test_one_thread_reads_while_another_writes(store, make_pipeline, add_prediction):
    ids = make_pipeline(store)
    n = 20
    done = threading.Event()
    errors: list[BaseException] = []
    counts: list[int] = []

    def write() -> None:
        try:
            for i in range(n):
                add_prediction(store, ids, fold_id=str(i))
                store.log_step(ids.pipeline_id, i, "PLSRegression", "end", duration_ms=1.0)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def read() -> None:
        try:
            while not done.is_set():
                counts.append(store.query_predictions(pipeline_id=ids.pipeline_id).height)
                store.get_pipeline_log(ids.pipeline_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert not errors
    assert counts == sorted(counts)  # a reader never sees a row vanish
    assert store.query_predictions().height == n
    assert store.get_pipeline_log(ids.pipeline_id).height == n
