"""Compaction: merging a partition's files into one, dropping deleted and superseded rows.

Follows the commit protocol of docs/lake-spec.md: the merged file is published under a name no
reader shows, then one commit record makes it visible and hides the files it replaces, at once.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from . import schema as S
from .checkpoint import COPY_PREFIX, retention
from .journal import JOURNAL_DIR
from .rules import resolve
from .storage import STAGING_DIR, Storage
from .tables import (
    CLOCK,
    COMPACT_PREFIX,
    FileCache,
    commit_state,
    conform,
    counting_commits,
    is_schema_file,
    is_visible,
    land_commit,
    new_file_name,
    new_id,
    read_files,
    to_parquet_bytes,
    visible_files,
)

# Their rows are the rules themselves: compacting them would change what every reader sees.
NEVER_COMPACTED = ("deletions", "commits")


def leftovers(storage: Storage, cache: FileCache, cutoff_us: int) -> dict[str, list[str]]:
    """Bytes no reader needs any more, if they became unneeded before ``cutoff_us``, by kind.

    ``superseded``: files a counting commit replaced; ``uncommitted``: compaction output no
    counting commit made visible (a crashed, losing or still running compaction);
    ``staging``: half-written files of crashed writers (and journal segments they never named);
    ``checkpoints`` no reader uses any more and the ``resolved copies`` none in use lists (lake
    spec §11): a file a checkpoint in use lists is never superseded (checkpoints list only visible
    files, so never uncommitted output either). Artifact objects are left to
    ``gc_artifacts`` and ``check``. Ages are the storage's modification times (when a commit
    landed, when a file was written), never a writer's clock: a compactor whose clock is behind
    gets neither its replaced files deleted early nor its output taken for old.
    """
    # The checkpoints before the tables: a copy written after this listing is younger than the cutoff.
    listed_by_checkpoints, found_checkpoints = retention(storage, cutoff_us)
    commits, added, _ = counting_commits(storage, cache)
    landed = storage.list_modified(S.COMMITS.dir) if commits else {}
    counted_removed = {name for c in commits if landed.get(c.rel, cutoff_us) < cutoff_us for name in c.removed}
    found: dict[str, list[str]] = {"superseded": [], "uncommitted": [], "staging": [], "checkpoints": found_checkpoints, "resolved copies": []}
    for rel in storage.list_files("tables"):
        name = posixpath.basename(rel)
        if name in counted_removed:
            if rel not in listed_by_checkpoints:
                found["superseded"].append(rel)
        elif name.startswith(COMPACT_PREFIX) and name not in added and (storage.modified_us(rel) or 0) < cutoff_us:
            found["uncommitted"].append(rel)
        elif name.startswith(COPY_PREFIX) and rel not in listed_by_checkpoints and (storage.modified_us(rel) or 0) < cutoff_us:
            found["resolved copies"].append(rel)
    # A journal segment is created under a hidden .tmp name, then named (lake spec §6): one left
    # unnamed by a crash holds no acknowledged record.
    found["staging"] = [
        rel
        for folder in (STAGING_DIR, JOURNAL_DIR)
        for rel in storage.list_files(folder, suffix=".tmp")
        if (storage.modified_us(rel) or 0) < cutoff_us
    ]
    return found


def remove_leftovers(storage: Storage, cache: FileCache, found: dict[str, list[str]]) -> int:
    """Delete the ``found`` leftovers (of :func:`leftovers`); returns how many files went.

    Uncommitted compaction output may belong to a compaction still running (slower than the
    grace period): its commit would land after the files are gone and hide the files it
    replaced. So the output is first **claimed**: one commit per table that names those
    files as both added and removed. Landing before the late commit, it makes that commit not
    count (lake spec §4) and hides the files itself; landing after it, it does not count and
    the files stay, now committed. Only files that no counting commit shows are deleted.
    """
    uncommitted = found.get("uncommitted", [])
    doomed = [rel for kind, rels in found.items() if kind != "uncommitted" for rel in rels]
    if uncommitted:
        by_table: dict[str, list[str]] = defaultdict(list)
        for rel in uncommitted:
            by_table[rel.split("/", 2)[1]].append(posixpath.basename(rel))
        for table, names in sorted(by_table.items()):
            land_commit(storage, _commit_row(table, names, names))
        _, added, removed = counting_commits(storage, cache)
        doomed += [rel for rel in uncommitted if not is_visible(posixpath.basename(rel), added, removed)]
    cache.forget(doomed)
    return storage.delete_many(doomed)


def purge(storage: Storage, cache: FileCache, cutoff_us: int) -> int:
    """Delete the :func:`leftovers` older than ``cutoff_us``; returns how many files went."""
    return remove_leftovers(storage, cache, leftovers(storage, cache, cutoff_us))


def _commit_row(table: str, added: list[str], removed: list[str]) -> dict:
    return {"commit_id": new_id(), "table_name": table, "added": added, "removed": removed, "created_at": CLOCK.now_us()}


def _deletions(storage: Storage, cache: FileCache) -> pl.LazyFrame:
    rels = visible_files(storage, S.DELETIONS, cache, state=commit_state(storage, cache))
    return pl.from_arrow(read_files(storage, S.DELETIONS, cache, rels)).lazy()


# Compaction merges files smaller than half of this and writes files of about this size: big
# enough that a scan opens few files, small enough to rewrite cheaply (Delta and Iceberg use
# 128 MiB to 1 GiB; our rows are small and many writers append small files).
TARGET_FILE_BYTES = 128 * 1024 * 1024


@dataclass
class CompactionResult:
    """What one compaction did, per table and in total."""

    files_replaced: int = 0
    files_written: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    partitions: int = 0
    tables: dict[str, int] = field(default_factory=dict)  # table -> files replaced

    def add(self, other: CompactionResult, table: str) -> None:
        self.files_replaced += other.files_replaced
        self.files_written += other.files_written
        self.bytes_before += other.bytes_before
        self.bytes_after += other.bytes_after
        self.partitions += other.partitions
        self.tables[table] = self.tables.get(table, 0) + other.files_replaced


def compact_all(
    storage: Storage,
    cache: FileCache,
    target_bytes: int = TARGET_FILE_BYTES,
    tables: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    dead_rows: bool = False,
) -> CompactionResult:
    """Compact every table that may be compacted (or only ``tables``); ``dead_rows``: see ``compact_table``."""
    names = [n for n in S.TABLES if n not in NEVER_COMPACTED] if tables is None else list(tables)
    for name in names:
        if name not in S.TABLES:
            raise ValueError(f"unknown table {name!r}: choose among {', '.join(S.TABLES)}")
        if name in NEVER_COMPACTED:
            raise ValueError(f"table {name!r} is never compacted (its rows are the read rules)")
    deletions = _deletions(storage, cache)  # compaction adds no deletion: read them once
    total = CompactionResult()
    for name in names:
        one = compact_table(storage, cache, S.TABLES[name], target_bytes=target_bytes, deletions=deletions, dead_rows=dead_rows)
        total.add(one, name)
        if progress is not None and one.files_replaced:
            progress(
                f"{name}: {one.files_replaced} files ({_mib(one.bytes_before)}) -> "
                f"{one.files_written} ({_mib(one.bytes_after)}) in {one.partitions} partition(s)"
            )
    return total


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _encode_in_pieces(table: pa.Table, row_group_bytes: int | None, target_bytes: int) -> list[bytes]:
    """Parquet files of about ``target_bytes`` each (none for no rows): encoded whole, then, when
    larger than the target, in as many equal slices of rows as the target needs."""
    if table.num_rows == 0:
        return []
    whole = to_parquet_bytes(table, row_group_bytes)
    pieces = min(table.num_rows, -(-len(whole) // target_bytes))
    if pieces <= 1:
        return [whole]
    step = -(-table.num_rows // pieces)
    return [to_parquet_bytes(table.slice(start, step), row_group_bytes) for start in range(0, table.num_rows, step)]


def compact_table(
    storage: Storage,
    cache: FileCache,
    tdef: S.TableDef,
    min_files: int = 2,
    deletions: pl.LazyFrame | None = None,
    target_bytes: int = TARGET_FILE_BYTES,
    dead_rows: bool = False,
) -> CompactionResult:
    """Merge the small files (under half of ``target_bytes``) of each partition of ``tdef``.

    A partition is compacted when it has ``min_files`` or more small files; with ``dead_rows``
    (vacuum) also when fewer small files hold deleted or superseded rows. The merged rows,
    without superseded versions and deleted rows, are written as ``compact-`` files of about
    ``target_bytes`` each, then one commit swaps them in (lake spec §4).
    """
    if tdef.name in NEVER_COMPACTED:
        raise ValueError(f"table {tdef.name!r} is never compacted")
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    state = commit_state(storage, cache)
    if deletions is None:
        deletions = _deletions(storage, cache)
    folders: dict[str, list[tuple[str, int]]] = defaultdict(list)
    sizes = storage.list_sizes(tdef.dir, suffix=".parquet")
    for rel in visible_files(storage, tdef, cache, state=state):
        if is_schema_file(rel) or rel not in sizes:
            continue
        size = sizes[rel]
        if size < target_bytes // 2:
            folders[posixpath.dirname(rel)].append((rel, size))
    result = CompactionResult()
    for folder, entries in sorted(folders.items()):
        if len(entries) < min_files and not dead_rows:
            continue
        rels = [rel for rel, _ in entries]
        size_in = sum(size for _, size in entries)
        raw = pl.from_arrow(read_files(storage, tdef, cache, rels, sizes))
        merged = resolve(raw.lazy(), tdef, deletions).collect()
        if len(entries) < min_files and merged.height == raw.height:
            continue  # every row still counts: nothing to reclaim here
        added, size_out = [], 0
        for data in _encode_in_pieces(conform(merged.to_arrow(), tdef.schema), tdef.row_group_bytes, target_bytes):
            name = new_file_name(COMPACT_PREFIX)
            storage.publish(f"{folder}/{name}", data)
            added.append(name)
            size_out += len(data)
        # The commit lands after every file it adds: a reader that lists the commits first (as
        # all of ours do) finds each added file in its later listing of the data.
        land_commit(storage, _commit_row(tdef.name, added, [posixpath.basename(r) for r in rels]))
        # The replaced files are hidden now; their bytes stay until ``purge`` finds the commit
        # landed longer ago than the grace period, so a reader that listed them a moment ago
        # can still read them.
        result.files_replaced += len(rels)
        result.files_written += len(added)
        result.bytes_before += size_in
        result.bytes_after += size_out
        result.partitions += 1
    return result
