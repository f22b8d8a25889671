"""The write path: rows buffered in memory, made durable in a journal, published as lake files.

Implements lake spec §6: a durability point appends one journal frame per table; the journal is
published as Parquet in bulk (by size, by age, on flush/close/read), status rows after results.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import pyarrow as pa

from . import schema as S
from .arrays import ARRAY_FIELDS, list_column, matrix_column, nbytes
from .journal import Journal, read_frames, segment_stamp
from .storage import Storage
from .tables import CLOCK, write_table

# Parents before children, status changes after them: a crash midway never leaves a prediction
# whose pipeline is missing, nor a pipeline marked completed whose results are missing.
FLUSH_ORDER = (
    "runs:open", "pipelines:open", "artifacts", "chains", "predictions", "prediction_arrays", "logs",
    "runs:final", "pipelines:final", "deletions",
)

DEFAULT_FLUSH_BYTES = 64 * 1024 * 1024
DEFAULT_FLUSH_ROWS = 50_000
DEFAULT_FLUSH_SECONDS = 10.0


def _table_of(key: str) -> S.TableDef:
    return S.TABLES[key.split(":")[0]]


class LakeWriter:
    """Buffers rows per table; ``commit()`` makes them durable, ``publish()`` makes them lake files.

    On a local workspace ``commit`` appends to this writer's journal, and the journal is
    published once it holds ``flush_bytes`` or is ``flush_seconds`` old; elsewhere (object
    stores) ``commit`` publishes directly. Not thread-safe on its own: the store serialises calls.
    """

    def __init__(
        self,
        storage: Storage,
        flush_bytes: int = DEFAULT_FLUSH_BYTES,
        flush_rows: int = DEFAULT_FLUSH_ROWS,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
    ):
        self.storage = storage
        self.flush_bytes = flush_bytes
        self.flush_rows = flush_rows
        self.flush_us = int(flush_seconds * 1e6)
        self.journal = Journal(storage) if storage.is_local else None
        self._rows: dict[str, list[dict]] = {name: [] for name in FLUSH_ORDER if name != "prediction_arrays"}
        self._arrays: list[dict] = []
        self._array_bytes = 0
        self._pending = 0
        self._sealed: list[str] = []  # journal segments closed but not yet published

    # -- buffering -------------------------------------------------------------
    def add(self, table: str, row: dict) -> None:
        if table in ("runs", "pipelines"):
            table = f"{table}:{'open' if row['status'] == 'running' else 'final'}"
        self._rows[table].append(row)
        self._pending += 1
        if self._pending >= self.flush_rows:
            self.commit()

    def add_arrays(self, row: dict) -> None:
        """Buffer one prediction's arrays (already checked by ``arrays.check_arrays``)."""
        self._arrays.append(row)
        self._pending += 1
        self._array_bytes += nbytes({f: row[f] for f in ARRAY_FIELDS})
        if self._array_bytes >= self.flush_bytes or self._pending >= self.flush_rows:
            self.commit()

    @property
    def pending(self) -> int:
        """Records buffered in memory, not yet durable."""
        return self._pending

    # -- durability ------------------------------------------------------------
    def commit(self) -> None:
        """A durability point: once this returns, every buffered record survives a crash of the process."""
        self._make_durable()
        journal = self.journal
        if journal is not None and journal.current is not None:
            if journal.bytes >= self.flush_bytes or CLOCK.now_us() - journal.opened_us >= self.flush_us:
                self.publish()

    def publish(self) -> None:
        """Commit, then turn the journal into lake files (readers in other processes see them now)."""
        self._make_durable()
        if self.journal is not None:
            sealed = self.journal.seal()
            if sealed:
                self._sealed.append(sealed)
        while self._sealed:
            publish_segment(self.storage, self._sealed[0])
            self._sealed.pop(0)

    def _make_durable(self) -> None:
        if not self._pending:
            return
        frames = self._frames()
        if self.journal is None:
            publish_frames(self.storage, frames)
        else:
            self.journal.append(frames)
        self._clear()

    def _frames(self) -> list[tuple[str, pa.Table | dict[str, list]]]:
        frames = []
        for name in FLUSH_ORDER:
            if name == "prediction_arrays":
                if self._arrays:
                    frames.append((name, self._pack_arrays()))
            elif self._rows[name]:
                # Columns, not row dicts: cheaper to encode now and to turn into Arrow at publication.
                names = _table_of(name).schema.names
                frames.append((name, {column: [row[column] for row in self._rows[name]] for column in names}))
        return frames

    def _clear(self) -> None:
        # Only after the records are durable: a failed append keeps them for the next attempt.
        for name in self._rows:
            self._rows[name] = []
        self._arrays, self._array_bytes, self._pending = [], 0, 0

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
            "y_proba_classes": pa.array([None if r["y_proba"] is None else r["y_proba"].shape[1] for r in rows], pa.int64()),
        }
        return pa.Table.from_pydict(columns, schema=S.PREDICTION_ARRAYS.schema)


def publish_frames(
    storage: Storage, frames: list[tuple[str, pa.Table | dict[str, list]]], seed: tuple[int, str] | None = None
) -> None:
    """Write frames (Arrow tables, or columns of values) as lake files, merged per table, in ``FLUSH_ORDER``."""
    tables: dict[str, list[pa.Table]] = defaultdict(list)
    columns: dict[str, dict[str, list]] = {}
    for name, records in frames:
        if isinstance(records, pa.Table):
            tables[name].append(records)
        else:
            merged = columns.setdefault(name, defaultdict(list))
            for column, values in records.items():
                merged[column].extend(values)
    for name in FLUSH_ORDER:
        if name in columns:
            schema = _table_of(name).schema
            tables[name].append(pa.Table.from_pydict({c: columns[name].get(c, []) for c in schema.names}, schema=schema))
        if tables.get(name):
            table = pa.concat_tables(tables[name])
            write_table(storage, _table_of(name), table, seed=None if seed is None else (seed[0], f"{seed[1]}/{name}"))


def publish_segment(storage: Storage, rel: str) -> None:
    """Publish one journal segment's records as lake files, then delete it.

    File names derive from the segment, so a second publication (two processes recovering the
    same orphan, or a crash between publishing and deleting) writes nothing new.
    """
    frames = list(read_frames(storage.read_bytes(rel)))
    publish_frames(storage, frames, seed=(segment_stamp(rel), rel.rsplit("/", 1)[-1]))
    storage.delete(rel)


def flush_left_open(writer: LakeWriter, label: str) -> None:
    """Publish a store that was garbage-collected or left open at exit; report, never raise, a failure."""
    try:
        writer.publish()
    except Exception as exc:  # noqa: BLE001 - at exit an exception would crash the interpreter
        where = "its journal keeps what it made durable; the next store opened on the workspace publishes it"
        print(f"nirslake: could not publish {label} ({writer.pending} records still in memory; {where}): {exc}", file=sys.stderr)
