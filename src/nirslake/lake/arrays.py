"""Dense per-sample arrays: checking what callers pass, and packing numpy into Arrow list columns.

Packing builds one offsets buffer and one values buffer per column, never a Python list per sample.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

ARRAY_FIELDS = ("y_true", "y_pred", "y_proba", "sample_indices", "weights", "sample_ids")


def numeric(name: str, value: Any, dtype=np.float64) -> np.ndarray:
    """``value`` as an array of ``dtype``. Text, complex numbers, dates and other objects are
    refused rather than cast (``"1.5"`` would silently become 1.5); integers must be whole.
    Masked arrays are refused: their mask has no place in the lake and would be dropped."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a masked array, whose mask would be lost: pass {name}.filled(np.nan) "
            "to keep the masked samples as NaN, or leave them out"
        )
    try:
        arr = np.asarray(value)
        if arr.dtype.kind == "O":  # Python objects: numbers, or None for a missing float
            arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"{name} must be a numeric array-like, got {type(value).__name__}: {exc}") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers, got {type(value).__name__} of dtype {arr.dtype}")
    if np.dtype(dtype).kind == "i" and arr.dtype.kind in "uf" and arr.size:
        whole = np.isfinite(arr) & (np.trunc(arr) == arr) if arr.dtype.kind == "f" else True
        bad = ~(whole & (arr < 2.0**63) & (arr >= -(2.0**63)))
        if bad.any():
            raise ValueError(f"{name} must hold whole numbers that fit 64-bit integers, got {arr[bad].flat[0].item()!r}")
    return arr.astype(dtype, copy=False)


def as_vector(name: str, value: Any, dtype=np.float64) -> np.ndarray | None:
    if value is None:
        return None
    arr = numeric(name, value, dtype)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def as_ids(name: str, value: Any) -> np.ndarray | None:
    """Sample ids as a 1-D array of text: strings or whole numbers (written as text), no missing ones."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "O":
        if not all(isinstance(v, (str, int, np.integer)) and not isinstance(v, bool) for v in arr):
            bad = next(v for v in arr if not (isinstance(v, (str, int, np.integer)) and not isinstance(v, bool)))
            raise TypeError(f"{name} must hold strings or whole numbers, got {type(bad).__name__} {bad!r}")
    elif arr.dtype.kind not in "Uiu":
        raise TypeError(f"{name} must hold strings or whole numbers, got dtype {arr.dtype}")
    return arr.astype(str)


def check_arrays(y_true, y_pred, y_proba=None, sample_indices=None, weights=None, sample_ids=None) -> dict[str, np.ndarray | None]:
    """Validate and normalise one prediction's arrays; every given array must have one length."""
    arrays: dict[str, np.ndarray | None] = {
        "y_true": as_vector("y_true", y_true),
        "y_pred": as_vector("y_pred", y_pred),
        "sample_indices": as_vector("sample_indices", sample_indices, np.int64),
        "weights": as_vector("weights", weights),
        "sample_ids": as_ids("sample_ids", sample_ids),
    }
    if y_proba is not None:
        proba = numeric("y_proba", y_proba)
        if proba.ndim == 1:
            proba = proba.reshape(-1, 1)
        if proba.ndim != 2:
            raise ValueError(f"y_proba must be 2-D (samples x classes), got shape {proba.shape}")
        arrays["y_proba"] = np.ascontiguousarray(proba)
    else:
        arrays["y_proba"] = None
    lengths = {k: len(v) for k, v in arrays.items() if v is not None}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise ValueError(f"prediction arrays have mismatched lengths: {detail}")
    return arrays


def list_column(values: Sequence[np.ndarray | None], value_type: pa.DataType) -> pa.Array:
    """A ``list<value_type>`` column from 1-D arrays (None -> null)."""
    if all(v is None for v in values):
        return pa.nulls(len(values), pa.list_(value_type))
    if pa.types.is_string(value_type):
        return pa.array([None if v is None else v.tolist() for v in values], pa.list_(value_type))
    lengths = np.fromiter((0 if v is None else len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [v for v in values if v is not None]
    flat = np.concatenate(present) if present else np.empty(0)
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(flat, type=value_type), type=pa.list_(value_type), mask=mask
    )


def matrix_column(values: Sequence[np.ndarray | None]) -> pa.Array:
    """A ``list<list<double>>`` column from 2-D arrays: one inner list per sample."""
    if all(v is None for v in values):
        return pa.nulls(len(values), pa.list_(pa.list_(pa.float64())))
    rows_per = np.fromiter((0 if v is None else v.shape[0] for v in values), dtype=np.int64, count=len(values))
    outer = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(rows_per, out=outer[1:])
    present = [v for v in values if v is not None]
    if present:
        inner_lengths = np.concatenate([np.full(v.shape[0], v.shape[1], dtype=np.int64) for v in present])
        flat = np.concatenate([v.reshape(-1) for v in present])
    else:
        inner_lengths, flat = np.empty(0, dtype=np.int64), np.empty(0)
    inner_offsets = np.zeros(len(inner_lengths) + 1, dtype=np.int32)
    np.cumsum(inner_lengths, out=inner_offsets[1:])
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat, type=pa.float64()))
    mask = pa.array([v is None for v in values], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(outer), inner, type=pa.list_(pa.list_(pa.float64())), mask=mask)


def to_numpy(field: str, value: Any, classes: int | None = None) -> np.ndarray | None:
    """One stored array back as numpy: float64, ``sample_indices`` int64, ``y_proba`` 2-D.

    ``value`` is a Python list or an Arrow list scalar (converted without a Python list).
    ``classes`` (the stored ``y_proba_classes``) gives ``y_proba`` without samples its width.
    """
    if value is None or (isinstance(value, pa.Scalar) and not value.is_valid):
        return None
    if field == "y_proba":
        return _matrix(value, classes or 0)
    if field == "sample_ids":
        return np.asarray(value.as_py() if isinstance(value, pa.ListScalar) else value, dtype=str)
    dtype = np.int64 if field == "sample_indices" else np.float64
    if isinstance(value, pa.ListScalar):
        return _values(value.values).astype(dtype, copy=False)
    return np.asarray(value, dtype=dtype)


_BY_BUFFER = {pa.float64(): np.float64, pa.int64(): np.int64}


def _values(values: pa.Array) -> np.ndarray:
    """``values.to_numpy(zero_copy_only=False)``: the same read-only view of Arrow's memory, taken
    from the buffer where there are no nulls, since ``to_numpy`` imports pandas (about 0.15 s, the
    first time in a process)."""
    kind = _BY_BUFFER.get(values.type)
    if kind is None or values.null_count:
        return values.to_numpy(zero_copy_only=False)
    data = values.buffers()[1]
    if data is None:  # no values at all
        return np.empty(0, dtype=kind)
    view = np.frombuffer(data, dtype=kind, count=len(values), offset=values.offset * 8)
    view.flags.writeable = False  # as to_numpy's: writing would change Arrow's (maybe cached) memory
    return view


def _matrix(rows: Any, classes: int) -> np.ndarray:
    """A ``list<list<double>>`` value back as a 2-D array, also when it has no rows (then
    ``classes`` wide: the inner lists that would say so are missing)."""
    if isinstance(rows, pa.ListScalar):
        rows = rows.as_py()
    if len(rows) == 0:
        return np.empty((0, classes), dtype=np.float64)
    return np.array([np.asarray(r, dtype=np.float64) for r in rows], dtype=np.float64).reshape(len(rows), -1)


def nbytes(arrays: dict[str, np.ndarray | None]) -> int:
    return sum(a.nbytes for a in arrays.values() if a is not None)
