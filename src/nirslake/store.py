"""``WorkspaceStore``: the nirs4all store API over the lake (docs/lake-spec.md), as a facade.

Each method checks its arguments (``api.validation``), builds its record (``api.records``) and hands
the work to its owner: the lake writer, the reads (``api.reads``), exports, replay, gc, maintenance.
Writes buffer in memory, become durable in the writer's journal at each durability point and
are published as immutable Parquet files in bulk; reads publish first, then apply the lake's
read rules, so a process always sees its own writes.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from .api import bundles, exports, gc, records
from .api import validation as V
from .api.known import Known
from .api.records import checked_arrays_row, record_arrays
from .api.reads import LakeReads, exact_dataset, filter_exprs, leasable, log_summary, public
from .lake import artifacts as art
from .lake import liveness
from .lake import schema as S
from .lake.storage import Storage
from .lake.tables import CLOCK, ensure_schema_files, new_id
from .lake.writer import DEFAULT_FLUSH_BYTES, DEFAULT_FLUSH_ROWS, DEFAULT_FLUSH_SECONDS, LakeWriter, flush_left_open, recover_orphans
from .query import catalog, top_k, with_scores
from .query.scores import METRICS

if TYPE_CHECKING:
    from .lake.check import CheckReport
    from .lake.checkpoint import CheckpointResult
    from .lake.maintenance import CompactionResult

# How long gc_artifacts and vacuum leave alone what another writer or reader may still use.
DEFAULT_GRACE_SECONDS = 3600.0

# Every store of this process: a forked child gives each fresh locks, since a thread of the
# parent that held one at the fork does not exist in the child and would never release it.
_STORES: weakref.WeakSet[WorkspaceStore] = weakref.WeakSet()


def _fresh_locks_in_child() -> None:
    for store in list(_STORES):
        store._lock = threading.RLock()
        store._reads.cache.after_fork()


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
        V.store_options(flush_bytes, flush_rows, grace_seconds, flush_seconds, listing_ttl_seconds)
        self._storage = Storage(workspace_path, storage_options, fsync=fsync)
        self._workspace_path: Path | str = (
            Path(self._storage.root) if self._storage.is_local else os.fspath(workspace_path)
        )
        self._lock = threading.RLock()
        self._reads = LakeReads(self._storage, listing_ttl_seconds, self._publish_for_read)
        self._writer = LakeWriter(self._storage, flush_bytes, flush_rows, flush_seconds)
        self._grace_us = int(grace_seconds * 1e6)
        self._known = Known(self._reads)  # what this process wrote: writes find parents without a scan
        self._closed = False
        # The storage's count of publishes and deletes when this store last checkpointed (or
        # opened): close() checkpoints only when it moved (lake spec §11).
        self._checkpointed_at = self._storage.generation
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
        current = catalog.is_current(self._storage)
        # One empty file per table fixes its schema for engines that glob the lake, so every
        # view works (and returns no rows) before anything was written. They are written before
        # the catalog, so on an object store, where each check is a request (nine per open), a
        # current catalog vouches for them.
        written = ensure_schema_files(self._storage) if (self._storage.is_local or not current) else set()
        try:
            if not current:
                catalog.build_catalog(self._storage, written)
        except catalog.CatalogError as exc:
            # The store reads the lake, not the catalog: a damaged file must not lock everyone
            # out, least of all `nirslake check`, which names it.
            warnings.warn(f"{exc}. The store opens without a current catalog.", RuntimeWarning, stacklevel=3)
        # Records a crashed writer made durable but never published (lake spec §6).
        recover_orphans(self._storage)

    def close(self) -> None:
        """Flush what is buffered and release the store. Idempotent.

        When anything was published or deleted since the store opened (or last checkpointed), a
        checkpoint brings ``_current/manifest.parquet`` up to date (lake spec §11); its failure
        warns, never raises: the lake itself is written by then."""
        with self._lock:
            if self._closed:
                return
            # Closed only once the buffer is written: a failed flush leaves the store open, so
            # close() can be retried and the exit hook still holds the rows.
            self._publish()
            self._closed = True
            self._finalizer.detach()
            if self._storage.generation != self._checkpointed_at:
                self._checkpoint_quietly()

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

    def _publish_for_read(self) -> None:
        """Publish this store's writes and what other stores of this process acknowledged: one
        process reads what any of its stores acknowledged (lake spec §6)."""
        self._publish()
        self._writer.publish_process_writers()

    def _get(self, tdef: S.TableDef, key: str, json_fields: tuple[str, ...], drop: str) -> dict | None:
        """One current row with its JSON fields decoded (for get_run, get_pipeline, get_chain)."""
        V.text(tdef.key, key, allow_none=False)
        with self._lock:
            self._check_open()
            row = self._reads.row(tdef, key)
        if row is None:
            return None
        row.pop(drop, None)
        return records.decoded(row, json_fields)

    # ------------------------------------------------------------------ runs
    def begin_run(self, name: str, config: Any, datasets: list[dict]) -> str:
        """Start a run over ``datasets``; returns its new id. Status ``running``."""
        with self._lock:
            self._check_open()
            V.text("name", name, allow_none=False)
            V.dict_list("datasets", datasets)
            row = records.run_row(name, config, datasets)
            # Names this process as the run's writer, so `check` can tell a run whose writer
            # died from one still being written (lake spec §12).
            liveness.record_writer(self._storage, row["run_id"])
            self._known.runs[row["run_id"]] = row
            self._buffer("runs", row)
            return row["run_id"]

    def _finish(self, table: str, key: str, **changes: Any) -> None:
        """Append the run's or pipeline's next version (a new status) and make it durable."""
        with self._lock:
            self._check_open()
            require, known = (
                (self._known.run, self._known.runs) if table == "runs" else (self._known.pipeline, self._known.pipelines)
            )
            row = known[key] = records.next_version(require(key), changes)
            self._buffer(table, row)
            self._writer.commit()

    def complete_run(self, run_id: str, summary: dict) -> None:
        """Mark the run ``completed`` with its summary: a durability point."""
        self._finish("runs", run_id, status="completed", summary=V.json_field(summary, "summary"))

    def fail_run(self, run_id: str, error: str) -> None:
        """Mark the run ``failed`` and keep ``error``: a durability point."""
        self._finish("runs", run_id, status="failed", error=V.free_text("error", error))

    def left_running(self) -> list[dict]:
        """Runs whose status is ``running`` while the process that began them is proven gone
        (killed before it could record ``completed`` or ``failed``); ``check`` reports them."""
        from .api.lifecycle import left_running

        return left_running(self)

    def mark_failed(self, run_ids: list[str] | None = None, force: bool = False) -> list[str]:
        """Record ``failed`` for runs left running (all of them, or ``run_ids``); returns the ids
        marked. A run whose writer may still run is refused unless ``force`` (api.lifecycle)."""
        from .api.lifecycle import mark_failed

        return mark_failed(self, run_ids, force)

    @leasable
    def get_run(self, run_id: str) -> dict | None:
        """The run as a dict (JSON fields decoded), or None."""
        return self._get(S.RUNS, run_id, records.RUN_JSON, drop="_version")

    @leasable
    def list_runs(self, status: str | None = None, dataset: str | None = None, limit: int = 100, offset: int = 0) -> pl.DataFrame:
        """Runs, newest first, optionally by status and by a dataset name they mention."""
        V.text("status", status)
        V.text("dataset", dataset)
        limit, offset = V.count("limit", limit, allow_none=True), V.count("offset", offset)
        with self._lock:
            self._check_open()
            frame = self._reads.frame(S.RUNS)
        if status is not None:
            frame = frame.filter(pl.col("status") == status)
        if dataset is not None:
            frame = frame.filter(pl.col("datasets").str.contains(json.dumps(dataset), literal=True))
        frame = frame.sort(["created_at", "run_id"], descending=True).slice(offset, limit)
        return public(frame.collect())

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
            self._known.run(run_id)
            V.text("dataset_name", dataset_name, allow_none=False)
            row = records.pipeline_row(run_id, name, expanded_config, generator_choices, dataset_name, dataset_hash)
            self._known.pipelines[row["pipeline_id"]] = row
            self._buffer("pipelines", row)
            return row["pipeline_id"]

    def complete_pipeline(self, pipeline_id: str, best_val: float, best_test: float, metric: str, duration_ms: int) -> None:
        """Mark the pipeline ``completed`` with its best scores: a durability point."""
        self._finish(
            "pipelines",
            pipeline_id,
            status="completed",
            best_val=V.opt_float("best_val", best_val),
            best_test=V.opt_float("best_test", best_test),
            metric=V.text("metric", metric),
            duration_ms=V.opt_int("duration_ms", duration_ms),
        )

    def fail_pipeline(self, pipeline_id: str, error: str) -> None:
        """Mark the pipeline ``failed``: its chains stop holding artifacts. A durability point."""
        self._finish("pipelines", pipeline_id, status="failed", error=V.free_text("error", error))

    @leasable
    def get_pipeline(self, pipeline_id: str) -> dict | None:
        """The pipeline as a dict (JSON fields decoded), or None."""
        return self._get(S.PIPELINES, pipeline_id, records.PIPELINE_JSON, drop="_version")

    @leasable
    def list_pipelines(self, run_id: str | None = None, dataset_name: str | None = None) -> pl.DataFrame:
        """Pipelines, newest first, optionally of one run and/or one dataset."""
        V.text("run_id", run_id)
        V.text("dataset_name", dataset_name)
        with self._lock:
            self._check_open()
            frame = self._reads.frame(S.PIPELINES)
        if run_id is not None:
            frame = frame.filter(pl.col("run_id") == run_id)
        if dataset_name is not None:
            frame = frame.filter(pl.col("dataset_name") == dataset_name)
        return public(frame.sort(["created_at", "pipeline_id"], descending=True).collect())

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
            pipeline = self._known.pipeline(pipeline_id)
            V.dict_list("steps", steps)
            fold_artifacts, shared_artifacts = V.artifact_maps(fold_artifacts, shared_artifacts)
            held = records.held_artifacts(steps, fold_artifacts, shared_artifacts)
            if self._storage.is_local:
                art.refresh_objects(self._storage, map(str, held))
            row = records.chain_row(
                pipeline, steps, model_step_idx, model_class, preprocessings, fold_strategy,
                fold_artifacts, shared_artifacts, branch_path, source_index, held,
            )
            self._known.chains[row["chain_id"]] = pipeline_id
            self._buffer("chains", row)
            return row["chain_id"]

    @leasable
    def get_chain(self, chain_id: str) -> dict | None:
        """The chain as a dict (steps, fold_artifacts, shared_artifacts, branch_path decoded), or None."""
        return self._get(S.CHAINS, chain_id, records.CHAIN_JSON, drop="artifact_ids")

    @leasable
    def get_chains_for_pipeline(self, pipeline_id: str) -> pl.DataFrame:
        """The pipeline's chains, in creation order."""
        V.text("pipeline_id", pipeline_id, allow_none=False)
        with self._lock:
            self._check_open()
            frame = self._reads.frame(S.CHAINS).filter(pl.col("pipeline_id") == pipeline_id)
            return public(frame.sort(["created_at", "chain_id"]).collect())

    @leasable
    def list_chains(
        self, run_id: str | None = None, pipeline_id: str | None = None, dataset_name: str | None = None
    ) -> pl.DataFrame:
        """Chains in creation order, with their pipeline's ``dataset_name``; optionally of one run,
        one pipeline and/or one dataset (beyond the seed API: ``nirslake chains``)."""
        for name, value in (("run_id", run_id), ("pipeline_id", pipeline_id), ("dataset_name", dataset_name)):
            V.text(name, value)
        with self._lock:
            self._check_open()
            snap = self._reads.snapshot(tables=("chains", "pipelines"))
            chains = self._reads.frame(S.CHAINS, snap=snap)
            datasets = self._reads.frame(S.PIPELINES, snap=snap).select(
                "pipeline_id", pl.col("dataset_name").alias("_pipeline_dataset")
            )
        # A chain's own dataset_name (format 3, written by the nirs4all integration) wins; else its pipeline's.
        frame = chains.join(datasets, on="pipeline_id", how="left").with_columns(
            pl.coalesce("dataset_name", "_pipeline_dataset").alias("dataset_name")
        ).drop("_pipeline_dataset")
        exprs = [pl.col(c) == v for c, v in (("run_id", run_id), ("pipeline_id", pipeline_id), ("dataset_name", dataset_name)) if v is not None]
        frame = frame.filter(*exprs) if exprs else frame
        return public(frame.sort(["created_at", "chain_id"]).collect())

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
        fields = dict(locals())
        with self._lock:
            self._check_open()
            row = self._prediction_row(fields)
            self._known.predictions[row["prediction_id"]] = (row["run_id"], dataset_name, row["created_at"])
            self._buffer("predictions", row)
            return row["prediction_id"]

    def _prediction_row(
        self, fields: Mapping[str, Any], owner_of: Callable[[str], tuple[str, str, int] | None] | None = None,
        parents: dict | None = None,
    ) -> dict:
        """One checked ``predictions`` row from ``save_prediction``'s arguments by name; records
        nothing. ``owner_of`` finds where a caller-given id is stored already, and ``parents``
        remembers the (pipeline, chain) pairs already checked: a batch looks each up once."""
        pipeline_id, chain_id, dataset_name = fields["pipeline_id"], fields["chain_id"], fields["dataset_name"]
        pipeline = parents.get((pipeline_id, chain_id)) if parents is not None else None
        if pipeline is None:
            pipeline = self._known.pipeline(pipeline_id)
            if chain_id is not None:
                self._known.check_chain(V.text("chain_id", chain_id), pipeline_id)
            if parents is not None:
                parents[(pipeline_id, chain_id)] = pipeline
        V.text("dataset_name", dataset_name, allow_none=False)
        prediction_id = fields["prediction_id"]
        pid = new_id() if prediction_id is None else self._known.resaved_prediction(prediction_id, dataset_name, owner_of)
        return records.prediction_row(pid, pipeline, chain_id, dataset_name, fields)

    def save_predictions(self, records: Iterable[Mapping[str, Any]]) -> list[str]:
        """Save many predictions with their arrays as one batch; returns their ids, in order.

        Each record holds ``save_prediction``'s arguments by name (``pipeline_id``, ``chain_id``,
        ``dataset_name`` required; the others default to None, ``preprocessings`` to "") and any of
        ``y_true``, ``y_pred``, ``y_proba``, ``sample_indices``, ``weights`` and ``sample_ids`` (the
        sample each row measured, docs/scores.md). Every record is checked before any is kept, so a
        bad one (named by its position) leaves nothing behind; the batch is durable once this
        returns. The fastest way to write predictions: ``nirslake.Predictions.flush`` uses it.
        """
        batch = list(records)
        with self._lock:
            self._check_open()
            rows, arrays, datasets, parents = [], [], {}, {}
            stored = self._known.stored_predictions([r.get("prediction_id") for r in batch if isinstance(r, Mapping)])
            for i, record in enumerate(batch):
                try:
                    row = self._prediction_row(V.prediction_record(record), owner_of=stored.get, parents=parents)
                    pid = row["prediction_id"]
                    if datasets.setdefault(pid, row["dataset_name"]) != row["dataset_name"]:
                        raise ValueError(f"prediction_id {pid!r} is in this batch under two datasets")
                    checked = record_arrays(record)
                except (TypeError, ValueError, KeyError) as exc:
                    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                    raise type(exc)(f"record {i}: {message}") from None
                rows.append(row)
                arrays.append(checked)
            for row, checked in zip(rows, arrays):
                owner = (row["run_id"], row["dataset_name"], row["created_at"])
                self._known.predictions[row["prediction_id"]] = owner
                self._buffer("predictions", row)
                if checked is not None:
                    self._writer.add_arrays(checked_arrays_row(row["prediction_id"], owner, checked))
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
            owner = self._known.live_prediction(prediction_id, self._publish_for_read)
            given = {"y_true": y_true, "y_pred": y_pred, "y_proba": y_proba, "sample_indices": sample_indices, "weights": weights}
            self._writer.add_arrays(records.arrays_row(prediction_id, owner, given))

    @leasable
    def get_prediction(self, prediction_id: str, load_arrays: bool = False) -> dict | None:
        """The prediction as a dict, or None; with ``load_arrays`` also its arrays as numpy (or None)."""
        V.text("prediction_id", prediction_id, allow_none=False)
        with self._lock:
            self._check_open()
            snap = self._reads.snapshot(tables=("predictions", "prediction_arrays") if load_arrays else ("predictions",))
            row = self._reads.row(S.PREDICTIONS, prediction_id, snap=snap)
            if row is None:
                return None
            records.decoded(row, ("scores", "best_params"))
            if load_arrays:
                row.update(self._reads.arrays(prediction_id, row["dataset_name"], snap))
            return row

    def _predictions(self, dataset_name: str | None = None) -> pl.DataFrame:
        return self._reads.table(S.PREDICTIONS, exact_dataset(dataset_name))

    @leasable
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
        filters = dict(zip(V.PREDICTION_FILTERS, (dataset_name, model_class, partition, fold_id, branch_id, pipeline_id, run_id)))
        exprs = filter_exprs(filters)  # checked before any read
        limit, offset = V.count("limit", limit, allow_none=True), V.count("offset", offset)
        with self._lock:
            self._check_open()
            frame = self._predictions(dataset_name)
        frame = frame.filter(*exprs) if exprs else frame  # eager: planning a lazy query cost more
        return frame.sort(["created_at", "prediction_id"]).slice(offset, limit)

    @leasable
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
        numeric = V.top_predictions_args(n, metric, ascending, group_by)
        exprs = filter_exprs({"partition": partition, "dataset_name": dataset_name})
        with self._lock:
            self._check_open()
            frame = self._predictions(dataset_name).lazy()
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
        return top_k(frame, min(int(n), V.MAX_ROWS), score=metric, by=group_by, ascending=ascending, metric=direction_of)

    def delete_prediction(self, prediction_id: str) -> bool:
        """Delete one prediction and its arrays; False when it did not exist."""
        V.text("prediction_id", prediction_id, allow_none=False)
        with self._lock:
            self._check_open()
            snap = self._reads.snapshot(tables=("predictions", "prediction_arrays"))
            row = self._reads.row(S.PREDICTIONS, prediction_id, snap=snap)
            if row is None:
                return False
            # Read for its stamp only: arrays saved after the row must be deleted too (§5.3).
            self._reads.row(S.PREDICTION_ARRAYS, prediction_id, dataset_name=row["dataset_name"], snap=snap)
            self._delete("prediction", [prediction_id])
            self._known.predictions.pop(prediction_id, None)
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
        from .api.rescore import rescore

        return rescore(self, dataset_name=dataset_name, run_id=run_id, pipeline_id=pipeline_id, partition=partition, save=save)

    def _delete(self, kind: str, entity_ids: list[str]) -> None:
        """Append deletion records and publish them at once, so every reader stops seeing them."""
        for row in records.deletion_rows(kind, entity_ids):
            self._buffer("deletions", row)
        self._publish()

    # ------------------------------------------------------------------ artifacts
    def save_artifact(self, obj: Any, operator_class: str, artifact_type: str, format: str) -> str:
        """Serialise ``obj`` and store it by content; identical content gives the same id, stored once.

        ``format``: ``joblib``, ``pickle``, ``cloudpickle`` (they run code when loaded), or ``npz``
        for a numpy array or a dict of arrays and numbers (loaded without pickle).
        """
        V.text("operator_class", operator_class)  # checked before any bytes are stored
        V.text("artifact_type", artifact_type)
        data = art.serialize(obj, format)
        with self._lock:
            self._check_open()
            digest, rel = art.put_object(self._storage, data)
            # Recorded on every save (one row each, resolved to one artifact), so a record that a
            # concurrent gc hid comes back with the next save of the same object.
            self._buffer("artifacts", records.saved_artifact_row(digest, rel, operator_class, artifact_type, format, len(data)))
            self._known.artifacts.add(digest)
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
            V.text("artifact_id", artifact_id, allow_none=False)
            if artifact_id in self._known.artifacts or self._reads.row(S.ARTIFACTS, artifact_id) is not None:
                return artifact_id
            path = V.text("path", os.fspath(path), allow_none=False)
            full = path if art.is_external(path) else self._storage.path(path)
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

    def _artifact(self, artifact_id: str) -> dict:
        V.text("artifact_id", artifact_id, allow_none=False)
        row = self._reads.row(S.ARTIFACTS, artifact_id)
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
            self._publish()
            return gc.gc_artifacts(self, CLOCK.now_us() - self._grace_us)

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
            pipeline = self._known.pipeline(pipeline_id)
            row = records.log_row(pipeline, step_idx, operator_class, event, duration_ms, message, details, level)
            self._buffer("logs", row)

    @leasable
    def get_pipeline_log(self, pipeline_id: str) -> pl.DataFrame:
        """The pipeline's step events, ordered by step, then time."""
        V.text("pipeline_id", pipeline_id, allow_none=False)
        with self._lock:
            self._check_open()
            frame = self._reads.frame(S.LOGS).filter(pl.col("pipeline_id") == pipeline_id)
            return public(frame.sort(["step_idx", "_version"], nulls_last=True).collect())

    @leasable
    def get_run_log_summary(self, run_id: str) -> pl.DataFrame:
        """One row per pipeline of the run: log count, total ``end`` duration, warnings, errors."""
        V.text("run_id", run_id, allow_none=False)
        with self._lock:
            self._check_open()
            pipelines = self._reads.frame(S.PIPELINES).filter(pl.col("run_id") == run_id).select("pipeline_id", "name", "dataset_name", "created_at")
            logs = self._reads.frame(S.LOGS).filter(pl.col("run_id") == run_id)
        return log_summary(pipelines, logs)

    # ------------------------------------------------------------------ export, deletion, replay
    def export_chain(self, chain_id: str, output_path: str | os.PathLike, format: str = "n4a") -> Path:
        """Write the chain and its artifacts as a bundle: a zip of ``manifest.json``, ``chain.json``
        and ``artifacts/``, sealed with the sha256 of every byte, that ``nirslake.predict`` and
        nirs4all's ``predict(model=path, engine="legacy")`` load (docs/bundles.md)."""
        return bundles.export_chain(self, chain_id, output_path, format)

    def import_bundle(self, path: str | os.PathLike) -> str:
        """Add a bundle's chain and artifacts to this workspace; returns the new chain id.

        The bundle is verified whole first. Artifacts are stored once (an object already here is
        not written again); the chain comes under a run ``import of <bundle>`` whose config keeps
        the provenance (bundle name, its sha256, when it was imported). A durability point.
        """
        return bundles.import_bundle(self, path)

    def export_pipeline_config(self, pipeline_id: str, output_path: str | os.PathLike) -> Path:
        """Write the pipeline's expanded config as JSON (``.json`` added when the path has no suffix)."""
        pipeline = self.get_pipeline(pipeline_id)
        if pipeline is None:
            raise KeyError(f"unknown pipeline_id {pipeline_id!r}")
        return exports.export_pipeline_config(pipeline, output_path)

    def export_run(self, run_id: str, output_path: str | os.PathLike) -> Path:
        """Write the run, its pipelines and their chains as YAML (``.yaml`` added when no suffix)."""
        run = self.get_run(run_id)
        if run is None:
            raise KeyError(f"unknown run_id {run_id!r}")
        with self._lock:
            pipelines = self.list_pipelines(run_id=run_id).sort("created_at").rows(named=True)
            chains = public(self._reads.frame(S.CHAINS).filter(pl.col("run_id") == run_id).sort("created_at").collect())
        chains = [records.decoded(chain, records.CHAIN_JSON) for chain in chains.rows(named=True)]
        pipelines = [records.decoded(p, records.PIPELINE_JSON) for p in pipelines]
        return exports.export_run(run, pipelines, chains, output_path)

    def export_predictions_parquet(self, output_path: str | os.PathLike, **filters: Any) -> Path:
        """``query_predictions(**filters)`` written as one Parquet file (also when empty)."""
        V.export_filters(filters)
        return exports.export_predictions_parquet(self.query_predictions(**filters), output_path)

    def delete_run(self, run_id: str, delete_artifacts: bool = True) -> int:
        """Delete the run and everything under it; returns how many records went.

        Counted: the run, its pipelines, chains, predictions and log events. One deletion record
        hides them all at once; ``vacuum()`` reclaims their space.
        """
        V.text("run_id", run_id, allow_none=False)
        with self._lock:
            self._check_open()
            if self._reads.row(S.RUNS, run_id) is None:
                return 0
            count = 1
            for tdef in (S.PIPELINES, S.CHAINS, S.PREDICTIONS, S.LOGS):
                count += self._reads.frame(tdef).filter(pl.col("run_id") == run_id).select(pl.len()).collect().item()
            self._delete("run", [run_id])
            self._known.forget_run(run_id)
            if delete_artifacts:
                self.gc_artifacts()
            return count

    def vacuum(self) -> None:
        """Reclaim space: merge each partition's small files without deleted or superseded rows
        (a partition of one small file too, when it holds such rows).

        Readers never see the swap (lake spec §4). The replaced files' bytes are deleted by a
        later vacuum, once hidden for longer than ``grace_seconds`` and listed by no checkpoint
        in use (the compaction checkpoints first, lake spec §11).

        A store opened with ``grace_seconds=0`` deletes them in this call: space after
        ``delete_run`` comes back at once instead of an hour later (with ``gc_artifacts()`` for
        the artifacts). Only safe when no other process reads the workspace: a read that listed
        the replaced files a moment before would find them gone (``nirslake vacuum --grace 0``
        refuses while a run is being written).
        """
        from .lake.maintenance import compact_all, purge

        grace_us = self._grace_us
        with self._lock:
            self._check_open()
            self._publish_for_read()
            compact_all(self._storage, self._reads.cache, 128 * 1048576, dead_rows=True)
            self._checkpoint_quietly()
            purge(self._storage, self._reads.cache, CLOCK.now_us() - grace_us)

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
        from .lake.maintenance import compact_all

        V.target_file_mb(target_file_mb)
        with self._lock:
            self._check_open()
            self._publish_for_read()
            result = compact_all(
                self._storage, self._reads.cache, int(target_file_mb * 1048576), tables=tables, progress=progress
            )
            self._checkpoint_quietly()
            return result

    def checkpoint(self) -> CheckpointResult:
        """Write the current-state manifest, ``_current/manifest.parquet``: the files that hold
        exactly the current rows of every table, for engines that read Parquet without nirslake
        (lake spec §11, docs/engines.md). Also done by ``close()`` after writes, ``compact``,
        ``vacuum`` and ``check(repair=True)``; returns what it wrote."""
        from .lake.checkpoint import write_checkpoint

        with self._lock:
            self._check_open()
            self._publish_for_read()
            return self._checkpoint(write_checkpoint)

    def _checkpoint(self, write_checkpoint: Callable) -> CheckpointResult:
        result = write_checkpoint(self._storage, self._reads.cache)
        self._checkpointed_at = self._storage.generation
        return result

    def _checkpoint_quietly(self) -> None:
        """A checkpoint after a write, warning instead of raising: the lake is the truth and is
        intact; the manifest is a view of it that the next checkpoint brings up to date."""
        from .lake.checkpoint import write_checkpoint

        try:
            self._checkpoint(write_checkpoint)
        except Exception as exc:  # noqa: BLE001 - reported; nothing written to the lake is at stake
            warnings.warn(
                f"the current-state manifest of {self._workspace_path} was not updated ({type(exc).__name__}: {exc}); "
                "the lake is intact and the store reads it; engines reading _current/manifest.parquet see the "
                "previous checkpoint until `nirslake checkpoint` runs",
                RuntimeWarning,
                stacklevel=3,
            )

    def check(self, repair: bool = False, progress: Callable[[str], None] | None = None) -> CheckReport:
        """Verify the workspace: every data file opens, every artifact's bytes match their
        sha256, every prediction's chain, pipeline and run (and every chain's artifacts) exist.

        Also lists leftovers (staging files, replaced or uncommitted compaction files,
        unreferenced objects) older than ``grace_seconds``; ``repair=True`` deletes those.
        Problems are reported, never repaired. Returns a :class:`~nirslake.lake.check.CheckReport`.
        """
        from .lake.check import check_workspace

        with self._lock:
            self._check_open()
            self._publish_for_read()
            if repair:  # before the purge: what the fresh checkpoint lists is what it must keep
                self._checkpoint_quietly()
            report = check_workspace(
                self._storage,
                self._reads.cache,
                lambda tdef, snap: self._reads.frame(tdef, snap=snap).collect(),
                CLOCK.now_us() - self._grace_us,
                repair=repair,
                progress=progress,
            )
        from .api.lifecycle import describe, left_running

        try:
            gone = left_running(self)
        except Exception:  # noqa: BLE001 - a damaged file is reported above already, by name
            gone = []
        report.left_running = [describe(run) + ": `nirslake mark-failed` records it failed" for run in gone]
        return report

    # ------------------------------------------------------------------ SQL and catalog
    def sql(self, query: str, params: list | None = None) -> pl.DataFrame:
        """Run DuckDB SQL against the lake's views (the ones in ``catalog.duckdb``); returns polars.

        Buffered writes are flushed first, so the query sees them.
        """
        with self._lock:
            self._check_open()
            self._publish_for_read()
            return catalog.run_sql(self._storage, query, params)

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
        chain = self.get_chain(chain_id)
        if chain is None:
            raise KeyError(f"unknown chain_id {chain_id!r}")
        return bundles.apply_chain(chain, self.load_artifact, X, wavelengths)
