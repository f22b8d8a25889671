"""The write path: rows buffered in memory, made durable in a journal, published as lake files.

Implements lake spec §6: a durability point appends one journal batch; the journal is published
as Parquet in bulk (by size, by age, on flush/close/read), status rows after results.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
import weakref
from collections import defaultdict

import numpy as np
import pyarrow as pa

from . import schema as S
from .arrays import ARRAY_FIELDS, list_column, matrix_column, nbytes
from .journal import JOURNAL_DIR, SUFFIX, Frames, Journal, keep_damaged, read_segment, segment_stamp
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


# Every writer of this process, by workspace: a read through one store first publishes what the
# others acknowledged (one process reads what any of its stores acknowledged), and a forked
# child makes them all forget their parent's records.
_WRITERS: dict[str, weakref.WeakSet[LakeWriter]] = defaultdict(weakref.WeakSet)
_WRITERS_LOCK = threading.Lock()


class LakeWriter:
    """Buffers rows per table; ``commit()`` makes them durable, ``publish()`` makes them lake files.

    On a local workspace ``commit`` appends to this writer's journal, and the journal is
    published once it holds ``flush_bytes`` or is ``flush_seconds`` old; elsewhere (object
    stores) ``commit`` publishes directly. Thread-safe: its own lock serialises calls, so a
    read through another store of the process may publish it (``publish_acknowledged``).
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
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._rows: dict[str, list[dict]] = {name: [] for name in FLUSH_ORDER if name != "prediction_arrays"}
        self._arrays: list[dict] = []
        self._array_bytes = 0
        self._pending = 0
        # Object stores: batches a durability point began to publish, each with the seed of its
        # file names (and its record count), kept until every file landed, so a retry rewrites
        # the same names.
        self._landing: list[tuple[list, tuple[int, str], int]] = []
        # While held (a caller's transaction), durability points keep the buffer in memory:
        # nothing of it is journaled or published until the hold is released (or rolled back).
        self.held = 0
        with _WRITERS_LOCK:
            _WRITERS[storage.root].add(self)

    # -- buffering -------------------------------------------------------------
    def add(self, table: str, row: dict) -> None:
        if table in ("runs", "pipelines"):
            table = f"{table}:{'open' if row['status'] == 'running' else 'final'}"
        with self._lock:
            self._own()
            self._rows[table].append(row)
            self._pending += 1
            if self._pending >= self.flush_rows and not self.held:
                self.commit()

    def add_arrays(self, row: dict) -> None:
        """Buffer one prediction's arrays (already checked by ``arrays.check_arrays``)."""
        with self._lock:
            self._own()
            self._arrays.append(row)
            self._pending += 1
            self._array_bytes += nbytes({f: row[f] for f in ARRAY_FIELDS})
            if (self._array_bytes >= self.flush_bytes or self._pending >= self.flush_rows) and not self.held:
                self.commit()

    @property
    def pending(self) -> int:
        """Records not yet durable: buffered in memory, or in a batch that has not landed."""
        return self._pending + sum(count for _frames, _seed, count in self._landing)

    @property
    def journaled(self) -> bool:
        """True when a journal segment holds records not yet published."""
        return self.journal is not None and bool(self.journal.segments)

    # -- holding (transactions) ------------------------------------------------
    def hold(self) -> tuple[dict[str, int], int]:
        """Keep what is buffered from now on in memory until ``release``; returns a mark for ``rollback``."""
        with self._lock:
            self._own()
            self.held += 1
            return {name: len(rows) for name, rows in self._rows.items()}, len(self._arrays)

    def release(self) -> None:
        with self._lock:
            self.held = max(0, self.held - 1)

    def rollback(self, mark: tuple[dict[str, int], int]) -> int:
        """Drop what was buffered since ``mark`` (taken by ``hold``); returns how many records went."""
        with self._lock:
            self._own()
            rows, arrays = mark
            dropped = 0
            for name, kept in rows.items():
                dropped += max(0, len(self._rows[name]) - kept)
                del self._rows[name][kept:]
            dropped += max(0, len(self._arrays) - arrays)
            del self._arrays[arrays:]
            self._pending = max(0, self._pending - dropped)
            self._array_bytes = sum(nbytes({f: r.get(f) for f in ARRAY_FIELDS}) for r in self._arrays)
            return dropped

    def buffered(self, table: str) -> list[dict]:
        """The rows of ``table`` buffered and not yet durable (a writer reads its own held rows)."""
        with self._lock:
            if table == "prediction_arrays":
                return list(self._arrays)
            return [row for name, rows in self._rows.items() if name.split(":")[0] == table for row in rows]

    # -- durability ------------------------------------------------------------
    def commit(self) -> None:
        """A durability point: once this returns, every buffered record survives a crash of the
        process. While held, the buffer stays in memory (the hold's release commits)."""
        with self._lock:
            self._own()
            if self.held:
                return
            self._make_durable()
            journal = self.journal
            if journal is not None and journal.current is not None:
                if journal.bytes >= self.flush_bytes or CLOCK.now_us() - journal.opened_us >= self.flush_us:
                    self._publish_journal()

    def publish(self) -> None:
        """Commit, then turn the journal into lake files (readers in other processes see them now).
        While held, only what was durable before is published."""
        with self._lock:
            self._own()
            if not self.held:
                self._make_durable()
            self._publish_journal()

    def publish_acknowledged(self) -> None:
        """Publish what durability points acknowledged (the journal), leaving the buffer alone."""
        with self._lock:
            self._own()
            self._publish_journal()

    def publish_process_writers(self) -> None:
        """Publish what every other writer of this process on this workspace acknowledged, so a
        read here sees it (lake spec §6). One writer's lock at a time: no two are ever held."""
        with _WRITERS_LOCK:
            others = [w for w in _WRITERS[self.storage.root] if w is not self]
        for other in others:
            other.publish_acknowledged()

    def _publish_journal(self) -> None:
        if self.journal is None:
            return
        self.journal.seal()
        for rel in self.journal.segments:  # oldest first: sealed ones, and any a failed append sealed
            publish_segment(self.storage, rel, self.journal.appended(rel))
            self.journal.release(rel)  # only now may a recoverer take the segment

    def _make_durable(self) -> None:
        if self.journal is None:
            if self._pending:
                self._landing.append((self._frames(), (CLOCK.now_us(), f"batch-{uuid.uuid4().hex}"), self._pending))
                self._clear()
            while self._landing:
                frames, seed, _count = self._landing[0]
                publish_frames(self.storage, frames, seed)
                self._landing.pop(0)
        elif self._pending:
            self.journal.append(self._frames())
            self._clear()

    def _own(self) -> None:
        """A belt for forks the at-fork hook did not see (a fork from C code)."""
        if self._pid != os.getpid():
            self.forget_parent()

    def forget_parent(self) -> None:
        """In a forked child: the parent's buffer, batches and journal stay the parent's to
        publish (publishing them here too would duplicate them, or delete the journal the parent
        still appends to). The child starts empty, with a journal of its own."""
        self._lock = threading.RLock()  # another thread of the parent may have held it at the fork
        self._pid = os.getpid()
        self._clear()
        self._landing = []
        if self.journal is not None:
            self.journal.forget()

    def _frames(self) -> list[tuple[str, pa.Table | dict[str, list]]]:
        frames = []
        for name in FLUSH_ORDER:
            if name == "prediction_arrays":
                if self._arrays:
                    frames.append((name, self._pack_arrays()))
            elif self._rows[name]:
                # Columns, not row dicts: cheaper to encode now and to turn into Arrow at publication.
                names = _table_of(name).schema.names
                # Columns a row leaves out (added by a later format) are null.
                frames.append((name, {column: [row.get(column) for row in self._rows[name]] for column in names}))
        return frames

    def _clear(self) -> None:
        # Only once the records are durable (or, on object stores, held in a landing batch): a
        # failed append keeps them for the next attempt.
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
            "sample_ids": list_column([r.get("sample_ids") for r in rows], pa.string()),
        }
        for field in S.PREDICTION_ARRAYS.schema:  # later columns (format 3): null unless the row has them
            if field.name not in columns:
                values = [r.get(field.name) for r in rows]
                if pa.types.is_list(field.type) and any(isinstance(v, np.ndarray) for v in values):
                    columns[field.name] = list_column(values, field.type.value_type)
                else:
                    columns[field.name] = pa.array(values, field.type)
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


def publish_segment(storage: Storage, rel: str, appended: Frames | None = None) -> str | None:
    """Publish one journal segment's whole batches as lake files, then delete it; a segment with
    damage inside is kept as ``.damaged`` instead, and its new name returned.

    File names derive from the segment, so a second publication (a crash between publishing and
    deleting) writes nothing new. ``appended``: the batches the caller appended to it itself
    (``Journal.appended``), published without reading the file back.
    """
    frames, damage = (appended, []) if appended is not None else read_segment(storage.read_bytes(rel))
    publish_frames(storage, frames, seed=(segment_stamp(rel), rel.rsplit("/", 1)[-1]))
    if damage:
        return keep_damaged(storage, rel, damage)
    storage.delete(rel)
    return None


def recover_orphans(storage: Storage) -> list[str]:
    """Publish every journal segment whose writer is gone; returns those kept as damaged.

    Gone means its lock can be taken: a live writer, in this process or another, on this host
    or any other, holds it (lake spec §6). A segment another recoverer is publishing is locked
    too, and one it finished is gone: both are skipped.
    """
    if not storage.is_local:
        return []
    kept = []
    for rel in storage.list_files(JOURNAL_DIR, suffix=SUFFIX):
        fd = storage.lock_file(rel)
        if fd is None:
            continue
        try:
            damaged = publish_segment(storage, rel)
        except FileNotFoundError:  # removed by a recoverer that took no lock (an older version)
            continue
        finally:
            os.close(fd)
        if damaged:
            kept.append(damaged)
    return kept


def flush_left_open(writer: LakeWriter, label: str) -> None:
    """Publish a store that was garbage-collected or left open at exit; report, never raise, a failure."""
    try:
        writer.publish()
    except Exception as exc:  # noqa: BLE001 - at exit an exception would crash the interpreter
        fate = []
        if writer.pending:
            fate.append(f"{writer.pending} records not yet made durable are lost")
        if writer.journaled:
            fate.append("what it made durable stays in _journal/ and the next store opened on the workspace publishes it")
        print(f"nirslake: could not publish {label} ({'; '.join(fate) or 'nothing was lost'}): {exc}", file=sys.stderr)


def _forget_parents_in_child() -> None:
    global _WRITERS_LOCK
    _WRITERS_LOCK = threading.Lock()  # another thread of the parent may have held it at the fork
    for writers in _WRITERS.values():
        for writer in list(writers):
            writer.forget_parent()


os.register_at_fork(after_in_child=_forget_parents_in_child)

