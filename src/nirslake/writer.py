"""The write buffer: rows of every table held in memory, written as new immutable files on flush.

Implements lake spec §6: parents are written before children, and buffers flush by size.
"""

from __future__ import annotations

import sys

import pyarrow as pa

from . import schema as S
from .arrays import list_column, matrix_column, nbytes
from .storage import Storage
from .tables import write_table

# Parents before children, status changes after them: a crash midway never leaves a prediction
# whose pipeline is missing, nor a pipeline marked completed whose results are missing.
FLUSH_ORDER = (
    "runs:open", "pipelines:open", "artifacts", "chains", "predictions", "prediction_arrays", "logs",
    "runs:final", "pipelines:final", "deletions",
)

DEFAULT_FLUSH_BYTES = 64 * 1024 * 1024
DEFAULT_FLUSH_ROWS = 50_000


class LakeWriter:
    """Buffers rows per table; ``flush()`` publishes each non-empty buffer as new Parquet files.

    Not thread-safe on its own: the store serialises calls.
    """

    def __init__(self, storage: Storage, flush_bytes: int = DEFAULT_FLUSH_BYTES, flush_rows: int = DEFAULT_FLUSH_ROWS):
        self.storage = storage
        self.flush_bytes = flush_bytes
        self.flush_rows = flush_rows
        self._rows: dict[str, list[dict]] = {name: [] for name in FLUSH_ORDER if name != "prediction_arrays"}
        self._arrays: list[dict] = []
        self._array_bytes = 0
        self._pending = 0

    def add(self, table: str, row: dict) -> None:
        if table in ("runs", "pipelines"):
            table = f"{table}:{'open' if row['status'] == 'running' else 'final'}"
        self._rows[table].append(row)
        self._pending += 1
        if self._pending >= self.flush_rows:
            self.flush()

    def add_arrays(self, row: dict) -> None:
        """Buffer one prediction's arrays (already checked by ``arrays.check_arrays``)."""
        self._arrays.append(row)
        self._pending += 1
        self._array_bytes += nbytes({f: row[f] for f in ("y_true", "y_pred", "y_proba", "sample_indices", "weights")})
        if self._array_bytes >= self.flush_bytes or self._pending >= self.flush_rows:
            self.flush()

    @property
    def pending(self) -> int:
        return self._pending

    def flush(self) -> None:
        """Write everything buffered; once this returns it is durable (lake spec §3, §6).

        A buffer is emptied only after its files are published, so a failed flush keeps what it
        could not write for the next attempt.
        """
        if not self._pending:
            return
        for name in FLUSH_ORDER:
            if name == "prediction_arrays":
                if self._arrays:
                    write_table(self.storage, S.PREDICTION_ARRAYS, self._pack_arrays())
                    self._pending -= len(self._arrays)
                    self._arrays, self._array_bytes = [], 0
                continue
            rows = self._rows[name]
            if rows:
                tdef = S.TABLES[name.split(":")[0]]
                write_table(self.storage, tdef, pa.Table.from_pylist(rows, schema=tdef.schema))
                self._pending -= len(rows)
                self._rows[name] = []

    def _pack_arrays(self) -> pa.Table:
        rows = self._arrays

        def strings(key: str) -> pa.Array:
            return pa.array([r[key] for r in rows], pa.string())

        columns = {
            "prediction_id": strings("prediction_id"),
            "run_id": strings("run_id"),
            "dataset_name": strings("dataset_name"),
            "y_true": list_column([r["y_true"] for r in rows], pa.float64()),
            "y_pred": list_column([r["y_pred"] for r in rows], pa.float64()),
            "y_proba": matrix_column([r["y_proba"] for r in rows]),
            "sample_indices": list_column([r["sample_indices"] for r in rows], pa.int64()),
            "weights": list_column([r["weights"] for r in rows], pa.float64()),
            "_version": pa.array([r["_version"] for r in rows], pa.int64()),
        }
        return pa.Table.from_pydict(columns, schema=S.PREDICTION_ARRAYS.schema)


def flush_left_open(writer: LakeWriter, label: str) -> None:
    """Flush a store that was garbage-collected or left open at exit; report, never raise, a failure."""
    try:
        writer.flush()
    except Exception as exc:  # noqa: BLE001 - at exit an exception would crash the interpreter
        print(f"nirslake: {writer.pending} buffered records of {label} could not be written: {exc}", file=sys.stderr)
