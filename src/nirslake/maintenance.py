"""Compaction: merging a partition's files into one, dropping deleted and superseded rows.

Follows the commit protocol of docs/lake-spec.md: the merged file is published under a name no
reader shows, then one commit record makes it visible and hides the files it replaces, at once.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict

import polars as pl
import pyarrow as pa

from . import schema as S
from .query import resolve
from .tables import (
    COMPACT_PREFIX,
    CLOCK,
    FileCache,
    commit_state,
    counting_commits,
    conform,
    file_stamp,
    is_schema_file,
    new_file_name,
    new_id,
    read_files,
    to_parquet_bytes,
    visible_files,
)
from .storage import STAGING_DIR, Storage


# Their rows are the rules themselves: compacting them would change what every reader sees.
NEVER_COMPACTED = ("deletions", "commits")


def purge(storage: Storage, cache: FileCache, cutoff_us: int) -> int:
    """Delete bytes no reader needs any more, if they became unneeded before ``cutoff_us``.

    That is: files a counting commit replaced, compaction output no commit made visible (a
    crashed or losing compaction), and staging leftovers. Returns how many files went.
    """
    commits, added, _ = counting_commits(storage, cache)
    counted_removed = {name for created, _, removed in commits if created < cutoff_us for name in removed}
    doomed: list[str] = []
    for rel in storage.list_files("tables"):
        name = posixpath.basename(rel)
        if name in counted_removed:
            doomed.append(rel)
        elif name.startswith(COMPACT_PREFIX) and name not in added and file_stamp(name) < cutoff_us:
            doomed.append(rel)
    doomed += [rel for rel in storage.list_files(STAGING_DIR, suffix=".tmp") if (storage.modified_us(rel) or 0) < cutoff_us]
    cache.forget(doomed)
    return storage.delete_many(doomed)


def _deletions(storage: Storage, cache: FileCache) -> pl.LazyFrame:
    rels = visible_files(storage, S.DELETIONS, cache, state=commit_state(storage, cache))
    return pl.from_arrow(read_files(storage, S.DELETIONS, cache, rels)).lazy()


def compact_all(storage: Storage, cache: FileCache) -> int:
    """Compact every table that may be compacted; returns how many files were replaced."""
    deletions = _deletions(storage, cache)  # compaction adds no deletion: read them once
    return sum(
        compact_table(storage, cache, tdef, deletions=deletions)
        for tdef in S.TABLES.values()
        if tdef.name not in NEVER_COMPACTED
    )


def compact_table(
    storage: Storage, cache: FileCache, tdef: S.TableDef, min_files: int = 2, deletions: pl.LazyFrame | None = None
) -> int:
    """Compact every partition of ``tdef`` that has ``min_files`` or more data files.

    Returns how many files were replaced. ``deletions`` and ``commits`` are never compacted.
    """
    if tdef.name in NEVER_COMPACTED:
        raise ValueError(f"table {tdef.name!r} is never compacted")
    state = commit_state(storage, cache)
    if deletions is None:
        deletions = _deletions(storage, cache)
    folders: dict[str, list[str]] = defaultdict(list)
    for rel in visible_files(storage, tdef, cache, state=state):
        if not is_schema_file(rel):
            folders[posixpath.dirname(rel)].append(rel)
    replaced = 0
    for folder, rels in sorted(folders.items()):
        if len(rels) < min_files:
            continue
        merged = resolve(pl.from_arrow(read_files(storage, tdef, cache, rels)).lazy(), tdef, deletions).collect()
        added = []
        if merged.height:
            name = new_file_name(COMPACT_PREFIX)
            storage.publish(f"{folder}/{name}", to_parquet_bytes(conform(merged.to_arrow(), tdef.schema)))
            added.append(name)
        commit = {
            "commit_id": [new_id()],
            "table_name": [tdef.name],
            "added": [added],
            "removed": [[posixpath.basename(r) for r in rels]],
            "created_at": [CLOCK.now_us()],
        }
        storage.publish(f"{S.COMMITS.dir}/{new_file_name()}", to_parquet_bytes(pa.Table.from_pydict(commit, schema=S.COMMITS.schema)))
        # The replaced files are hidden now; their bytes stay until ``purge`` finds the commit
        # older than the grace period, so a reader that listed them a moment ago can still read them.
        replaced += len(rels)
    return replaced
