"""``WorkspaceStore``: the nirs4all store API over the lake (docs/lake-spec.md).

Writes buffer in memory, become durable in the writer's journal at each durability point and
are published as immutable Parquet files in bulk; reads publish first, then apply the lake's
read rules, so a process always sees its own writes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from . import catalog
from . import artifacts as art
from . import schema as S
from .arrays import ARRAY_FIELDS, check_arrays, to_numpy
from .query import _ENTITY_DELETIONS, Deleted, resolve, resolve_one, top_k, with_scores
from .scores import METRICS
from .storage import Storage
from .tables import (
    CLOCK,
    FileCache,
    Snapshot,
    lookup,
    new_id,
    read_files,
    schema_file,
    take_snapshot,
    to_parquet_bytes,
)
from .writer import (
    DEFAULT_FLUSH_BYTES,
    DEFAULT_FLUSH_ROWS,
    DEFAULT_FLUSH_SECONDS,
    LakeWriter,
    flush_left_open,
    recover_orphans,
)

if TYPE_CHECKING:
    from .check import CheckReport
    from .maintenance import CompactionResult

# How long gc_artifacts and vacuum leave alone what another writer or reader may still use.
DEFAULT_GRACE_SECONDS = 3600.0

# Limits on one call's values (docs/bad-input.md). Far above real use, so they only stop a
# mistake (a spectra matrix passed as a config, a file's text as a name) at the call, before it
# bloats every later read of the table; checked before any conversion.
MAX_NAME_CHARS = 65_536  # one name, class, label or id
MAX_JSON_CHARS = 8 * 1024 * 1024  # one JSON field (config, scores, ...; ASCII, so also bytes) or free text (error, message)
MAX_ARRAY_VALUES = 2**24  # one per-sample array (y_proba counts samples x classes): 128 MiB of float64

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# polars counts rows in 32 bits: no frame holds more, so a larger limit, offset or n means the same.
MAX_ROWS = 2**32 - 1

# A metric name of a ``scores`` dict that ``top_predictions`` may rank by: a plain identifier.
_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREDICTION_FILTERS = ("dataset_name", "model_class", "partition", "fold_id", "branch_id", "pipeline_id", "run_id")
# save_prediction's arguments, in order: the fields of a save_predictions record (with the arrays).
_PREDICTION_FIELDS = (
    "pipeline_id", "chain_id", "dataset_name", "model_name", "model_class", "fold_id", "partition", "val_score",
    "test_score", "train_score", "metric", "task_type", "n_samples", "n_features", "scores", "best_params",
    "branch_id", "branch_name", "exclusion_count", "exclusion_rate", "preprocessings", "prediction_id",
)
_FIELD_DEFAULTS = tuple((f, "" if f == "preprocessings" else None) for f in _PREDICTION_FIELDS)
_RECORD_FIELDS = frozenset(_PREDICTION_FIELDS) | frozenset(ARRAY_FIELDS)
_REQUIRED_FIELDS = frozenset({"pipeline_id", "chain_id", "dataset_name"})


def _json(value: Any, field: str) -> str | None:
    """Strict JSON: NaN and infinities become null (Python's json would write invalid ``NaN``)."""
    if value is None:
        return None
    if not value and isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    try:
        try:
            text = json.dumps(value, default=_json_default, allow_nan=False)
        except ValueError as exc:  # a NaN or infinity somewhere: rare, so only then walk the value
            if "ircular" in str(exc):  # a value that contains itself: walking it would never end
                raise
            text = json.dumps(_finite(value), default=_json_default, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{field} must be JSON-serialisable: {exc}") from None
    return _sized(field, text, MAX_JSON_CHARS)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.floating):
        return _finite(float(value))
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (datetime, Path)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _unjson(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _opt_float(name: str, value: Any) -> float | None:
    """A float, or None; NaN is stored as null so it ranks last (infinities are kept)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a number or None, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or None, got {value!r}") from None
    except OverflowError:  # an integer beyond float64 (10**400): not an infinity, so not kept as one
        raise ValueError(f"{name} is out of range for a 64-bit float: an integer of {len(str(abs(int(value))))} digits") from None
    return None if math.isnan(number) else number


def _opt_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise TypeError(f"{name} must be an integer or None, got {value!r}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise TypeError(f"{name} must be an integer or None, got {value!r}")
    number = int(value)
    if not -(2**63) <= number < 2**63:  # caught here, not when the journal is published
        raise ValueError(f"{name} is out of range for a 64-bit integer: {number}")
    return number


def _count(name: str, value: Any, allow_none: bool = False) -> int | None:
    """A limit or offset: a non-negative integer (or None where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative integer{' or None' if allow_none else ''}, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return min(int(value), MAX_ROWS)


def _fold_id(value: Any) -> str | None:
    """Fold ids are stored as text: ``0`` and ``"0"`` are one fold."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise TypeError(f"fold_id must be a string or an integer, got {type(value).__name__}")
    return _text("fold_id", str(value))


def _array_size(name: str, value: Any) -> None:
    """Refuse an array of more than ``MAX_ARRAY_VALUES`` values, from its shape or length alone."""
    shape = getattr(value, "shape", None)
    try:
        size = math.prod(shape) if isinstance(shape, tuple) else len(value)
    except TypeError:  # None, a scalar, an iterator: check_arrays says what is wrong with it
        return
    if size > MAX_ARRAY_VALUES:
        raise ValueError(f"{name} is too large: {size:,} values (the limit is {MAX_ARRAY_VALUES:,})")


def _mapping(name: str, value: Any) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict or None, got {type(value).__name__}")
    return value


def _leasable(method: Callable) -> Callable:
    """Marks a read that may reuse the listing lease (``listing_ttl_seconds``). Every other call
    lists afresh: a write must not look for its parents, nor gc or check for references, in an
    old listing, and artifact bytes are not kept for a grace period as data files are."""

    @functools.wraps(method)
    def read(self: WorkspaceStore, *args: Any, **kwargs: Any) -> Any:
        scope = self._lease_scope
        if not self._listing_ttl or getattr(scope, "on", False):
            return method(self, *args, **kwargs)
        scope.on = True
        try:
            return method(self, *args, **kwargs)
        finally:
            scope.on = False

    return read


def _text(name: str, value: Any, allow_none: bool = True) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return _sized(name, value, MAX_NAME_CHARS)


def _free_text(name: str, value: Any) -> str | None:
    """Text callers may pass as any object (an exception as ``error``): kept as ``str(value)``."""
    return None if value is None else _sized(name, str(value), MAX_JSON_CHARS)


def _sized(name: str, text: str, limit: int) -> str:
    """``text`` if it fits ``limit`` characters and Parquet can store it (UTF-8)."""
    if len(text) > limit:
        raise ValueError(f"{name} is too large: {len(text):,} characters (the limit is {limit:,})")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a file name that is not UTF-8
            raise ValueError(
                f"{name} is not valid Unicode text ({exc.reason} at position {exc.start}); Parquet stores UTF-8"
            ) from None
    return text


def _with_suffix(output_path: str | os.PathLike, suffix: str) -> Path:
    path = Path(output_path)
    return path if path.suffix else path.with_suffix(suffix)


class _Recent(OrderedDict):
    """A dict of the most recently set entries only: what this process wrote lately, so hot-path
    writes find their parent without a lake read while memory does not grow with the workspace.
    A key that fell out is looked up in the lake again."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)


# Every store of this process: a forked child gives each fresh locks, since a thread of the
# parent that held one at the fork does not exist in the child and would never release it.
_STORES: weakref.WeakSet[WorkspaceStore] = weakref.WeakSet()


def _fresh_locks_in_child() -> None:
    for store in list(_STORES):
        store._lock = threading.RLock()
        store._cache.after_fork()


os.register_at_fork(after_in_child=_fresh_locks_in_child)


class WorkspaceStore:
    """The workspace store of nirs4all, kept as an open lake.

    ``workspace_path`` is a local folder or an fsspec URL (``s3://bucket/prefix``); it is
    created when missing. Per-record writes are buffered; ``flush()``, ``complete_pipeline``,
    ``fail_pipeline``, ``complete_run``, ``fail_run`` and ``close()`` are durability points:
    once one returns, everything saved before it survives a crash of the process (with
    ``fsync=True``, also a crash of the machine). Other processes see the records once they are
    published as Parquet: at ``flush()``, ``close()`` and any read, and at the first durability
    point after the journal reaches ``flush_bytes`` or ``flush_seconds`` of age (lake spec §6).
    One instance may be shared by threads; any number of processes may write one workspace.

    ``grace_seconds`` protects what another writer may still be using: ``gc_artifacts`` keeps
    artifacts recorded more recently than that, and ``vacuum`` keeps the bytes of files hidden
    more recently than that (lake spec §4, §7).

    ``listing_ttl_seconds`` (default 0: every read lists the lake) lets reads reuse the lake's
    listing for that long, as long as this store has not written since: on an object store,
    where a listing is a request or two per call, a loop of point reads then costs no listing
    per call. A reused listing is an earlier consistent state of the lake; what other
    processes published after it shows up once it expires (docs/remote.md).
    """

    def __init__(
        self,
        workspace_path: str | os.PathLike,
        storage_options: dict | None = None,
        flush_bytes: int = DEFAULT_FLUSH_BYTES,
        flush_rows: int = DEFAULT_FLUSH_ROWS,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        fsync: bool = False,
        listing_ttl_seconds: float = 0.0,
    ) -> None:
        for name, value in (("grace_seconds", grace_seconds), ("flush_seconds", flush_seconds)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, value in (("flush_bytes", flush_bytes), ("flush_rows", flush_rows)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ttl = listing_ttl_seconds
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl < 0:
            raise ValueError(f"listing_ttl_seconds must be a finite number >= 0, got {ttl!r}")
        if ttl > grace_seconds / 2:
            raise ValueError(
                f"listing_ttl_seconds ({ttl}) must be at most half of grace_seconds ({grace_seconds}): a listing "
                "kept longer could name files that vacuum has since deleted"
            )
        self._storage = Storage(workspace_path, storage_options, fsync=fsync)
        self._listing_ttl = float(listing_ttl_seconds)
        self._leases: dict[tuple[str, ...] | None, tuple[float, int, Snapshot]] = {}
        self._lease_scope = threading.local()  # .on while a read that may use a lease runs
        self._workspace_path: Path | str = (
            Path(self._storage.root) if self._storage.is_local else os.fspath(workspace_path)
        )
        self._lock = threading.RLock()
        self._cache = FileCache()
        # Resolved tables by (table, dataset, visible files, deletion files): files never
        # change, so an entry is valid exactly while that file list is.
        self._resolved: dict[tuple, pl.DataFrame] = {}
        self._deleted: tuple[tuple[str, ...] | None, Deleted | None] = (None, None)
        self._writer = LakeWriter(self._storage, flush_bytes, flush_rows, flush_seconds)
        self._grace_us = int(grace_seconds * 1e6)
        # What this process wrote, so hot-path writes never scan the lake to find a parent.
        self._known_runs: _Recent = _Recent(1_000)
        self._known_pipelines: _Recent = _Recent(10_000)
        self._known_chains: _Recent = _Recent(10_000)  # id -> pipeline_id
        self._known_predictions: _Recent = _Recent(100_000)  # id -> (run_id, dataset_name, created µs)
        self._known_artifacts: set[str] = set()
        self._closed = False
        self._init_workspace()
        # A store dropped or left open at exit still writes what it buffered (never silently lost).
        self._finalizer = weakref.finalize(self, flush_left_open, self._writer, repr(self))
        _STORES.add(self)

    # ------------------------------------------------------------------ lifetime
    @property
    def workspace_path(self) -> Path | str:
        """The workspace: a ``Path`` for a local folder, the URL otherwise."""
        return self._workspace_path

    @property
    def storage(self) -> Storage:
        return self._storage

    def _init_workspace(self) -> None:
        # One empty file per table fixes its schema for engines that glob the lake, so every
        # view works (and returns no rows) before anything was written.
        for tdef in S.TABLES.values():
            rel = schema_file(tdef)
            if not self._storage.exists(rel):
                self._storage.publish(rel, to_parquet_bytes(tdef.schema.empty_table()), exists_ok=True)
        try:
            catalog.ensure_catalog(self._storage)
        except catalog.CatalogError as exc:
            # The store reads the lake, not the catalog: a damaged file must not lock everyone
            # out, least of all `nirslake check`, which names it.
            warnings.warn(f"{exc}. The store opens without a current catalog.", RuntimeWarning, stacklevel=3)
        # Records a crashed writer made durable but never published (lake spec §6).
        recover_orphans(self._storage)

    def close(self) -> None:
        """Flush what is buffered and release the store. Idempotent."""
        with self._lock:
            if self._closed:
                return
            # Closed only once the buffer is written: a failed flush leaves the store open, so
            # close() can be retried and the exit hook still holds the rows.
            self._publish()
            self._closed = True
            self._finalizer.detach()

    def __enter__(self) -> WorkspaceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WorkspaceStore({str(self._workspace_path)!r})"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this WorkspaceStore is closed; open a new WorkspaceStore(workspace) to continue")

    def flush(self) -> None:
        """Publish every record saved so far as Parquet files, visible to every reader: a durability point."""
        with self._lock:
            self._check_open()
            self._publish()

    def _publish(self) -> None:
        self._writer.publish()

    def _buffer(self, table: str, row: dict) -> None:
        self._writer.add(table, row)

    # ------------------------------------------------------------------ reading
    def _publish_for_read(self) -> None:
        """Publish this store's writes and what other stores of this process acknowledged: one
        process reads what any of its stores acknowledged (lake spec §6)."""
        self._publish()
        self._writer.publish_process_writers()

    def _snapshot(self, publish: bool = True, tables: tuple[str, ...] | None = None) -> Snapshot:
        """Publish this process's writes, then list the lake once for the reads of one call."""
        if publish:
            self._publish_for_read()
        snap = self._leased_snapshot(tables)
        if snap is None:
            # The lease counts from before the listing: the state it shows is that old.
            started, generation = time.monotonic(), self._storage.generation
            snap = take_snapshot(self._storage, self._cache, tables if tables is None else (*tables, "deletions"))
            if self._listing_ttl:
                self._leases[tables] = (started, generation, snap)
        deletion_rels = tuple(snap.table_files(S.DELETIONS))
        if self._deleted[0] != deletion_rels:
            table = read_files(self._storage, S.DELETIONS, self._cache, list(deletion_rels))
            self._deleted = (deletion_rels, Deleted.from_table(table))
        return snap

    def _leased_snapshot(self, tables: tuple[str, ...] | None) -> Snapshot | None:
        """A listing taken less than ``listing_ttl_seconds`` ago, with no write of ours since,
        for the reads marked ``@_leasable`` only."""
        if not self._listing_ttl or not getattr(self._lease_scope, "on", False):
            return None
        for key in (tables, None):  # a listing of every table serves a read of a few
            lease = self._leases.get(key)
            if (
                lease is not None
                and lease[1] == self._storage.generation
                and time.monotonic() - lease[0] < self._listing_ttl
            ):
                return lease[2]
        return None

    def _frame(self, tdef: S.TableDef, dataset_name: str | None = None, snap: Snapshot | None = None) -> pl.LazyFrame:
        """The table's current rows (read rules applied), after publishing this process's writes.

        The resolved table is cached until a file of the table, or a deletion, comes or goes.
        """
        snap = snap or self._snapshot()
        part = dataset_name if (dataset_name is not None and tdef.partition_by) else ...
        rels = snap.table_files(tdef, part)
        deletion_rels = snap.table_files(S.DELETIONS)
        cache_key = (tdef.name, dataset_name, tuple(rels), tuple(deletion_rels))
        if cache_key in self._resolved:
            return self._resolved[cache_key].lazy()
        deletions = pl.from_arrow(read_files(self._storage, S.DELETIONS, self._cache, deletion_rels)).lazy()
        raw = pl.from_arrow(read_files(self._storage, tdef, self._cache, rels))
        # Most tables hold each key once (a sweep rarely re-saves): then there is no version to pick.
        keys_unique = tdef.version_column is not None and raw[tdef.key].n_unique() == raw.height
        frame = raw.lazy()
        if part is not ...:
            frame = frame.filter(pl.col("dataset_name") == dataset_name)
        resolved = resolve(frame, tdef, deletions, keys_unique).collect()
        self._resolved = {k: v for k, v in self._resolved.items() if k[:2] != cache_key[:2]}
        self._resolved[cache_key] = resolved
        return resolved.lazy()

    def _row(
        self, tdef: S.TableDef, key: str, dataset_name: str | None = None, snap: Snapshot | None = None
    ) -> dict | None:
        """The current row of one key, found through per-file key positions (or row-group
        statistics for arrays) instead of a scan."""
        snap = snap or self._snapshot()
        part = dataset_name if (dataset_name is not None and tdef.partition_by) else ...
        rels = snap.table_files(tdef, part)
        if tdef.row_group_rows:
            rows = lookup(self._storage, tdef, self._cache, rels, {key})
        else:
            pieces = []
            for rel in rels:
                positions = self._cache.positions(self._storage, rel, tdef).get(key)
                if positions:
                    pieces.append(self._cache.read(self._storage, rel, tdef.schema).take(positions))
            rows = pa.concat_tables(pieces) if pieces else tdef.schema.empty_table()
        _observe_stamps(rows, tdef, self._deleted[1], key)
        return resolve_one(rows, tdef, self._deleted[1])

    def _public(self, frame: pl.DataFrame) -> pl.DataFrame:
        return frame.drop([c for c in ("_version", "artifact_ids") if c in frame.columns])

    def _require_run(self, run_id: str) -> dict:
        _text("run_id", run_id, allow_none=False)
        row = self._known_runs.get(run_id) or self._row(S.RUNS, run_id)
        if row is None:
            raise KeyError(f"unknown run_id {run_id!r}")
        self._known_runs[run_id] = row
        return row

    def _require_pipeline(self, pipeline_id: str) -> dict:
        _text("pipeline_id", pipeline_id, allow_none=False)
        row = self._known_pipelines.get(pipeline_id) or self._row(S.PIPELINES, pipeline_id)
        if row is None:
            raise KeyError(f"unknown pipeline_id {pipeline_id!r}")
        self._known_pipelines[pipeline_id] = row
        return row

    def _require_chain(self, chain_id: str, pipeline_id: str) -> None:
        """A prediction's chain exists and is one of its pipeline's."""
        owner = self._known_chains.get(chain_id)
        if owner is None:
            row = self._row(S.CHAINS, chain_id)
            if row is None:
                raise KeyError(f"unknown chain_id {chain_id!r}")
            owner = self._known_chains[chain_id] = row["pipeline_id"]
        if owner != pipeline_id:
            raise ValueError(f"chain_id {chain_id!r} belongs to pipeline {owner!r}, not to pipeline_id {pipeline_id!r}")

    def _stored_owners(self, prediction_ids: list) -> dict[str, tuple[str, str, int]]:
        """``_prediction_owner`` of many ids at once: one listing, and only the ids some file
        holds are read (a batch of fresh ids costs a dict lookup per file each)."""
        wanted = {p for p in prediction_ids if isinstance(p, str) and p}
        owners = {p: self._known_predictions[p] for p in wanted if p in self._known_predictions}
        unknown = wanted - set(owners)
        if unknown:
            snap = self._snapshot(publish=False, tables=("predictions",))
            held = set()
            for rel in snap.table_files(S.PREDICTIONS):
                held |= unknown & self._cache.positions(self._storage, rel, S.PREDICTIONS).keys()
            for pid in held:
                owner = self._prediction_owner(pid, snap)
                if owner is not None:
                    owners[pid] = owner
        return owners

    def _prediction_owner(self, prediction_id: str, snap: Snapshot | None = None) -> tuple[str, str, int] | None:
        """(run_id, dataset_name, created µs) of a prediction; looked up without flushing (in
        ``snap``, a listing of the predictions, when given), then remembered."""
        _text("prediction_id", prediction_id, allow_none=False)
        owner = self._known_predictions.get(prediction_id)
        if owner is None:
            row = self._row(S.PREDICTIONS, prediction_id, snap=snap or self._snapshot(publish=False, tables=("predictions",)))
            if row is None:
                return None
            created = (row["created_at"] - _EPOCH) // timedelta(microseconds=1)
            owner = self._known_predictions[prediction_id] = (row["run_id"], row["dataset_name"], created)
        return owner

    # ------------------------------------------------------------------ runs
    def begin_run(self, name: str, config: Any, datasets: list[dict]) -> str:
        """Start a run over ``datasets``; returns its new id. Status ``running``."""
        with self._lock:
            self._check_open()
            _text("name", name, allow_none=False)
            if not isinstance(datasets, (list, tuple)):
                raise TypeError(f"datasets must be a list of dicts, got {type(datasets).__name__}")
            now = CLOCK.now_us()
            row = {
                "run_id": new_id(),
                "name": name,
                "config": _json(config, "config"),
                "datasets": _json(list(datasets), "datasets"),
                "status": "running",
                "created_at": now,
                "completed_at": None,
                "summary": None,
                "error": None,
                "_version": now,
            }
            self._known_runs[row["run_id"]] = row
            self._buffer("runs", row)
            return row["run_id"]

    def _finish(self, table: str, key: str, **changes: Any) -> None:
        """Append the run's or pipeline's next version (a new status) and make it durable."""
        with self._lock:
            self._check_open()
            require, known = (
                (self._require_run, self._known_runs) if table == "runs" else (self._require_pipeline, self._known_pipelines)
            )
            row = dict(require(key))
            now = CLOCK.now_us()
            row.update(changes, completed_at=now, _version=now)
            known[key] = row
            self._buffer(table, row)
            self._writer.commit()

    def complete_run(self, run_id: str, summary: dict) -> None:
        """Mark the run ``completed`` with its summary: a durability point."""
        self._finish("runs", run_id, status="completed", summary=_json(summary, "summary"))

    def fail_run(self, run_id: str, error: str) -> None:
        """Mark the run ``failed`` and keep ``error``: a durability point."""
        self._finish("runs", run_id, status="failed", error=_free_text("error", error))

    @_leasable
    def get_run(self, run_id: str) -> dict | None:
        """The run as a dict (JSON fields decoded), or None."""
        _text("run_id", run_id, allow_none=False)
        with self._lock:
            self._check_open()
            row = self._row(S.RUNS, run_id)
        if row is None:
            return None
        row.pop("_version", None)
        for key in ("config", "datasets", "summary"):
            row[key] = _unjson(row[key])
        return row

    @_leasable
    def list_runs(self, status: str | None = None, dataset: str | None = None, limit: int = 100, offset: int = 0) -> pl.DataFrame:
        """Runs, newest first, optionally by status and by a dataset name they mention."""
        _text("status", status)
        _text("dataset", dataset)
        limit, offset = _count("limit", limit, allow_none=True), _count("offset", offset)
        with self._lock:
            self._check_open()
            frame = self._frame(S.RUNS)
        if status is not None:
            frame = frame.filter(pl.col("status") == status)
        if dataset is not None:
            frame = frame.filter(pl.col("datasets").str.contains(json.dumps(dataset), literal=True))
        frame = frame.sort(["created_at", "run_id"], descending=True).slice(offset, limit)
        return self._public(frame.collect())

    # ------------------------------------------------------------------ pipelines
    def begin_pipeline(
        self,
        run_id: str,
        name: str,
        expanded_config: Any,
        generator_choices: Any,
        dataset_name: str,
        dataset_hash: str,
    ) -> str:
        """Start a pipeline of ``run_id`` on one dataset; returns its new id."""
        with self._lock:
            self._check_open()
            self._require_run(run_id)
            _text("dataset_name", dataset_name, allow_none=False)
            now = CLOCK.now_us()
            row = {
                "pipeline_id": new_id(),
                "run_id": run_id,
                "name": _text("name", name),
                "expanded_config": _json(expanded_config, "expanded_config"),
                "generator_choices": _json(generator_choices, "generator_choices"),
                "dataset_name": dataset_name,
                "dataset_hash": _free_text("dataset_hash", dataset_hash),
                "status": "running",
                "created_at": now,
                "completed_at": None,
                "best_val": None,
                "best_test": None,
                "metric": None,
                "duration_ms": None,
                "error": None,
                "_version": now,
            }
            self._known_pipelines[row["pipeline_id"]] = row
            self._buffer("pipelines", row)
            return row["pipeline_id"]

    def complete_pipeline(self, pipeline_id: str, best_val: float, best_test: float, metric: str, duration_ms: int) -> None:
        """Mark the pipeline ``completed`` with its best scores: a durability point."""
        self._finish(
            "pipelines",
            pipeline_id,
            status="completed",
            best_val=_opt_float("best_val", best_val),
            best_test=_opt_float("best_test", best_test),
            metric=_text("metric", metric),
            duration_ms=_opt_int("duration_ms", duration_ms),
        )

    def fail_pipeline(self, pipeline_id: str, error: str) -> None:
        """Mark the pipeline ``failed``: its chains stop holding artifacts. A durability point."""
        self._finish("pipelines", pipeline_id, status="failed", error=_free_text("error", error))

    @_leasable
    def get_pipeline(self, pipeline_id: str) -> dict | None:
        """The pipeline as a dict (JSON fields decoded), or None."""
        _text("pipeline_id", pipeline_id, allow_none=False)
        with self._lock:
            self._check_open()
            row = self._row(S.PIPELINES, pipeline_id)
        if row is None:
            return None
        row.pop("_version", None)
        for key in ("expanded_config", "generator_choices"):
            row[key] = _unjson(row[key])
        return row

    @_leasable
    def list_pipelines(self, run_id: str | None = None, dataset_name: str | None = None) -> pl.DataFrame:
        """Pipelines, newest first, optionally of one run and/or one dataset."""
        _text("run_id", run_id)
        _text("dataset_name", dataset_name)
        with self._lock:
            self._check_open()
            frame = self._frame(S.PIPELINES)
        if run_id is not None:
            frame = frame.filter(pl.col("run_id") == run_id)
        if dataset_name is not None:
            frame = frame.filter(pl.col("dataset_name") == dataset_name)
        return self._public(frame.sort(["created_at", "pipeline_id"], descending=True).collect())

    # ------------------------------------------------------------------ chains
    def save_chain(
        self,
        pipeline_id: str,
        steps: list[dict],
        model_step_idx: int,
        model_class: str,
        preprocessings: str,
        fold_strategy: str,
        fold_artifacts: dict,
        shared_artifacts: dict,
        branch_path: list | None = None,
        source_index: int | None = None,
    ) -> str:
        """Record the steps and fitted artifacts that produced a pipeline's predictions; returns its id."""
        with self._lock:
            self._check_open()
            pipeline = self._require_pipeline(pipeline_id)
            if not isinstance(steps, (list, tuple)):
                raise TypeError(f"steps must be a list of dicts, got {type(steps).__name__}")
            fold_artifacts, shared_artifacts = _artifact_maps(fold_artifacts, shared_artifacts)
            held = set(fold_artifacts.values())
            for ids in shared_artifacts.values():
                held.update(ids)
            for i, step in enumerate(steps):
                if isinstance(step, dict) and step.get("artifact_id") is not None:
                    held.add(_text(f"steps[{i}]['artifact_id']", str(step["artifact_id"])))
            held.discard(None)
            if self._storage.is_local:
                art.refresh_objects(self._storage, map(str, held))
            row = {
                "chain_id": new_id(),
                "pipeline_id": pipeline_id,
                "run_id": pipeline["run_id"],
                "steps": _json(list(steps), "steps"),
                "model_step_idx": _opt_int("model_step_idx", model_step_idx),
                "model_class": _text("model_class", model_class),
                "preprocessings": _text("preprocessings", preprocessings),
                "fold_strategy": _free_text("fold_strategy", fold_strategy),
                "fold_artifacts": _json(fold_artifacts, "fold_artifacts"),
                "shared_artifacts": _json(shared_artifacts, "shared_artifacts"),
                "branch_path": _json(branch_path, "branch_path"),
                "source_index": _opt_int("source_index", source_index),
                "artifact_ids": sorted(held),
                "created_at": CLOCK.now_us(),
            }
            self._known_chains[row["chain_id"]] = pipeline_id
            self._buffer("chains", row)
            return row["chain_id"]

    @_leasable
    def get_chain(self, chain_id: str) -> dict | None:
        """The chain as a dict (steps, fold_artifacts, shared_artifacts, branch_path decoded), or None."""
        _text("chain_id", chain_id, allow_none=False)
        with self._lock:
            self._check_open()
            row = self._row(S.CHAINS, chain_id)
        if row is None:
            return None
        row.pop("artifact_ids", None)
        for key in ("steps", "fold_artifacts", "shared_artifacts", "branch_path"):
            row[key] = _unjson(row[key])
        return row

    @_leasable
    def get_chains_for_pipeline(self, pipeline_id: str) -> pl.DataFrame:
        """The pipeline's chains, in creation order."""
        _text("pipeline_id", pipeline_id, allow_none=False)
        with self._lock:
            self._check_open()
            frame = self._frame(S.CHAINS).filter(pl.col("pipeline_id") == pipeline_id)
            return self._public(frame.sort(["created_at", "chain_id"]).collect())

    # ------------------------------------------------------------------ predictions
    def save_prediction(
        self,
        pipeline_id: str,
        chain_id: str,
        dataset_name: str,
        model_name: str,
        model_class: str,
        fold_id: Any,
        partition: str,
        val_score: float | None,
        test_score: float | None,
        train_score: float | None,
        metric: str,
        task_type: str,
        n_samples: int,
        n_features: int,
        scores: dict,
        best_params: dict,
        branch_id: int | None,
        branch_name: str | None,
        exclusion_count: int,
        exclusion_rate: float,
        preprocessings: str = "",
        prediction_id: str | None = None,
    ) -> str:
        """Add one prediction record (every call adds one); returns its id."""
        with self._lock:
            self._check_open()
            row = self._prediction_row(
                pipeline_id, chain_id, dataset_name, model_name, model_class, fold_id, partition, val_score,
                test_score, train_score, metric, task_type, n_samples, n_features, scores, best_params, branch_id,
                branch_name, exclusion_count, exclusion_rate, preprocessings, prediction_id,
            )
            self._known_predictions[row["prediction_id"]] = (row["run_id"], dataset_name, row["created_at"])
            self._buffer("predictions", row)
            return row["prediction_id"]

    def _prediction_row(
        self, pipeline_id, chain_id, dataset_name, model_name, model_class, fold_id, partition, val_score, test_score,
        train_score, metric, task_type, n_samples, n_features, scores, best_params, branch_id, branch_name,
        exclusion_count, exclusion_rate, preprocessings="", prediction_id=None,
        owner_of: Callable[[str], tuple[str, str, int] | None] | None = None,
        parents: dict | None = None,
    ) -> dict:
        """One checked ``predictions`` row (``save_prediction``'s arguments); records nothing.
        ``owner_of`` finds where a caller-given id is stored already, and ``parents`` remembers the
        (pipeline, chain) pairs already checked: a batch looks each up once."""
        pipeline = parents.get((pipeline_id, chain_id)) if parents is not None else None
        if pipeline is None:
            pipeline = self._require_pipeline(pipeline_id)
            if chain_id is not None:
                self._require_chain(_text("chain_id", chain_id), pipeline_id)
            if parents is not None:
                parents[(pipeline_id, chain_id)] = pipeline
        _text("dataset_name", dataset_name, allow_none=False)
        if prediction_id is None:
            pid = new_id()
        else:
            pid = _text("prediction_id", prediction_id, allow_none=False)
            if not pid:
                raise ValueError("prediction_id must not be empty")
            owner = (owner_of or self._prediction_owner)(pid)
            if owner is not None and owner[1] != dataset_name:
                # A key lives in one dataset partition; moving it would let pruned reads disagree.
                raise ValueError(
                    f"prediction_id {pid!r} already belongs to dataset {owner[1]!r}; "
                    f"it cannot be saved again under {dataset_name!r} (delete it first)"
                )
        row = {
            "prediction_id": pid,
            "pipeline_id": pipeline_id,
            "chain_id": _text("chain_id", chain_id),
            "run_id": pipeline["run_id"],
            "dataset_name": dataset_name,
            "model_name": _text("model_name", model_name),
            "model_class": _text("model_class", model_class),
            "fold_id": _fold_id(fold_id),
            "partition": _text("partition", partition),
            "val_score": _opt_float("val_score", val_score),
            "test_score": _opt_float("test_score", test_score),
            "train_score": _opt_float("train_score", train_score),
            "metric": _text("metric", metric),
            "task_type": _text("task_type", task_type),
            "n_samples": _opt_int("n_samples", n_samples),
            "n_features": _opt_int("n_features", n_features),
            "scores": _json(_mapping("scores", scores), "scores"),
            "best_params": _json(_mapping("best_params", best_params), "best_params"),
            "branch_id": _opt_int("branch_id", branch_id),
            "branch_name": _text("branch_name", branch_name),
            "exclusion_count": _opt_int("exclusion_count", exclusion_count),
            "exclusion_rate": _opt_float("exclusion_rate", exclusion_rate),
            "preprocessings": _text("preprocessings", preprocessings) or "",
            "created_at": CLOCK.now_us(),
        }
        return row

    def save_predictions(self, records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Save many predictions with their arrays as one batch; returns their ids, in order.

        Each record holds ``save_prediction``'s arguments by name (``pipeline_id``, ``chain_id``,
        ``dataset_name`` required; the others default to None, ``preprocessings`` to "") and any of
        ``y_true``, ``y_pred``, ``y_proba``, ``sample_indices``, ``weights`` and ``sample_ids`` (the
        sample each row measured, docs/scores.md). Every record is checked before any is kept, so a
        bad one (named by its position) leaves nothing behind; the batch is durable once this
        returns. The fastest way to write predictions: ``nirslake.Predictions.flush`` uses it.
        """
        records = list(records)
        with self._lock:
            self._check_open()
            rows, arrays, datasets, parents = [], [], {}, {}
            stored = self._stored_owners([r.get("prediction_id") for r in records if isinstance(r, Mapping)])
            for i, record in enumerate(records):
                try:
                    if not isinstance(record, Mapping):
                        raise TypeError(f"a record must be a mapping of field names, got {type(record).__name__}")
                    unknown = record.keys() - _RECORD_FIELDS
                    if unknown:
                        raise TypeError(f"unknown field(s) {sorted(map(str, unknown))}")
                    if not _REQUIRED_FIELDS <= record.keys():
                        raise TypeError(f"missing field(s) {sorted(_REQUIRED_FIELDS - record.keys())}")
                    row = self._prediction_row(
                        **{f: record.get(f, default) for f, default in _FIELD_DEFAULTS}, owner_of=stored.get, parents=parents
                    )
                    pid = row["prediction_id"]
                    if datasets.setdefault(pid, row["dataset_name"]) != row["dataset_name"]:
                        raise ValueError(f"prediction_id {pid!r} is in this batch under two datasets")
                    given = {f: record.get(f) for f in ARRAY_FIELDS}
                    checked = None
                    if any(v is not None for v in given.values()):
                        for field, value in given.items():
                            if value is not None and not isinstance(value, np.ndarray):  # an array's size is known
                                _array_size(field, value)
                        checked = check_arrays(**given)
                        for field, value in checked.items():
                            if value is not None and value.size > MAX_ARRAY_VALUES:
                                _array_size(field, value)
                except (TypeError, ValueError, KeyError) as exc:
                    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                    raise type(exc)(f"record {i}: {message}") from None
                rows.append(row)
                arrays.append(checked)
            for row, checked in zip(rows, arrays):
                self._known_predictions[row["prediction_id"]] = (row["run_id"], row["dataset_name"], row["created_at"])
                self._buffer("predictions", row)
                if checked is not None:
                    self._writer.add_arrays(
                        {"prediction_id": row["prediction_id"], "run_id": row["run_id"],
                         "dataset_name": row["dataset_name"], "_version": CLOCK.now_us(), **checked}
                    )
            self._writer.commit()
            return [row["prediction_id"] for row in rows]

    def save_prediction_arrays(
        self,
        prediction_id: str,
        y_true: Any,
        y_pred: Any,
        y_proba: Any = None,
        sample_indices: Any = None,
        weights: Any = None,
    ) -> None:
        """Attach dense arrays to a prediction (a later call replaces them)."""
        with self._lock:
            self._check_open()
            owner = self._prediction_owner(prediction_id)
            # Arrays of a deleted prediction would never show (lake spec §5.4): a remembered owner
            # that a deletion this store has read since may hide is looked up again (another
            # process may have saved it anew). A deletion not read yet is left to the read rules.
            deleted = self._deleted[1]
            if (
                owner is not None
                and deleted is not None
                and (owner[0] in deleted.runs or deleted.entities.get(("prediction", prediction_id), -1) >= owner[2])
            ):
                self._known_predictions.pop(prediction_id, None)
                owner = self._prediction_owner(prediction_id)
            if owner is None:
                self._publish_for_read()  # it may sit in a buffer or journal of this process
                owner = self._prediction_owner(prediction_id)
            if owner is None:
                raise KeyError(f"unknown prediction_id {prediction_id!r}")
            given = {"y_true": y_true, "y_pred": y_pred, "y_proba": y_proba, "sample_indices": sample_indices, "weights": weights}
            for field, value in given.items():  # before converting: an oversized view costs nothing yet
                _array_size(field, value)
            arrays = check_arrays(**given)
            for field, value in arrays.items():  # nested lists only show their full size once converted
                _array_size(field, value)
            self._writer.add_arrays(
                {"prediction_id": prediction_id, "run_id": owner[0], "dataset_name": owner[1], "_version": CLOCK.now_us(), **arrays}
            )

    @_leasable
    def get_prediction(self, prediction_id: str, load_arrays: bool = False) -> dict | None:
        """The prediction as a dict, or None; with ``load_arrays`` also its arrays as numpy (or None)."""
        _text("prediction_id", prediction_id, allow_none=False)
        with self._lock:
            self._check_open()
            snap = self._snapshot()
            row = self._row(S.PREDICTIONS, prediction_id, snap=snap)
            if row is None:
                return None
            row["scores"] = _unjson(row["scores"])
            row["best_params"] = _unjson(row["best_params"])
            if load_arrays:
                row.update(self._load_arrays(prediction_id, row["dataset_name"], snap))
            return row

    def _load_arrays(self, prediction_id: str, dataset_name: str, snap: Snapshot) -> dict[str, np.ndarray | None]:
        tdef = S.PREDICTION_ARRAYS
        stored = self._row(tdef, prediction_id, dataset_name=dataset_name, snap=snap)
        if stored is None:
            return {f: None for f in ARRAY_FIELDS}
        return {f: to_numpy(f, stored[f], stored["y_proba_classes"]) for f in ARRAY_FIELDS}

    def _predictions(self, dataset_name: str | None = None) -> pl.LazyFrame:
        exact = dataset_name if (dataset_name is not None and "%" not in dataset_name) else None
        return self._frame(S.PREDICTIONS, exact)

    @_leasable
    def query_predictions(
        self,
        dataset_name: str | None = None,
        model_class: str | None = None,
        partition: str | None = None,
        fold_id: Any = None,
        branch_id: int | None = None,
        pipeline_id: str | None = None,
        run_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> pl.DataFrame:
        """Predictions matching every given filter (``%`` in a string makes it a LIKE pattern); no arrays."""
        filters = dict(zip(_PREDICTION_FILTERS, (dataset_name, model_class, partition, fold_id, branch_id, pipeline_id, run_id)))
        exprs = _filter_exprs(filters)  # checked before any read
        limit, offset = _count("limit", limit, allow_none=True), _count("offset", offset)
        with self._lock:
            self._check_open()
            frame = self._predictions(dataset_name)
        frame = frame.filter(*exprs) if exprs else frame
        frame = frame.sort(["created_at", "prediction_id"]).slice(offset, limit)
        return frame.collect()

    @_leasable
    def top_predictions(
        self,
        n: int,
        metric: str = "val_score",
        ascending: bool | None = True,
        partition: str = "val",
        dataset_name: str | None = None,
        group_by: str | None = None,
    ) -> pl.DataFrame:
        """The best ``n`` predictions of ``partition`` by ``metric`` (of each ``group_by`` group).

        ``metric`` is a score column (``val_score``, ``test_score`` ...) or a metric of the rows'
        ``scores`` dicts (``r2``, ``rpd``, ``rmse`` ...: each row's ``scores[partition][metric]``,
        returned in a column of that name). ``ascending`` is the sort order as given;
        ``ascending=None`` ranks best first in the metric's own direction (higher is better for
        r2, rpd, rpiq, accuracy, f1; a bias by its absolute value; for a score column, the
        direction of the rows' ``metric``, which must then be one).
        """
        columns = S.PREDICTIONS.schema.names
        numeric = {f.name for f in S.PREDICTIONS.schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)}
        if not isinstance(metric, str) or (metric not in numeric and (metric in columns or not _METRIC_NAME.fullmatch(metric))):
            raise ValueError(
                f"Invalid metric column: {metric!r} (choose one of {', '.join(sorted(numeric))}, "
                "or a metric of the predictions' scores such as r2)"
            )
        if group_by is not None and (not isinstance(group_by, str) or group_by not in columns):
            raise ValueError(f"Invalid group_by column: {group_by!r} (choose one of {', '.join(columns)})")
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if ascending is not None and not isinstance(ascending, (bool, np.bool_)):
            raise TypeError(f"ascending must be True or False, got {ascending!r} (or None: best first in the metric's own direction)")
        exprs = _filter_exprs({"partition": partition, "dataset_name": dataset_name})
        with self._lock:
            self._check_open()
            frame = self._predictions(dataset_name)
        if exprs:
            frame = frame.filter(*exprs)
        if metric not in numeric:
            frame = with_scores(frame, [metric])
            if metric not in METRICS and not frame.select(pl.col(metric).is_not_null().any()).collect().item():
                raise ValueError(
                    f"Invalid metric column: {metric!r} is neither a score column ({', '.join(sorted(numeric))}) "
                    "nor a metric in the scores of these predictions"
                )
        direction_of = metric
        if ascending is None and metric in numeric:
            named = frame.select(pl.col("metric").drop_nulls().unique()).collect().to_series().to_list()
            if len(named) > 1:
                raise ValueError(f"ascending=None ranks {metric} in the direction of its metric, but these predictions mix {sorted(named)}: pass ascending")
            direction_of = named[0] if named else metric
        return top_k(frame, min(int(n), MAX_ROWS), score=metric, by=group_by, ascending=ascending, metric=direction_of)

    def delete_prediction(self, prediction_id: str) -> bool:
        """Delete one prediction and its arrays; False when it did not exist."""
        _text("prediction_id", prediction_id, allow_none=False)
        with self._lock:
            self._check_open()
            snap = self._snapshot()
            row = self._row(S.PREDICTIONS, prediction_id, snap=snap)
            if row is None:
                return False
            # Read for its stamp only: arrays saved after the row must be deleted too (§5.3).
            self._row(S.PREDICTION_ARRAYS, prediction_id, dataset_name=row["dataset_name"], snap=snap)
            self._delete("prediction", [prediction_id])
            self._known_predictions.pop(prediction_id, None)
            return True

    def rescore(
        self,
        dataset_name: str | None = None,
        run_id: str | None = None,
        pipeline_id: str | None = None,
        partition: str | None = None,
        save: bool = True,
    ) -> pl.DataFrame:
        """Compute the chemometrics set (RMSE, MSE, MAE, R², bias, SEP, RPD, RPIQ; accuracy,
        balanced accuracy, F1 for classification) from the arrays of the matching predictions.

        With ``save`` each prediction is saved again with the values merged into
        ``scores[<its partition>]`` (same-named entries replaced), so every ranking reads them.
        Returns one row per prediction that has arrays, with a column per metric. docs/scores.md
        defines each metric.
        """
        from .scores import rescore

        return rescore(self, dataset_name=dataset_name, run_id=run_id, pipeline_id=pipeline_id, partition=partition, save=save)

    def _delete(self, kind: str, entity_ids: list[str]) -> None:
        """Append deletion records and publish them at once, so every reader stops seeing them."""
        now = CLOCK.now_us()
        for entity_id in entity_ids:
            self._buffer("deletions", {"kind": kind, "entity_id": entity_id, "deleted_at": now})
        self._publish()

    # ------------------------------------------------------------------ artifacts
    def save_artifact(self, obj: Any, operator_class: str, artifact_type: str, format: str) -> str:
        """Serialise ``obj`` and store it by content; identical content gives the same id, stored once.

        ``format``: ``joblib``, ``pickle``, ``cloudpickle`` (they run code when loaded), or ``npz``
        for a numpy array or a dict of arrays and numbers (loaded without pickle).
        """
        _text("operator_class", operator_class)  # checked before any bytes are stored
        _text("artifact_type", artifact_type)
        data = art.serialize(obj, format)
        with self._lock:
            self._check_open()
            digest, rel = art.put_object(self._storage, data)
            # Recorded on every save (one row each, resolved to one artifact), so a record that a
            # concurrent gc hid comes back with the next save of the same object.
            self._buffer(
                "artifacts",
                {
                    "artifact_id": digest,
                    "content_hash": digest,
                    "path": rel,
                    "operator_class": _text("operator_class", operator_class),
                    "artifact_type": _text("artifact_type", artifact_type),
                    "format": format,
                    "size_bytes": len(data),
                    "created_at": CLOCK.now_us(),
                },
            )
            self._known_artifacts.add(digest)
            return digest

    def register_existing_artifact(
        self,
        artifact_id: str,
        path: str | os.PathLike,
        content_hash: str,
        operator_class: str,
        artifact_type: str,
        format: str,
        size_bytes: int,
    ) -> str:
        """Record an artifact whose bytes already exist at ``path``; idempotent."""
        with self._lock:
            self._check_open()
            _text("artifact_id", artifact_id, allow_none=False)
            if artifact_id in self._known_artifacts or self._row(S.ARTIFACTS, artifact_id) is not None:
                return artifact_id
            path = _text("path", os.fspath(path), allow_none=False)
            full = path if art.is_external(path) else self._storage.path(path)
            inside = full.split("://", 1)[-1].startswith(self._storage.root.rstrip("/") + "/")
            self._buffer(
                "artifacts",
                {
                    "artifact_id": artifact_id,
                    "content_hash": _text("content_hash", content_hash, allow_none=False),
                    "path": self._storage.relative(full) if inside else full,
                    "operator_class": _text("operator_class", operator_class),
                    "artifact_type": _text("artifact_type", artifact_type),
                    "format": _text("format", format),
                    "size_bytes": _opt_int("size_bytes", size_bytes),
                    "created_at": CLOCK.now_us(),
                },
            )
            self._known_artifacts.add(artifact_id)
            return artifact_id

    def _artifact(self, artifact_id: str) -> dict:
        _text("artifact_id", artifact_id, allow_none=False)
        row = self._row(S.ARTIFACTS, artifact_id)
        if row is None:
            raise KeyError(f"unknown artifact_id {artifact_id!r}")
        return row

    def load_artifact(self, artifact_id: str) -> Any:
        """The stored object, after its bytes are checked against their sha256.

        Unpickling runs code: load only artifacts from workspaces you trust.
        """
        with self._lock:
            self._check_open()
            row = self._artifact(artifact_id)
        try:
            data = art.read_verified(self._storage, row["path"], row["content_hash"])
        except FileNotFoundError:
            raise FileNotFoundError(f"the bytes of artifact {artifact_id!r} are gone (expected at {row['path']})") from None
        return art.deserialize(data, row["format"])

    def get_artifact_path(self, artifact_id: str) -> Path | str:
        """Where the artifact's bytes live: a ``Path`` for a local workspace, a URL otherwise."""
        with self._lock:
            self._check_open()
            rel = self._artifact(artifact_id)["path"]
        if "://" in rel:
            return rel
        if art.is_external(rel) or self._storage.is_local:
            return Path(rel if art.is_external(rel) else self._storage.path(rel))
        return self._storage.url(rel)

    def gc_artifacts(self) -> int:
        """Remove artifacts that no live chain (of a pipeline not failed, in a run not deleted) holds.

        Chains durable in another writer's journal but not yet published hold theirs too.
        Artifacts recorded, or objects saved again, within ``grace_seconds`` are kept: another
        writer may be about to reference them (lake spec §7). Returns how many artifacts were removed; their
        bytes go once no kept artifact points at them.
        """
        with self._lock:
            self._check_open()
            # Chains other writers made durable but have not published hold artifacts too
            # (ours are published first). Read before the lake: a segment published meanwhile
            # is then seen in one or the other.
            self._publish()
            held, _ = art.unpublished_references(self._storage)
            live_pipelines = self._frame(S.PIPELINES).filter(pl.col("status") != "failed").select("pipeline_id")
            held |= set(
                self._frame(S.CHAINS)
                .join(live_pipelines, on="pipeline_id", how="semi")
                .select(pl.col("artifact_ids").explode())
                .drop_nulls()
                .collect()["artifact_ids"]
                .to_list()
            )
            artifacts = self._frame(S.ARTIFACTS).collect()
            cutoff = CLOCK.now_us() - self._grace_us
            unheld = artifacts.filter(
                ~pl.col("artifact_id").is_in(list(held)) & (pl.col("created_at").dt.epoch("us") < cutoff)
            )
            candidates = unheld.rows(named=True)
            if self._storage.is_local or sum(map(_is_object, unheld["path"])) <= artifacts.height // 1000 + 1:
                modified = self._storage.modified_us
            else:  # one listing of objects/ (a page per 1,000 objects) costs less than a HEAD each
                modified = self._storage.list_modified(art.OBJECTS_DIR).get
            doomed = [
                row for row in candidates if not _is_object(row["path"]) or (modified(row["path"]) or 0) < cutoff
            ]
            if not doomed:
                return 0
            self._known_artifacts.difference_update(row["artifact_id"] for row in doomed)
            # The deletion records land first: a crash after this leaves orphan bytes, never a
            # record pointing at missing bytes.
            self._delete("artifact", [row["artifact_id"] for row in doomed])
            doomed_ids = {row["artifact_id"] for row in doomed}
            kept_paths = set(artifacts.filter(~pl.col("artifact_id").is_in(list(doomed_ids)))["path"].to_list())
            revived = []
            for rel in {row["path"] for row in doomed} - kept_paths:
                if _is_object(rel) and not art.remove_object(self._storage, rel, cutoff):
                    # Saved again by another writer since we looked (its record is not published
                    # yet, and the deletion above hides records up to now): keep the bytes and
                    # record the artifact anew, so that writer's chain still finds it.
                    revived += [row for row in doomed if row["path"] == rel]
            self._known_artifacts.update(row["artifact_id"] for row in revived)
            for row in revived:
                fields = ("artifact_id", "content_hash", "path", "operator_class", "artifact_type", "format", "size_bytes")
                self._buffer("artifacts", {**{k: row[k] for k in fields}, "created_at": CLOCK.now_us()})
            if revived:
                self._publish()
            return len(doomed) - len(revived)

    # ------------------------------------------------------------------ logs
    def log_step(
        self,
        pipeline_id: str,
        step_idx: int,
        operator_class: str,
        event: str,
        duration_ms: float | None = None,
        message: str | None = None,
        details: dict | None = None,
        level: str = "info",
    ) -> None:
        """Record a structured step event (start, end, warning, ...)."""
        with self._lock:
            self._check_open()
            pipeline = self._require_pipeline(pipeline_id)
            now = CLOCK.now_us()
            self._buffer(
                "logs",
                {
                    "log_id": new_id(),
                    "pipeline_id": pipeline_id,
                    "run_id": pipeline["run_id"],
                    "step_idx": _opt_int("step_idx", step_idx),
                    "operator_class": _text("operator_class", operator_class),
                    "event": _text("event", event, allow_none=False),
                    "duration_ms": _opt_float("duration_ms", duration_ms),
                    "message": _free_text("message", message),
                    "details": _json(details, "details"),
                    "level": _text("level", level, allow_none=False),
                    "created_at": now,
                    "_version": now,
                },
            )

    @_leasable
    def get_pipeline_log(self, pipeline_id: str) -> pl.DataFrame:
        """The pipeline's step events, ordered by step, then time."""
        _text("pipeline_id", pipeline_id, allow_none=False)
        with self._lock:
            self._check_open()
            frame = self._frame(S.LOGS).filter(pl.col("pipeline_id") == pipeline_id)
            return self._public(frame.sort(["step_idx", "_version"], nulls_last=True).collect())

    @_leasable
    def get_run_log_summary(self, run_id: str) -> pl.DataFrame:
        """One row per pipeline of the run: log count, total ``end`` duration, warnings, errors."""
        _text("run_id", run_id, allow_none=False)
        with self._lock:
            self._check_open()
            pipelines = self._frame(S.PIPELINES).filter(pl.col("run_id") == run_id).select("pipeline_id", "name", "dataset_name", "created_at")
            logs = self._frame(S.LOGS).filter(pl.col("run_id") == run_id)
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

    # ------------------------------------------------------------------ export, deletion, replay
    def export_chain(self, chain_id: str, output_path: str | os.PathLike, format: str = "n4a") -> Path:
        """Write the chain and its artifacts as a bundle: a zip of ``manifest.json``, ``chain.json``
        and ``artifacts/``, sealed with the sha256 of every byte, that ``nirslake.predict`` and
        nirs4all's ``predict(model=path, engine="legacy")`` load (docs/bundles.md)."""
        from .bundles import export_chain

        return export_chain(self, chain_id, output_path, format)

    def import_bundle(self, path: str | os.PathLike) -> str:
        """Add a bundle's chain and artifacts to this workspace; returns the new chain id.

        The bundle is verified whole first. Artifacts are stored once (an object already here is
        not written again); the chain comes under a run ``import of <bundle>`` whose config keeps
        the provenance (bundle name, its sha256, when it was imported). A durability point.
        """
        from .bundles import import_bundle

        return import_bundle(self, path)

    def export_pipeline_config(self, pipeline_id: str, output_path: str | os.PathLike) -> Path:
        """Write the pipeline's expanded config as JSON (``.json`` added when the path has no suffix)."""
        pipeline = self.get_pipeline(pipeline_id)
        if pipeline is None:
            raise KeyError(f"unknown pipeline_id {pipeline_id!r}")
        target = _with_suffix(output_path, ".json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(pipeline["expanded_config"], indent=2), encoding="utf-8")
        return target

    def export_run(self, run_id: str, output_path: str | os.PathLike) -> Path:
        """Write the run, its pipelines and their chains as YAML (``.yaml`` added when no suffix)."""
        import yaml

        run = self.get_run(run_id)
        if run is None:
            raise KeyError(f"unknown run_id {run_id!r}")
        with self._lock:
            pipelines = self.list_pipelines(run_id=run_id).sort("created_at").rows(named=True)
            chains = self._public(self._frame(S.CHAINS).filter(pl.col("run_id") == run_id).sort("created_at").collect())
        by_pipeline: dict[str, list] = {}
        for chain in chains.rows(named=True):
            for key in ("steps", "fold_artifacts", "shared_artifacts", "branch_path"):
                chain[key] = _unjson(chain[key])
            by_pipeline.setdefault(chain["pipeline_id"], []).append(chain)
        for p in pipelines:
            for key in ("expanded_config", "generator_choices"):
                p[key] = _unjson(p[key])
            p["chains"] = by_pipeline.get(p["pipeline_id"], [])
        document = _plain({"run": run, "pipelines": pipelines})
        target = _with_suffix(output_path, ".yaml")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), encoding="utf-8")
        return target

    def export_predictions_parquet(self, output_path: str | os.PathLike, **filters: Any) -> Path:
        """``query_predictions(**filters)`` written as one Parquet file (also when empty)."""
        unknown = set(filters) - set(_PREDICTION_FILTERS) - {"limit", "offset"}
        if unknown:
            raise TypeError(f"unknown filter(s) {sorted(unknown)}: use {', '.join(_PREDICTION_FILTERS)}, limit, offset")
        frame = self.query_predictions(**filters)
        target = Path(output_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(target)
        return target

    def delete_run(self, run_id: str, delete_artifacts: bool = True) -> int:
        """Delete the run and everything under it; returns how many records went.

        Counted: the run, its pipelines, chains, predictions and log events. One deletion record
        hides them all at once; ``vacuum()`` reclaims their space.
        """
        _text("run_id", run_id, allow_none=False)
        with self._lock:
            self._check_open()
            if self._row(S.RUNS, run_id) is None:
                return 0
            count = 1
            for tdef in (S.PIPELINES, S.CHAINS, S.PREDICTIONS, S.LOGS):
                count += self._frame(tdef).filter(pl.col("run_id") == run_id).select(pl.len()).collect().item()
            self._delete("run", [run_id])
            self._known_runs.pop(run_id, None)
            for pid in [p for p, row in self._known_pipelines.items() if row["run_id"] == run_id]:
                del self._known_pipelines[pid]
            for pid in [p for p, (owner, _, _) in self._known_predictions.items() if owner == run_id]:
                del self._known_predictions[pid]
            if delete_artifacts:
                self.gc_artifacts()
            return count

    def vacuum(self) -> None:
        """Reclaim space: merge each partition's small files without deleted or superseded rows.

        Readers never see the swap (lake spec §4). The replaced files' bytes are deleted by a
        later vacuum, once hidden for longer than ``grace_seconds``.
        """
        from .maintenance import purge

        with self._lock:
            self.compact()
            purge(self._storage, self._cache, CLOCK.now_us() - self._grace_us)

    # ------------------------------------------------------------------ maintenance (beyond the seed API)
    def compact(
        self,
        target_file_mb: float = 128,
        tables: list[str] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> CompactionResult:
        """Merge each partition's small files into files of about ``target_file_mb`` MiB.

        Files under half the target are merged; superseded versions and deleted rows are dropped.
        Safe while other processes read and write: one commit record swaps the files, so every
        reader sees either the old files or the new ones (lake spec §4). ``tables`` limits it to
        some tables; ``progress`` receives one line per compacted table.
        """
        from .maintenance import compact_all

        if (
            not isinstance(target_file_mb, (int, float))
            or isinstance(target_file_mb, bool)
            or not 0 < target_file_mb < math.inf
        ):
            raise ValueError(f"target_file_mb must be a positive number, and finite: got {target_file_mb!r}")
        with self._lock:
            self._check_open()
            self._publish_for_read()
            return compact_all(
                self._storage, self._cache, int(target_file_mb * 1048576), tables=tables, progress=progress
            )

    def check(self, repair: bool = False, progress: Callable[[str], None] | None = None) -> CheckReport:
        """Verify the workspace: every data file opens, every artifact's bytes match their
        sha256, every prediction's chain, pipeline and run (and every chain's artifacts) exist.

        Also lists leftovers (staging files, replaced or uncommitted compaction files,
        unreferenced objects) older than ``grace_seconds``; ``repair=True`` deletes those.
        Problems are reported, never repaired. Returns a :class:`~nirslake.check.CheckReport`.
        """
        from .check import check_workspace

        with self._lock:
            self._check_open()
            self._publish_for_read()
            return check_workspace(
                self._storage,
                self._cache,
                lambda tdef, snap: self._frame(tdef, snap=snap).collect(),
                CLOCK.now_us() - self._grace_us,
                repair=repair,
                progress=progress,
            )

    # ------------------------------------------------------------------ SQL and catalog
    def sql(self, query: str, params: list | None = None) -> pl.DataFrame:
        """Run DuckDB SQL against the lake's views (the ones in ``catalog.duckdb``); returns polars.

        Buffered writes are flushed first, so the query sees them.
        """
        with self._lock:
            self._check_open()
            self._publish_for_read()
            con = catalog.connect(self._storage)
            try:
                result = con.execute(query, params or [])
                if result is None:  # DuckDB's answer to text without a statement ("", a comment)
                    raise ValueError(f"the query holds no SQL statement: {query!r}; pass one, e.g. 'SELECT * FROM runs'")
                return result.pl()
            finally:
                con.close()

    def leaderboard(self, n: int = 5) -> pl.DataFrame:
        """The best ``n`` chains of each dataset by mean validation score over folds (the ``leaderboard`` view)."""
        return self.sql("SELECT * FROM leaderboard WHERE rank <= ? ORDER BY dataset_name, rank", [int(n)])

    def rebuild_catalog(self) -> str:
        """Rebuild ``<workspace>/catalog.duckdb`` from ``sql/views``; returns its path or URL."""
        with self._lock:
            self._check_open()
            return catalog.build_catalog(self._storage)

    def replay_chain(self, chain_id: str, X: Any, wavelengths: Any = None) -> np.ndarray:
        """Predict with a stored chain: shared transformers in step order, then the mean over fold models."""
        from .bundles import apply_chain

        chain = self.get_chain(chain_id)
        if chain is None:
            raise KeyError(f"unknown chain_id {chain_id!r}")
        return apply_chain(chain, self.load_artifact, X, wavelengths)


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


def _artifact_maps(fold_artifacts: Any, shared_artifacts: Any) -> tuple[dict, dict]:
    """Check the chain's artifact maps: ``{"fold_0": id}`` and ``{"<step_idx>": [id, ...]}``,
    where a single id stands for a list of one (as the seed store accepts). Every id is text
    Parquet can store: a chain's ids are also written raw, as its ``artifact_ids``."""
    if not isinstance(fold_artifacts or {}, dict) or not all(
        isinstance(v, str) or v is None for v in (fold_artifacts or {}).values()
    ):
        raise TypeError(f'fold_artifacts must map fold names to one artifact id each, like {{"fold_0": id}}; got {fold_artifacts!r}')
    shared = shared_artifacts or {}
    if isinstance(shared, dict):
        shared = {str(k): [v] if isinstance(v, str) else v for k, v in shared.items()}
    if not isinstance(shared, dict) or not all(
        isinstance(v, (list, tuple)) and all(isinstance(i, str) for i in v) for v in shared.values()
    ):
        raise TypeError(f'shared_artifacts must map step indices to lists of artifact ids, like {{"0": [id]}}; got {shared_artifacts!r}')
    folds = {k: _text(f"fold_artifacts[{k!r}]", v) for k, v in (fold_artifacts or {}).items()}
    return folds, {k: [_text(f"shared_artifacts[{k!r}]", i) for i in v] for k, v in shared.items()}


def _is_object(path: str) -> bool:
    """True for bytes the store manages under ``objects/`` (registered files are never deleted)."""
    return path.startswith(art.OBJECTS_DIR + "/")


def _filter_exprs(filters: dict[str, Any]) -> list[pl.Expr]:
    """polars expressions for equality / LIKE filters; values are data, never SQL text."""
    exprs = []
    for column, value in filters.items():
        if value is None:
            continue
        if column == "fold_id":
            value = _fold_id(value)
        if column == "branch_id":
            exprs.append(pl.col(column) == _opt_int("branch_id", value))
            continue
        _text(column, value)
        if "%" in value:
            pattern = "(?s)^" + ".*".join(re.escape(p) for p in value.split("%")) + "$"
            exprs.append(pl.col(column).str.contains(pattern))
        else:
            exprs.append(pl.col(column) == value)
    return exprs


def _plain(value: Any) -> Any:
    """Values YAML can write safely: datetimes as ISO strings, numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value
