"""The rows a ``WorkspaceStore`` call appends to a lake table, built from checked arguments, and
the decoding of stored rows back into what the nirs4all API returns (JSON fields as Python values).

Field order follows the table schemas (lake spec §3); each field is coerced through ``validation``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..lake.arrays import ARRAY_FIELDS, check_arrays
from ..lake.tables import CLOCK, new_id
from . import validation as V

# The JSON columns each get_* decodes.
RUN_JSON = ("config", "datasets", "summary")
PIPELINE_JSON = ("expanded_config", "generator_choices")
CHAIN_JSON = ("steps", "fold_artifacts", "shared_artifacts", "branch_path")
ARTIFACT_FIELDS = ("artifact_id", "content_hash", "path", "operator_class", "artifact_type", "format", "size_bytes")


def unjson(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def decoded(row: dict, fields: tuple[str, ...]) -> dict:
    """``row`` with its JSON ``fields`` decoded, in place."""
    for key in fields:
        row[key] = unjson(row[key])
    return row


def run_row(name: str, config: Any, datasets: list | tuple) -> dict:
    now = CLOCK.now_us()
    return {
        "run_id": new_id(),
        "name": name,
        "config": V.json_field(config, "config"),
        "datasets": V.json_field(list(datasets), "datasets"),
        "status": "running",
        "created_at": now,
        "completed_at": None,
        "summary": None,
        "error": None,
        "_version": now,
    }


def next_version(row: dict, changes: dict) -> dict:
    """The run's or pipeline's next version: a new status, stamped now."""
    row = dict(row)
    now = CLOCK.now_us()
    row.update(changes, completed_at=now, _version=now)
    return row


def pipeline_row(
    run_id: str, name: Any, expanded_config: Any, generator_choices: Any, dataset_name: str, dataset_hash: Any
) -> dict:
    now = CLOCK.now_us()
    return {
        "pipeline_id": new_id(),
        "run_id": run_id,
        "name": V.text("name", name),
        "expanded_config": V.json_field(expanded_config, "expanded_config"),
        "generator_choices": V.json_field(generator_choices, "generator_choices"),
        "dataset_name": dataset_name,
        "dataset_hash": V.free_text("dataset_hash", dataset_hash),
        "status": "running",
        "created_at": now,
        "completed_at": None,
        "best_val": None,
        "best_test": None,
        "metric": None,
        "duration_ms": None,
        "error": None,
        "_version": now,
    }


def held_artifacts(steps: list | tuple, fold_artifacts: dict, shared_artifacts: dict) -> set[str]:
    """Every artifact id a chain holds: its fold models, shared transformers and steps' own."""
    held = set(fold_artifacts.values())
    for ids in shared_artifacts.values():
        held.update(ids)
    for i, step in enumerate(steps):
        if isinstance(step, dict) and step.get("artifact_id") is not None:
            held.add(V.text(f"steps[{i}]['artifact_id']", str(step["artifact_id"])))
    held.discard(None)
    return held


def chain_row(
    pipeline: dict,
    steps: list | tuple,
    model_step_idx: Any,
    model_class: Any,
    preprocessings: Any,
    fold_strategy: Any,
    fold_artifacts: dict,
    shared_artifacts: dict,
    branch_path: Any,
    source_index: Any,
    held: set[str],
) -> dict:
    return {
        "chain_id": new_id(),
        "pipeline_id": pipeline["pipeline_id"],
        "run_id": pipeline["run_id"],
        "steps": V.json_field(list(steps), "steps"),
        "model_step_idx": V.opt_int("model_step_idx", model_step_idx),
        "model_class": V.text("model_class", model_class),
        "preprocessings": V.text("preprocessings", preprocessings),
        "fold_strategy": V.free_text("fold_strategy", fold_strategy),
        "fold_artifacts": V.json_field(fold_artifacts, "fold_artifacts"),
        "shared_artifacts": V.json_field(shared_artifacts, "shared_artifacts"),
        "branch_path": V.json_field(branch_path, "branch_path"),
        "source_index": V.opt_int("source_index", source_index),
        "artifact_ids": sorted(held),
        "created_at": CLOCK.now_us(),
    }


def prediction_row(pid: str, pipeline: dict, chain_id: Any, dataset_name: str, a: dict) -> dict:
    """The prediction record; ``a`` holds the remaining arguments of ``save_prediction`` by name."""
    return {
        "prediction_id": pid,
        "pipeline_id": pipeline["pipeline_id"],
        "chain_id": V.text("chain_id", chain_id),
        "run_id": pipeline["run_id"],
        "dataset_name": dataset_name,
        "model_name": V.text("model_name", a["model_name"]),
        "model_class": V.text("model_class", a["model_class"]),
        "fold_id": V.fold_id(a["fold_id"]),
        "partition": V.text("partition", a["partition"]),
        "val_score": V.opt_float("val_score", a["val_score"]),
        "test_score": V.opt_float("test_score", a["test_score"]),
        "train_score": V.opt_float("train_score", a["train_score"]),
        "metric": V.text("metric", a["metric"]),
        "task_type": V.text("task_type", a["task_type"]),
        "n_samples": V.opt_int("n_samples", a["n_samples"]),
        "n_features": V.opt_int("n_features", a["n_features"]),
        "scores": V.json_field(V.mapping("scores", a["scores"]), "scores"),
        "best_params": V.json_field(V.mapping("best_params", a["best_params"]), "best_params"),
        "branch_id": V.opt_int("branch_id", a["branch_id"]),
        "branch_name": V.text("branch_name", a["branch_name"]),
        "exclusion_count": V.opt_int("exclusion_count", a["exclusion_count"]),
        "exclusion_rate": V.opt_float("exclusion_rate", a["exclusion_rate"]),
        "preprocessings": V.text("preprocessings", a["preprocessings"]) or "",
        "created_at": CLOCK.now_us(),
    }


def arrays_row(prediction_id: str, owner: tuple[str, str, int], given: dict[str, Any]) -> dict:
    """A prediction's arrays record, after their sizes and values are checked."""
    return checked_arrays_row(prediction_id, owner, checked_arrays(given))


def checked_arrays(given: dict[str, Any]) -> dict[str, Any]:
    """The arrays of one prediction, their sizes and values checked."""
    for field, value in given.items():  # before converting: an oversized view costs nothing yet
        V.array_size(field, value)
    arrays = check_arrays(**given)
    for field, value in arrays.items():  # nested lists only show their full size once converted
        V.array_size(field, value)
    return arrays


def record_arrays(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """A ``save_predictions`` record's arrays, checked; None when it holds none."""
    given = {f: record.get(f) for f in ARRAY_FIELDS}
    return checked_arrays(given) if any(v is not None for v in given.values()) else None


def checked_arrays_row(prediction_id: str, owner: tuple[str, str, int], arrays: dict[str, Any]) -> dict:
    return {"prediction_id": prediction_id, "run_id": owner[0], "dataset_name": owner[1], "_version": CLOCK.now_us(), **arrays}


def saved_artifact_row(digest: str, rel: str, operator_class: Any, artifact_type: Any, format: str, size: int) -> dict:
    return {
        "artifact_id": digest,
        "content_hash": digest,
        "path": rel,
        "operator_class": V.text("operator_class", operator_class),
        "artifact_type": V.text("artifact_type", artifact_type),
        "format": format,
        "size_bytes": size,
        "created_at": CLOCK.now_us(),
    }


def registered_artifact_row(
    artifact_id: str, path: str, content_hash: Any, operator_class: Any, artifact_type: Any, format: Any, size_bytes: Any
) -> dict:
    return {
        "artifact_id": artifact_id,
        "content_hash": V.text("content_hash", content_hash, allow_none=False),
        "path": path,
        "operator_class": V.text("operator_class", operator_class),
        "artifact_type": V.text("artifact_type", artifact_type),
        "format": V.text("format", format),
        "size_bytes": V.opt_int("size_bytes", size_bytes),
        "created_at": CLOCK.now_us(),
    }


def renewed_artifact_row(row: dict) -> dict:
    """An artifact recorded anew (gc kept its bytes: another writer saved them again meanwhile)."""
    return {**{k: row[k] for k in ARTIFACT_FIELDS}, "created_at": CLOCK.now_us()}


def log_row(pipeline: dict, step_idx: Any, operator_class: Any, event: Any, duration_ms: Any, message: Any,
            details: Any, level: Any) -> dict:
    now = CLOCK.now_us()
    return {
        "log_id": new_id(),
        "pipeline_id": pipeline["pipeline_id"],
        "run_id": pipeline["run_id"],
        "step_idx": V.opt_int("step_idx", step_idx),
        "operator_class": V.text("operator_class", operator_class),
        "event": V.text("event", event, allow_none=False),
        "duration_ms": V.opt_float("duration_ms", duration_ms),
        "message": V.free_text("message", message),
        "details": V.json_field(details, "details"),
        "level": V.text("level", level, allow_none=False),
        "created_at": now,
        "_version": now,
    }


def deletion_rows(kind: str, entity_ids: list[str]) -> list[dict]:
    now = CLOCK.now_us()
    return [{"kind": kind, "entity_id": entity_id, "deleted_at": now} for entity_id in entity_ids]
