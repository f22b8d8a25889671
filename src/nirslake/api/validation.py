"""Every check of a ``WorkspaceStore`` call's arguments, and their coercion to what the lake stores:
text, numbers, fold ids, JSON fields, array sizes, limits (docs/bad-input.md lists each refusal).

Each check raises a ``TypeError`` or ``ValueError`` naming the argument, before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..lake import schema as S
from ..lake.arrays import ARRAY_FIELDS

# Limits on one call's values (docs/bad-input.md). Far above real use, so they only stop a
# mistake (a spectra matrix passed as a config, a file's text as a name) at the call, before it
# bloats every later read of the table; checked before any conversion.
MAX_NAME_CHARS = 65_536  # one name, class, label or id
MAX_JSON_CHARS = 8 * 1024 * 1024  # one JSON field (config, scores, ...; ASCII, so also bytes) or free text (error, message)
MAX_ARRAY_VALUES = 2**24  # one per-sample array (y_proba counts samples x classes): 128 MiB of float64

# polars counts rows in 32 bits: no frame holds more, so a larger limit, offset or n means the same.
MAX_ROWS = 2**32 - 1

# The columns query_predictions (and export_predictions_parquet) filter on, in argument order.
PREDICTION_FILTERS = ("dataset_name", "model_class", "partition", "fold_id", "branch_id", "pipeline_id", "run_id")

# A metric name of a ``scores`` dict that ``top_predictions`` may rank by: a plain identifier.
METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# save_prediction's arguments, in order: the fields of a save_predictions record (with the arrays).
PREDICTION_FIELDS = (
    "pipeline_id", "chain_id", "dataset_name", "model_name", "model_class", "fold_id", "partition", "val_score",
    "test_score", "train_score", "metric", "task_type", "n_samples", "n_features", "scores", "best_params",
    "branch_id", "branch_name", "exclusion_count", "exclusion_rate", "preprocessings", "prediction_id",
)
FIELD_DEFAULTS = tuple((f, "" if f == "preprocessings" else None) for f in PREDICTION_FIELDS)
RECORD_FIELDS = frozenset(PREDICTION_FIELDS) | frozenset(ARRAY_FIELDS)
REQUIRED_FIELDS = frozenset({"pipeline_id", "chain_id", "dataset_name"})


def store_options(
    flush_bytes: Any, flush_rows: Any, grace_seconds: Any, flush_seconds: Any, listing_ttl_seconds: Any
) -> None:
    """The tuning arguments of ``WorkspaceStore(...)``."""
    for name, value in (("grace_seconds", grace_seconds), ("flush_seconds", flush_seconds)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value in (("flush_bytes", flush_bytes), ("flush_rows", flush_rows)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    ttl = listing_ttl_seconds
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl < 0:
        raise ValueError(f"listing_ttl_seconds must be a finite number >= 0, got {ttl!r}")
    if ttl > grace_seconds / 2:
        raise ValueError(
            f"listing_ttl_seconds ({ttl}) must be at most half of grace_seconds ({grace_seconds}): a listing "
            "kept longer could name files that vacuum has since deleted"
        )


def dict_list(name: str, value: Any) -> None:
    """``datasets`` and ``steps``: a list (or tuple) of dicts."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of dicts, got {type(value).__name__}")


def top_predictions_args(n: Any, metric: Any, ascending: Any, group_by: Any) -> set[str]:
    """``top_predictions``: ``metric`` a numeric column or a metric name of the ``scores`` dicts,
    ``group_by`` a column, ``n`` a count; returns the numeric columns."""
    columns = S.PREDICTIONS.schema.names
    numeric = {f.name for f in S.PREDICTIONS.schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)}
    if not isinstance(metric, str) or (metric not in numeric and (metric in columns or not METRIC_NAME.fullmatch(metric))):
        raise ValueError(
            f"Invalid metric column: {metric!r} (choose one of {', '.join(sorted(numeric))}, "
            "or a metric of the predictions' scores such as r2)"
        )
    if group_by is not None and (not isinstance(group_by, str) or group_by not in columns):
        raise ValueError(f"Invalid group_by column: {group_by!r} (choose one of {', '.join(columns)})")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if ascending is not None and not isinstance(ascending, (bool, np.bool_)):
        raise TypeError(f"ascending must be True or False, got {ascending!r} (or None: best first in the metric's own direction)")
    return numeric


def prediction_record(record: Any) -> dict:
    """One ``save_predictions`` record as ``save_prediction``'s arguments by name (defaults filled),
    after its field names are checked; the arrays stay in ``record``."""
    if not isinstance(record, Mapping):
        raise TypeError(f"a record must be a mapping of field names, got {type(record).__name__}")
    unknown = record.keys() - RECORD_FIELDS
    if unknown:
        raise TypeError(f"unknown field(s) {sorted(map(str, unknown))}")
    if not REQUIRED_FIELDS <= record.keys():
        raise TypeError(f"missing field(s) {sorted(REQUIRED_FIELDS - record.keys())}")
    return {f: record.get(f, default) for f, default in FIELD_DEFAULTS}


def export_format(format: Any) -> None:
    if format != "n4a":
        raise ValueError(f"unknown export format {format!r}: only 'n4a' is supported")


def export_filters(filters: dict) -> None:
    """``export_predictions_parquet``'s keyword filters: those of ``query_predictions``."""
    unknown = set(filters) - set(PREDICTION_FILTERS) - {"limit", "offset"}
    if unknown:
        raise TypeError(f"unknown filter(s) {sorted(unknown)}: use {', '.join(PREDICTION_FILTERS)}, limit, offset")


def target_file_mb(value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"target_file_mb must be a positive number, and finite: got {value!r}")


def json_field(value: Any, field: str) -> str | None:
    """Strict JSON: NaN and infinities become null (Python's json would write invalid ``NaN``)."""
    if value is None:
        return None
    if not value and isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    try:
        try:
            text = json.dumps(value, default=json_default, allow_nan=False)
        except ValueError as exc:  # a NaN or infinity somewhere: rare, so only then walk the value
            if "ircular" in str(exc):  # a value that contains itself: walking it would never end
                raise
            text = json.dumps(finite(value), default=json_default, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{field} must be JSON-serialisable: {exc}") from None
    return sized(field, text, MAX_JSON_CHARS)


def finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, np.floating):
        return finite(float(value))
    if isinstance(value, np.ndarray):
        return finite(value.tolist())
    return value


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (datetime, Path)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def opt_float(name: str, value: Any) -> float | None:
    """A float, or None; NaN is stored as null so it ranks last (infinities are kept)."""
    if type(value) is float:  # the common case, checked first: called ~10 times per prediction
        return None if value != value else value
    if value is None:
        return None
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a number or None, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or None, got {value!r}") from None
    except OverflowError:  # an integer beyond float64 (10**400): not an infinity, so not kept as one
        raise ValueError(f"{name} is out of range for a 64-bit float: an integer of {len(str(abs(int(value))))} digits") from None
    return None if math.isnan(number) else number


def opt_int(name: str, value: Any) -> int | None:
    if type(value) is int and -(2**63) <= value < 2**63:  # the common case, checked first
        return value
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise TypeError(f"{name} must be an integer or None, got {value!r}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise TypeError(f"{name} must be an integer or None, got {value!r}")
    number = int(value)
    if not -(2**63) <= number < 2**63:  # caught here, not when the journal is published
        raise ValueError(f"{name} is out of range for a 64-bit integer: {number}")
    return number


def count(name: str, value: Any, allow_none: bool = False) -> int | None:
    """A limit or offset: a non-negative integer (or None where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative integer{' or None' if allow_none else ''}, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return min(int(value), MAX_ROWS)


def fold_id(value: Any) -> str | None:
    """Fold ids are stored as text: ``0`` and ``"0"`` are one fold."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise TypeError(f"fold_id must be a string or an integer, got {type(value).__name__}")
    return text("fold_id", str(value))


def array_size(name: str, value: Any) -> None:
    """Refuse an array of more than ``MAX_ARRAY_VALUES`` values, from its shape or length alone."""
    if value is None:  # most optional arrays: no exception to raise and catch
        return
    shape = getattr(value, "shape", None)
    try:
        size = math.prod(shape) if isinstance(shape, tuple) else len(value)
    except TypeError:  # None, a scalar, an iterator: check_arrays says what is wrong with it
        return
    if size > MAX_ARRAY_VALUES:
        raise ValueError(f"{name} is too large: {size:,} values (the limit is {MAX_ARRAY_VALUES:,})")


def mapping(name: str, value: Any) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict or None, got {type(value).__name__}")
    return value


def text(name: str, value: Any, allow_none: bool = True) -> str | None:
    if type(value) is str and len(value) <= MAX_NAME_CHARS and value.isascii():
        return value  # the common case, checked first: a dozen calls per prediction
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return sized(name, value, MAX_NAME_CHARS)


def free_text(name: str, value: Any) -> str | None:
    """Text callers may pass as any object (an exception as ``error``): kept as ``str(value)``."""
    return None if value is None else sized(name, str(value), MAX_JSON_CHARS)


def sized(name: str, text: str, limit: int) -> str:
    """``text`` if it fits ``limit`` characters and Parquet can store it (UTF-8)."""
    if len(text) > limit:
        raise ValueError(f"{name} is too large: {len(text):,} characters (the limit is {limit:,})")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a file name that is not UTF-8
            raise ValueError(
                f"{name} is not valid Unicode text ({exc.reason} at position {exc.start}); Parquet stores UTF-8"
            ) from None
    return text


def artifact_maps(fold_artifacts: Any, shared_artifacts: Any) -> tuple[dict, dict]:
    """Check the chain's artifact maps: ``{"fold_0": id}`` and ``{"<step_idx>": [id, ...]}``,
    where a single id stands for a list of one (as the seed store accepts). Every id is text
    Parquet can store: a chain's ids are also written raw, as its ``artifact_ids``."""
    if not isinstance(fold_artifacts or {}, dict) or not all(
        isinstance(v, str) or v is None for v in (fold_artifacts or {}).values()
    ):
        raise TypeError(f'fold_artifacts must map fold names to one artifact id each, like {{"fold_0": id}}; got {fold_artifacts!r}')
    shared = shared_artifacts or {}
    if isinstance(shared, dict):
        shared = {str(k): [v] if isinstance(v, str) else v for k, v in shared.items()}
    if not isinstance(shared, dict) or not all(
        isinstance(v, (list, tuple)) and all(isinstance(i, str) for i in v) for v in shared.values()
    ):
        raise TypeError(f'shared_artifacts must map step indices to lists of artifact ids, like {{"0": [id]}}; got {shared_artifacts!r}')
    folds = {k: text(f"fold_artifacts[{k!r}]", v) for k, v in (fold_artifacts or {}).items()}
    return folds, {k: [text(f"shared_artifacts[{k!r}]", i) for i in v] for k, v in shared.items()}
