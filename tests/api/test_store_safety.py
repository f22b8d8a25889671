"""What another writer or reader may still use is kept; bad calls lose nothing (lake spec §4-§7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import nirslake.query as q
from nirslake import WorkspaceStore
from nirslake.lake import schema as S
from nirslake.lake.tables import encode_partition_value, write_table
from nirslake.lake.writer import LakeWriter


def _pipeline(store, dataset="wheat"):
    run = store.begin_run("r", {}, [{"name": dataset}])
    return run, store.begin_pipeline(run, "p", {}, {}, dataset, "h")


def _predict(store, pipe, dataset="wheat", score=0.1, **kw):
    return store.save_prediction(pipe, None, dataset, "m", "M", 0, "val", score, 0.2, 0.3, "rmse", "regression",
                                 5, 3, {"val": {"rmse": score}}, {}, None, None, 0, 0.0, **kw)


def test_gc_keeps_a_fresh_unreferenced_artifact_by_default(workspace):
    with WorkspaceStore(workspace) as store:  # default grace period
        run, pipe = _pipeline(store)
        model = store.save_artifact({"coef": [1.0]}, "Ridge", "model", "pickle")
        other = store.begin_run("other", {}, [])
        store.delete_run(other)  # runs gc: the running pipeline's model must survive
        store.save_chain(pipe, [], 0, "Ridge", "", "kfold", {"fold_0": model}, {})
        assert store.load_artifact(model) == {"coef": [1.0]}
        assert store.gc_artifacts() == 0


def test_gc_keeps_an_object_another_writer_just_saved_again(workspace):
    collector = WorkspaceStore(workspace, grace_seconds=3600)
    writer = WorkspaceStore(workspace)
    try:
        old = collector.save_artifact([1, 2, 3], "X", "model", "pickle")
        collector.flush()
        # The record is older than the grace period only if we pretend time passed: instead the
        # collector uses grace 0 on a second handle, while the writer has just touched the object.
        eager = WorkspaceStore(workspace, grace_seconds=0.5)
        import time

        time.sleep(0.6)
        assert writer.save_artifact([1, 2, 3], "X", "model", "pickle") == old  # touches the object
        assert eager.gc_artifacts() == 0, "an object saved again within the grace period was collected"
        writer.flush()
        assert collector.load_artifact(old) == [1, 2, 3]
        eager.close()
    finally:
        collector.close()
        writer.close()


def test_vacuum_keeps_replaced_bytes_for_readers_until_the_grace_period_ends(workspace):
    with WorkspaceStore(workspace) as store:
        run, pipe = _pipeline(store)
        for _ in range(3):
            _predict(store, pipe)
            store.flush()
        before = store.query_predictions().height
        frame = q.scan(workspace, "predictions")  # a lazy reader that listed the files already
        store.vacuum()
        assert frame.collect().height == before == store.query_predictions().height


def test_two_compactions_racing_over_the_same_files_show_each_row_once(workspace):
    """Two compactors that listed the same files both commit: only the first commit counts."""
    import pyarrow as pa

    from nirslake.lake.tables import CLOCK, COMPACT_PREFIX, FileCache, new_file_name, new_id, read_files, to_parquet_bytes

    with WorkspaceStore(workspace, grace_seconds=3600) as store:
        run, pipe = _pipeline(store)
        for i in range(3):
            store.log_step(pipe, i, "Op", "end", duration_ms=1.0)
            store.flush()
        storage = store.storage
        rels = [r for r in storage.list_files(S.LOGS.dir) if "-schema-v" not in r]
        merged = to_parquet_bytes(read_files(storage, S.LOGS, FileCache(), rels))
        for _ in range(2):
            name = new_file_name(COMPACT_PREFIX)
            storage.publish(f"{S.LOGS.dir}/{name}", merged)
            commit = pa.Table.from_pydict(
                {"commit_id": [new_id()], "table_name": ["logs"], "added": [[name]],
                 "removed": [[r.rsplit("/", 1)[1] for r in rels]], "created_at": [CLOCK.now_us()]},
                schema=S.COMMITS.schema,
            )
            storage.publish(f"{S.COMMITS.dir}/{new_file_name()}", to_parquet_bytes(commit))
        assert store.get_pipeline_log(pipe).height == 3
        assert q.scan(workspace, "logs").collect().height == 3
        assert store.sql("SELECT count(*) AS n FROM logs")["n"][0] == 3


def test_flush_writes_status_changes_after_the_results_they_summarise(local_workspace, monkeypatch):
    """A crash while writing results must not leave a pipeline marked completed without them."""
    import nirslake.lake.writer as writer_module

    workspace = local_workspace  # it fails the publication of a local journal
    store = WorkspaceStore(workspace)
    run, pipe = _pipeline(store)
    store.flush()
    _predict(store, pipe)
    real = writer_module.write_table

    def failing(storage, tdef, table, *a, **kw):
        if tdef.name == "predictions":
            raise OSError("disk full")
        return real(storage, tdef, table, *a, **kw)

    monkeypatch.setattr(writer_module, "write_table", failing)
    store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 5)  # durable in the journal
    with pytest.raises(OSError, match="disk full"):
        store.flush()  # publishing fails half-way
    monkeypatch.setattr(writer_module, "write_table", real)
    # What the lake shows other processes (a store of this process would publish the journal first).
    published = q.scan(workspace, "pipelines").collect()
    assert published.filter(published["pipeline_id"] == pipe)["status"].to_list() == ["running"]
    store.close()  # the failed rows were kept and are written now
    with WorkspaceStore(workspace) as after:
        assert after.get_pipeline(pipe)["status"] == "completed"
        assert after.query_predictions().height == 1


def test_a_failed_close_keeps_the_store_open_and_its_rows(workspace, monkeypatch):
    store = WorkspaceStore(workspace)
    run, pipe = _pipeline(store)
    monkeypatch.setattr(LakeWriter, "publish", lambda self: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        store.close()
    monkeypatch.undo()
    assert store.get_run(run)["name"] == "r"  # still open, nothing lost
    store.close()
    with WorkspaceStore(workspace) as again:
        assert again.get_pipeline(pipe) is not None


def test_nan_scores_are_stored_as_null_and_rank_last(store):
    run, pipe = _pipeline(store)
    good = _predict(store, pipe, score=0.9)
    diverged = _predict(store, pipe, score=float("nan"))
    top = store.top_predictions(2, ascending=False)
    assert top["prediction_id"].to_list() == [good, diverged]
    row = store.get_prediction(diverged)
    assert row["val_score"] is None and row["scores"] == {"val": {"rmse": None}}


def test_a_prediction_id_cannot_move_to_another_dataset(store):
    run, pipe = _pipeline(store)
    _predict(store, pipe, dataset="A", prediction_id="p1")
    with pytest.raises(ValueError, match="already belongs to dataset 'A'"):
        _predict(store, pipe, dataset="B", prediction_id="p1")
    assert store.get_prediction("p1")["dataset_name"] == "A"


def test_chain_artifact_maps_are_checked(store):
    run, pipe = _pipeline(store)
    with pytest.raises(TypeError, match="shared_artifacts"):
        store.save_chain(pipe, [], 0, "M", "", "kfold", {}, {"0": 5})  # a single id is a list of one; a number is not
    with pytest.raises(TypeError, match="fold_artifacts"):
        store.save_chain(pipe, [], 0, "M", "", "kfold", {"fold_0": ["abc"]}, {})
    assert store.get_chains_for_pipeline(pipe).height == 0


def test_empty_arrays_round_trip(store):
    run, pipe = _pipeline(store)
    pid = _predict(store, pipe)
    store.save_prediction_arrays(pid, [], [], y_proba=np.empty((0, 3)))
    row = store.get_prediction(pid, load_arrays=True)
    # With no samples the class count is kept beside the rows (y_proba_classes): (0, 3) again.
    assert row["y_true"].shape == (0,) and row["y_proba"].shape == (0, 3)


def test_arrays_for_an_older_prediction_do_not_flush_per_call(workspace):
    with WorkspaceStore(workspace) as first:
        run, pipe = _pipeline(first)
        ids = [_predict(first, pipe) for _ in range(20)]
    with WorkspaceStore(workspace) as second:
        for pid in ids:
            second.save_prediction_arrays(pid, [1.0, 2.0], [1.5, 2.5])
        second.flush()
        files = second.storage.list_files(S.PREDICTION_ARRAYS.dir)
        assert len([f for f in files if "-schema-v" not in f]) == 1
        assert math.isclose(second.get_prediction(ids[-1], load_arrays=True)["y_pred"][1], 2.5)


@pytest.mark.parametrize("name, encoded", [("..", "%2E%2E"), (".", "%2E"), ("a~b", "a%7Eb"), ("a/b", "a%2Fb")])
def test_partition_names_follow_the_spec(name, encoded):
    assert encode_partition_value(name) == encoded


def test_write_table_never_publishes_an_empty_file(workspace):
    with WorkspaceStore(workspace) as store:
        assert write_table(store.storage, S.RUNS, S.RUNS.schema.empty_table()) == []


def test_a_value_that_is_not_json_is_refused_naming_its_field(store):
    run, pipe = _pipeline(store)
    with pytest.raises(TypeError, match="expanded_config must be JSON-serialisable"):
        store.begin_pipeline(run, "p2", {"estimator": object()}, {}, "wheat", "h")
    with pytest.raises(TypeError, match="scores must be JSON-serialisable"):
        store.save_prediction(
            pipe, None, "wheat", "m", "M", 0, "val", 0.1, 0.1, 0.1, "rmse", "regression", 1, 1,
            {"val": {"rmse": object()}}, {}, None, None, 0, 0.0)
    assert store.list_pipelines(run_id=run).height == 1 and store.query_predictions().height == 0


def test_a_run_and_pipeline_begun_by_another_store_can_be_completed(workspace):
    with WorkspaceStore(workspace) as first:
        run, pipe = _pipeline(first)
        _predict(first, pipe)
    with WorkspaceStore(workspace) as second:  # knows them only from the lake
        second.complete_pipeline(pipe, 0.1, 0.2, "rmse", 12)
        second.fail_run(run, "stopped by hand")
        created = second.get_pipeline(pipe)["created_at"]
    with WorkspaceStore(workspace) as third:
        pipeline = third.get_pipeline(pipe)
        assert pipeline["status"] == "completed" and pipeline["created_at"] == created
        assert third.get_run(run)["status"] == "failed"


def test_gc_keeps_and_records_again_an_object_saved_again_while_it_collects(local_workspace, monkeypatch):
    """The worst moment: another writer saves the same bytes after gc wrote its deletion rows
    and before it removes the object. gc looks again, keeps the bytes and records the artifact
    anew, so the writer's chain still loads its model. (Local: the test needs sub-second mtimes.)"""
    import time

    workspace = local_workspace

    setup = WorkspaceStore(workspace)
    old = setup.save_artifact([4, 5, 6], "X", "model", "pickle")
    setup.close()
    time.sleep(0.3)
    collector = WorkspaceStore(workspace, grace_seconds=0.2)
    writer = WorkspaceStore(workspace)
    original_delete = collector._delete

    def delete_then_race(kind, ids):
        original_delete(kind, ids)
        assert writer.save_artifact([4, 5, 6], "X", "model", "pickle") == old  # refreshes the object
        run, pipe = _pipeline(writer)
        writer.save_chain(pipe, [], 0, "X", "", "kfold", {"fold_0": old}, {})
        writer.flush()

    monkeypatch.setattr(collector, "_delete", delete_then_race)
    try:
        assert collector.gc_artifacts() == 0
        monkeypatch.undo()
        with WorkspaceStore(workspace, grace_seconds=0) as fresh:
            assert fresh.load_artifact(old) == [4, 5, 6]
            assert fresh.check().ok
            assert fresh.gc_artifacts() == 0  # held by the writer's chain now
    finally:
        collector.close()
        writer.close()


def test_deleting_twice_is_harmless(store):
    run, pipe = _pipeline(store)
    pid = _predict(store, pipe)
    keep = _predict(store, pipe)
    assert store.delete_prediction(pid) is True
    assert store.delete_prediction(pid) is False
    assert store.query_predictions()["prediction_id"].to_list() == [keep]
    assert store.delete_run(run) == 3  # the run, its pipeline and the prediction still visible
    assert store.delete_run(run) == 0
    assert store.get_run(run) is None and store.query_predictions().height == 0
