"""nirs4all on nirslake: ``install()`` makes nirs4all 1.4.10 keep every workspace it opens as a lake.

    import nirslake.integrations.nirs4all as lake; lake.install()

After it, every ``WorkspaceStore`` nirs4all opens (runs on the default and the legacy engine,
``Predictions.from_workspace``, ``predict(chain_id=...)``, exports) is a :class:`Nirs4allStore`:
nirslake's store with the calls nirs4all 1.4.10 makes beyond the seed API. The readers of nirs4all
that open ``store.sqlite`` directly (the default engine's ``predict(chain_id=...)``, the model
catalogue, the prediction array export) are replaced by readers of the lake. docs/nirs4all.md
says what works and what does not.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from ..api import records
from ..api import validation as V
from ..api.known import Recent
from ..api.reads import exact_dataset, public
from ..lake import artifacts as art
from ..lake import schema as S
from ..lake.tables import CLOCK, Snapshot, with_rows
from ..store import WorkspaceStore
from .nirs4all_arrays import LakeArrayStore
from .nirs4all_readers import (
    chain_summaries,
    export_prediction_arrays,
    load_general_workspace_chain,
    protecting_lake_artifacts,
    read_model_catalogue,
)

TESTED_VERSION = "1.4.10"

# The prediction lineage fields of nirs4all 1.4.10 (text; stored as given).
LINEAGE_FIELDS = (
    "prediction_scope", "prediction_level", "evaluation_scope", "reduction_role", "reduction_id",
    "physical_sample_id", "origin_sample_id", "derived_unit_id", "unit_level", "unit_id", "row_id",
)


# nirs4all passes every workspace through ``pathlib.Path``, which folds ``s3://bucket/ws`` into
# ``s3:/bucket/ws``; a local folder named like that is implausible, so the URL is restored.
_FOLDED_URL = re.compile(r"^(s3|s3a|gs|gcs|az|abfs|abfss|memory|file):/(?!/)(.*)$")


def workspace_url(workspace_path: str | os.PathLike) -> str | os.PathLike:
    """The workspace nirs4all meant: an object-store URL that ``Path()`` folded is unfolded."""
    text = os.fspath(workspace_path)
    match = _FOLDED_URL.match(text.replace(os.sep, "/"))
    if match is None:
        return workspace_path
    return f"{match.group(1)}://{match.group(2)}"


class ObjectPath(str):
    """An artifact's URL on an object store, with the ``pathlib.Path`` reads nirs4all makes of
    ``get_artifact_path`` (``read_bytes``, ``open``, ``exists``, ``is_file``, ``name``)."""

    def __new__(cls, url: str, fs: Any) -> ObjectPath:
        self = super().__new__(cls, url)
        self._fs = fs
        return self

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    def read_bytes(self) -> bytes:
        with self._fs.open(str(self), "rb") as fh:
            return fh.read()

    def open(self, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        return self._fs.open(str(self), mode, *args, **kwargs)

    def exists(self) -> bool:
        return self._fs.exists(str(self))

    def is_file(self) -> bool:
        return self._fs.isfile(str(self))


def _no_projects() -> Any:
    raise NotImplementedError(
        "nirs4all projects are not kept in a nirslake workspace yet (docs/nirs4all.md): run without project=..."
    )


def loose_json(value: Any) -> Any:
    """A value as nirs4all's own store keeps it: JSON with ``str()`` of anything JSON lacks."""
    if value is None:
        return None
    return json.loads(json.dumps(value, default=str))


def _relation_payload(value: Any) -> dict | None:
    from nirs4all.pipeline.storage.workspace_store import _relation_replay_manifest_payload

    return _relation_replay_manifest_payload(value)


_LIVE: weakref.WeakSet = weakref.WeakSet()


def live_stores() -> list:
    """The open ``Nirs4allStore`` objects of this process."""
    return [s for s in list(_LIVE) if not s._closed]


def naive_utc(value: Any) -> Any:
    """A read's result with its times as nirs4all's own store gives them: naive datetimes in UTC
    (SQLite's ``TIMESTAMP``), where the lake's are UTC-aware. nirs4all compares and prints them as
    naive, and polars turns an aware time into a Python value through the time zone database,
    row by row: a reload iterating the predictions three times paid 2-8 ms for it on 521 rows."""
    if isinstance(value, pl.DataFrame):
        naive = _naive_columns(value)
        return value.with_columns(naive) if naive else value
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dt.datetime) and item.tzinfo is not None:
                value[key] = item.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _naive_columns(frame: pl.DataFrame) -> list[pl.Expr]:
    """The frame's UTC-aware time columns, each made naive in UTC (none when it has none).
    Names and dtypes as lists: ``frame.schema`` builds a checked ``pl.Schema`` (30 us)."""
    return [
        pl.col(name).dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        for name, dtype in zip(frame.columns, frame.dtypes)
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None
    ]


def _naive_reads(cls: type) -> type:
    """Wrap ``cls.NAIVE_READS`` so their results go through ``naive_utc``."""
    for name in cls.NAIVE_READS:
        method = getattr(cls, name)

        @functools.wraps(method)
        def read(self: Any, *args: Any, _method: Callable = method, **kwargs: Any) -> Any:
            return naive_utc(_method(self, *args, **kwargs))

        setattr(cls, name, read)
    return cls


@_naive_reads
class Nirs4allStore(WorkspaceStore):
    """nirslake's ``WorkspaceStore`` with the surface nirs4all 1.4.10 calls on its run, rank,
    reload, predict and export paths (docs/nirs4all.md lists it, call by call).

    ``transaction()`` keeps what is written inside it in memory and writes it at its end, as one
    durability point; an exception drops it all. nirs4all's artifact conventions hold: artifact
    paths it registers are relative to ``<workspace>/artifacts``, hashes may be ``sha256:<hex>``.
    """

    # The reads nirs4all makes that hold times: their times are naive UTC, as in nirs4all's store.
    # (``get_pipeline`` and ``get_chains_for_pipeline`` answer from indexes whose times are naive
    # already: a reload calls them once per pipeline.)
    NAIVE_READS = (
        "get_run", "list_runs", "list_pipelines", "get_chain",
        "query_predictions", "get_prediction", "get_pipeline_log", "get_run_log_summary", "query_chain_summaries",
    )

    def __init__(self, workspace_path: str | os.PathLike, *, read_only: bool = False, **options: Any) -> None:
        self._read_only = bool(read_only)
        super().__init__(workspace_url(workspace_path), **options)
        self._array_store = LakeArrayStore(self)
        self._tx_depth = 0
        # (pipeline, chain, fold, partition, model, branch) -> prediction id: nirs4all replaces a
        # prediction saved again under the same natural key; the lake keeps its latest version.
        self._natural: Recent = Recent(100_000)
        # Per-table indexes of the current rows, valid while the table's files (and the
        # deletions) are the same: a reload asks for each pipeline and its chains in turn.
        self._indexes: dict[str, tuple[tuple, dict, tuple | None]] = {}
        self._stamp_folders: dict[str, tuple[str, ...]] = {}
        # The chains this store saved, by pipeline: nirs4all reads a pipeline's chains right after
        # saving them, which this answers without publishing (one file per pipeline otherwise).
        self._own_chains: Recent = Recent(10_000)
        _LIVE.add(self)

    @classmethod
    def open_readonly(cls, workspace_path: str | os.PathLike) -> Nirs4allStore:
        """A store that refuses every write (nirs4all's read-only open)."""
        return cls(workspace_path, read_only=True)

    def _require_writable(self) -> None:
        if self._read_only:
            raise RuntimeError("WorkspaceStore is read-only")

    def _buffer(self, table: str, row: dict) -> None:
        self._require_writable()
        super()._buffer(table, row)

    @property
    def array_store(self) -> LakeArrayStore:
        return self._array_store

    @property
    def workspace_path(self) -> Path | str:
        return self._workspace_path

    def __repr__(self) -> str:
        return f"Nirs4allStore({str(self._workspace_path)!r})"

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def transaction(self) -> Generator[None, None, None]:
        """Everything written inside is kept in memory and made durable at the end, at once; an
        exception drops it all (nothing of it reaches the lake). Re-entrant: an inner block joins
        the outer one. Reads inside see the lake as it was plus what this store holds of its own
        (chains, pipelines, artifacts, predictions it wrote)."""
        with self._lock:
            if self._tx_depth:
                self._tx_depth += 1
                try:
                    yield
                finally:
                    self._tx_depth -= 1
                return
            self._check_open()
            mark = self._writer.hold()
            self._tx_depth = 1
            known = (dict(self._known.pipelines), dict(self._known.chains), set(self._known.artifacts), dict(self._natural),
                 {pid: len(rows) for pid, rows in self._own_chains.items()})
            try:
                yield
            except BaseException:
                self._writer.rollback(mark)
                self._forget_since(known)
                raise
            finally:
                self._tx_depth = 0
                self._writer.release()
            self._writer.commit()

    def _forget_since(self, known: tuple) -> None:
        pipelines, chains, artifacts, natural, own_chains = known
        for pid in list(self._own_chains):
            if pid in own_chains:
                del self._own_chains[pid][own_chains[pid]:]
            else:
                del self._own_chains[pid]
        for pid in [p for p in self._known.pipelines if p not in pipelines]:
            del self._known.pipelines[pid]
        for cid in [c for c in self._known.chains if c not in chains]:
            del self._known.chains[cid]
        self._known.artifacts.intersection_update(artifacts)
        for key in [k for k in self._natural if k not in natural]:
            del self._natural[key]

    def _publish_for_read(self) -> None:
        # Inside a transaction nothing of it is published; what was durable before is.
        if self._tx_depth:
            self._writer.publish_acknowledged()
            self._writer.publish_process_writers()
        else:
            super()._publish_for_read()

    # ------------------------------------------------------------------ runs and pipelines
    def begin_run(self, name: str, config: Any, datasets: list[dict]) -> str:
        return super().begin_run(name, loose_json(config), loose_json(datasets))

    def complete_run(self, run_id: str, summary: dict) -> None:
        super().complete_run(run_id, loose_json(summary))

    def begin_pipeline(
        self,
        run_id: str,
        name: str,
        expanded_config: Any,
        generator_choices: Any,
        dataset_name: str,
        dataset_hash: str,
        original_template: Any | None = None,
    ) -> str:
        """``begin_pipeline`` with the authoring template kept (``original_template``)."""
        with self._lock:
            self._check_open()
            self._known.run(run_id)
            V.text("dataset_name", dataset_name, allow_none=False)
            row = records.pipeline_row(
                run_id, name, loose_json(expanded_config), loose_json(generator_choices), dataset_name, dataset_hash
            )
            row["original_template"] = V.json_field(loose_json(original_template), "original_template")
            self._known.pipelines[row["pipeline_id"]] = row
            self._buffer("pipelines", row)
            self._own_chains[row["pipeline_id"]] = []
            return row["pipeline_id"]

    # A folder's mtime younger than this may still change within the same clock tick (file
    # times use a coarse clock): only an older one vouches that the folder did not change.
    SETTLED_SECONDS = 0.05

    def _folder_stamp(self, tdef: S.TableDef) -> tuple[int, ...] | None:
        """The modification times of the folders whose files make ``tdef``'s current rows (the
        table, the deletions, the compaction commits), when all are settled; None otherwise or
        off a local disk. A file published, renamed or removed in one changes its time."""
        if not self._storage.is_local:
            return None
        folders = self._stamp_folders.get(tdef.name)
        if folders is None:  # asked for on every call of a reload: joined once
            folders = self._stamp_folders[tdef.name] = tuple(self._storage.path(t.dir) for t in (tdef, S.DELETIONS, S.COMMITS))
        try:
            times = tuple(os.stat(folder).st_mtime_ns for folder in folders)
        except OSError:
            return None
        return times if time.time_ns() - max(times) > self.SETTLED_SECONDS * 1e9 else None

    # What a reload (``Predictions.from_workspace``) reads after the predictions: the run, each
    # pipeline and its chains; and, when it loads them, the arrays.
    RELOAD_TABLES = (S.PREDICTIONS, S.RUNS, S.PIPELINES, S.CHAINS)
    # The arrays are decoded with them only when a query is a reload's (a dataset's predictions,
    # nothing else asked) and the partition's files are small on a local disk: then one round
    # costs less than two, and what is decoded for nothing is bounded.
    PREFETCH_ARRAY_BYTES = 16 * 2**20

    def _prefetch(self, dataset_name: str | None, whole: bool) -> None:
        """Decode the reload's tables in one round (``LakeReads.prefetch``); files decoded
        before are not read again, so after the first query this only lists. For a reload's
        query (``whole``) the indexes behind ``get_run``, ``get_pipeline`` and
        ``get_chains_for_pipeline`` are built from the same listing, their read rules in the
        predictions' round: a reload asks for them next."""
        exact = exact_dataset(dataset_name)
        tables = self.RELOAD_TABLES
        with self._lock:
            self._check_open()
            listed = tuple(t.name for t in tables) + (("prediction_arrays",) if whole else ())
            if whole:
                self._publish_for_read()  # before the folder times, which the publication changes
                times = {t.name: self._folder_stamp(t) for t in self.INDEXED}
            snap = self._reads.snapshot(publish=not whole, tables=listed)
            if whole and self._storage.is_local:
                rels = with_rows(snap.table_files(S.PREDICTION_ARRAYS, ... if exact is None else exact))
                try:
                    small = sum(self._storage.size(rel) for rel in rels) <= self.PREFETCH_ARRAY_BYTES
                except OSError:  # removed by a vacuum meanwhile: the load lists again
                    small = False
                tables += (S.PREDICTION_ARRAYS,) if small else ()
            self._reads.prefetch(tables, snap, exact)
            if whole:
                self._build_indexes(self.INDEXED, snap, times, also=(S.PREDICTIONS,), dataset_name=exact)

    # The tables nirs4all asks row by row (the run, each pipeline and its chains), indexed.
    INDEXED = (S.RUNS, S.PIPELINES, S.CHAINS)

    def _index(self, tdef: S.TableDef) -> dict:
        """``{pipeline_id: row dict}`` (pipelines, runs by run_id), or the chains and each
        pipeline's span of them, of the current rows: a reload asks for each pipeline and
        its chains in turn. Rebuilt when the table's files or the deletions changed; on a local
        disk, folders not modified since the index was built (their times settled) spare the
        listing. The first build builds the other indexed tables with it, in one read."""
        self._publish_for_read()  # this process's writes first, as every read
        folders = self._folder_stamp(tdef)
        cached = self._indexes.get(tdef.name)
        if cached is not None and folders is not None and cached[2] == folders:
            return cached[1]
        todo = [tdef, *(t for t in self.INDEXED if t is not tdef and t.name not in self._indexes)]
        # The folder times read before the listing: a change after them shows as a newer time.
        times = {t.name: folders if t is tdef else self._folder_stamp(t) for t in todo}
        snap = self._reads.snapshot(publish=False, tables=tuple(t.name for t in todo))
        self._build_indexes(todo, snap, times)
        return self._indexes[tdef.name][1]

    def _build_indexes(
        self, todo: tuple[S.TableDef, ...] | list[S.TableDef], snap: Snapshot, times: dict, also: tuple = (),
        dataset_name: str | None = None,
    ) -> None:
        """The indexes of ``todo`` as of ``snap`` (``times``: each table's folder times, read
        before the listing), rebuilding those whose files changed. ``also``: tables of
        ``dataset_name`` whose rules run in the same round, for the read that follows."""
        stamps = {t.name: (tuple(snap.table_files(t)), tuple(snap.table_files(S.DELETIONS))) for t in todo}
        stale = []
        for t in todo:
            kept = self._indexes.get(t.name)
            if kept is not None and kept[0] == stamps[t.name]:
                self._indexes[t.name] = (stamps[t.name], kept[1], times[t.name])
            else:
                stale.append(t)
        if not stale:
            return
        frames = self._reads.frames(tuple(stale) + also, snap, dataset_name)[: len(stale)]
        # Every index's rows in one polars round: each eager step costs a round of its own.
        for t, frame in zip(stale, pl.collect_all([self._index_rows(t, f) for t, f in zip(stale, frames)])):
            self._indexes[t.name] = (stamps[t.name], self._build_index(t, frame), times[t.name])

    @staticmethod
    def _index_rows(tdef: S.TableDef, frame: pl.DataFrame) -> pl.LazyFrame:
        """The rows an index holds: times naive (once here, not on each call that reads the
        index), without the lake's own columns but a run's version (a read moves the clock
        past it); chains by pipeline, each pipeline's in creation order."""
        drop = ("artifact_ids",) if tdef is S.RUNS else ("_version", "artifact_ids")
        rows = frame.lazy().with_columns(_naive_columns(frame)).drop([c for c in drop if c in frame.columns])
        return rows.sort(["pipeline_id", "created_at", tdef.key]) if tdef is S.CHAINS else rows

    @staticmethod
    def _build_index(tdef: S.TableDef, frame: pl.DataFrame) -> dict:
        """``{key: row dict}`` of ``_index_rows``' rows, or for chains their frame and each
        pipeline's span of it: a call takes its span (a slice, which copies nothing; a gather
        per call cost 0.2 ms, splitting into frames 2 ms)."""
        if tdef is not S.CHAINS:
            return {row[tdef.key]: row for row in frame.to_dicts()}
        spans: dict[str, list[int]] = {}
        for i, pid in enumerate(frame["pipeline_id"].to_list()):
            span = spans.setdefault(pid, [i, 0])
            span[1] += 1
        return {"frame": frame, "spans": spans}

    def get_run(self, run_id: str) -> dict | None:
        """The run as a dict (JSON fields decoded), or None: from the runs table read whole
        (a handful of rows, decoded by polars as the other reads of a reload)."""
        V.text("run_id", run_id, allow_none=False)
        with self._lock:
            self._check_open()
            found = self._index(S.RUNS).get(run_id)
        if found is None:
            return super().get_run(run_id)  # none: the lookup that also notes a deletion's stamp
        row = dict(found)
        CLOCK.observe(row.pop("_version"))  # what this process writes of the run next is later
        return records.decoded(row, records.RUN_JSON)

    def get_pipeline(self, pipeline_id: str) -> dict | None:
        """The pipeline as a dict (JSON fields decoded, ``original_template`` too), or None."""
        V.text("pipeline_id", pipeline_id, allow_none=False)
        with self._lock:
            self._check_open()
            found = self._index(S.PIPELINES).get(pipeline_id)
        if found is None:
            return None
        return records.decoded(dict(found), (*records.PIPELINE_JSON, "original_template"))

    def get_chains_for_pipeline(self, pipeline_id: str) -> pl.DataFrame:
        """The pipeline's chains, in creation order. For a pipeline this store began, the chains
        it saved (only its maker saves a pipeline's chains: nirs4all's ids are fresh uuids)."""
        V.text("pipeline_id", pipeline_id, allow_none=False)
        with self._lock:
            self._check_open()
            own = self._own_chains.get(pipeline_id)
            if own is not None and pipeline_id in self._known.pipelines:
                table = pa.Table.from_pylist(own, schema=S.CHAINS.schema)
                return naive_utc(public(pl.from_arrow(table)))
            index = self._index(S.CHAINS)
        start, length = index["spans"].get(pipeline_id, (0, 0))
        return index["frame"].slice(start, length)

    def log_step(self, pipeline_id: str, step_idx: int, operator_class: str, event: str, duration_ms: float | None = None,
                 message: str | None = None, details: dict | None = None, level: str = "info") -> None:
        super().log_step(pipeline_id, step_idx, operator_class, event, duration_ms, message, loose_json(details), level)

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
        dataset_name: str | None = None,
        relation_replay_manifest: Any | None = None,
    ) -> str:
        """``save_chain`` with the chain's dataset and its relation replay manifest (with that
        manifest's version and fingerprint), as nirs4all records them."""
        payload = _relation_payload(relation_replay_manifest)
        with self._lock:
            self._check_open()
            pipeline = self._known.pipeline(pipeline_id)
            steps = loose_json(steps)
            V.dict_list("steps", steps)
            fold_artifacts, shared_artifacts = V.artifact_maps(fold_artifacts, shared_artifacts)
            held = records.held_artifacts(steps, fold_artifacts, shared_artifacts)
            if self._storage.is_local:
                art.refresh_objects(self._storage, map(str, held))
            row = records.chain_row(
                pipeline, steps, model_step_idx, model_class, preprocessings, fold_strategy,
                fold_artifacts, shared_artifacts, loose_json(branch_path), source_index, held,
            )
            row["dataset_name"] = V.text("dataset_name", dataset_name if dataset_name is not None else pipeline["dataset_name"])
            row["relation_replay_manifest"] = V.json_field(loose_json(payload), "relation_replay_manifest")
            row["relation_replay_version"] = None if payload is None or payload.get("version") is None else str(payload["version"])
            row["relation_replay_fingerprint"] = None if payload is None or payload.get("fingerprint") is None else str(payload["fingerprint"])
            self._known.chains[row["chain_id"]] = pipeline_id
            self._buffer("chains", row)
            if pipeline_id in self._own_chains:
                self._own_chains[pipeline_id].append(row)
            return row["chain_id"]

    def get_chain(self, chain_id: str) -> dict | None:
        row = super().get_chain(chain_id)
        if row is not None:
            records.decoded(row, ("relation_replay_manifest",))
        return row

    def update_chain_summary(self, chain_id: str) -> None:
        self.bulk_update_chain_summaries([chain_id])

    def bulk_update_chain_summaries(self, chain_ids: list[str]) -> None:
        """In the lake a chain's summary (CV and refit scores) is computed from its predictions
        when read (:meth:`query_chain_summaries`), so it is never stale and nothing is rewritten;
        this checks that every chain exists."""
        with self._lock:
            self._check_open()
            for chain_id in chain_ids:
                V.text("chain_id", chain_id, allow_none=False)
                if chain_id not in self._known.chains and self._reads.row(S.CHAINS, chain_id) is None:
                    raise KeyError(f"unknown chain_id {chain_id!r}")

    def query_chain_summaries(self, run_id: str | None = None, pipeline_id: str | None = None,
                              dataset_name: str | None = None, **_: Any) -> pl.DataFrame:
        """One row per chain: its identity and its CV and refit scores (``cv_val_score`` the mean
        validation score over CV folds, ``final_test_score`` the refit's test score ...)."""
        with self._lock:
            self._check_open()
            chains = public(self._reads.frame(S.CHAINS).collect())
            predictions = self._reads.frame(S.PREDICTIONS).collect()
        frame = chain_summaries(chains, predictions)
        for column, value in (("run_id", run_id), ("pipeline_id", pipeline_id), ("dataset_name", dataset_name)):
            if value is not None:
                frame = frame.filter(pl.col(column) == value)
        return frame

    def count_chain_summaries(self, **filters: Any) -> int:
        return self.query_chain_summaries(**filters).height

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
        refit_context: str | None = None,
        prediction_scope: str | None = None,
        prediction_level: str | None = None,
        evaluation_scope: str | None = None,
        reduction_role: str | None = None,
        reduction_id: str | None = None,
        physical_sample_id: str | None = None,
        origin_sample_id: str | None = None,
        derived_unit_id: str | None = None,
        unit_level: str | None = None,
        unit_id: str | None = None,
        row_id: str | None = None,
        sample_influence_weight: float | None = None,
    ) -> str:
        """``save_prediction`` with nirs4all's refit context and lineage fields. A prediction
        saved again under the same natural key (pipeline, chain, fold, partition, model, branch)
        keeps its id, and the lake its latest version, as nirs4all replaces it."""
        fields = dict(locals())
        fields.pop("self")
        natural = (pipeline_id, chain_id, str(fold_id), partition, model_name, branch_id)
        with self._lock:
            self._check_open()
            earlier = self._natural.get(natural)
            if earlier is not None:
                fields["prediction_id"] = earlier
            elif prediction_id is not None:
                fields["prediction_id"] = V.text("prediction_id", prediction_id, allow_none=False)
            # Only what this process wrote is checked for a caller-given id (a lake lookup per
            # prediction would cost a listing each): nirs4all's ids are fresh uuids.
            try:
                row = self._prediction_row(fields, owner_of=self._known.predictions.get)
            except TypeError:
                # Live objects in scores or best_params (a tuned estimator ...): kept as nirs4all
                # keeps them, their str(); anything else still fails below, named.
                fields["scores"], fields["best_params"] = loose_json(scores), loose_json(best_params)
                row = self._prediction_row(fields, owner_of=self._known.predictions.get)
            row["refit_context"] = V.text("refit_context", refit_context)
            for name in LINEAGE_FIELDS:
                value = fields[name]
                row[name] = None if value is None else V.free_text(name, str(value))
            row["sample_influence_weight"] = V.opt_float("sample_influence_weight", sample_influence_weight)
            self._known.predictions[row["prediction_id"]] = (row["run_id"], dataset_name, row["created_at"])
            self._natural[natural] = row["prediction_id"]
            self._buffer("predictions", row)
            return row["prediction_id"]

    # ------------------------------------------------------------------ artifacts
    def save_artifact(self, obj: Any, operator_class: str, artifact_type: str, format: str) -> str:
        self._require_writable()
        return super().save_artifact(obj, operator_class, artifact_type, format)

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
        """Record a file nirs4all wrote itself: ``path`` is relative to ``<workspace>/artifacts``
        (or absolute); ``content_hash`` is ``sha256:<hex>`` or the bare digest. Registering an id
        again with other content or format is refused, as nirs4all refuses it."""
        V.text("artifact_id", artifact_id, allow_none=False)
        path = V.text("path", os.fspath(path), allow_none=False)
        if not art.is_hash(content_hash):
            raise ValueError(
                f"content_hash of artifact {artifact_id!r} must be a sha256 digest ('sha256:' and 64 "
                f"lowercase hex, as nirs4all writes it, or the 64 hex alone), got {content_hash!r}"
            )
        rel = path if (os.path.isabs(path) or "://" in path) else f"artifacts/{path}"
        with self._lock:
            self._check_open()
            existing = self._own_artifact(artifact_id)
            if existing is None and artifact_id not in self._known.artifacts:
                # What this store recorded is in memory (known.artifacts); the lake is read without
                # publishing first, so each registration does not publish a file per table.
                snap = self._reads.snapshot(publish=False, tables=("artifacts",))
                existing = self._reads.row(S.ARTIFACTS, artifact_id, snap=snap)
            if existing is not None:
                if art.bare_hash(existing["content_hash"]) != art.bare_hash(content_hash) or existing["format"] != format:
                    raise ValueError(f"Artifact identity collision for {artifact_id!r}: fitted content differs")
                return artifact_id
            full = rel if art.is_external(rel) else self._storage.path(rel)
            inside = full.split("://", 1)[-1].startswith(self._storage.root.rstrip("/") + "/")
            stored_path = self._storage.relative(full) if inside else full
            self._buffer(
                "artifacts",
                records.registered_artifact_row(
                    artifact_id, stored_path, content_hash, operator_class, artifact_type, format, size_bytes
                ),
            )
            self._known.artifacts.add(artifact_id)
            return artifact_id

    def _own_artifact(self, artifact_id: str) -> dict | None:
        """The artifact's record when this store holds it unpublished (inside a transaction)."""
        for row in reversed(self._writer.buffered("artifacts")):
            if row["artifact_id"] == artifact_id:
                return row
        return None

    def _artifact(self, artifact_id: str) -> dict:
        V.text("artifact_id", artifact_id, allow_none=False)
        return self._own_artifact(artifact_id) or super()._artifact(artifact_id)

    def get_artifact_path(self, artifact_id: str) -> Path | ObjectPath:
        """Where the artifact's bytes are: a ``Path``, or on an object store its URL with the
        reads nirs4all makes of a ``Path``."""
        found = super().get_artifact_path(artifact_id)
        return found if isinstance(found, Path) else ObjectPath(found, self._storage.fs)

    def cleanup_transient_artifacts(self, run_id: str, dataset_name: str, winning_pipeline_ids: list[str]) -> int:
        """nirs4all drops the reference of losing pipelines' fold models here. In the lake a
        chain holds its artifacts for as long as it lives (chains are never deleted), so only
        the artifacts no live chain holds go: ``gc_artifacts``. Returns how many."""
        V.text("run_id", run_id, allow_none=False)
        V.text("dataset_name", dataset_name, allow_none=False)
        return self.gc_artifacts()

    # nirs4all's chain replay, unchanged: it reads chains, pipelines and artifacts through the
    # store's public calls, which the lake serves.
    def replay_chain(self, chain_id: str, X: Any, wavelengths: Any = None) -> Any:
        return native_store().replay_chain(self, chain_id, X, wavelengths)

    def query_predictions(self, dataset_name: str | None = None, model_class: str | None = None,
                          partition: str | None = None, fold_id: Any = None, branch_id: int | None = None,
                          pipeline_id: str | None = None, run_id: str | None = None, task_type: str | None = None,
                          limit: int | None = None, offset: int = 0) -> pl.DataFrame:
        """``query_predictions`` with nirs4all's ``task_type`` filter too. What a reload
        (``Predictions.from_workspace``) reads next, the run, each pipeline, its chains and
        maybe the arrays, is decoded in the same round as the predictions (``_prefetch``)."""
        V.text("dataset_name", dataset_name)
        whole = (model_class, partition, fold_id, branch_id, pipeline_id, run_id, task_type, limit) == (None,) * 8 and not offset
        self._prefetch(dataset_name, whole)
        if task_type is None:
            return super().query_predictions(dataset_name, model_class, partition, fold_id, branch_id, pipeline_id, run_id, limit, offset)
        V.text("task_type", task_type)
        frame = super().query_predictions(dataset_name, model_class, partition, fold_id, branch_id, pipeline_id, run_id)
        return frame.filter(pl.col("task_type") == task_type).slice(V.count("offset", offset), V.count("limit", limit, allow_none=True))

    def list_runs(self, status: str | None = None, dataset: str | None = None, project_id: str | None = None,
                  limit: int = 100, offset: int = 0) -> pl.DataFrame:
        if project_id is not None:
            _no_projects()
        return super().list_runs(status=status, dataset=dataset, limit=limit, offset=offset)

    # Projects have no table in the lake yet (docs/nirs4all.md): refused by name, never ignored.
    def create_project(self, *args: Any, **kwargs: Any) -> str:
        _no_projects()

    def set_run_project(self, *args: Any, **kwargs: Any) -> None:
        _no_projects()

    def get_or_create_project(self, *args: Any, **kwargs: Any) -> str:
        _no_projects()

    def list_projects(self) -> pl.DataFrame:
        _no_projects()

    # ------------------------------------------------------------------ nirs4all's SQL
    _PIPELINES_IN_ORDER = re.compile(
        r"\s*SELECT rowid AS _rowid, \* FROM pipelines WHERE run_id = \?( AND dataset_name = \?)? ORDER BY rowid ASC\s*", re.I
    )

    def _fetch_pl(self, sql: str, params: list | None = None) -> pl.DataFrame:
        """The SQL nirs4all 1.4.10 runs on its store outside the store's API, answered from the
        lake. One statement: the legacy refit's pipelines of a run in creation order (its
        ``config_extractor`` recurses without end on a store that lacks this). Any other SQL is
        refused by name: nirs4all's SQLite tables are not the lake's."""
        match = self._PIPELINES_IN_ORDER.fullmatch(sql)
        if match is None:
            raise NotImplementedError(f"nirslake answers no SQLite SQL but nirs4all's pipeline order query; got {sql!r}")
        params = list(params or [])
        frame = self.list_pipelines(run_id=params[0], dataset_name=params[1] if match.group(1) else None)
        frame = frame.sort(["created_at", "pipeline_id"])
        return frame.with_row_index("_rowid", offset=1).with_columns(pl.col("_rowid").cast(pl.Int64))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self._read_only:
            with self._lock:
                self._closed = True
                self._finalizer.detach()
            return
        super().close()


# ---------------------------------------------------------------------- install
_INSTALL_LOCK = threading.Lock()
_INSTALLED: list[tuple[object, str, object]] | None = None
_NATIVE: list[type] = []


def native_store() -> type:
    """nirs4all's own ``WorkspaceStore`` class, also while ``install()`` has replaced it."""
    if not _NATIVE:
        import nirs4all.pipeline.storage.workspace_store as workspace_store

        if workspace_store.WorkspaceStore is not Nirs4allStore:
            _NATIVE.append(workspace_store.WorkspaceStore)
    return _NATIVE[0]


def _targets() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for every place nirs4all holds its store or a direct reader."""
    import nirs4all.pipeline.dagml.general_workspace as general_workspace
    import nirs4all.pipeline.storage.model_catalogue as model_catalogue
    import nirs4all.pipeline.storage.prediction_export as prediction_export
    import nirs4all.pipeline.storage.workspace_store as workspace_store
    from nirs4all.data.predictions import Predictions
    from nirs4all.pipeline.storage.artifacts import artifact_registry

    native = native_store()
    if workspace_store.WorkspaceStore is Nirs4allStore:
        return []
    targets: list[tuple[object, str, object]] = [(workspace_store, "WorkspaceStore", Nirs4allStore)]
    # Modules that imported the class by name, now or before install().
    for name, module in list(sys.modules.items()):
        if name.startswith("nirs4all") and module is not workspace_store and getattr(module, "WorkspaceStore", None) is native:
            targets.append((module, "WorkspaceStore", Nirs4allStore))
    if Predictions.__dict__.get("_store_backend") in (None, native):
        targets.append((Predictions, "_store_backend", Nirs4allStore))
    registry = artifact_registry.ArtifactRegistry
    targets += [
        (registry, "_scan_all_manifest_references", protecting_lake_artifacts(registry.__dict__["_scan_all_manifest_references"])),
        (general_workspace, "load_general_workspace_chain", load_general_workspace_chain),
        (model_catalogue, "read_model_catalogue", read_model_catalogue),
        (prediction_export, "export_prediction_arrays", export_prediction_arrays),
    ]
    return targets


def install() -> Callable[[], None]:
    """Make nirs4all (1.4.10) open nirslake for every workspace; returns a callable undoing it.

    Idempotent: a second call changes nothing (and its undo is the same). Works whether nirs4all
    was imported before or after: it imports nirs4all's storage modules and replaces the store
    class wherever nirs4all holds it, and the direct readers of ``store.sqlite``.
    """
    global _INSTALLED
    import nirs4all

    if getattr(nirs4all, "__version__", TESTED_VERSION) != TESTED_VERSION:
        import warnings

        warnings.warn(
            f"nirslake.integrations.nirs4all is tested with nirs4all {TESTED_VERSION}, found {nirs4all.__version__}",
            RuntimeWarning,
            stacklevel=2,
        )
    # The local filesystem of fsspec, imported now rather than inside the first store a
    # reload opens (it costs that reload ~30 ms).
    import fsspec.implementations.local  # noqa: F401

    with _INSTALL_LOCK:
        if _INSTALLED is None:
            done = []
            for owner, attr, replacement in _targets():
                done.append((owner, attr, owner.__dict__.get(attr, getattr(owner, attr, None))))
                setattr(owner, attr, replacement)
            _INSTALLED = done
    return uninstall


def uninstall() -> None:
    """Give nirs4all its own store and readers back (what ``install()`` returned)."""
    global _INSTALLED
    with _INSTALL_LOCK:
        if _INSTALLED is None:
            return
        for owner, attr, original in reversed(_INSTALLED):
            setattr(owner, attr, original)
        _INSTALLED = None


def installed() -> bool:
    return _INSTALLED is not None


__all__ = ["Nirs4allStore", "install", "uninstall", "installed", "TESTED_VERSION"]
