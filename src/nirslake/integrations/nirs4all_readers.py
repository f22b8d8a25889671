"""The readers nirs4all 1.4.10 points at ``store.sqlite`` directly, reading the lake instead.

``install()`` puts them in place of nirs4all's own: the default engine's workspace chain loader
(``predict(chain_id=...)``), the model catalogue and the prediction array export. Each keeps the
contract of the function it replaces (same arguments, same result, same refusals) and opens the
workspace read-only through the store.
"""

from __future__ import annotations

import base64
import hashlib
import io

import zipfile
from pathlib import Path
from typing import Any

import polars as pl

from ..lake import schema as S

# nirs4all's fold ids that are not cross-validation folds.
NOT_CV = ("final", "avg", "w_avg", "final_agg", "fold_final", "fold_avg", "fold_w_avg")


def _open(workspace_path: Any):
    from .nirs4all import Nirs4allStore

    return Nirs4allStore.open_readonly(workspace_path)


def _is_lake(workspace_path: Any) -> bool:
    root = str(workspace_path)
    if "://" in root:
        return True
    return (Path(root) / "tables").is_dir()


def load_general_workspace_chain(workspace_path: str | Path, chain_id: str) -> dict[str, Any] | None:
    """nirs4all's ``load_general_workspace_chain`` over the lake: the chain's captured REFIT
    artifact, its bytes checked against the fingerprint the chain recorded before anything is
    deserialised. None when the workspace or chain is not there or the chain is not a captured refit."""
    import joblib

    if not _is_lake(workspace_path):
        return None
    with _open(workspace_path) as store:
        chain = store.get_chain(str(chain_id))
        if chain is None:
            return None
        steps = chain.get("steps") or []
        marker = steps[0].get("dagml_host_replay") if len(steps) == 1 and isinstance(steps[0], dict) else None
        if not isinstance(marker, dict) or marker.get("schema") != "nirs4all.dagml-workspace-refit.v1":
            return None
        artifact_id = (chain.get("fold_artifacts") or {}).get("final")
        if not isinstance(artifact_id, str) or steps[0].get("artifact_id") != artifact_id:
            raise ValueError("DAG workspace chain does not identify one captured REFIT artifact")
        record = store._artifact(artifact_id)
        from ..lake import artifacts as art

        payload = art.read_verified(store.storage, record["path"], record["content_hash"])
        fingerprint = "sha256:" + hashlib.sha256(payload).hexdigest()
        if fingerprint != marker.get("artifact_fingerprint"):
            raise ValueError("DAG workspace artifact fingerprint mismatch; refusing to deserialize")
        pipeline_record = store.get_pipeline(chain["pipeline_id"])
    artifact = joblib.load(io.BytesIO(payload))
    if not isinstance(artifact, dict) or not callable(getattr(artifact.get("estimator"), "predict", None)):
        raise ValueError("DAG workspace artifact is not a captured predictor")
    return {
        "artifact": artifact, "pipeline": [{"model": artifact["estimator"]}],
        "manifest": {key: marker[key] for key in ("relation_replay_manifest", "relation_materialization_manifest") if key in marker},
        "target_names": marker.get("target_names", ["y"]), "chain": chain,
        "training_pipeline": pipeline_record.get("expanded_config") if pipeline_record else None,
        "metadata": {
            "chain_id": chain_id, "workspace_path": str(workspace_path), "artifact_fingerprint": fingerprint,
            "artifact_integrity_verified": True, "artifact_scope": "full_training_refit",
            "cv_artifacts_available": False, "portable": False,
        },
    }


def chain_summaries(chains: pl.DataFrame, predictions: pl.DataFrame) -> pl.DataFrame:
    """One row per chain with its scores, computed from its predictions: ``cv_val_score``,
    ``cv_test_score``, ``cv_train_score`` (means over CV folds of the ``val`` rows),
    ``cv_fold_count``, and the refit's ``final_test_score`` / ``final_train_score``."""
    preds = predictions.filter(pl.col("chain_id").is_not_null())
    cv = preds.filter(~pl.col("fold_id").is_in(NOT_CV) & (pl.col("partition") == "val"))
    cv_scores = cv.group_by("chain_id").agg(
        pl.col("val_score").mean().alias("cv_val_score"),
        pl.col("test_score").mean().alias("cv_test_score"),
        pl.col("train_score").mean().alias("cv_train_score"),
        pl.col("fold_id").n_unique().alias("cv_fold_count"),
        pl.col("metric").first().alias("metric"),
        pl.col("task_type").first().alias("task_type"),
        pl.col("model_name").first().alias("model_name"),
    )
    final = preds.filter(pl.col("fold_id") == "final").group_by("chain_id").agg(
        pl.col("test_score").drop_nulls().first().alias("final_test_score"),
        pl.col("train_score").drop_nulls().first().alias("final_train_score"),
    )
    keep = [c for c in ("chain_id", "pipeline_id", "run_id", "dataset_name", "model_class", "preprocessings",
                        "branch_path", "source_index", "model_step_idx", "created_at") if c in chains.columns]
    return chains.select(keep).join(cv_scores, on="chain_id", how="left").join(final, on="chain_id", how="left")


def read_model_catalogue(workspace_path: str | Path, *, max_models: int = 10000) -> list[dict[str, Any]]:
    """nirs4all's model catalogue over the lake: ``[{"summary": ..., "chain": ...}]`` per chain."""
    if type(max_models) is not int or not 0 < max_models <= 10000:
        raise ValueError("max_models must be an integer between 1 and 10000")
    if not _is_lake(workspace_path):
        raise FileNotFoundError(f"WorkspaceStore lake not found: {workspace_path}")
    with _open(workspace_path) as store:
        summaries = store.query_chain_summaries()
        if summaries.height > max_models:
            raise ValueError("Model catalogue exceeds the bounded response capacity")
        result = []
        for summary in summaries.iter_rows(named=True):
            chain = store.get_chain(summary["chain_id"])
            if chain is None:
                raise RuntimeError("Model catalogue chain is missing")
            result.append({"summary": summary, "chain": chain})
        return result


MAX_EXPORT_BYTES = 24 * 1024 * 1024


def export_prediction_arrays(workspace_path: str, request: dict[str, Any]) -> dict[str, str]:
    """nirs4all's prediction array export over the lake: the live predictions of the selected
    datasets with their arrays, as nirs4all's portable Parquet (one file per dataset; zipped
    unless ``format="parquet"``)."""
    from nirs4all.pipeline.storage.array_store import ArrayStore

    if set(request) - {"dataset_names", "format", "partition", "model_name"}:
        raise ValueError("Unknown prediction export fields")
    export_format = request.get("format", "zip")
    if export_format not in {"parquet", "zip"}:
        raise ValueError("Prediction export format must be parquet or zip")
    selected = request.get("dataset_names")
    if selected is not None and (not isinstance(selected, list) or not 1 <= len(selected) <= 128 or any(not isinstance(name, str) or not name or len(name) > 256 for name in selected)):
        raise ValueError("Prediction export requires 1 to 128 dataset names")
    for field in ("partition", "model_name"):
        if field in request and (not isinstance(request[field], str) or not request[field] or len(request[field]) > 256):
            raise ValueError(f"Invalid prediction export {field}")
    if not _is_lake(workspace_path):
        raise ValueError("not_found: Prediction results store does not exist")
    members: list[tuple[str, bytes]] = []
    with _open(workspace_path) as store:
        live = store.query_predictions()
        names = sorted(set(live["dataset_name"].to_list()))
        selected = list(dict.fromkeys(selected if selected is not None else names))
        if not selected:
            raise ValueError("not_found: No prediction datasets are available")
        if any(name not in names for name in selected):
            raise ValueError("not_found: Selected prediction dataset does not exist")
        if export_format == "parquet" and len(selected) != 1:
            raise ValueError("Parquet export requires exactly one dataset")
        total = 0
        for name in selected:
            rows = live.filter(pl.col("dataset_name") == name)
            for field in ("partition", "model_name"):
                if field in request:
                    rows = rows.filter(pl.col(field) == request[field])
            arrays = store.array_store.load_batch(rows["prediction_id"].to_list(), dataset_name=name)
            records = []
            for row in rows.iter_rows(named=True):
                found = arrays.get(row["prediction_id"])
                if found is None:
                    continue
                records.append({**{k: row[k] for k in ("prediction_id", "dataset_name", "model_name", "fold_id", "partition",
                                                         "metric", "val_score", "task_type")}, **found})
            table = ArrayStore._records_to_table(None, records)  # nirs4all's own portable layout
            buffer = io.BytesIO()
            pl.from_arrow(table).write_parquet(buffer, compression="zstd")
            data = buffer.getvalue()
            total += len(data)
            if total > MAX_EXPORT_BYTES:
                raise ValueError("Prediction export exceeds 24 MiB")
            from nirs4all.pipeline.storage.array_store import _sanitize_dataset_filename

            members.append((f"{_sanitize_dataset_filename(name)}.parquet", data))
    if export_format == "parquet":
        filename, content = members[0]
        media_type = "application/octet-stream"
    else:
        output = io.BytesIO()
        with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            seen = set()
            for index, (member, data) in enumerate(members):
                if member in seen:
                    member = f"{index}_{member}"
                seen.add(member)
                archive.writestr(member, data)
        content = output.getvalue()
        filename, media_type = "predictions_export.zip", "application/zip"
    if len(content) > MAX_EXPORT_BYTES:
        raise ValueError("Prediction export exceeds 24 MiB")
    return {"filename": filename, "media_type": media_type, "content_base64": base64.b64encode(content).decode("ascii")}





def lake_artifact_paths(workspace_path: Any) -> set[str]:
    """Every artifact file the lake's records point at, relative to ``<workspace>/artifacts`` (as
    nirs4all's artifact registry names its files), including what stores of this process hold
    unpublished."""
    from .nirs4all import live_stores

    prefix = "artifacts/"
    paths = set()
    with _open(workspace_path) as store:
        frame = store._reads.frame(S.ARTIFACTS).collect()
        paths.update(frame["path"].to_list())
        root = store.storage.root
    for other in live_stores():
        if other.storage.root == root:
            paths.update(row["path"] for row in other._writer.buffered("artifacts"))
    return {p[len(prefix):] for p in paths if isinstance(p, str) and p.startswith(prefix)}


def protecting_lake_artifacts(original: Any) -> Any:
    """nirs4all's ``ArtifactRegistry._scan_all_manifest_references`` (what it must never delete),
    also counting the files the lake's records point at: it reads them from ``store.sqlite``,
    which a lake has not, and would take the lake's files for orphans."""

    def scan(self: Any, include_memory: bool = True, include_store: bool = True) -> set[str]:
        referenced = original(self, include_memory=include_memory, include_store=include_store)
        if include_store and _is_lake(self.workspace):
            referenced |= lake_artifact_paths(self.workspace)
        return referenced

    scan.__wrapped__ = original  # type: ignore[attr-defined]
    return scan


__all__ = ["load_general_workspace_chain", "read_model_catalogue", "export_prediction_arrays", "chain_summaries",
           "lake_artifact_paths", "protecting_lake_artifacts"]
