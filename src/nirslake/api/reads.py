"""The store's reads of the lake: one listing (snapshot) per call, reused under a lease when
allowed, resolved tables cached by their file lists, single-key lookups without a scan.

The read rules themselves are the lake's (``lake.rules``); this module decides what to read and keeps it.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ..lake import schema as S
from ..lake.arrays import ARRAY_FIELDS, to_numpy
from ..lake.rules import _ENTITY_DELETIONS, Deleted, resolve, resolve_one
from ..lake.storage import Storage
from ..lake.tables import CLOCK, FileCache, Snapshot, lookup, polars_schema, read_files, take_snapshot, with_rows
from . import validation as V


def leasable(method: Callable) -> Callable:
    """Marks a read that may reuse the listing lease (``listing_ttl_seconds``). Every other call
    lists afresh: a write must not look for its parents, nor gc or check for references, in an
    old listing, and artifact bytes are not kept for a grace period as data files are."""

    @functools.wraps(method)
    def read(self: Any, *args: Any, **kwargs: Any) -> Any:
        scope = self._reads.lease_scope
        if not self._reads.listing_ttl or getattr(scope, "on", False):
            return method(self, *args, **kwargs)
        scope.on = True
        try:
            return method(self, *args, **kwargs)
        finally:
            scope.on = False

    return read


def listed_for(tdef: S.TableDef) -> tuple[str, ...] | None:
    """The tables a read of ``tdef`` lists (the commits and deletions come with any): its own,
    not all nine; on an object store each is a LIST request (issue 11). Arrays are shown only with
    their prediction (lake spec §5.4), so a read of them lists every table, predictions after."""
    return None if tdef is S.PREDICTION_ARRAYS else (tdef.name,)


class LakeReads:
    """What one store reads: ``publish_for_read`` runs before a call's listing, so a process
    always reads its own writes (lake spec §6)."""

    def __init__(self, storage: Storage, listing_ttl: float, publish_for_read: Callable[[], None]) -> None:
        self.storage = storage
        self.cache = FileCache()
        self.listing_ttl = float(listing_ttl)
        self.leases: dict[tuple[str, ...] | None, tuple[float, int, Snapshot]] = {}
        self.lease_scope = threading.local()  # .on while a read that may use a lease runs
        # Resolved tables by (table, dataset, visible files, deletion files): files never
        # change, so an entry is valid exactly while that file list is.
        self.resolved: dict[tuple, pl.DataFrame] = {}
        self.deleted: tuple[tuple[str, ...] | None, Deleted | None] = (None, None)
        self._publish_for_read = publish_for_read

    def snapshot(self, publish: bool = True, tables: tuple[str, ...] | None = None) -> Snapshot:
        """Publish this process's writes, then list the lake once for the reads of one call."""
        if publish:
            self._publish_for_read()
        if self.listing_ttl and getattr(self.lease_scope, "on", False):
            tables = None  # one listing of every table serves all reads of the lease: one state, whole
        snap = self._leased_snapshot(tables)
        if snap is None:
            # The lease counts from before the listing: the state it shows is that old.
            started, generation = time.monotonic(), self.storage.generation
            snap = take_snapshot(self.storage, self.cache, tables if tables is None else (*tables, "deletions"))
            if self.listing_ttl:
                self.leases[tables] = (started, generation, snap)
        deletion_rels = tuple(snap.table_files(S.DELETIONS))
        if self.deleted[0] != deletion_rels:
            table = read_files(self.storage, S.DELETIONS, self.cache, list(deletion_rels))
            self.deleted = (deletion_rels, Deleted.from_table(table))
        return snap

    def _leased_snapshot(self, tables: tuple[str, ...] | None) -> Snapshot | None:
        """A listing taken less than ``listing_ttl_seconds`` ago, with no write of ours since,
        for the reads marked ``@leasable`` only."""
        if not self.listing_ttl or not getattr(self.lease_scope, "on", False):
            return None
        for key in (tables, None):  # a listing of every table serves a read of a few
            lease = self.leases.get(key)
            if (
                lease is not None
                and lease[1] == self.storage.generation
                and time.monotonic() - lease[0] < self.listing_ttl
            ):
                return lease[2]
        return None

    def prefetch(self, tdefs: tuple[S.TableDef, ...], snap: Snapshot, dataset_name: str | None = None) -> None:
        """Decode the files of ``tdefs`` (of ``dataset_name``'s partition, for a partitioned one)
        in ``snap`` not decoded yet, all in one round, for a caller that reads those tables next:
        each first read of a table alone pays polars' fixed cost again. Only the decoding is
        shared: each read still lists and applies the rules on its own."""
        files = []
        for tdef in tdefs:
            part = dataset_name if (dataset_name is not None and tdef.partition_by) else ...
            files += [(rel, tdef) for rel in with_rows(snap.table_files(tdef, part))]
        self.cache.frames_of(self.storage, files)

    def frame(self, tdef: S.TableDef, dataset_name: str | None = None, snap: Snapshot | None = None) -> pl.LazyFrame:
        """The table's current rows (read rules applied), after publishing this process's writes.

        The resolved table is cached until a file of the table, or a deletion, comes or goes.
        """
        return self.table(tdef, dataset_name, snap).lazy()

    def table(self, tdef: S.TableDef, dataset_name: str | None = None, snap: Snapshot | None = None) -> pl.DataFrame:
        """``frame`` as the frame in memory it is, for eager work on it (a lazy query over a
        frame of a few thousand rows costs more in planning than in running)."""
        snap = snap or self.snapshot(tables=listed_for(tdef))
        return self.frames((tdef,), snap, dataset_name)[0]

    def frames(
        self, tdefs: tuple[S.TableDef, ...], snap: Snapshot, dataset_name: str | None = None
    ) -> list[pl.DataFrame]:
        """``frame`` of several tables of one snapshot, their files decoded in one round and
        their rules run in one ``collect_all``: each round and each query has a fixed cost in
        polars that a read of a few small tables (a nirs4all reload) otherwise pays per table."""
        deletion_rels = snap.table_files(S.DELETIONS)
        keys, missing = [], {}
        for tdef in tdefs:
            part = dataset_name if (dataset_name is not None and tdef.partition_by) else ...
            rels = snap.table_files(tdef, part)
            key = (tdef.name, dataset_name, tuple(rels), tuple(deletion_rels))
            keys.append(key)
            if key not in self.resolved:
                missing[key] = (tdef, part, with_rows(rels))
        if missing:
            deletion_data = with_rows(deletion_rels)
            decoded = self.cache.frames_of(
                self.storage,
                [(rel, S.DELETIONS) for rel in deletion_data]
                + [(rel, tdef) for tdef, _, data in missing.values() for rel in data],
            )
            deletions = pl.concat(decoded[: len(deletion_data)]) if deletion_data else None
            # No deletion records (the common case): nothing to join them with.
            live = None if deletions is None or deletions.height == 0 else deletions.lazy()
            done, plans, at = {}, {}, len(deletion_data)
            for key, (tdef, part, data) in missing.items():
                pieces, at = decoded[at: at + len(data)], at + len(data)
                raw = pl.concat(pieces) if pieces else pl.DataFrame(schema=polars_schema(tdef))
                # Most tables hold each key once (a sweep rarely re-saves): then there is no version to pick.
                keys_unique = tdef.version_column is not None and raw[tdef.key].n_unique() == raw.height
                if part is not ... and raw["dataset_name"].eq_missing(dataset_name).all():
                    part = ...  # the partition's files hold its rows only (as written): no filter, no copy
                if live is None and part is ... and (keys_unique or tdef.version_column is None):
                    done[key] = raw  # no rule has anything to do: the rows as read (no query to run)
                    continue
                frame = raw.lazy()
                if part is not ...:
                    frame = frame.filter(pl.col("dataset_name") == dataset_name)
                plans[key] = resolve(frame, tdef, live, keys_unique)
            if plans:
                done.update(zip(plans, pl.collect_all(list(plans.values()))))
            names = {key[:2] for key in missing}
            self.resolved = {k: v for k, v in self.resolved.items() if k[:2] not in names}
            self.resolved.update(done)
        return [self.resolved[key] for key in keys]

    def row(
        self, tdef: S.TableDef, key: str, dataset_name: str | None = None, snap: Snapshot | None = None
    ) -> dict | None:
        """The current row of one key, found through per-file key positions (or row-group
        statistics for arrays) instead of a scan."""
        snap = snap or self.snapshot(tables=listed_for(tdef))
        part = dataset_name if (dataset_name is not None and tdef.partition_by) else ...
        rels = snap.table_files(tdef, part)
        if tdef.row_group_bytes:
            rows = lookup(self.storage, tdef, self.cache, rels, {key})
        else:
            rows = self.cache.key_rows(self.storage, with_rows(rels), tdef, key)
        _observe_stamps(rows, tdef, self.deleted[1], key)
        return resolve_one(rows, tdef, self.deleted[1])

    def arrays(self, prediction_id: str, dataset_name: str, snap: Snapshot) -> dict[str, np.ndarray | None]:
        """A prediction's arrays as numpy, each None when it has none."""
        stored = self.row(S.PREDICTION_ARRAYS, prediction_id, dataset_name=dataset_name, snap=snap)
        if stored is None:
            return {f: None for f in ARRAY_FIELDS}
        return {f: to_numpy(f, stored[f], stored["y_proba_classes"]) for f in ARRAY_FIELDS}


def public(frame: pl.DataFrame) -> pl.DataFrame:
    """A frame without the lake's own columns (``_version``, a chain's ``artifact_ids``)."""
    return frame.drop([c for c in ("_version", "artifact_ids") if c in frame.columns])


def _observe_stamps(rows: pa.Table, tdef: S.TableDef, deleted: Deleted, key: str) -> None:
    """Move this process's clock past every stamp of ``key`` it just read (rows and deletion),
    so what it writes next about that key (a new version, a re-save, a deletion) is later than
    all of it even when the writer of those rows had a clock ahead of ours (lake spec §5)."""
    column = tdef.version_column or ("created_at" if "created_at" in rows.column_names else None)
    if rows.num_rows and column is not None:
        CLOCK.observe(pc.max(rows.column(column).cast(pa.int64())).as_py())
    if tdef.name in _ENTITY_DELETIONS:
        died = deleted.entities.get((_ENTITY_DELETIONS[tdef.name][0], key))
        if died is not None:
            CLOCK.observe(died)


def exact_dataset(dataset_name: str | None) -> str | None:
    """The one partition a ``dataset_name`` filter reads, or None (no filter, or a ``%`` pattern:
    every partition, filtered by ``filter_exprs``)."""
    return dataset_name if (dataset_name is not None and "%" not in dataset_name) else None


def filter_exprs(filters: dict[str, Any]) -> list[pl.Expr]:
    """polars expressions for equality / LIKE filters; values are data, never SQL text."""
    exprs = []
    for column, value in filters.items():
        if value is None:
            continue
        if column == "fold_id":
            value = V.fold_id(value)
        if column == "branch_id":
            exprs.append(pl.col(column) == V.opt_int("branch_id", value))
            continue
        V.text(column, value)
        if "%" in value:
            pattern = "(?s)^" + ".*".join(re.escape(p) for p in value.split("%")) + "$"
            exprs.append(pl.col(column).str.contains(pattern))
        else:
            exprs.append(pl.col(column) == value)
    return exprs


def log_summary(pipelines: pl.LazyFrame, logs: pl.LazyFrame) -> pl.DataFrame:
    """One row per pipeline: log count, total ``end`` duration, warnings, errors (pipelines without logs count 0)."""
    per_pipeline = logs.group_by("pipeline_id").agg(
        pl.len().alias("log_count"),
        pl.col("duration_ms").filter(pl.col("event") == "end").sum().alias("total_duration_ms"),
        ((pl.col("level") == "warning") | (pl.col("event") == "warning")).sum().alias("warning_count"),
        ((pl.col("level") == "error") | (pl.col("event") == "error")).sum().alias("error_count"),
    )
    return (
        pipelines.join(per_pipeline, on="pipeline_id", how="left")
        .with_columns(
            pl.col("log_count").fill_null(0).cast(pl.Int64),
            pl.col("total_duration_ms").fill_null(0.0),
            pl.col("warning_count").fill_null(0).cast(pl.Int64),
            pl.col("error_count").fill_null(0).cast(pl.Int64),
        )
        .sort("created_at")
        .drop("created_at")
        .collect()
    )
