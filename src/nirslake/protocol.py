"""``WorkspaceStoreProtocol``: the store surface of SEED-API.md as a runtime-checkable Protocol.

Other implementations (the nirs4all peer, test doubles) can be checked against it with
``isinstance`` or ``issubclass``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import polars as pl


class _WithWorkspacePath(type(Protocol)):
    """Adds the ``workspace_path`` property to the check of the protocol's methods. typing refuses
    ``issubclass`` for a protocol with any member that is not a method, so the property is checked
    here, for instances and classes alike, and the protocol body holds methods only."""

    def __instancecheck__(cls, instance: Any) -> bool:
        return super().__instancecheck__(instance) and hasattr(instance, "workspace_path")

    def __subclasscheck__(cls, other: type) -> bool:
        return super().__subclasscheck__(other) and hasattr(other, "workspace_path")


@runtime_checkable
class WorkspaceStoreProtocol(Protocol, metaclass=_WithWorkspacePath):
    """Every method below, and a ``workspace_path`` property (the workspace: a ``Path`` for a
    local folder, the URL otherwise)."""

    def close(self) -> None: ...

    # runs
    def begin_run(self, name: str, config: Any, datasets: list[dict]) -> str: ...
    def complete_run(self, run_id: str, summary: dict) -> None: ...
    def fail_run(self, run_id: str, error: str) -> None: ...
    def get_run(self, run_id: str) -> dict | None: ...
    def list_runs(self, status: str | None = None, dataset: str | None = None, limit: int = 100, offset: int = 0) -> pl.DataFrame: ...

    # pipelines
    def begin_pipeline(self, run_id: str, name: str, expanded_config: Any, generator_choices: Any, dataset_name: str, dataset_hash: str) -> str: ...
    def complete_pipeline(self, pipeline_id: str, best_val: float, best_test: float, metric: str, duration_ms: int) -> None: ...
    def fail_pipeline(self, pipeline_id: str, error: str) -> None: ...
    def get_pipeline(self, pipeline_id: str) -> dict | None: ...
    def list_pipelines(self, run_id: str | None = None, dataset_name: str | None = None) -> pl.DataFrame: ...

    # chains
    def save_chain(
        self,
        pipeline_id: str,
        steps: list[dict],
        model_step_idx: int,
        model_class: str,
        preprocessings: str,
        fold_strategy: str,
        fold_artifacts: dict,
        shared_artifacts: dict,
        branch_path: list | None = None,
        source_index: int | None = None,
    ) -> str: ...
    def get_chain(self, chain_id: str) -> dict | None: ...
    def get_chains_for_pipeline(self, pipeline_id: str) -> pl.DataFrame: ...

    # predictions
    def save_prediction(
        self,
        pipeline_id: str,
        chain_id: str,
        dataset_name: str,
        model_name: str,
        model_class: str,
        fold_id: Any,
        partition: str,
        val_score: float | None,
        test_score: float | None,
        train_score: float | None,
        metric: str,
        task_type: str,
        n_samples: int,
        n_features: int,
        scores: dict,
        best_params: dict,
        branch_id: int | None,
        branch_name: str | None,
        exclusion_count: int,
        exclusion_rate: float,
        preprocessings: str = "",
        prediction_id: str | None = None,
    ) -> str: ...
    def save_prediction_arrays(self, prediction_id: str, y_true: Any, y_pred: Any, y_proba: Any = None, sample_indices: Any = None, weights: Any = None) -> None: ...
    def get_prediction(self, prediction_id: str, load_arrays: bool = False) -> dict | None: ...
    def query_predictions(
        self,
        dataset_name: str | None = None,
        model_class: str | None = None,
        partition: str | None = None,
        fold_id: Any = None,
        branch_id: int | None = None,
        pipeline_id: str | None = None,
        run_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> pl.DataFrame: ...
    def top_predictions(
        self,
        n: int,
        metric: str = "val_score",
        ascending: bool = True,
        partition: str = "val",
        dataset_name: str | None = None,
        group_by: str | None = None,
    ) -> pl.DataFrame: ...
    def delete_prediction(self, prediction_id: str) -> bool: ...

    # artifacts
    def save_artifact(self, obj: Any, operator_class: str, artifact_type: str, format: str) -> str: ...
    def register_existing_artifact(
        self, artifact_id: str, path: str | os.PathLike, content_hash: str, operator_class: str, artifact_type: str, format: str, size_bytes: int
    ) -> str: ...
    def load_artifact(self, artifact_id: str) -> Any: ...
    def get_artifact_path(self, artifact_id: str) -> Path | str: ...
    def gc_artifacts(self) -> int: ...

    # logs
    def log_step(
        self,
        pipeline_id: str,
        step_idx: int,
        operator_class: str,
        event: str,
        duration_ms: float | None = None,
        message: str | None = None,
        details: dict | None = None,
        level: str = "info",
    ) -> None: ...
    def get_pipeline_log(self, pipeline_id: str) -> pl.DataFrame: ...
    def get_run_log_summary(self, run_id: str) -> pl.DataFrame: ...

    # export, deletion, replay
    def export_chain(self, chain_id: str, output_path: str | os.PathLike, format: str = "n4a") -> Path: ...
    def export_pipeline_config(self, pipeline_id: str, output_path: str | os.PathLike) -> Path: ...
    def export_run(self, run_id: str, output_path: str | os.PathLike) -> Path: ...
    def export_predictions_parquet(self, output_path: str | os.PathLike, **filters: Any) -> Path: ...
    def delete_run(self, run_id: str, delete_artifacts: bool = True) -> int: ...
    def vacuum(self) -> None: ...
    def replay_chain(self, chain_id: str, X: Any, wavelengths: Any = None) -> np.ndarray: ...
