"""nirs4all's ``ArrayStore`` surface over the lake's ``prediction_arrays`` table.

nirs4all hands its arrays over as records (``save_batch``) and reads them back per dataset
(``load_batch``). Each record becomes one lake row: ``y_true``/``y_pred`` flat with their shape
when multi-output, class labels in nirs4all's own encoding, ``y_proba`` as samples x classes with
its exact shape, ``X`` and ``spectra`` flat with their shapes, weights of any length, per-sample
and result metadata as JSON. A load reads each dataset's partition once, whatever the number of
predictions asked for.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from ..lake import schema as S
from ..lake.tables import CLOCK

if TYPE_CHECKING:
    from .nirs4all import Nirs4allStore


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _flat(value: Any, dtype=np.float64) -> np.ndarray | None:
    if value is None:
        return None
    return np.ascontiguousarray(np.asarray(value, dtype=dtype).reshape(-1))


def _shape(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(np.shape(value), dtype=np.int64)


def lake_row(record: dict, owner: tuple[str, str, int]) -> dict:
    """One nirs4all array record as a ``prediction_arrays`` row (nothing of it dropped)."""
    from nirs4all.data._predictions.target_codec import classification_task, encode_target_labels

    row: dict[str, Any] = {
        "prediction_id": record["prediction_id"],
        "run_id": owner[0],
        "dataset_name": owner[1],
        "_version": CLOCK.now_us(),
        "sample_ids": None,
    }
    for field in ("y_true", "y_pred"):
        values = record.get(field)
        encoded = encode_target_labels(values) if classification_task(record.get("task_type")) else None
        row[f"{field}_labels"] = encoded
        row[field] = None if encoded is not None else _flat(values)
        multi = values is not None and np.ndim(values) > 1 and np.shape(values)[1] > 1
        row[f"{field}_shape"] = _shape(values) if multi and encoded is None else None
    proba = record.get("y_proba")
    if proba is not None:
        proba = np.asarray(proba, dtype=np.float64)
        rows = proba.shape[0] if proba.ndim else 1
        row["y_proba"] = np.ascontiguousarray(proba.reshape(rows, -1)) if proba.size else proba.reshape(rows, 0)
        row["y_proba_shape"] = _shape(proba)
    else:
        row["y_proba"] = row["y_proba_shape"] = None
    for field in ("X", "spectra"):
        value = record.get(field)
        row[field] = _flat(value)
        row[f"{field}_shape"] = _shape(value)
    row["sample_indices"] = _flat(record.get("sample_indices"), np.int64)
    row["weights"] = _flat(record.get("weights"))
    for field in ("sample_metadata", "result_metadata"):
        value = record.get(field)
        row[field] = json.dumps(value, default=_json_default) if value else None
    return row


def _reshaped(values: Any, shape: Any) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    if shape is not None and len(shape) > 1:
        try:
            return array.reshape(shape)
        except ValueError:
            return array
    return array


_SCALARS = (str, int, float, bool, type(None))


def _fresh(value: Any) -> Any:
    """A copy of decoded JSON sharing nothing mutable with ``value`` (as a new decode would)."""
    kind = type(value)
    if kind is dict:
        return {k: _fresh(v) for k, v in value.items()}
    if kind is list:
        for item in value:
            if type(item) not in _SCALARS:
                return [_fresh(v) for v in value]
        return value.copy()
    return value


def _meta(text: str | None, seen: dict | None = None) -> dict:
    """The JSON metadata decoded ({} when missing or not JSON). ``seen`` (one load's texts
    already decoded: predictions of a fold share their samples' metadata) gives a fresh copy of
    an earlier decode: nothing is shared between the dicts handed out."""
    if text is None:
        return {}
    if seen is not None:
        earlier = seen.get(text)
        if earlier is not None:
            return _fresh(earlier)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return {}
    if seen is not None:
        seen[text] = value
    return value


def _targets(field: str, values: list, shapes: list, labels: list, decode_target_array: Any) -> list:
    """The ``field`` (y_true or y_pred) of each row as nirs4all's ``load_batch`` gives it."""
    out = []
    for value, shape, encoded in zip(values, shapes, labels):
        if encoded is None and type(value) is np.ndarray and value.dtype == np.float64:
            # Numeric targets: what decode_target_array gives (the values as float64, in their
            # stored shape), from the row's own copy instead of a second one.
            out.append(value if shape is None else value.reshape(shape))
            continue
        view = {field: value, f"{field}_shape": shape, f"{field}_labels": encoded}
        if encoded is not None:
            view["task_type"] = "classification"  # labels are only ever encoded for a classification task
        out.append(decode_target_array(view, field))
    return out


def _probabilities(proba: Any, shape: Any) -> np.ndarray:
    flat = np.asarray([v for inner in proba for v in inner], dtype=np.float64) if len(proba) else np.empty(0)
    return _reshaped(flat, shape)


def _all_none(values: list) -> bool:
    return all(value is None for value in values)


# What ``load_batch`` gives per prediction, in nirs4all's order.
_ARRAY_KEYS = ("y_true", "y_pred", "y_proba", "weights", "X", "spectra", "sample_indices", "sample_metadata", "result_metadata")


def nirs4all_arrays(columns: dict[str, list], decode_target_array: Any = None) -> list[dict[str, Any]]:
    """The lake rows (``columns``: each of ``_READ_COLUMNS`` as a list, as ``_columns`` gives
    them) back as nirs4all's ``load_batch`` gives them, one dict per row, field by field rather
    than row by row (a column no row holds costs one check). Metadata texts repeated between rows
    (a fold's samples) are decoded once and copied for the later rows (``_meta``)."""
    if decode_target_array is None:
        from nirs4all.data._predictions.target_codec import decode_target_array
    n = len(columns["prediction_id"])
    none = [None] * n
    fields: dict[str, list] = {
        field: _targets(field, columns[field], columns[f"{field}_shape"], columns[f"{field}_labels"], decode_target_array)
        for field in ("y_true", "y_pred")
    }
    proba = columns["y_proba"]
    fields["y_proba"] = none if _all_none(proba) else [
        None if p is None else _probabilities(p, shape) for p, shape in zip(proba, columns["y_proba_shape"])
    ]
    fields["weights"] = [None if w is None else np.asarray(w, dtype=np.float64) for w in columns["weights"]]
    for field in ("X", "spectra"):
        values = columns[field]
        fields[field] = none if _all_none(values) else [_reshaped(v, shape) for v, shape in zip(values, columns[f"{field}_shape"])]
    fields["sample_indices"] = [None if v is None else np.asarray(v, dtype=np.int32) for v in columns["sample_indices"]]
    seen: dict[str, Any] = {}
    for field in ("sample_metadata", "result_metadata"):
        fields[field] = [_meta(text, seen) for text in columns[field]]
    return [dict(zip(_ARRAY_KEYS, values)) for values in zip(*(fields[key] for key in _ARRAY_KEYS))]


_READ_COLUMNS = (
    "prediction_id", "y_true", "y_true_shape", "y_true_labels", "y_pred", "y_pred_shape", "y_pred_labels",
    "y_proba", "y_proba_shape", "weights", "X", "X_shape", "spectra", "spectra_shape", "sample_indices",
    "sample_metadata", "result_metadata",
)


# The flat numeric lists: each row's values come out as a numpy slice of the column's one buffer
# rather than as a Python list converted back (most of a reload's cost otherwise).
_FLAT_COLUMNS = {"y_true": np.float64, "y_pred": np.float64, "weights": np.float64, "X": np.float64,
                 "spectra": np.float64, "sample_indices": np.int32}  # int32: as nirs4all's load_batch


def _flat_lists(array: pa.Array | pa.ChunkedArray, dtype: Any) -> list[np.ndarray | None]:
    """Each row of a ``list<number>`` column as its own (writable) numpy array, None when null;
    chunk by chunk (a file's row groups), never joined into one buffer first."""
    out: list[np.ndarray | None] = []
    for chunk in array.chunks if isinstance(array, pa.ChunkedArray) else [array]:
        if len(chunk) == 0:
            continue
        offsets = chunk.offsets.to_numpy().tolist()
        # One writable copy of the chunk's values, each row a view of its own span of it (a
        # copy per row cost 2,000 small copies on a 500-prediction reload).
        values = np.array(chunk.values.to_numpy(zero_copy_only=False), dtype=dtype)
        spans = [values[offsets[i]:offsets[i + 1]] for i in range(len(chunk))]
        if chunk.null_count:
            nulls = chunk.is_null().to_numpy(zero_copy_only=False).tolist()
            spans = [None if null else span for null, span in zip(nulls, spans)]
        out += spans
    return out


def _columns(frame: pl.DataFrame, names: tuple[str, ...]) -> dict[str, list]:
    """The frame's ``names`` column by column (cheaper than a dict per row), flat numeric
    lists as numpy."""
    columns: dict[str, list] = {}
    for name in names:
        series = frame.get_column(name)
        dtype = _FLAT_COLUMNS.get(name)
        flat = dtype is not None and isinstance(series.dtype, pl.List) and series.dtype.inner.is_numeric()
        if flat and series.dtype.inner.is_integer() and series.list.explode().null_count():
            flat = False  # a missing integer has no numpy value: the lists as they are
        columns[name] = _flat_lists(series.to_arrow(), dtype) if flat else series.to_list()
    return columns


class LakeArrayStore:
    """What nirs4all calls on ``store.array_store``, kept in the lake's ``prediction_arrays``."""

    def __init__(self, store: Nirs4allStore) -> None:
        self._store = store

    def save_batch(self, records: list[dict]) -> int:
        """Add each record's arrays to its prediction; returns how many were written. Inside
        ``transaction()`` they are kept with it (written at its end, dropped by a rollback)."""
        if not records:
            return 0
        store = self._store
        with store._lock:
            store._check_open()
            store._require_writable()
            rows = []
            for i, record in enumerate(records):
                if not isinstance(record, dict) or not isinstance(record.get("prediction_id"), str):
                    raise TypeError(f"array record {i} must be a dict with a prediction_id")
                owner = store._known.predictions.get(record["prediction_id"])
                if owner is None:
                    owner = store._known.live_prediction(record["prediction_id"], store._publish_for_read)
                rows.append(lake_row(record, owner))
            for row in rows:
                store._writer.add_arrays(row)
            store._writer.commit()
            return len(rows)

    def _frame(self, dataset_name: str | None) -> pl.DataFrame:
        """The current rows of the partition (every partition when None), as resolved and kept
        by the reads: a frame for reading only (``load_dataset`` hands out a copy)."""
        return self._store._reads.table(S.PREDICTION_ARRAYS, dataset_name)

    def load_batch(self, prediction_ids: list[str], dataset_name: str | None = None) -> dict[str, dict[str, Any]]:
        """``{prediction_id: arrays}`` of those found: one read of the dataset's partition
        (of every partition when ``dataset_name`` is None), never one per prediction."""
        if not prediction_ids:
            return {}
        store = self._store
        with store._lock:
            store._check_open()
            frame = self._frame(dataset_name)
        from nirs4all.data._predictions.target_codec import decode_target_array

        ids = set(prediction_ids)
        if not ids.issuperset(frame.get_column("prediction_id").to_list()):  # a reload asks for all
            frame = frame.filter(pl.col("prediction_id").is_in(list(ids)))
        columns = _columns(frame, _READ_COLUMNS)
        # The first decode of a metadata text is handed out as is and copied for the later rows:
        # every copy is made before this returns, so before nirs4all changes any of them.
        return dict(zip(columns["prediction_id"], nirs4all_arrays(columns, decode_target_array)))

    def load_single(self, prediction_id: str, dataset_name: str | None = None) -> dict[str, Any] | None:
        return self.load_batch([prediction_id], dataset_name=dataset_name).get(prediction_id)

    def load_dataset(self, dataset_name: str) -> pl.DataFrame:
        """Every current array row of the dataset (the lake's columns)."""
        with self._store._lock:
            self._store._check_open()
            frame = self._frame(dataset_name)
        if frame.is_empty():
            raise FileNotFoundError(f"No arrays for dataset '{dataset_name}' in {self._store.workspace_path}")
        return frame.clone()

    def delete_batch(self, prediction_ids: set[str], dataset_name: str | None = None) -> int:
        """Hide the arrays with their predictions (one deletion record each; nothing rewritten)."""
        ids = sorted({p for p in prediction_ids if isinstance(p, str)})
        if ids:
            self._store._require_writable()
            with self._store._lock:
                self._store._delete("prediction", ids)
        return len(ids)

    # nirs4all keeps deletions as a tombstone file applied by compaction; the lake keeps them as
    # deletion records that every read applies at once, so none is ever pending.
    def pending_tombstone_count(self) -> int:
        return 0

    def has_pending_tombstones(self) -> bool:
        return False

    def list_datasets(self) -> list[str]:
        with self._store._lock:
            frame = self._frame(None)
        return sorted(frame["dataset_name"].unique().to_list())

    def compact(self, dataset_name: str | None = None, live_ids: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """Merge small files of the arrays table (the lake's compaction)."""
        result = self._store.compact(tables=["prediction_arrays"])
        return {"prediction_arrays": {"result": repr(result)}}

    def stats(self) -> dict[str, Any]:
        with self._store._lock:
            frame = self._frame(None)
        return {"total_rows": frame.height, "datasets": sorted(frame["dataset_name"].unique().to_list())}
