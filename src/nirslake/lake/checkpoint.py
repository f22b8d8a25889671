"""The current-state manifest (lake spec §11): the Parquet files that hold exactly the current rows
of every table, so an engine that knows none of the read rules reads the lake with one line.

A checkpoint lists the lake (§4), applies the read rules (§5) to find the files holding hidden
rows, writes a resolved copy of each (``current-`` files, invisible to our own readers), and lands
``_current/checkpoint-<n>.parquet`` with a put-if-absent, then points ``_current/manifest.parquet`` at it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema as S
from .rules import _ENTITY_DELETIONS, Deleted, identity, stamp_column
from .storage import Storage, arrow_owned
from .tables import (
    CLOCK,
    FETCH_FILES,
    FileCache,
    Snapshot,
    _decoding,
    commit_sequence,
    conform,
    is_schema_file,
    read_files,
    schema_file,
    take_snapshot,
    to_parquet_bytes,
)

CURRENT_DIR = "_current"
POINTER = f"{CURRENT_DIR}/manifest.parquet"
CHECKPOINT_PREFIX = "checkpoint-"
COPY_PREFIX = "current-"

# A checkpoint that loses its number to another lists the lake again and retries; each retry
# costs a listing and the rows of files published since (everything else is cached).
MAX_ATTEMPTS = 50

MANIFEST_SCHEMA = pa.schema(
    [
        ("table", pa.string()),
        ("file", pa.string()),  # relative to the workspace root
        ("replaces", pa.string()),  # the lake file a resolved copy stands for; null for lake files
        ("rows", pa.int64()),
        ("bytes", pa.int64()),
    ]
)

# Tables in the manifest's order; the arrays are resolved after the predictions (§5.4 needs them).
MANIFEST_TABLES = ("runs", "pipelines", "chains", "predictions", "prediction_arrays", "artifacts", "logs", "deletions", "commits")


class CheckpointError(RuntimeError):
    """A checkpoint that could not land (the lake itself is untouched)."""


@dataclass
class CheckpointResult:
    """What one :func:`write_checkpoint` did."""

    number: int
    file: str
    landed: bool = True  # False: nothing changed since checkpoint ``number``, which stays current
    files: int = 0  # files the manifest lists
    rows: int = 0  # rows in those files: the current rows of every table
    bytes: int = 0
    copies_written: int = 0
    copies_reused: int = 0
    attempts: int = 1
    seconds: float = 0.0

    def summary(self) -> str:
        what = "landed" if self.landed else "is current (nothing changed since it)"
        return (
            f"checkpoint {self.number} {what} ({self.file}): {self.files} files, {self.rows} current rows, "
            f"{self.bytes / 1048576:.1f} MiB; {self.copies_written} resolved copies written, "
            f"{self.copies_reused} reused; {self.seconds:.2f} s; engines read {POINTER}"
        )


def checkpoint_file(number: int) -> str:
    return f"{CURRENT_DIR}/{CHECKPOINT_PREFIX}{number:020d}.parquet"


def checkpoint_number(rel: str) -> int | None:
    name = posixpath.basename(rel)
    if not (name.startswith(CHECKPOINT_PREFIX) and name.endswith(".parquet")):
        return None
    digits = name[len(CHECKPOINT_PREFIX) : -len(".parquet")]
    return int(digits) if digits.isdigit() else None


def list_checkpoints(storage: Storage) -> list[tuple[int, str]]:
    """(number, file) of every landed checkpoint, lowest first."""
    found = [(checkpoint_number(rel), rel) for rel in storage.list_files(CURRENT_DIR)]
    return sorted((n, rel) for n, rel in found if n is not None)


def read_manifest(storage: Storage, rel: str = POINTER) -> pa.Table:
    """A checkpoint's (or the pointer's) rows; its schema metadata holds ``nirslake.checkpoint``."""
    with _decoding(rel), storage.open_arrow(rel) as fh:
        return pq.ParquetFile(fh).read()  # not pq.read_table: it imports pyarrow.dataset (and pandas), 0.25 s


def manifest_number(table: pa.Table) -> int | None:
    value = (table.schema.metadata or {}).get(b"nirslake.checkpoint")
    return int(value) if value else None


def copy_digest(rel: str) -> str | None:
    """The digest in a resolved copy's name: of the lake file it replaces and the rows it hides."""
    name = posixpath.basename(rel)
    if not name.startswith(COPY_PREFIX):
        return None
    return name[len(COPY_PREFIX) + 15 : -len(".parquet")]


# -- the rows each file keeps ---------------------------------------------------------------


def _rule_columns(tdef: S.TableDef) -> list[str]:
    """The columns the read rules look at in ``tdef``; empty when no row of it is ever hidden."""
    columns: list[str] = []
    if tdef.version_column:
        columns += [*identity(tdef), tdef.version_column]
    if "run_id" in tdef.schema.names:
        columns.append("run_id")
    if tdef.name in _ENTITY_DELETIONS:
        columns += [_ENTITY_DELETIONS[tdef.name][1], stamp_column(tdef)]
    if tdef is S.PREDICTION_ARRAYS:
        columns += identity(S.PREDICTIONS)
    return list(dict.fromkeys(columns))


class _RuleColumns:
    """The rule columns, row count and size of data files, read once per process: files never
    change, so an entry never goes stale (a vacuumed file is simply never asked for again).
    Shared by the process's stores, which may checkpoint from several threads at once."""

    LIMIT_ROWS = 20_000_000

    def __init__(self) -> None:
        # key -> (rule columns, or the row count when the table has none; file size)
        self._entries: OrderedDict[str, tuple[pa.Table | int, int]] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork

    def get(self, storage: Storage, tdef: S.TableDef, rels: list[str]) -> list[tuple[pa.Table | int, int]]:
        columns = _rule_columns(tdef)
        wanted = pa.schema([tdef.schema.field(c) for c in columns])
        keys = [f"{storage.url(rel)}\n{','.join(columns)}" for rel in rels]
        found: dict[str, tuple[pa.Table | int, int]] = {}
        with self._lock:
            for key in keys:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    found[key] = self._entries[key]
        missing = [(rel, key) for rel, key in zip(rels, keys) if key not in found]
        if storage.is_local:
            for rel, key in missing:
                with _decoding(rel), pa.OSFile(storage.path(rel)) as fh:
                    found[key] = (_decode(pq.ParquetFile(fh), wanted), fh.size())
        else:  # object stores: concurrent GETs, each file's bytes dropped once decoded
            for start in range(0, len(missing), FETCH_FILES):
                batch = missing[start : start + FETCH_FILES]
                fetched = storage.read_many([rel for rel, _ in batch])
                for rel, key in batch:
                    data = fetched.pop(rel)
                    with _decoding(rel), pa.BufferReader(arrow_owned(data)) as fh:
                        found[key] = (_decode(pq.ParquetFile(fh), wanted), len(data))
        with self._lock:
            for _, key in missing:
                if key not in self._entries:  # another thread may have read it meanwhile
                    self._entries[key] = found[key]
                    self._rows += _count(found[key][0])
            while self._rows > self.LIMIT_ROWS and len(self._entries) > 1:
                _, (old, _size) = self._entries.popitem(last=False)
                self._rows -= _count(old)
        return [found[key] for key in keys]


def _count(table: pa.Table | int) -> int:
    return table if isinstance(table, int) else table.num_rows


def _decode(parquet: pq.ParquetFile, wanted: pa.Schema) -> pa.Table | int:
    """Only the ``wanted`` columns (those a file lacks, written before they existed, as nulls);
    just the row count (from the footer) when there is nothing to look at."""
    if not wanted.names:
        return parquet.metadata.num_rows
    present = [name for name in wanted.names if name in parquet.schema_arrow.names]
    return conform(parquet.read(columns=present), wanted)


_RULE_COLUMNS = _RuleColumns()
os.register_at_fork(after_in_child=_RULE_COLUMNS.after_fork)


def _kept_rows(
    tdef: S.TableDef, files: list[tuple[pa.Table | int, int]], deleted: Deleted, predictions: pa.Table | None
) -> tuple[list[np.ndarray | None], pa.Table | None]:
    """Per file, the positions of its current rows, or None when all of its rows are current; and
    the current rows' identities in the predictions table (they decide the arrays', §5.4).

    The rules of ``query.resolve`` and ``with_visible_prediction``, in numpy and pyarrow rather
    than polars: a store's close() checkpoints, and polars hangs in a process forked from one that
    used it (its thread pool does not survive the fork), where the store's writes work.
    """
    counts = np.array([_count(table) for table, _ in files], dtype=np.int64)
    if not _rule_columns(tdef):  # deletions, commits: every row counts
        return [None] * len(files), None
    narrow = pa.concat_tables([table for table, _ in files]).combine_chunks() if files else (
        pa.schema([tdef.schema.field(c) for c in _rule_columns(tdef)]).empty_table()
    )
    current = np.ones(narrow.num_rows, dtype=bool)
    if tdef.version_column:
        current = _latest(narrow, tdef)
    if "run_id" in narrow.column_names and deleted.runs:
        dead = pc.is_in(narrow.column("run_id"), value_set=pa.array(sorted(deleted.runs), pa.string()))
        current &= ~pc.fill_null(dead, False).to_numpy(zero_copy_only=False)
    if tdef.name in _ENTITY_DELETIONS:
        current &= _not_deleted(narrow, tdef, deleted)
    if predictions is not None:
        current &= _pairs_in(narrow.select(identity(S.PREDICTIONS)), predictions)
    identities = narrow.select(identity(tdef)).filter(pa.array(current)) if tdef is S.PREDICTIONS else None
    kept: list[np.ndarray | None] = []
    for start, count in zip(np.cumsum(counts) - counts, counts):
        mine = current[start : start + count]
        kept.append(None if mine.all() else np.flatnonzero(mine))
    return kept, identities


def _codes(columns: list[pa.ChunkedArray | pa.Array]) -> np.ndarray:
    """One int64 per row, equal exactly when the rows' values in ``columns`` are (nulls equal)."""
    combined = np.zeros(len(columns[0]), dtype=np.int64)
    for column in columns:
        # One chunk first: each chunk of a chunked array would get a dictionary of its own.
        encoded = pc.dictionary_encode(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
        indices = pc.fill_null(encoded.indices.cast(pa.int64()), -1).to_numpy()
        combined = combined * (len(encoded.dictionary) + 1) + indices + 1
    return combined


def _stamps(column: pa.ChunkedArray) -> np.ndarray:
    """µs as int64 (timestamps or ``_version``); a missing stamp sorts first."""
    return pc.fill_null(column.cast(pa.int64()), np.iinfo(np.int64).min).to_numpy()


def _latest(narrow: pa.Table, tdef: S.TableDef) -> np.ndarray:
    """§5.1: per identity the row with the highest version; equal versions go to the later row
    (rows are in file-name, then row order)."""
    keys = _codes([narrow.column(c) for c in identity(tdef)])
    position = np.arange(narrow.num_rows)
    order = np.lexsort((position, _stamps(narrow.column(tdef.version_column)), keys))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = keys[order[1:]] != keys[order[:-1]]
    latest = np.zeros(narrow.num_rows, dtype=bool)
    latest[order[last]] = True
    return latest


def _not_deleted(narrow: pa.Table, tdef: S.TableDef, deleted: Deleted) -> np.ndarray:
    """§5.3: rows not later than their entity's latest deletion are hidden."""
    kind, key = _ENTITY_DELETIONS[tdef.name]
    dead = {entity: stamp for (k, entity), stamp in deleted.entities.items() if k == kind}
    if not dead:
        return np.ones(narrow.num_rows, dtype=bool)
    ids = sorted(dead)
    found = pc.index_in(narrow.column(key), value_set=pa.array(ids, pa.string()))
    died = pc.take(pa.array([dead[i] for i in ids], pa.int64()), found)
    keep = pc.or_kleene(pc.is_null(died), pc.less(died, narrow.column(stamp_column(tdef)).cast(pa.int64())))
    return pc.fill_null(keep, False).to_numpy(zero_copy_only=False)


def _pairs_in(rows: pa.Table, allowed: pa.Table) -> np.ndarray:
    """Whether each row of ``rows`` appears in ``allowed`` (same columns). A null matches nothing,
    as in the readers' joins (polars' semi-join, SQL's ``IN``): arrays without a dataset name
    never show."""
    if allowed.num_rows == 0:
        return np.zeros(rows.num_rows, dtype=bool)
    both = pa.concat_tables([rows, allowed.cast(rows.schema)])
    codes = _codes([both.column(c) for c in rows.column_names])
    found = np.isin(codes[: rows.num_rows], codes[rows.num_rows :])
    for name in rows.column_names:
        found &= ~pc.is_null(rows.column(name)).to_numpy(zero_copy_only=False)
    return found


def _hidden_digest(rel: str, kept: np.ndarray, total: int) -> str:
    hidden = np.setdiff1d(np.arange(total, dtype=np.int64), kept, assume_unique=True)
    return hashlib.sha256(rel.encode() + b"\n" + hidden.tobytes()).hexdigest()[:32]


# -- one checkpoint ----------------------------------------------------------------------------


def _entries(
    storage: Storage, cache: FileCache, snap: Snapshot, copies: dict[str, dict], counters: dict[str, int]
) -> list[dict]:
    """The manifest rows for ``snap``: per table its schema file, then each visible file with all
    its rows current, or a resolved copy of it (one of ``copies``, by the lake file it replaces,
    when it hides the same rows; a new copy joins them)."""
    deleted = Deleted.from_table(read_files(storage, S.DELETIONS, cache, snap.table_files(S.DELETIONS)))
    predictions: pa.Table | None = None
    entries: list[dict] = []
    for name in MANIFEST_TABLES:
        tdef = S.TABLES[name]
        # Other schema files (the root one of a partitioned table, from before §3 moved it) hold
        # no rows and would break a hive reader: only the table's own is listed, first.
        schema_rels = [rel for rel in snap.table_files(tdef) if rel == schema_file(tdef)]
        for rel, (_, size) in zip(schema_rels, _RULE_COLUMNS.get(storage, tdef, schema_rels)):
            entries.append({"table": name, "file": rel, "replaces": None, "rows": 0, "bytes": size})
        data = [rel for rel in snap.table_files(tdef) if not is_schema_file(rel)]
        files = _RULE_COLUMNS.get(storage, tdef, data)
        kept, identities = _kept_rows(tdef, files, deleted, predictions if tdef is S.PREDICTION_ARRAYS else None)
        if tdef is S.PREDICTIONS:
            predictions = identities
        for rel, (table, size), keep in zip(data, files, kept):
            if keep is None:
                entries.append({"table": name, "file": rel, "replaces": None, "rows": _count(table), "bytes": size})
            elif len(keep):  # a file none of whose rows is current is left out
                copies[rel] = _resolved_copy(storage, tdef, rel, keep, _count(table), copies.get(rel), counters)
                entries.append(copies[rel])
    return entries


def _resolved_copy(
    storage: Storage, tdef: S.TableDef, rel: str, keep: np.ndarray, total: int, previous: dict | None, counters: dict[str, int]
) -> dict:
    """The manifest row of ``rel``'s current rows: the previous checkpoint's copy when it hides the
    same rows of the same file (runs and pipelines change status in place: their files stay dirty
    for ever), else a new ``current-`` file beside ``rel`` (same partition folder, so hive paths hold)."""
    digest = _hidden_digest(rel, keep, total)
    if previous is not None and copy_digest(previous["file"]) == digest:
        counters["reused"] += 1
        return {**previous, "table": tdef.name}
    with _decoding(rel), storage.open_arrow(rel) as fh:
        table = conform(pq.ParquetFile(fh).read(), tdef.schema)
    data = to_parquet_bytes(table.take(pa.array(keep)), tdef.row_group_bytes)
    copy = f"{posixpath.dirname(rel)}/{COPY_PREFIX}{CLOCK.now_us():014x}-{digest}.parquet"
    storage.publish(copy, data)
    counters["written"] += 1
    return {"table": tdef.name, "file": copy, "replaces": rel, "rows": len(keep), "bytes": len(data)}


def _manifest_bytes(entries: list[dict], number: int, commit: int) -> bytes:
    table = pa.Table.from_pylist(entries, schema=MANIFEST_SCHEMA)
    created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    metadata = {
        b"nirslake.checkpoint": str(number).encode(),
        b"nirslake.created_at": created.encode(),
        b"nirslake.commit": str(commit).encode(),  # the highest commit number the listing held
        b"nirslake.format": str(S.FORMAT_VERSION).encode(),
    }
    return to_parquet_bytes(table.replace_schema_metadata(metadata))


def write_checkpoint(storage: Storage, cache: FileCache) -> CheckpointResult:
    """Land the next checkpoint and point ``_current/manifest.parquet`` at the highest one.

    Monotone: the highest checkpoint is found **before** the lake is listed, and the new one
    lands as the next number only with a put-if-absent. So whatever checkpoint precedes it in
    landing order landed before this listing began, and since data files only ever appear
    (commits aside, which this listing sees), this listing holds every file and row it held. A
    checkpoint that loses its number to another lists again (files and copies are reused). When
    the listing resolves to exactly the highest checkpoint's list, nothing lands: that one is
    current, and so is every later one.
    """
    started = time.perf_counter()
    counters = {"written": 0, "reused": 0}
    copies: dict[str, dict] = {}  # lake file -> its resolved copy: the previous checkpoint's, or ours
    for attempt in range(1, MAX_ATTEMPTS + 1):
        landed = list_checkpoints(storage)
        number = landed[-1][0] + 1 if landed else 1
        previous = _read_previous(storage, landed)
        if previous is not None:
            copies.update({row["replaces"]: row for row in previous.to_pylist() if row["replaces"]})
        snap = take_snapshot(storage, cache)
        entries = _entries(storage, cache, snap, copies, counters)
        if previous is not None and previous.to_pylist() == entries:
            # The highest checkpoint is exact still: a new one would be the same list.
            number, landed_now = number - 1, False
            if (_pointer_number(storage) or 0) < number:  # its writer stopped before the pointer
                _point(storage, number, storage.read_bytes(checkpoint_file(number)))
        else:
            commits = [commit_sequence(posixpath.basename(rel)) for rel in snap.files.get(S.COMMITS.name, [])]
            data = _manifest_bytes(entries, number, max([-1, *(n for n in commits if n is not None)]))
            try:
                storage.publish(checkpoint_file(number), data, exclusive=True)
            except FileExistsError:
                time.sleep(min(0.002 * attempt, 0.05))  # another checkpoint took the number: list again
                continue
            _point(storage, number, data)
            landed_now = True
        return CheckpointResult(
            number=number,
            file=checkpoint_file(number),
            landed=landed_now,
            files=len(entries),
            rows=sum(e["rows"] for e in entries),
            bytes=sum(e["bytes"] for e in entries),
            copies_written=counters["written"],
            copies_reused=counters["reused"],
            attempts=attempt,
            seconds=time.perf_counter() - started,
        )
    raise CheckpointError(
        f"no checkpoint landed after {MAX_ATTEMPTS} attempts: other checkpoints took every number first "
        f"(the highest one is {POINTER}); run `nirslake checkpoint` again"
    )


def _read_previous(storage: Storage, landed: list[tuple[int, str]]) -> pa.Table | None:
    """The highest checkpoint, for the copies it made; None when there is none or it does not read
    (its copies are then written anew: the previous checkpoint is a cache, never a source of rows)."""
    if not landed:
        return None
    try:
        return read_manifest(storage, landed[-1][1])
    except (OSError, pa.ArrowException):
        return None


def _pointer_number(storage: Storage) -> int | None:
    """The checkpoint the pointer holds (from its footer), or None when it is missing or unreadable."""
    try:
        with _decoding(POINTER), storage.open_arrow(POINTER) as fh:
            metadata = pq.read_schema(fh).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = metadata.get(b"nirslake.checkpoint")
    return int(value) if value else None


def _point(storage: Storage, number: int, data: bytes) -> None:
    """Make ``_current/manifest.parquet`` the highest checkpoint: write it, then list again, and
    copy any higher checkpoint that landed meanwhile, until none is higher than the one written.
    Whichever writer writes last then wrote the highest (locally an atomic rename, on S3 one PUT)."""
    while True:
        storage.publish(POINTER, data, overwrite=True)
        highest, rel = max(list_checkpoints(storage), default=(number, ""))
        if highest <= number:
            return
        number, data = highest, storage.read_bytes(rel)


# -- what vacuum must keep ---------------------------------------------------------------------


def retention(storage: Storage, cutoff_us: int) -> tuple[set[str], list[str]]:
    """(files a checkpoint still in use lists, checkpoint files no longer in use).

    A checkpoint is in use while it is the highest, or the one the pointer holds, or the next one
    landed less than the grace period ago (before ``cutoff_us`` means longer): a reader that
    read the pointer just before the next checkpoint replaced it still reads its files.
    """
    landed = storage.list_modified(CURRENT_DIR)
    numbered = sorted((n, rel) for rel in landed if (n := checkpoint_number(rel)) is not None)
    try:
        pointer = read_manifest(storage, POINTER) if POINTER in landed else None
    except (OSError, pa.ArrowException):
        pointer = None  # rewritten by the next checkpoint; the highest is kept anyway
    held = manifest_number(pointer) if pointer is not None else None
    in_use: list[str] = []
    stale: list[str] = []
    for (number, rel), successor in zip(numbered, [*numbered[1:], None]):
        if successor is None or number == held or landed[successor[1]] >= cutoff_us:
            in_use.append(rel)
        else:
            stale.append(rel)
    protected: set[str] = set()
    for manifest in _readable(storage, in_use):
        protected.update(manifest.column("file").to_pylist())
    if pointer is not None:
        protected.update(pointer.column("file").to_pylist())
    return protected, stale


def _readable(storage: Storage, rels: Iterable[str]) -> Iterable[pa.Table]:
    for rel in rels:
        try:
            yield read_manifest(storage, rel)
        except FileNotFoundError:
            continue  # purged by a concurrent vacuum: it was no longer in use
