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
    conform,
    new_file_name,
    new_id,
    read_files,
    to_parquet_bytes,
    visible_files,
)
from .storage import Storage


def is_schema_file(rel: str) -> bool:
    return "-schema-v" in posixpath.basename(rel)


def compact_table(storage: Storage, cache: FileCache, tdef: S.TableDef, min_files: int = 2) -> int:
    """Compact every partition of ``tdef`` that has ``min_files`` or more data files.

    Returns how many files were replaced. Tables whose rows are rules themselves (deletions,
    commits) are never compacted.
    """
    if tdef.name in ("deletions", "commits"):
        raise ValueError(f"table {tdef.name!r} is never compacted")
    state = commit_state(storage, cache)
    deletions = pl.from_arrow(read_files(storage, S.DELETIONS, cache, visible_files(storage, S.DELETIONS, cache, state=state))).lazy()
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
        # Replaced files are hidden from now on; their bytes can go.
        storage.delete_many(rels)
        cache.forget(rels)
        replaced += len(rels)
    return replaced
