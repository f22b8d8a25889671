"""``Predictions``: the facade training loops use to collect predictions in memory, rank them and
write them to a store in one batch (nirs4all's ``Predictions`` calls; docs/predictions.md).

Rows live in memory until ``flush`` writes those not yet written with ``WorkspaceStore.save_predictions``;
ranking reads the rows in memory, from their ``scores`` dicts or, failing that, their arrays.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from .lake.tables import new_id
from .query import scores as sc

if TYPE_CHECKING:
    from .store import WorkspaceStore

# Per-sample arrays of a row; everything else is a scalar field (or a dict).
ARRAY_KEYS = ("y_true", "y_pred", "y_proba", "sample_indices", "weights", "sample_ids")
_SCORE_COLUMNS = {"val": "val_score", "test": "test_score", "train": "train_score"}


class Predictions:
    """Predictions of a training loop: ``add_prediction`` buffers, ``flush`` writes in one batch.

    ``store`` (a ``WorkspaceStore``) is where ``flush`` writes; without one, ``flush`` is a no-op
    that keeps every row. Rows stay in memory after a flush, so ``top``, ``get_best`` and
    ``filter_predictions`` keep answering; a row is written once (a second flush writes only rows
    added since). :meth:`from_store` loads stored predictions, with their arrays, for ranking.
    """

    def __init__(self, store: WorkspaceStore | None = None) -> None:
        self._store = store
        self._rows: list[dict[str, Any]] = []
        self._repetition_column: str | None = None

    # ------------------------------------------------------------------ adding and writing
    def add_prediction(
        self,
        dataset_name: str,
        dataset_path: str = "",
        config_name: str = "",
        config_path: str = "",
        pipeline_uid: str | None = None,
        step_idx: int = 0,
        op_counter: int = 0,
        model_name: str = "",
        model_classname: str = "",
        model_path: str = "",
        fold_id: str | int | None = None,
        sample_indices: Any = None,
        weights: Any = None,
        metadata: dict[str, Any] | None = None,
        partition: str = "",
        y_true: Any = None,
        y_pred: Any = None,
        y_proba: Any = None,
        val_score: float | None = None,
        test_score: float | None = None,
        train_score: float | None = None,
        metric: str = "mse",
        task_type: str = "regression",
        n_samples: int = 0,
        n_features: int = 0,
        preprocessings: str = "",
        best_params: dict[str, Any] | None = None,
        scores: dict[str, dict[str, float]] | None = None,
        branch_id: int | None = None,
        branch_path: list[int] | None = None,
        branch_name: str | None = None,
        exclusion_count: int | None = None,
        exclusion_rate: float | None = None,
        model_artifact_id: str | None = None,
        trace_id: str | None = None,
        refit_context: str | None = None,
        target_processing: str = "",
        sample_ids: Any = None,
    ) -> str:
        """Buffer one prediction (one model, fold and partition); returns its id, the one it is stored under.

        The arguments are nirs4all's, in its order, plus ``sample_ids`` (the sample each row
        measured, for repetitions). Stored by ``flush``: the fields of a lake prediction and the
        arrays. Kept in memory only: ``dataset_path``, ``config_name``, ``config_path``,
        ``step_idx``, ``op_counter``, ``model_path``, ``metadata``, ``branch_path``,
        ``model_artifact_id``, ``trace_id``, ``refit_context``, ``target_processing``.
        """
        row = {
            "id": new_id(),
            "dataset_name": dataset_name,
            "dataset_path": dataset_path,
            "config_name": config_name,
            "config_path": config_path,
            "pipeline_uid": pipeline_uid or "",
            "step_idx": step_idx,
            "op_counter": op_counter,
            "model_name": model_name,
            "model_classname": model_classname,
            "model_path": model_path,
            "fold_id": "" if fold_id is None else str(fold_id),
            "metadata": metadata if metadata is not None else {},
            "partition": partition,
            "val_score": val_score,
            "test_score": test_score,
            "train_score": train_score,
            "metric": metric,
            "task_type": task_type,
            "n_samples": n_samples,
            "n_features": n_features,
            "preprocessings": preprocessings,
            "best_params": best_params if best_params is not None else {},
            "scores": scores if scores is not None else {},
            "branch_id": branch_id,
            "branch_path": branch_path,
            "branch_name": branch_name or "",
            "exclusion_count": exclusion_count,
            "exclusion_rate": exclusion_rate,
            "model_artifact_id": model_artifact_id or "",
            "trace_id": trace_id or "",
            "refit_context": refit_context,
            "target_processing": target_processing or "",
            "pipeline_id": "",
            "chain_id": "",
            "flushed": False,
            "y_true": _array(y_true),
            "y_pred": _array(y_pred),
            "y_proba": _array(y_proba),
            "sample_indices": _array(sample_indices),
            "weights": _array(weights),
            "sample_ids": None if sample_ids is None else np.asarray(sample_ids),
        }
        self._rows.append(row)
        return row["id"]

    def flush(self, pipeline_id: str | None = None, chain_id: str | None = None) -> None:
        """Write every row not yet written to the store, in one batch (a durability point).

        ``pipeline_id`` / ``chain_id`` name where they belong; without them each row's
        ``pipeline_uid`` is its pipeline. No store: nothing happens and every row stays buffered.
        A row the store refuses fails the whole batch (the error names it) and nothing is written.
        """
        if self._store is None:
            return
        pending = [row for row in self._rows if not row["flushed"]]
        if not pending:
            return
        records = []
        for row in pending:
            record = {
                "pipeline_id": pipeline_id or row["pipeline_uid"] or None,
                "chain_id": chain_id or row["chain_id"] or None,
                "dataset_name": row["dataset_name"],
                "model_name": row["model_name"],
                "model_class": row["model_classname"],
                "fold_id": row["fold_id"],
                "partition": row["partition"],
                "val_score": row["val_score"],
                "test_score": row["test_score"],
                "train_score": row["train_score"],
                "metric": row["metric"],
                "task_type": row["task_type"],
                "n_samples": row["n_samples"],
                "n_features": row["n_features"],
                "scores": row["scores"],
                "best_params": row["best_params"],
                "branch_id": row["branch_id"],
                "branch_name": row["branch_name"] or None,
                "exclusion_count": row["exclusion_count"] or 0,
                "exclusion_rate": row["exclusion_rate"] or 0.0,
                "preprocessings": row["preprocessings"],
                "prediction_id": row["id"],
            }
            if record["pipeline_id"] is None:
                raise ValueError(
                    f"prediction {row['id']} ({row['model_name']}, fold {row['fold_id']}) has no pipeline: "
                    "pass flush(pipeline_id=...) or add_prediction(pipeline_uid=...)"
                )
            for key in ARRAY_KEYS:
                if row[key] is not None:
                    record[key] = row[key]
            if record.get("sample_ids") is None:
                ids = self._repetition_ids(row)
                if ids is not None:
                    record["sample_ids"] = ids
            records.append(record)
        self._store.save_predictions(records)
        for row, record in zip(pending, records):
            row["flushed"] = True
            row["pipeline_id"], row["chain_id"] = record["pipeline_id"], record["chain_id"] or ""

    @classmethod
    def from_store(cls, store: WorkspaceStore, load_arrays: bool = True, **filters: Any) -> Predictions:
        """The store's predictions matching ``filters`` (``query_predictions``' filters), as rows
        already written; with ``load_arrays`` also their arrays."""
        from . import query as q

        frame = store.query_predictions(**filters)
        facade = cls(store)
        arrays: dict[str, dict] = {}
        if load_arrays and frame.height:
            ids = frame["prediction_id"].to_list()
            for dataset in frame["dataset_name"].unique().to_list():
                stored = q.scan(store.storage, "prediction_arrays", dataset_name=dataset).filter(pl.col("prediction_id").is_in(ids)).collect()
                for rec in stored.iter_rows(named=True):
                    arrays[rec["prediction_id"]] = rec
        for rec in frame.iter_rows(named=True):
            row_arrays = arrays.get(rec["prediction_id"], {})
            facade.add_prediction(
                rec["dataset_name"], pipeline_uid=rec["pipeline_id"], model_name=rec["model_name"] or "",
                model_classname=rec["model_class"] or "", fold_id=rec["fold_id"], partition=rec["partition"] or "",
                y_true=row_arrays.get("y_true"), y_pred=row_arrays.get("y_pred"),
                y_proba=_proba(row_arrays.get("y_proba")), sample_indices=row_arrays.get("sample_indices"),
                weights=row_arrays.get("weights"), sample_ids=row_arrays.get("sample_ids"),
                val_score=rec["val_score"], test_score=rec["test_score"], train_score=rec["train_score"],
                metric=rec["metric"], task_type=rec["task_type"], n_samples=rec["n_samples"] or 0,
                n_features=rec["n_features"] or 0, preprocessings=rec["preprocessings"] or "",
                best_params=_loads(rec["best_params"]), scores=_loads(rec["scores"]), branch_id=rec["branch_id"],
                branch_name=rec["branch_name"], exclusion_count=rec["exclusion_count"], exclusion_rate=rec["exclusion_rate"],
            )
            # The stored id replaces the one add_prediction drew; the row is written already.
            facade._rows[-1].update(id=rec["prediction_id"], pipeline_id=rec["pipeline_id"], chain_id=rec["chain_id"] or "", flushed=True)
        return facade

    # ------------------------------------------------------------------ repetitions
    def set_repetition_column(self, column: str | None) -> None:
        """The ``metadata`` column that holds each row's sample id (nirs4all's repetition column):
        ``by_repetition=True`` aggregates by it, and ``flush`` stores it as ``sample_ids``."""
        self._repetition_column = column

    @property
    def repetition_column(self) -> str | None:
        return self._repetition_column

    def _repetition_ids(self, row: dict, column: str | bool | None = True) -> np.ndarray | None:
        if column is True or column == "sample_ids":
            if row["sample_ids"] is not None:
                return row["sample_ids"]
            column = self._repetition_column
        if not column or not isinstance(column, str):
            return None
        if column == "y":
            return row["y_true"]
        values = (row["metadata"] or {}).get(column)
        return None if values is None else np.asarray(values)

    # ------------------------------------------------------------------ ranking
    def top(
        self,
        n: int,
        rank_metric: str = "",
        rank_partition: str = "val",
        display_metrics: list[str] | None = None,
        display_partition: str = "test",
        ascending: bool | None = None,
        group_by: str | list[str] | None = None,
        by_repetition: bool | str | None = None,
        repetition_method: str | None = None,
        task_type: str | None = None,
        **filters: Any,
    ) -> list[dict[str, Any]]:
        """The best ``n`` rows of ``rank_partition`` (of each ``group_by`` group), best first.

        An empty ``rank_metric`` ranks by the partition's score column (``val_score`` ...) in the
        direction of the rows' ``metric``; a named one reads ``scores[rank_partition][metric]``,
        computing it from the arrays when the dict lacks it. ``ascending`` None infers the
        direction from the metric (r2, rpd, accuracy: higher is better; a bias: closest to zero).
        ``by_repetition`` (True: the rows' ``sample_ids``, or a ``metadata`` column name) folds
        repeated measurements per sample (``repetition_method`` ``mean``, ``median``, ``vote``)
        and ranks on the scores recomputed from them. Rows without a score are left out. Each
        result is a copy of the row with ``rank_score``, ``rank_metric`` and ``rank``; with
        ``display_metrics``, ``display_scores`` holds those metrics of ``display_partition``.
        """
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        candidates = [
            row for row in self.filter_predictions(partition=rank_partition or None, task_type=task_type, **filters)
        ]
        if not candidates:
            return []
        metric = rank_metric or candidates[0]["metric"] or ""
        ranked = []
        for row in candidates:
            score = self._rank_score(row, rank_metric, rank_partition, by_repetition, repetition_method)
            if score is None or math.isnan(score):
                continue
            ranked.append((sc.rank_key(metric, score, ascending), row, score))
        ranked.sort(key=lambda item: item[0])
        keys = [group_by] if isinstance(group_by, str) else list(group_by or [])
        counts: dict[tuple, int] = {}
        results = []
        for _, row, score in ranked:
            group = tuple(row.get(k) for k in keys)
            counts[group] = counts.get(group, 0) + 1
            if counts[group] > n:
                continue
            result = dict(row)
            result.update(rank_score=score, rank_metric=metric, rank=counts[group])
            if display_metrics:
                result["display_scores"] = {
                    m: self._rank_score(row, m, display_partition, by_repetition, repetition_method, own_partition=False)
                    for m in display_metrics
                }
            results.append(result)
        return results

    def get_best(self, metric: str = "", ascending: bool | None = None, **filters: Any) -> dict[str, Any] | None:
        """The best row of the ``val`` partition by ``metric`` (else of ``test``), or None."""
        for partition in ("val", "test"):
            best = self.top(1, metric, partition, ascending=ascending, **filters)
            if best:
                return best[0]
        return None

    def _rank_score(
        self,
        row: dict,
        metric: str,
        partition: str,
        by_repetition: bool | str | None,
        method: str | None,
        own_partition: bool = True,
    ) -> float | None:
        """The row's score for ``metric`` on ``partition``. Its own arrays are that partition's
        only when the row is of that partition (``own_partition``)."""
        arrays_apply = own_partition or row["partition"] == partition
        if by_repetition:
            ids = self._repetition_ids(row, by_repetition)
            if ids is not None and arrays_apply and row["y_true"] is not None and row["y_pred"] is not None:
                return sc.sample_scores(ids, row["y_true"], row["y_pred"], row["task_type"], method).get(
                    metric or row["metric"], None
                )
            warnings.warn(
                f"prediction {row['id']} has no sample ids ({by_repetition!r}) or no arrays for {partition!r}: "
                "ranked on its rows as they are",
                UserWarning,
                stacklevel=3,
            )
        if not metric:
            value = row.get(_SCORE_COLUMNS.get(partition, "val_score"))
            return None if value is None else float(value)
        stored = sc.score_of(row["scores"], partition, metric)
        if stored is not None:
            return stored
        if metric == row["metric"] and partition in _SCORE_COLUMNS and row.get(_SCORE_COLUMNS[partition]) is not None:
            return float(row[_SCORE_COLUMNS[partition]])
        if arrays_apply and row["y_true"] is not None and row["y_pred"] is not None:
            return sc.compute(row["y_true"], row["y_pred"], row["task_type"]).get(metric)
        return None

    # ------------------------------------------------------------------ reading
    def filter_predictions(
        self,
        dataset_name: str | None = None,
        partition: str | None = None,
        config_name: str | None = None,
        model_name: str | None = None,
        fold_id: str | None = None,
        step_idx: int | None = None,
        branch_id: int | None = None,
        branch_name: str | None = None,
        task_type: str | None = None,
        load_arrays: bool = True,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """The rows equal to every given filter (any row field by name), in the order they were added.

        ``task_type`` ``"classification"`` also matches ``binary_classification`` and
        ``multiclass_classification``. Without ``load_arrays`` the rows come without their arrays.
        """
        wanted = {k: v for k, v in {"dataset_name": dataset_name, "partition": partition, "config_name": config_name,
                                    "model_name": model_name, "step_idx": step_idx, "branch_id": branch_id,
                                    "branch_name": branch_name}.items() if v is not None}
        if fold_id is not None:
            wanted["fold_id"] = str(fold_id)
        unknown = set(kwargs) - set(self._rows[0]) if self._rows else set()
        if unknown:
            raise ValueError(f"unknown filter(s) {sorted(unknown)}: filter on a row field, e.g. model_classname=...")
        wanted.update(kwargs)
        found = []
        for row in self._rows:
            if any(row.get(k) != v for k, v in wanted.items()):
                continue
            if task_type is not None and not _same_task(row["task_type"], task_type):
                continue
            found.append(row if load_arrays else {k: v for k, v in row.items() if k not in ARRAY_KEYS})
        return found

    def get_prediction_by_id(self, prediction_id: str, load_arrays: bool = True) -> dict[str, Any] | None:
        """The row of ``prediction_id``, or None."""
        found = self.filter_predictions(id=prediction_id, load_arrays=load_arrays) if self._rows else []
        return found[0] if found else None

    def to_polars(self, load_arrays: bool = True) -> pl.DataFrame:
        """The rows as a DataFrame with the lake's column names (``model_class``, ``prediction_id``,
        ``scores`` as JSON text), so ``nirslake.query``'s helpers apply; arrays as list columns."""
        if not self._rows:
            return pl.DataFrame()
        columns: dict[str, list] = {
            "prediction_id": [r["id"] for r in self._rows],
            "pipeline_id": [r["pipeline_id"] or r["pipeline_uid"] or None for r in self._rows],
            "chain_id": [r["chain_id"] or None for r in self._rows],
        }
        for key, name in (("dataset_name", None), ("model_name", None), ("model_classname", "model_class"), ("fold_id", None),
                          ("partition", None), ("val_score", None), ("test_score", None), ("train_score", None),
                          ("metric", None), ("task_type", None), ("n_samples", None), ("n_features", None),
                          ("preprocessings", None), ("branch_id", None), ("branch_name", None), ("config_name", None),
                          ("step_idx", None), ("flushed", None)):
            columns[name or key] = [r[key] for r in self._rows]
        columns["scores"] = [json.dumps(r["scores"], default=_plain) for r in self._rows]
        columns["best_params"] = [json.dumps(r["best_params"], default=_plain) for r in self._rows]
        frame = pl.DataFrame(columns, strict=False)
        if load_arrays:
            for key, dtype in (("y_true", pl.List(pl.Float64)), ("y_pred", pl.List(pl.Float64)),
                               ("sample_indices", pl.List(pl.Int64)), ("weights", pl.List(pl.Float64)),
                               ("sample_ids", pl.List(pl.String))):
                values = [None if r[key] is None else (r[key].astype(str) if key == "sample_ids" else r[key]).tolist() for r in self._rows]
                try:
                    frame = frame.with_columns(pl.Series(key, values, dtype=dtype))
                except (TypeError, ValueError, pl.exceptions.PolarsError):  # labels that are not numbers
                    frame = frame.with_columns(pl.Series(key, values, strict=False))
        return frame

    @property
    def num_predictions(self) -> int:
        return len(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forget every row, written or not (rows not yet written are lost)."""
        self._rows = []


def _array(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value)


def _proba(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    return np.asarray([np.asarray(r, dtype=np.float64) for r in value], dtype=np.float64) if len(value) else None


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _same_task(row_task: str | None, wanted: str) -> bool:
    wanted = wanted.lower()
    if wanted in ("classification", "clf"):
        return sc.is_classification(row_task)
    if wanted in ("regression", "reg"):
        return (row_task or "").lower() == "regression"
    return (row_task or "").lower() == wanted
