"""Strict JSON for people and programs: NaN and infinities as null, times as ISO 8601 text,
numpy values as plain numbers, the lake's JSON text columns decoded. The CLI's ``--json`` and the
web API send the same thing through these helpers."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

# Text columns that hold JSON (docs/lake-spec.md): sent decoded, so a client parses once.
JSON_COLUMNS = frozenset({
    "config", "datasets", "summary", "expanded_config", "generator_choices", "steps", "fold_artifacts",
    "shared_artifacts", "branch_path", "scores", "best_params", "details",
})


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: NaN and infinities become null, times ISO 8601 text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def plain(value: Any) -> Any:
    """``value`` with datetimes as ISO 8601 text and numpy scalars as Python numbers, the rest as is
    (NaN stays NaN): what the bundle manifests and the YAML exports write."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value


def dumps(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON text that every parser accepts (``allow_nan=False`` after ``jsonable``)."""
    separators = None if indent else (",", ":")
    return json.dumps(jsonable(value), allow_nan=False, ensure_ascii=False, indent=indent, separators=separators)


def rows(frame: pl.DataFrame) -> list[dict]:
    """The frame's rows as dicts, JSON text columns decoded."""
    out = frame.to_dicts()
    for name in JSON_COLUMNS.intersection(frame.columns):
        for row in out:
            if isinstance(row[name], str):
                try:
                    row[name] = json.loads(row[name])
                except ValueError:
                    pass  # not JSON after all: sent as the text it is
    return out
