"""The public surface matches the nirs4all WorkspaceStore contract name for name, in order, with its defaults."""

from __future__ import annotations

import inspect

import pytest

from nirslake import WorkspaceStore, WorkspaceStoreProtocol

_ = inspect.Parameter.empty
# (method, [(parameter, default), ...]) as the contract states them; callers pass many positionally.
CONTRACT = {
    "close": [],
    "begin_run": [("name", _), ("config", _), ("datasets", _)],
    "complete_run": [("run_id", _), ("summary", _)],
    "fail_run": [("run_id", _), ("error", _)],
    "get_run": [("run_id", _)],
    "list_runs": [("status", None), ("dataset", None), ("limit", 100), ("offset", 0)],
    "begin_pipeline": [("run_id", _), ("name", _), ("expanded_config", _), ("generator_choices", _), ("dataset_name", _), ("dataset_hash", _)],
    "complete_pipeline": [("pipeline_id", _), ("best_val", _), ("best_test", _), ("metric", _), ("duration_ms", _)],
    "fail_pipeline": [("pipeline_id", _), ("error", _)],
    "get_pipeline": [("pipeline_id", _)],
    "list_pipelines": [("run_id", None), ("dataset_name", None)],
    "save_chain": [("pipeline_id", _), ("steps", _), ("model_step_idx", _), ("model_class", _), ("preprocessings", _),
                   ("fold_strategy", _), ("fold_artifacts", _), ("shared_artifacts", _), ("branch_path", None), ("source_index", None)],
    "get_chain": [("chain_id", _)],
    "get_chains_for_pipeline": [("pipeline_id", _)],
    "save_prediction": [("pipeline_id", _), ("chain_id", _), ("dataset_name", _), ("model_name", _), ("model_class", _),
                        ("fold_id", _), ("partition", _), ("val_score", _), ("test_score", _), ("train_score", _), ("metric", _),
                        ("task_type", _), ("n_samples", _), ("n_features", _), ("scores", _), ("best_params", _), ("branch_id", _),
                        ("branch_name", _), ("exclusion_count", _), ("exclusion_rate", _), ("preprocessings", ""), ("prediction_id", None)],
    "save_prediction_arrays": [("prediction_id", _), ("y_true", _), ("y_pred", _), ("y_proba", None), ("sample_indices", None), ("weights", None)],
    "get_prediction": [("prediction_id", _), ("load_arrays", False)],
    "query_predictions": [("dataset_name", None), ("model_class", None), ("partition", None), ("fold_id", None), ("branch_id", None),
                          ("pipeline_id", None), ("run_id", None), ("limit", None), ("offset", 0)],
    "top_predictions": [("n", _), ("metric", "val_score"), ("ascending", True), ("partition", "val"), ("dataset_name", None), ("group_by", None)],
    "delete_prediction": [("prediction_id", _)],
    "save_artifact": [("obj", _), ("operator_class", _), ("artifact_type", _), ("format", _)],
    "register_existing_artifact": [("artifact_id", _), ("path", _), ("content_hash", _), ("operator_class", _), ("artifact_type", _), ("format", _), ("size_bytes", _)],
    "load_artifact": [("artifact_id", _)],
    "get_artifact_path": [("artifact_id", _)],
    "gc_artifacts": [],
    "log_step": [("pipeline_id", _), ("step_idx", _), ("operator_class", _), ("event", _), ("duration_ms", None), ("message", None), ("details", None), ("level", "info")],
    "get_pipeline_log": [("pipeline_id", _)],
    "get_run_log_summary": [("run_id", _)],
    "export_chain": [("chain_id", _), ("output_path", _), ("format", "n4a")],
    "export_pipeline_config": [("pipeline_id", _), ("output_path", _)],
    "export_run": [("run_id", _), ("output_path", _)],
    "export_predictions_parquet": [("output_path", _), ("filters", _)],
    "delete_run": [("run_id", _), ("delete_artifacts", True)],
    "vacuum": [],
    "replay_chain": [("chain_id", _), ("X", _), ("wavelengths", None)],
}


def _params(func) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in list(inspect.signature(func).parameters.values())[1:]]


@pytest.mark.parametrize("method", sorted(CONTRACT))
def test_store_method_matches_the_contract(method):
    assert _params(getattr(WorkspaceStore, method)) == CONTRACT[method]
    assert inspect.getdoc(getattr(WorkspaceStore, method)), f"{method} has no docstring"


@pytest.mark.parametrize("method", sorted(CONTRACT))
def test_protocol_names_the_same_surface(method):
    assert _params(getattr(WorkspaceStoreProtocol, method)) == CONTRACT[method]


def test_constructor_takes_the_workspace_first_and_the_protocol_accepts_the_store(workspace):
    assert list(inspect.signature(WorkspaceStore).parameters)[0] == "workspace_path"
    store = WorkspaceStore(workspace)
    try:
        assert isinstance(store, WorkspaceStoreProtocol)
        assert str(store.workspace_path).endswith("ws")
    finally:
        store.close()


def test_an_object_missing_a_method_is_not_a_store():
    class Partial:
        def close(self):
            pass

    assert not isinstance(Partial(), WorkspaceStoreProtocol)
