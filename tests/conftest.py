"""Shared fixtures: a fresh workspace, a store opened on it, and a run -> pipeline -> chain helper.

Every test gets its workspace from the ``workspace`` fixture only, so the whole suite can later
run against other backends (local folder, S3) by parametrising that one fixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from nirslake import WorkspaceStore


@pytest.fixture
def workspace(tmp_path) -> str:
    """Where a fresh, not yet created workspace lives."""
    return str(tmp_path / "ws")


@pytest.fixture
def store(workspace):
    """A store opened on the fresh workspace, closed after the test."""
    # grace_seconds=0 so gc_artifacts and vacuum act at once; test_store_artifacts checks the default.
    s = WorkspaceStore(workspace, grace_seconds=0)
    yield s
    s.close()


@dataclass(frozen=True)
class PipelineIds:
    run_id: str
    pipeline_id: str
    chain_id: str


def create_pipeline(store, dataset_name: str = "corn_m5", run_name: str = "protein_sweep") -> PipelineIds:
    """Begin a run and a pipeline on ``dataset_name`` and save a SNV -> PLS chain without artifacts."""
    run_id = store.begin_run(
        run_name,
        {"cv": {"n_splits": 2}, "metric": "rmse"},
        [{"name": dataset_name, "path": f"data/{dataset_name}.csv"}],
    )
    pipeline_id = store.begin_pipeline(
        run_id,
        "snv_pls10",
        [{"class": "SNV"}, {"class": "PLSRegression", "params": {"n_components": 10}}],
        {"n_components": 10},
        dataset_name,
        "sha256:0f3a",
    )
    chain_id = store.save_chain(
        pipeline_id,
        [
            {"step_idx": 0, "operator_class": "SNV", "params": {}, "artifact_id": None, "stateless": True},
            {
                "step_idx": 1,
                "operator_class": "PLSRegression",
                "params": {"n_components": 10},
                "artifact_id": None,
                "stateless": False,
            },
        ],
        1,
        "PLSRegression",
        "SNV",
        "KFold(2)",
        {},
        {},
    )
    return PipelineIds(run_id, pipeline_id, chain_id)


@pytest.fixture
def make_pipeline():
    """``make_pipeline(store, dataset_name=..., run_name=...) -> PipelineIds``."""
    return create_pipeline


def record_prediction(
    store,
    ids: PipelineIds,
    *,
    dataset_name: str = "corn_m5",
    model_name: str = "PLS_10",
    model_class: str = "PLSRegression",
    fold_id: str = "0",
    partition: str = "val",
    val_score: float | None = 0.42,
    test_score: float | None = 0.45,
    train_score: float | None = 0.30,
    metric: str = "rmse",
    task_type: str = "regression",
    n_samples: int = 40,
    n_features: int = 200,
    scores: dict | None = None,
    best_params: dict | None = None,
    branch_id: int | None = None,
    branch_name: str | None = None,
    exclusion_count: int = 0,
    exclusion_rate: float = 0.0,
    preprocessings: str = "SNV",
    prediction_id: str | None = None,
) -> str:
    """Save one prediction of ``ids``' chain, passing every argument positionally as callers do."""
    if scores is None:
        scores = {partition: {metric: val_score}}
    return store.save_prediction(
        ids.pipeline_id,
        ids.chain_id,
        dataset_name,
        model_name,
        model_class,
        fold_id,
        partition,
        val_score,
        test_score,
        train_score,
        metric,
        task_type,
        n_samples,
        n_features,
        scores,
        best_params if best_params is not None else {},
        branch_id,
        branch_name,
        exclusion_count,
        exclusion_rate,
        preprocessings,
        prediction_id,
    )


@pytest.fixture
def add_prediction():
    """``add_prediction(store, ids, **fields) -> prediction_id`` with realistic defaults."""
    return record_prediction
