"""Parquet data files of the lake: naming, partition folders, publishing and the visibility rule.

The rules implemented here are the ones written in docs/lake-spec.md; keep the two in step.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import threading
import time
import urllib.parse
import uuid
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import COMMITS, TableDef
from .storage import Storage

DATA_PREFIX = "part-"
COMPACT_PREFIX = "compact-"
MAX_PARTITION_NAME = 180  # bytes; keeps folder names under every filesystem's 255


class Clock:
    """Strictly increasing UTC microseconds within a process.

    Latest-wins and deletions compare these stamps, so two events of one process never tie.
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def now_us(self) -> int:
        with self._lock:
            now = time.time_ns() // 1000
            self._last = now if now > self._last else self._last + 1
            return self._last


CLOCK = Clock()


def new_id() -> str:
    """A 32-hex id that sorts by creation time (like UUIDv7), so Parquet min/max stats prune lookups."""
    return f"{CLOCK.now_us():014x}{uuid.uuid4().hex[:18]}"


def encode_partition_value(value: str | None) -> str:
    """A folder-safe, reversible encoding of a partition value (percent-encoding, as Hive does).

    Every byte outside ``[A-Za-z0-9_.-]`` is escaped, so ``/``, ``..``, ``=``, ``%``, spaces and
    unicode cannot leave the table folder. The exact value is kept as a column in each file, so
    readers never need to decode folder names; over-long names are cut and suffixed by a hash.
    """
    if value is None:
        return "__null__"
    # quote() leaves "~" alone; the spec's safe set is [A-Za-z0-9_.-] only.
    encoded = urllib.parse.quote(value, safe="").replace("~", "%7E")
    if encoded in ("", ".", ".."):
        encoded = "".join(f"%{b:02X}" for b in value.encode()) if value else "__empty__"
    if len(encoded) > MAX_PARTITION_NAME:
        digest = hashlib.sha256(value.encode()).hexdigest()[:16]
        encoded = f"{encoded[: MAX_PARTITION_NAME - 17]}~{digest}"
    return encoded


def partition_dir(tdef: TableDef, value: str | None) -> str:
    return f"{tdef.dir}/dataset={encode_partition_value(value)}"


def new_file_name(prefix: str = DATA_PREFIX) -> str:
    return f"{prefix}{CLOCK.now_us():014x}-{uuid.uuid4().hex}.parquet"


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Project ``table`` onto ``schema``: missing columns become nulls, extra ones are dropped."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            columns.append(col if col.type == field.type else col.cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue()


def write_table(
    storage: Storage, tdef: TableDef, table: pa.Table, prefix: str = DATA_PREFIX, seed: tuple[int, str] | None = None
) -> list[str]:
    """Publish ``table`` as new immutable files (one per partition); returns their relative paths.

    With ``seed`` = (stamp, text) the names are derived from it instead of drawn at random, so
    publishing the same rows twice (a journal segment replayed after a crash) is a no-op.
    """
    if table.num_rows == 0:
        return []
    table = conform(table, tdef.schema)
    written = []
    if tdef.partition_by is None:
        groups: Iterable[tuple[str, pa.Table]] = [(tdef.dir, table)]
    else:
        key = table.column(tdef.partition_by)
        values = pc.unique(key).to_pylist()
        groups = []
        for value in values:
            mask = pc.is_null(key) if value is None else pc.equal(key, value)
            groups.append((partition_dir(tdef, value), table.filter(mask)))
    for folder, part in groups:
        if seed is None:
            name = new_file_name(prefix)
        else:
            digest = hashlib.sha256(f"{seed[1]}/{folder}".encode()).hexdigest()[:32]
            name = f"{prefix}{seed[0]:014x}-{digest}.parquet"
        rel = f"{folder}/{name}"
        storage.publish(rel, to_parquet_bytes(part))
        written.append(rel)
    return written


class FileCache:
    """Decoded contents of data files, keyed by path. Files never change, so entries never go stale."""

    def __init__(self) -> None:
        self._tables: dict[str, pa.Table] = {}
        self._lock = threading.Lock()

    def read(self, storage: Storage, rel: str, schema: pa.Schema) -> pa.Table:
        with self._lock:
            hit = self._tables.get(rel)
        if hit is not None:
            return hit
        with storage.open(rel) as fh:
            table = conform(pq.read_table(fh), schema)
        with self._lock:
            self._tables[rel] = table
        return table

    def forget(self, rels: Iterable[str]) -> None:
        with self._lock:
            for rel in rels:
                self._tables.pop(rel, None)


def commit_state(storage: Storage, cache: FileCache) -> tuple[set[str], set[str]]:
    """File names (basenames) made visible and hidden by the compaction commits that count.

    A commit counts unless an earlier one (by ``commit_id``) already replaced one of the same
    files: of two compactions racing over the same files, the first wins (lake spec §4).
    """
    commits = read_files(storage, COMMITS, cache, storage.list_files(COMMITS.dir)).sort_by("commit_id")
    added: set[str] = set()
    removed: set[str] = set()
    named_before: set[str] = set()  # files any earlier commit replaced, counted or not (as in SQL)
    for new_files, old_files in zip(commits.column("added").to_pylist(), commits.column("removed").to_pylist()):
        old_files = set(old_files or ())
        counts = not (old_files & named_before)
        named_before |= old_files
        if counts:
            added.update(new_files or ())
            removed |= old_files
    return added, removed


def is_visible(name: str, added: set[str], removed: set[str]) -> bool:
    """The visibility rule (lake spec): plain files unless removed; compacted files once committed."""
    if name in removed:
        return False
    if name.startswith(COMPACT_PREFIX):
        return name in added
    return name.startswith(DATA_PREFIX)


def visible_files(
    storage: Storage, tdef: TableDef, cache: FileCache, partition_value: str | None = ..., state=None
) -> list[str]:
    """Relative paths of the table's visible files, optionally of one partition only."""
    folder = tdef.dir if partition_value is ... else partition_dir(tdef, partition_value)
    added, removed = state if state is not None else commit_state(storage, cache)
    return [
        rel for rel in storage.list_files(folder) if is_visible(posixpath.basename(rel), added, removed)
    ]


def read_files(storage: Storage, tdef: TableDef, cache: FileCache, rels: list[str]) -> pa.Table:
    if not rels:
        return tdef.schema.empty_table()
    return pa.concat_tables([cache.read(storage, rel, tdef.schema) for rel in rels])


def file_stamp(name: str) -> int:
    """The µs stamp in a data file's name (``part-<14 hex>-...``, ``compact-<14 hex>-...``)."""
    stem = name.split("-", 1)[1] if "-" in name else ""
    try:
        return int(stem.split("-", 1)[0], 16)
    except ValueError:
        return 0
