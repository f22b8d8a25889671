"""What this process wrote lately (runs, pipelines, chains, predictions, artifacts), and the
lookups a write makes for its parent: in memory first, then one keyed read of the lake.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from ..lake import schema as S
from ..lake.tables import Snapshot, with_rows
from . import validation as V
from .reads import LakeReads

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Recent(OrderedDict):
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


class Known:
    """A store's memory of its writes, so hot-path writes never scan the lake to find a parent."""

    def __init__(self, reads: LakeReads) -> None:
        self.reads = reads
        self.runs: Recent = Recent(1_000)
        self.pipelines: Recent = Recent(10_000)
        self.chains: Recent = Recent(10_000)  # id -> pipeline_id
        self.predictions: Recent = Recent(100_000)  # id -> (run_id, dataset_name, created µs)
        self.artifacts: set[str] = set()

    def run(self, run_id: str) -> dict:
        V.text("run_id", run_id, allow_none=False)
        row = self.runs.get(run_id) or self.reads.row(S.RUNS, run_id)
        if row is None:
            raise KeyError(f"unknown run_id {run_id!r}")
        self.runs[run_id] = row
        return row

    def pipeline(self, pipeline_id: str) -> dict:
        V.text("pipeline_id", pipeline_id, allow_none=False)
        row = self.pipelines.get(pipeline_id) or self.reads.row(S.PIPELINES, pipeline_id)
        if row is None:
            raise KeyError(f"unknown pipeline_id {pipeline_id!r}")
        self.pipelines[pipeline_id] = row
        return row

    def check_chain(self, chain_id: str, pipeline_id: str) -> None:
        """A prediction's chain exists and is one of its pipeline's."""
        owner = self.chains.get(chain_id)
        if owner is None:
            row = self.reads.row(S.CHAINS, chain_id)
            if row is None:
                raise KeyError(f"unknown chain_id {chain_id!r}")
            owner = self.chains[chain_id] = row["pipeline_id"]
        if owner != pipeline_id:
            raise ValueError(f"chain_id {chain_id!r} belongs to pipeline {owner!r}, not to pipeline_id {pipeline_id!r}")

    def stored_predictions(self, prediction_ids: list) -> dict[str, tuple[str, str, int]]:
        """``prediction`` of many ids at once: one listing, and only the ids some file holds are
        read (a batch of fresh ids costs a dict lookup per file each)."""
        wanted = {p for p in prediction_ids if isinstance(p, str) and p}
        owners = {p: self.predictions[p] for p in wanted if p in self.predictions}
        unknown = wanted - set(owners)
        if unknown:
            snap = self.reads.snapshot(publish=False, tables=("predictions",))
            rels = with_rows(snap.table_files(S.PREDICTIONS))
            for pid in self.reads.cache.held_keys(self.reads.storage, rels, S.PREDICTIONS, unknown):
                owner = self.prediction(pid, snap)
                if owner is not None:
                    owners[pid] = owner
        return owners

    def prediction(self, prediction_id: str, snap: Snapshot | None = None) -> tuple[str, str, int] | None:
        """(run_id, dataset_name, created µs) of a prediction; looked up without flushing (in
        ``snap``, a listing of the predictions, when given), then remembered."""
        V.text("prediction_id", prediction_id, allow_none=False)
        owner = self.predictions.get(prediction_id)
        if owner is None:
            snap = snap or self.reads.snapshot(publish=False, tables=("predictions",))
            row = self.reads.row(S.PREDICTIONS, prediction_id, snap=snap)
            if row is None:
                return None
            created = (row["created_at"] - _EPOCH) // timedelta(microseconds=1)
            owner = self.predictions[prediction_id] = (row["run_id"], row["dataset_name"], created)
        return owner

    def resaved_prediction(
        self, prediction_id: Any, dataset_name: str, owner_of: Callable[[str], tuple[str, str, int] | None] | None = None
    ) -> str:
        """A caller-given prediction id, checked: a key lives in one dataset partition. ``owner_of``
        (a batch's ``stored_predictions``) finds its owner instead of a lookup."""
        pid = V.text("prediction_id", prediction_id, allow_none=False)
        if not pid:
            raise ValueError("prediction_id must not be empty")
        owner = (owner_of or self.prediction)(pid)
        if owner is not None and owner[1] != dataset_name:
            # Moving it would let pruned reads disagree.
            raise ValueError(
                f"prediction_id {pid!r} already belongs to dataset {owner[1]!r}; "
                f"it cannot be saved again under {dataset_name!r} (delete it first)"
            )
        return pid

    def live_prediction(self, prediction_id: str, publish_for_read: Callable[[], None]) -> tuple[str, str, int]:
        """The owner of a prediction that arrays may be attached to; KeyError when there is none."""
        owner = self.prediction(prediction_id)
        # Arrays of a deleted prediction would never show (lake spec §5.4): a remembered owner
        # that a deletion this store has read since may hide is looked up again (another
        # process may have saved it anew). A deletion not read yet is left to the read rules.
        deleted = self.reads.deleted[1]
        if (
            owner is not None
            and deleted is not None
            and (owner[0] in deleted.runs or deleted.entities.get(("prediction", prediction_id), -1) >= owner[2])
        ):
            self.predictions.pop(prediction_id, None)
            owner = self.prediction(prediction_id)
        if owner is None:
            publish_for_read()  # it may sit in a buffer or journal of this process
            owner = self.prediction(prediction_id)
        if owner is None:
            raise KeyError(f"unknown prediction_id {prediction_id!r}")
        return owner

    def forget_run(self, run_id: str) -> None:
        """Drop a deleted run and what it held."""
        self.runs.pop(run_id, None)
        for pid in [p for p, row in self.pipelines.items() if row["run_id"] == run_id]:
            del self.pipelines[pid]
        for pid in [p for p, (owner, _, _) in self.predictions.items() if owner == run_id]:
            del self.predictions[pid]
