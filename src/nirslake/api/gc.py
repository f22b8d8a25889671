"""Garbage collection of artifacts (lake spec §7): which artifacts no live chain holds, and the
removal of their bytes once their deletion records are published.

Deletion records always land before bytes go: a crash leaves orphan bytes, never a dangling record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import polars as pl

from ..lake import artifacts as art
from ..lake import schema as S
from ..lake.storage import Storage
from . import records

if TYPE_CHECKING:
    from ..store import WorkspaceStore


def is_object(path: str) -> bool:
    """True for bytes the store manages under ``objects/`` (registered files are never deleted)."""
    return path.startswith(art.OBJECTS_DIR + "/")


def unheld_artifacts(
    storage: Storage, frame: Callable[[S.TableDef], pl.LazyFrame], cutoff: int
) -> tuple[list[dict], pl.DataFrame]:
    """The artifacts to remove (no live chain holds them; recorded and saved before ``cutoff``, µs),
    and every current artifact record. ``frame`` reads a table with the read rules applied."""
    # Chains other writers made durable but have not published hold artifacts too
    # (ours are published first). Read before the lake: a segment published meanwhile
    # is then seen in one or the other.
    held, _ = art.unpublished_references(storage)
    live_pipelines = frame(S.PIPELINES).filter(pl.col("status") != "failed").select("pipeline_id")
    held |= set(
        frame(S.CHAINS)
        .join(live_pipelines, on="pipeline_id", how="semi")
        .select(pl.col("artifact_ids").explode())
        .drop_nulls()
        .collect()["artifact_ids"]
        .to_list()
    )
    artifacts = frame(S.ARTIFACTS).collect()
    unheld = artifacts.filter(~pl.col("artifact_id").is_in(list(held)) & (pl.col("created_at").dt.epoch("us") < cutoff))
    candidates = unheld.rows(named=True)
    if storage.is_local or sum(map(is_object, unheld["path"])) <= artifacts.height // 1000 + 1:
        modified = storage.modified_us
    else:  # one listing of objects/ (a page per 1,000 objects) costs less than a HEAD each
        modified = storage.list_modified(art.OBJECTS_DIR).get
    doomed = [row for row in candidates if not is_object(row["path"]) or (modified(row["path"]) or 0) < cutoff]
    return doomed, artifacts


def remove_bytes(storage: Storage, doomed: list[dict], artifacts: pl.DataFrame, cutoff: int) -> list[dict]:
    """Delete the objects only ``doomed`` artifacts point at; returns the doomed artifacts whose
    object another writer saved again meanwhile (kept, to be recorded anew)."""
    doomed_ids = {row["artifact_id"] for row in doomed}
    kept_paths = set(artifacts.filter(~pl.col("artifact_id").is_in(list(doomed_ids)))["path"].to_list())
    revived = []
    for rel in {row["path"] for row in doomed} - kept_paths:
        if is_object(rel) and not art.remove_object(storage, rel, cutoff):
            # Saved again by another writer since we looked (its record is not published
            # yet, and the deletion above hides records up to now): keep the bytes and
            # record the artifact anew, so that writer's chain still finds it.
            revived += [row for row in doomed if row["path"] == rel]
    return revived


def gc_artifacts(store: WorkspaceStore, cutoff: int) -> int:
    """``WorkspaceStore.gc_artifacts`` after the store published its writes: the deletion records
    land first, then the bytes go, then artifacts saved again meanwhile are recorded anew."""
    doomed, artifacts = unheld_artifacts(store.storage, store._reads.frame, cutoff)
    if not doomed:
        return 0
    store._known.artifacts.difference_update(row["artifact_id"] for row in doomed)
    # The deletion records land first: a crash after this leaves orphan bytes, never a
    # record pointing at missing bytes.
    store._delete("artifact", [row["artifact_id"] for row in doomed])
    revived = remove_bytes(store.storage, doomed, artifacts, cutoff)
    store._known.artifacts.update(row["artifact_id"] for row in revived)
    for row in revived:
        store._buffer("artifacts", records.renewed_artifact_row(row))
    if revived:
        store._publish()
    return len(doomed) - len(revived)
