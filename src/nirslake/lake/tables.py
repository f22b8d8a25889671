"""Parquet data files of the lake: naming, partition folders, publishing and the visibility rule.

The rules implemented here are the ones written in docs/lake-spec.md; keep the two in step.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import io
import os
import posixpath
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import COMMITS, FORMAT_VERSION, TABLES, TableDef
from .storage import Storage, arrow_owned

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

    def observe(self, stamp_us: int) -> None:
        """Never stamp at or below ``stamp_us`` from now on: a row this process read and will
        supersede or delete was stamped by another machine, whose clock may be ahead of ours."""
        if stamp_us > self._last:  # the common case (an older stamp) takes no lock
            with self._lock:
                self._last = max(self._last, stamp_us)


CLOCK = Clock()
# A thread of the parent may hold the clock's lock at a fork; the child's copy would stay locked.
os.register_at_fork(after_in_child=lambda: setattr(CLOCK, "_lock", threading.Lock()))


def new_id() -> str:
    """A 32-hex id that sorts by creation time (like UUIDv7), so Parquet min/max stats prune lookups."""
    return f"{CLOCK.now_us():014x}{os.urandom(9).hex()}"


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
    elif encoded in ("__empty__", "__null__"):
        encoded = "%5F" + encoded[1:]  # the names themselves must not share the sentinels' folders
    if len(encoded) > MAX_PARTITION_NAME:
        digest = hashlib.sha256(value.encode()).hexdigest()[:16]
        encoded = f"{encoded[: MAX_PARTITION_NAME - 17]}~{digest}"
    return encoded


def partition_dir(tdef: TableDef, value: str | None) -> str:
    return f"{tdef.dir}/dataset={encode_partition_value(value)}"


def schema_file(tdef: TableDef) -> str:
    """The empty file that fixes a table's schema for globbing engines (lake spec §3). A
    partitioned table's lies in a partition folder (``dataset=__null__``): a hive reader of the
    table folder finds every file under a ``dataset=`` folder."""
    folder = tdef.dir if tdef.partition_by is None else partition_dir(tdef, None)
    return f"{folder}/{DATA_PREFIX}00000000000000-schema-v{FORMAT_VERSION}.parquet"


def root_schema_file(tdef: TableDef, version: int = FORMAT_VERSION) -> str:
    """Where workspaces made before the partitioned tables' schema files moved hold them (removed
    on open): of format ``version``, as a workspace made by an older format holds its own."""
    return f"{tdef.dir}/{DATA_PREFIX}00000000000000-schema-v{version}.parquet"


def ensure_schema_files(storage: Storage) -> set[str]:
    """Write each table's schema file where it is missing (lake spec §3); returns those written.

    On an object store one listing of ``tables/`` says which are there (instead of a HEAD each,
    and a DELETE for every older location that might hold one), and the missing ones are written
    concurrently: opening a new workspace cost about 30 requests one after another (issue 11)."""
    present = None if storage.is_local else set(storage.list_files("tables"))

    def missing(rel: str) -> bool:
        return not storage.exists(rel) if present is None else rel not in present

    def ensure(tdef: TableDef) -> str | None:
        rel = schema_file(tdef)
        if not missing(rel):
            return None
        storage.publish(rel, to_parquet_bytes(empty_table(tdef.schema)), exists_ok=True)
        if rel != root_schema_file(tdef):
            # Older workspaces kept it at the table root, outside every `dataset=` folder, which
            # hive readers refuse (lake spec §3); it holds no rows. One made by an older format
            # holds that format's file there.
            for version in range(1, FORMAT_VERSION + 1):
                old = root_schema_file(tdef, version)
                if present is None or old in present:
                    storage.delete(old)
        return rel

    if storage.is_local:
        written = [ensure(tdef) for tdef in TABLES.values()]
    else:
        with ThreadPoolExecutor(max_workers=len(TABLES)) as pool:
            written = list(pool.map(ensure, TABLES.values()))
    return {rel for rel in written if rel is not None}


def is_schema_file(rel: str) -> bool:
    return "-schema-v" in posixpath.basename(rel)


def with_rows(rels: Iterable[str]) -> list[str]:
    """``rels`` without the schema files, which hold no rows (lake spec §3): a lake nothing was
    deleted from or compacted has only those under deletions and commits, so reading them is
    most of what a first read of a process would open for nothing."""
    return [rel for rel in rels if not is_schema_file(rel)]


def new_file_name(prefix: str = DATA_PREFIX) -> str:
    return f"{prefix}{CLOCK.now_us():014x}-{uuid.uuid4().hex}.parquet"


def empty_table(schema: pa.Schema) -> pa.Table:
    """A table of no rows. ``Schema.empty_table()`` and ``pa.array([])`` import pandas when it is
    installed (about 0.15 s, paid by the first read of a process); this does not."""
    return pa.Table.from_batches([], schema)


@functools.lru_cache(maxsize=None)
def polars_schema(tdef: TableDef) -> pl.Schema:
    return pl.from_arrow(empty_table(tdef.schema)).schema


@functools.lru_cache(maxsize=None)
def _polars_layout(tdef: TableDef) -> tuple[list[str], list[pl.DataType]]:
    """``polars_schema`` as (column names, dtypes), the lists a frame gives cheaply: comparing
    a frame's ``schema`` builds and checks a ``pl.Schema`` per file (2 ms for a reload's 17)."""
    schema = polars_schema(tdef)
    return list(schema.names()), list(schema.dtypes())


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


def to_parquet_bytes(table: pa.Table, row_group_bytes: int | None = None) -> bytes:
    """``table`` as Parquet, in row groups of about ``row_group_bytes`` each in memory (one when
    None): a fold's arrays of a small dataset are a few hundred per group, spectra of thousands
    of wavelengths one or a few, where a fixed count of rows made decoding small rows slow
    (a group costs its columns' setup) and lookups of large ones fetch megabytes."""
    row_group_rows = None
    if row_group_bytes and table.num_rows:
        row_group_rows = max(1, row_group_bytes * table.num_rows // max(1, table.nbytes))
    sink = io.BytesIO()
    dictionary, statistics = encoded_columns(table.schema)
    pq.write_table(
        table, sink, compression="zstd", write_statistics=statistics, row_group_size=row_group_rows,
        use_dictionary=dictionary,
    )
    return sink.getvalue()


@functools.lru_cache(maxsize=64)
def encoded_columns(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """(leaf columns worth a dictionary, leaf columns worth min/max statistics).

    Measured values (scores, per-sample arrays) rarely repeat: a dictionary of them costs half
    the encoding time of the arrays and about a sixth more bytes than plain values. Statistics
    of per-sample values (the floats inside lists) prune nothing anyone asks for and were most
    of an arrays file's footer, which a remote lookup fetches first (issue 11)."""
    dictionary, statistics = [], []

    def leaves(name: str, kind: pa.DataType, in_list: bool):
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            leaves(f"{name}.list.element", kind.value_type, True)
        elif pa.types.is_struct(kind):
            for field in kind:
                leaves(f"{name}.{field.name}", field.type, in_list)
        else:
            measured = pa.types.is_floating(kind)
            if not measured:
                dictionary.append(name)
            if not (measured and in_list):
                statistics.append(name)

    for field in schema:
        leaves(field.name, field.type, False)
    return dictionary, statistics


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
        groups = [(partition_dir(tdef, value), part) for value, part in split_by_value(table, tdef.partition_by)]
    for folder, _part in groups:
        if seed is None:
            name = new_file_name(prefix)
        else:
            digest = hashlib.sha256(f"{seed[1]}/{folder}".encode()).hexdigest()[:32]
            name = f"{prefix}{seed[0]:014x}-{digest}.parquet"
        written.append(f"{folder}/{name}")

    def publish(rel: str, part: pa.Table) -> None:
        # A seeded name may have landed at an earlier attempt, with these same rows: keep it.
        storage.publish(rel, to_parquet_bytes(part, tdef.row_group_bytes), exists_ok=seed is not None)

    parts = [part for _folder, part in groups]
    if len(parts) > 1 and table.nbytes >= PARALLEL_BYTES:
        # Parquet encoding releases the GIL: the partitions of a large publication (a sweep's
        # arrays, one file per dataset) are encoded on several cores at once.
        with ThreadPoolExecutor(max_workers=min(len(parts), os.cpu_count() or 1)) as pool:
            list(pool.map(publish, written, parts))
    else:
        for rel, part in zip(written, parts):
            publish(rel, part)
    return written


PARALLEL_BYTES = 8 * 2**20  # below this, one thread: handing work to others costs more than it saves


def split_by_value(table: pa.Table, column: str) -> list[tuple[object, pa.Table]]:
    """``table``'s rows by value of ``column`` (first seen first), each part in row order.

    A batch holding one value (a durability point's rows are mostly of one dataset) joins its
    part as it is, without a copy: filtering tens of MiB of arrays once per dataset was a tenth
    of a publication (issue 11). Only batches of mixed values are filtered."""
    parts: dict[object, list[pa.RecordBatch]] = {}
    for batch in table.to_batches():
        key = batch.column(batch.schema.get_field_index(column))
        values = pc.unique(key).to_pylist()
        if len(values) == 1:
            parts.setdefault(values[0], []).append(batch)
            continue
        for value in values:
            mask = pc.is_null(key) if value is None else pc.equal(key, pa.scalar(value, key.type))
            parts.setdefault(value, []).append(batch.filter(mask))
    return [(value, pa.Table.from_batches(batches, table.schema)) for value, batches in parts.items()]


FETCH_FILES = 64  # files fetched together from an object store
FETCH_BYTES = 256 * 2**20  # and their bytes, when known (compaction knows them)


def _fetch_rounds(rels: list[str], sizes: dict[str, int]) -> Iterable[list[str]]:
    batch: list[str] = []
    held = 0
    for rel in rels:
        size = sizes.get(rel, 0)
        if batch and (len(batch) == FETCH_FILES or held + size > FETCH_BYTES):
            yield batch
            batch, held = [], 0
        batch.append(rel)
        held += size
    if batch:
        yield batch


class CorruptFileError(OSError):
    """A data file that exists but cannot be decoded (torn, truncated, not Parquet, wrong types).

    Names the workspace-relative file: pyarrow's own errors name only ``<Buffer>`` or nothing.
    """

    def __init__(self, rel: str, cause: BaseException):
        super().__init__(
            f"data file {rel} cannot be read ({type(cause).__name__}: {cause}); "
            "`nirslake check` lists every damaged file"
        )
        self.rel = rel


@contextlib.contextmanager
def _decoding(rel: str):
    """Turn a failure to decode ``rel`` into a :class:`CorruptFileError` naming it; a file that
    is gone stays a ``FileNotFoundError`` (a vacuum removed it: the caller lists again)."""
    try:
        yield
    except (FileNotFoundError, CorruptFileError):
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptFileError(rel, exc) from exc


def _decode_frames(storage: Storage, rels: list[str], sources: list, tdefs: list[TableDef]) -> list[pl.DataFrame]:
    """polars frames of ``rels`` (local paths or fetched bytes in ``sources``; each file of the
    table in ``tdefs`` at its place), conformed to the table's schema as ``conform`` does, all
    in one ``collect_all`` (polars decodes them in parallel). A file polars cannot take as it is
    (a column of another type, a damaged or vanished file) goes through pyarrow instead, which
    casts like ``conform`` and names a damaged file in its error (``CorruptFileError``), or
    raises FileNotFoundError."""
    schemas = [polars_schema(tdef) for tdef in tdefs]
    layouts = [_polars_layout(tdef) for tdef in tdefs]
    try:
        # Read as written: a file of the table's current schema (every file this version writes)
        # needs no casting, and polars' casting reader costs more per file. Only the files that
        # turn out otherwise (an older format, a foreign writer) are read again, cast.
        frames = pl.collect_all([pl.scan_parquet(source, hive_partitioning=False, glob=False) for source in sources])
        other = [i for i, (frame, (names, dtypes)) in enumerate(zip(frames, layouts)) if frame.columns != names or frame.dtypes != dtypes]
        cast = pl.collect_all([
            pl.scan_parquet(
                sources[i], schema=schemas[i], missing_columns="insert", extra_columns="ignore",
                hive_partitioning=False, glob=False,
            )
            for i in other
        ]) if other else []
        for i, frame in zip(other, cast):
            frames[i] = frame
        return frames
    except BaseException as exc:  # noqa: BLE001 - polars raises its own errors and Rust panics
        if isinstance(exc, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
    frames = []
    for rel, source, tdef in zip(rels, sources, tdefs):
        with _decoding(rel), (pa.OSFile(source) if storage.is_local else pa.BufferReader(arrow_owned(source))) as fh:
            frames.append(pl.from_arrow(conform(pq.ParquetFile(fh).read(), tdef.schema)))
    return frames


class FileCache:
    """Decoded contents of data files, keyed by path. Files never change, so entries never go
    stale; those of files a compaction replaced are dropped by the next snapshot."""

    def __init__(self) -> None:
        self._tables: dict[str, pa.Table] = {}
        self._frames: dict[str, pl.DataFrame] = {}  # the same files, decoded by polars (``frames``)
        self._footers: dict[str, pq.FileMetaData] = {}
        self._positions: dict[str, tuple[list, list[int]]] = {}  # file -> (its keys sorted, their rows)
        self._ranges: dict[str, list[tuple]] = {}
        self.commit_memo: tuple = (None, None)  # (commit file names, their commit state)
        self._swept_for: tuple[str, ...] | None = None  # the commit files forget_replaced last ran for
        self._lock = threading.Lock()

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (a thread of the parent may have held this one), and
        no polars frames: ``read`` would convert them with polars, which can hang after a fork."""
        self._lock = threading.Lock()
        self._frames = {}

    def read(self, storage: Storage, rel: str, schema: pa.Schema) -> pa.Table:
        with self._lock:
            hit = self._tables.get(rel)
            frame = self._frames.get(rel) if hit is None and not storage.is_local else None
        if hit is not None:
            return hit
        if frame is not None:
            # Decoded by polars already (a ranking read it): on an object store, fetching the
            # file again was a GET per file for the first lookup after a top-k (issue 11).
            table = conform(frame.to_arrow(), schema)
            with self._lock:
                self._tables[rel] = table
            return table
        with _decoding(rel), storage.open_arrow(rel) as fh:
            table = conform(pq.ParquetFile(fh).read(), schema)
        with self._lock:
            self._tables[rel] = table
        return table

    def read_many(
        self, storage: Storage, rels: list[str], schema: pa.Schema, sizes: dict[str, int] | None = None
    ) -> list[pa.Table]:
        """``read`` of several files; on object stores the ones not cached yet are fetched in
        rounds of concurrent requests instead of one request after another. A round holds at
        most ``FETCH_FILES`` files and, where ``sizes`` tells, ``FETCH_BYTES`` bytes; each file's
        bytes are dropped as soon as it is decoded."""
        if not storage.is_local:
            with self._lock:
                missing = [rel for rel in dict.fromkeys(rels) if rel not in self._tables]
            if len(missing) > 1:
                for batch in _fetch_rounds(missing, sizes or {}):
                    fetched = storage.read_many(batch)
                    for rel in batch:
                        with _decoding(rel), pa.BufferReader(arrow_owned(fetched.pop(rel))) as fh:
                            table = conform(pq.ParquetFile(fh).read(), schema)
                        with self._lock:
                            self._tables[rel] = table
        return [self.read(storage, rel, schema) for rel in rels]

    def frames(self, storage: Storage, rels: list[str], tdef: TableDef) -> list[pl.DataFrame]:
        """Files as polars frames (no read rules applied), for the reads that rank or filter a
        whole table. polars decodes Parquet about twice as fast as pyarrow plus ``from_arrow``,
        and reads the files of one call in parallel; the rows are the same as ``read``'s."""
        return self.frames_of(storage, [(rel, tdef) for rel in rels])

    def frames_of(self, storage: Storage, files: list[tuple[str, TableDef]]) -> list[pl.DataFrame]:
        """``frames`` of files of several tables (each ``(rel, its table)``), the ones not
        decoded yet in one round: a read that will want several tables (nirs4all's reload reads
        predictions, then runs, pipelines and chains) pays polars' fixed cost per round once."""
        found: dict[str, pl.DataFrame] = {}
        with self._lock:
            for rel, _ in files:
                hit = self._frames.get(rel)
                if hit is not None:
                    found[rel] = hit
        missing = {rel: tdef for rel, tdef in files if rel not in found}
        rounds = [list(missing)] if storage.is_local else _fetch_rounds(list(missing), {})
        for rels in rounds:
            if not rels:
                continue
            fetched = storage.read_many(rels) if not storage.is_local else {}
            sources = [storage.path(rel) if storage.is_local else fetched.pop(rel) for rel in rels]
            for rel, frame in zip(rels, _decode_frames(storage, rels, sources, [missing[rel] for rel in rels])):
                found[rel] = frame
                with self._lock:
                    self._frames[rel] = frame
        return [found[rel] for rel, _ in files]

    def key_rows(self, storage: Storage, rels: list[str], tdef: TableDef, key: str) -> pa.Table:
        """The stored rows of ``key`` in ``rels``, in file then row order: single-row lookups
        without a scan, through each file's keys sorted once (a binary search per lookup; the
        sort runs in Arrow, where a dict of every key built in Python cost several times more).

        pyarrow only, never polars: write paths look parents up here, also in forked children,
        where polars' thread pool (started by the parent) can deadlock."""
        pieces = []
        for rel in rels:
            keys, order = self._key_index(storage, rel, tdef)
            low = high = bisect.bisect_left(keys, key)
            while high < len(keys) and keys[high] == key:
                high += 1
            if high > low:
                pieces.append(take_rows(self.read(storage, rel, tdef.schema), sorted(order[low:high])))
        return pa.concat_tables(pieces) if pieces else empty_table(tdef.schema)

    def held_keys(self, storage: Storage, rels: list[str], tdef: TableDef, wanted: set[str]) -> set[str]:
        """Which of ``wanted`` some file of ``rels`` holds (a batch's caller-given ids: a binary
        search per id and file, through the same sorted keys as ``key_rows``)."""
        held: set[str] = set()
        for rel in rels:
            keys, _ = self._key_index(storage, rel, tdef)
            for key in wanted - held:
                i = bisect.bisect_left(keys, key)
                if i < len(keys) and keys[i] == key:
                    held.add(key)
        return held

    def _key_index(self, storage: Storage, rel: str, tdef: TableDef) -> tuple[list, list[int]]:
        """A file's keys sorted once, with their row numbers (nulls left out)."""
        with self._lock:
            index = self._positions.get(rel)
        if index is None:
            column = self.read(storage, rel, tdef.schema).column(tdef.key)
            order = pc.sort_indices(column)  # nulls last
            valid = len(column) - column.null_count
            index = (column.take(order).to_pylist()[:valid], order.to_pylist()[:valid])
            with self._lock:
                self._positions[rel] = index
        return index

    def key_ranges(self, storage: Storage, rel: str, key: str) -> list[tuple]:
        """Per row group, the (min, max) of the key column; (None-safe) full range without statistics."""
        with self._lock:
            hit = self._ranges.get(rel)
        if hit is None:
            meta = self.metadata(storage, rel)
            column = meta.schema.to_arrow_schema().get_field_index(key)
            hit = []
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(column).statistics
                if meta.row_group(g).num_rows == 0:
                    hit.append(("\uffff", ""))  # empty: matches nothing
                elif stats is None or not stats.has_min_max:
                    hit.append(("", "\uffff"))  # unknown: matches everything
                else:
                    hit.append((stats.min, stats.max))
            with self._lock:
                self._ranges[rel] = hit
        return hit

    def metadata(self, storage: Storage, rel: str) -> pq.FileMetaData:
        """A file's Parquet footer (row-group statistics), read once: on object stores from the
        file's tail alone (one ranged GET, two when the footer is larger than the first guess)."""
        with self._lock:
            hit = self._footers.get(rel)
        if hit is None:
            if storage.is_local:
                with _decoding(rel), storage.open_arrow(rel) as fh:
                    hit = pq.ParquetFile(fh).metadata
            else:
                hit = _remote_footer(storage, rel)
            with self._lock:
                self._footers[rel] = hit
        return hit

    def forget_replaced(self, commit_rels: tuple[str, ...], removed: set[str]) -> None:
        """Forget the files the counting commits hid (``removed``): no later snapshot reads them
        (a reader still holding an older one reads them again from storage, where they stay
        for the grace period). Only a new commit hides files, so this sweeps the cache once
        per new set of commits, not on every read."""
        if self._swept_for == commit_rels:
            return
        with self._lock:
            cached = {*self._tables, *self._frames, *self._footers}
        self.forget(rel for rel in cached if posixpath.basename(rel) in removed)
        self._swept_for = commit_rels

    def forget(self, rels: Iterable[str]) -> None:
        with self._lock:
            for rel in rels:
                self._tables.pop(rel, None)
                self._frames.pop(rel, None)
                self._footers.pop(rel, None)
                self._positions.pop(rel, None)
                self._ranges.pop(rel, None)


COMMIT_PREFIX = "commit-"


def commit_file(sequence: int) -> str:
    """The commit file that holds commit number ``sequence`` (lake spec §4): the name is the claim."""
    return f"{COMMITS.dir}/{COMMIT_PREFIX}{sequence:020d}.parquet"


def commit_sequence(name: str) -> int | None:
    """The landing number in a commit file's name; None for commits written before numbering."""
    if not (name.startswith(COMMIT_PREFIX) and name.endswith(".parquet")):
        return None
    digits = name[len(COMMIT_PREFIX) : -len(".parquet")]
    return int(digits) if digits.isdigit() else None


def land_commit(storage: Storage, row: dict) -> str:
    """Publish one commit row under the next free number; returns its file.

    Each number is claimed with a put-if-absent (a local hard link, an S3 ``If-None-Match: *``
    PUT), so commits are ordered by when they land, whatever the committers' clocks say: a
    committer that loses a number to another re-lists and takes the next one (as Delta's log does).
    """
    data = to_parquet_bytes(pa.Table.from_pydict({k: [v] for k, v in row.items()}, schema=COMMITS.schema))
    sequence = 0
    while True:
        taken = [commit_sequence(posixpath.basename(rel)) for rel in storage.list_files(COMMITS.dir)]
        sequence = max([sequence, *(n for n in taken if n is not None)]) + 1  # past any name we lost
        rel = commit_file(sequence)
        try:
            storage.publish(rel, data, exclusive=True)
            return rel
        except FileExistsError:
            continue


class Commit(NamedTuple):
    """One compaction commit: its file, when its writer made it (µs), and the names it adds and removes."""

    rel: str
    created_us: int
    added: list[str]
    removed: set[str]


def landing_order(rel: str, commit_id: str) -> tuple[int, str]:
    """Commits in the order they landed: by the number in their file name; commits written
    before numbering (no number) first, among themselves by ``commit_id`` (lake spec §4)."""
    sequence = commit_sequence(posixpath.basename(rel))
    return (-1 if sequence is None else sequence, commit_id or "")


def commits_that_count(commits: Iterable[tuple[list[str] | None, list[str] | None]]) -> list[bool]:
    """For (added, removed) names of commits in landing order, whether each one counts (lake
    spec §4): not when an earlier one, counted or not, already removed a file it removes or
    already named a file it adds."""
    removed_before: set[str] = set()
    named_before: set[str] = set()
    verdicts = []
    for new_files, old_files in commits:
        new_files, old_files = new_files or (), set(old_files or ())
        verdicts.append(not (old_files & removed_before) and named_before.isdisjoint(new_files))
        removed_before |= old_files
        named_before |= old_files
        named_before.update(new_files)
    return verdicts


def counting_commits(storage: Storage, cache: FileCache, commit_rels: list[str] | None = None) -> tuple:
    """The compaction commits that count, in landing order, with the names they add and remove.

    Returns (commits, added, removed): commits as :class:`Commit`, counted by
    :func:`commits_that_count`: of two compactions racing over the same files the first to
    land wins, and output a purge claimed before its compaction committed never shows.
    """
    if commit_rels is None:
        commit_rels = storage.list_files(COMMITS.dir)
    memo_key = tuple(commit_rels)
    if cache.commit_memo[0] == memo_key:
        return cache.commit_memo[1]
    rows = []
    for rel, table in zip(with_rows(commit_rels), cache.read_many(storage, with_rows(commit_rels), COMMITS.schema)):
        stamps = table.column("created_at").cast(pa.int64()).to_pylist()
        columns = (table.column("commit_id").to_pylist(), stamps, table.column("added").to_pylist(), table.column("removed").to_pylist())
        rows += [(landing_order(rel, commit_id), rel, stamp, new, old) for commit_id, stamp, new, old in zip(*columns)]
    rows.sort(key=lambda row: row[0])
    counted = [
        Commit(rel, stamp or 0, list(new or ()), set(old or ()))
        for (_, rel, stamp, new, old), counts in zip(rows, commits_that_count((new, old) for *_, new, old in rows))
        if counts
    ]
    added = {name for c in counted for name in c.added}
    removed = {name for c in counted for name in c.removed}
    cache.commit_memo = (memo_key, (counted, added, removed))
    return counted, added, removed


def commit_state(storage: Storage, cache: FileCache, commit_rels: list[str] | None = None) -> tuple[set[str], set[str]]:
    """File names (basenames) made visible and hidden by the compaction commits that count."""
    _, added, removed = counting_commits(storage, cache, commit_rels)
    return added, removed


@dataclass(frozen=True)
class Snapshot:
    """The visible files of every table at one moment, from one listing of each table."""

    files: dict[str, list[str]]

    def table_files(self, tdef: TableDef, partition_value: str | None = ...) -> list[str]:  # type: ignore[assignment]
        rels = self.files.get(tdef.name, [])
        if partition_value is ...:
            return rels
        prefix = partition_dir(tdef, partition_value) + "/"
        return [r for r in rels if r.startswith(prefix)]


# The order a snapshot lists the tables in (lake spec §4): children before their parents, the
# reverse of the order writers publish them (writer.FLUSH_ORDER), so every child listed has its
# parent, published before it, in the later listing of the parent; the deletions last, so a
# snapshot that holds a row of a deleted entity also holds its deletion.
LISTING_ORDER = ("logs", "prediction_arrays", "predictions", "chains", "artifacts", "pipelines", "runs")


def take_snapshot(storage: Storage, cache: FileCache, tables: tuple[str, ...] | None = None) -> Snapshot:
    """List the lake: every table, or only ``tables`` (plus the commits, always needed).

    The commits are listed **before** any data file (lake spec §4): a commit is published only
    after the files it adds, so every commit this listing sees has its files in the listing too.
    The data tables follow in ``LISTING_ORDER``, the deletions last. The cached contents of
    files a compaction replaced are dropped, so a long-lived reader holds only what it can read.
    """
    commit_rels = storage.list_files(COMMITS.dir)
    names = set(TABLES if tables is None else tables) - {COMMITS.name}
    ordered = [name for name in LISTING_ORDER if name in names] + sorted(names - {*LISTING_ORDER, "deletions"})
    ordered += ["deletions"] if "deletions" in names else []
    files: dict[str, list[str]] = {COMMITS.name: commit_rels}
    listed = {name: storage.list_files(f"tables/{name}") for name in ordered}
    added, removed = commit_state(storage, cache, commit_rels)
    for name, rels in listed.items():
        if rels:
            files[name] = [r for r in rels if is_visible(posixpath.basename(r), added, removed)]
    cache.forget_replaced(tuple(commit_rels), removed)
    return Snapshot(files)


def is_visible(name: str, added: set[str], removed: set[str]) -> bool:
    """The visibility rule (lake spec): plain files unless removed; compacted files once committed;
    every commit file (the commits table is the rules, never compacted)."""
    if name.startswith(COMMIT_PREFIX):
        return True
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


FOOTER_GUESS = 256 * 1024  # bytes of a remote file's tail fetched for its footer at first


def _remote_footer(storage: Storage, rel: str) -> pq.FileMetaData:
    """The footer of a remote Parquet file from its last bytes: ``<footer><length:4><PAR1>``."""
    tail = storage.read_tail(rel, FOOTER_GUESS)
    with _decoding(rel):
        if len(tail) < 12 or tail[-4:] != b"PAR1":
            raise ValueError("no Parquet footer at the end of the file")
        length = int.from_bytes(tail[-8:-4], "little")
        if length + 8 > len(tail):
            tail = storage.read_tail(rel, length + 8)
            if length + 8 > len(tail):
                raise ValueError(f"the footer claims {length} bytes, more than the file holds")
        return pq.read_metadata(pa.BufferReader(arrow_owned(tail[len(tail) - length - 8 :])))


def row_group_spans(meta: pq.FileMetaData, groups: list[int]) -> list[tuple[int, int]]:
    """The byte ranges holding ``groups``' column chunks, adjacent ones merged."""
    spans = []
    for g in groups:
        row_group = meta.row_group(g)
        for i in range(row_group.num_columns):
            chunk = row_group.column(i)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            spans.append((start, start + chunk.total_compressed_size))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def _read_row_groups(storage: Storage, rel: str, meta: pq.FileMetaData, groups: list[int]) -> pa.Table:
    """Row groups of a file; on object stores by ranged GETs of their column chunks only (an
    array lookup fetched the whole file of its partition before, issue 11)."""
    if storage.is_local:
        with _decoding(rel), storage.open_arrow(rel) as fh:
            return pq.ParquetFile(fh, metadata=meta).read_row_groups(groups)  # footer parsed once
    spans = row_group_spans(meta, groups)
    if not spans:
        return empty_table(meta.schema.to_arrow_schema())
    # A file as long as the last byte needed, holding only the fetched ranges: the reader, given
    # the footer, reads nothing else. np.zeros maps fresh zero pages: the rest costs no memory.
    sparse = np.zeros(spans[-1][1], dtype=np.uint8)
    for (start, end), data in zip(spans, storage.read_ranges(rel, spans)):
        if len(data) != end - start:
            raise CorruptFileError(rel, ValueError(f"bytes {start}-{end} are past the end of the file"))
        sparse[start:end] = np.frombuffer(data, dtype=np.uint8)
    with _decoding(rel):
        return pq.ParquetFile(pa.BufferReader(pa.py_buffer(sparse)), metadata=meta).read_row_groups(groups)


def lookup(storage: Storage, tdef: TableDef, cache: FileCache, rels: list[str], keys: set[str]) -> pa.Table:
    """The rows of ``keys`` from large files (arrays), reading only row groups whose key range
    (min/max statistics) can hold one: ids sort by time, so a lookup touches few row groups."""
    found = []
    rels = with_rows(rels)
    if not storage.is_local and len(rels) > 1:
        # The footers a first lookup needs, one ranged GET each, in flight together rather than
        # one after another (a partition written on S3 holds a file per durability point).
        with ThreadPoolExecutor(max_workers=min(len(rels), FETCH_FILES)) as pool:
            list(pool.map(lambda rel: cache.metadata(storage, rel), rels))
    for rel in rels:
        meta = cache.metadata(storage, rel)
        groups = [g for g, (low, high) in enumerate(cache.key_ranges(storage, rel, tdef.key)) if any(low <= k <= high for k in keys)]
        if groups:
            part = _read_row_groups(storage, rel, meta, groups)
            hits = [i for i, k in enumerate(part.column(tdef.key).to_pylist()) if k in keys]
            found.append(conform(take_rows(part, hits), tdef.schema))
    return pa.concat_tables(found) if found else empty_table(tdef.schema)


def take_rows(table: pa.Table, positions: list[int]) -> pa.Table:
    """``table.take(positions)`` for a few positions, by slices: ``take`` converts the Python
    list with ``pa.array``, which imports pandas (about 0.15 s) the first time in a process."""
    if not positions:
        return table.slice(0, 0)
    return pa.concat_tables([table.slice(i, 1) for i in positions]) if len(positions) > 1 else table.slice(positions[0], 1)


def read_files(
    storage: Storage, tdef: TableDef, cache: FileCache, rels: list[str], sizes: dict[str, int] | None = None
) -> pa.Table:
    rels = with_rows(rels)
    if not rels:
        return empty_table(tdef.schema)
    return pa.concat_tables(cache.read_many(storage, rels, tdef.schema, sizes))
