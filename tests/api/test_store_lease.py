"""The listing lease (``listing_ttl_seconds``): reads may reuse a recent listing of the lake.

A reused listing is an earlier consistent state; what this process wrote (through this store or
any other of the process) is always seen; other processes' writes show up once the lease expires.
Runs on a local folder and on S3 (tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import let_object_times_pass

import nirslake.api.reads as reads_module
from nirslake import WorkspaceStore
from nirslake.lake.tables import LISTING_ORDER


class FakeClock:
    """Stands in for ``time.monotonic`` in the store module, so expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(reads_module, "time", fake)
    return fake


def count_listings(store, monkeypatch) -> list[str]:
    listed: list[str] = []
    original = store.storage.list_files

    def counting(rel_dir, *args, **kwargs):
        listed.append(rel_dir)
        return original(rel_dir, *args, **kwargs)

    monkeypatch.setattr(store.storage, "list_files", counting)
    return listed


def add_pipeline(store, dataset="corn", predictions=3) -> list[str]:
    run = store.begin_run("r", {}, [{"name": dataset}])
    pipe = store.begin_pipeline(run, "p", {}, {}, dataset, "h")
    chain = store.save_chain(pipe, [], 0, "PLS", "SNV", "kfold", {}, {})
    ids = []
    for k in range(predictions):
        pid = store.save_prediction(pipe, chain, dataset, "PLS", "PLS", k, "val", k / 10, 0.2, 0.3, "rmse",
                                    "regression", 4, 10, {}, {}, None, None, 0, 0.0)
        store.save_prediction_arrays(pid, np.arange(4.0), np.arange(4.0) + k)
        ids.append(pid)
    store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
    return ids


ANOTHER_WRITER = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/.."]  # this file, and conftest.py beside the test folders
from nirslake import WorkspaceStore
from test_store_lease import add_pipeline
with WorkspaceStore(sys.argv[2]) as store:
    if sys.argv[3] == "pipeline":
        add_pipeline(store, dataset=sys.argv[4])
        print(json.dumps({}))
    else:  # a run, a pipeline and a chain, no prediction yet
        run = store.begin_run("r2", {}, [{"name": "corn"}])
        pipe = store.begin_pipeline(run, "p2", {}, {}, "corn", "h")
        chain = store.save_chain(pipe, [], 0, "PLS", "SNV", "kfold", {}, {})
        print(json.dumps({"pipe": pipe, "chain": chain}))
"""


def another_process_writes(workspace: str, *what: str) -> dict:
    """Writes from another process (closed before this returns): a lease hides them until it expires."""
    done = subprocess.run(
        [sys.executable, "-c", ANOTHER_WRITER, os.path.dirname(__file__), workspace, *what],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_point_reads_within_the_lease_list_the_lake_once(workspace, clock, monkeypatch):
    with WorkspaceStore(workspace) as writer:
        ids = add_pipeline(writer, predictions=10)
    with WorkspaceStore(workspace, listing_ttl_seconds=5) as reader:
        listed = count_listings(reader, monkeypatch)
        rows = [reader.get_prediction(pid, load_arrays=True) for pid in ids]
        assert [row["prediction_id"] for row in rows] == ids
        np.testing.assert_array_equal(rows[4]["y_pred"], np.arange(4.0) + 4)
        first = len(listed)
        # The commits, then every table, children before parents (lake spec §4): once for all ten reads.
        assert listed == [f"tables/{name}" for name in ("commits", *LISTING_ORDER, "deletions")]

        clock.now += 5.01  # expired: the next read lists again
        reader.get_prediction(ids[0])
        assert len(listed) > first


def test_without_a_lease_every_read_lists(workspace, monkeypatch):
    with WorkspaceStore(workspace) as store:
        ids = add_pipeline(store, predictions=2)
        listed = count_listings(store, monkeypatch)
        store.get_prediction(ids[0])
        once = len(listed)
        store.get_prediction(ids[1])
        assert once > 0 and len(listed) == 2 * once


def test_other_writers_show_up_when_the_lease_expires(workspace, clock):
    with WorkspaceStore(workspace, listing_ttl_seconds=30) as reader:
        another_process_writes(workspace, "pipeline", "corn")
        assert reader.query_predictions().height == 3
        another_process_writes(workspace, "pipeline", "wheat")
        clock.now += 29
        assert reader.query_predictions().height == 3  # the earlier state, whole
        assert reader.list_pipelines().height == 1
        clock.now += 1.01
        assert reader.query_predictions().height == 6
        assert reader.list_pipelines().height == 2


def test_the_store_always_sees_its_own_writes_and_deletes(workspace, clock):
    with WorkspaceStore(workspace, listing_ttl_seconds=30) as store:
        first = add_pipeline(store)
        assert store.query_predictions().height == 3
        add_pipeline(store, dataset="wheat")
        assert store.query_predictions().height == 6  # no time passed: the write ended the lease
        store.delete_prediction(first[0])
        assert store.get_prediction(first[0]) is None
        assert store.query_predictions().height == 5
        run_id = store.get_prediction(first[1])["run_id"]
        store.delete_run(run_id)
        assert store.get_run(run_id) is None
        assert store.query_predictions().height == 3  # the other run's
        store.compact()
        assert store.query_predictions().height == 3


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, True, "5", None])
def test_a_bad_listing_ttl_is_refused(local_workspace, bad):
    with pytest.raises(ValueError, match="listing_ttl_seconds must be a finite number >= 0"):
        WorkspaceStore(local_workspace, listing_ttl_seconds=bad)


@pytest.mark.parametrize("ttl", [5.01, 60])
def test_a_listing_ttl_over_half_the_grace_period_is_refused(local_workspace, ttl):
    with pytest.raises(ValueError, match=r"must be at most half of grace_seconds \(10"):
        WorkspaceStore(local_workspace, listing_ttl_seconds=ttl, grace_seconds=10)
    WorkspaceStore(local_workspace, listing_ttl_seconds=5, grace_seconds=10).close()


def test_the_lease_counts_from_the_start_of_the_listing(workspace, clock, monkeypatch):
    """A slow listing shows the lake as it was when it started: its age counts from then."""
    with WorkspaceStore(workspace) as writer:
        ids = add_pipeline(writer)
    with WorkspaceStore(workspace, listing_ttl_seconds=5) as reader:
        listed = count_listings(reader, monkeypatch)
        slow = reader.storage.list_files

        def three_seconds_each(*args, **kwargs):
            clock.now += 3
            return slow(*args, **kwargs)

        monkeypatch.setattr(reader.storage, "list_files", three_seconds_each)
        reader.get_prediction(ids[0])  # one listing per table: 27 s, longer than the lease
        reader.get_prediction(ids[1])
        assert len(listed) == 2 * (len(LISTING_ORDER) + 2)


def test_a_write_finds_parents_another_writer_created_during_the_lease(workspace, clock):
    with WorkspaceStore(workspace, listing_ttl_seconds=30) as second:
        another_process_writes(workspace, "pipeline", "corn")
        assert second.list_pipelines().height == 1  # takes a lease
        made = another_process_writes(workspace, "parents")
        pipe, chain = made["pipe"], made["chain"]
        assert second.list_pipelines().height == 1  # the lease still holds for reads
        pid = second.save_prediction(pipe, chain, "corn", "PLS", "PLS", 0, "val", 0.5, 0.2, 0.3, "rmse",
                                     "regression", 4, 10, {}, {}, None, None, 0, 0.0)
        second.log_step(pipe, 0, "SNV", "end")
        assert second.get_prediction(pid)["pipeline_id"] == pipe
        assert second.list_pipelines().height == 2  # it wrote: the lease ended


def test_gc_during_a_lease_sees_chains_published_since(workspace, clock):
    """gc must not decide from an old listing: a chain another writer published after the
    lease began holds an artifact that looked unreferenced in it."""
    writer = WorkspaceStore(workspace)
    collector = WorkspaceStore(workspace, grace_seconds=1, listing_ttl_seconds=0.5)
    try:
        run = writer.begin_run("r", {}, [{"name": "corn"}])
        failed = writer.begin_pipeline(run, "p1", {}, {}, "corn", "h")
        model = writer.save_artifact({"coef": [1.0, 2.0]}, "PLS", "model", "pickle")
        writer.save_chain(failed, [], 0, "PLS", "SNV", "kfold", {"fold_0": model}, {})
        writer.fail_pipeline(failed, "diverged")  # the artifact is now held by nothing live
        writer.flush()
        time.sleep(1.1)
        let_object_times_pass(workspace)  # older than the grace period, on S3 too
        time.sleep(1.0)

        assert collector.list_pipelines().height == 1  # the lease: only the failed pipeline
        kept = writer.begin_pipeline(run, "p2", {}, {}, "corn", "h")
        writer.save_chain(kept, [], 0, "PLS", "SNV", "kfold", {"fold_0": model}, {})
        writer.complete_pipeline(kept, 0.1, 0.2, "rmse", 1)
        writer.flush()

        assert collector.gc_artifacts() == 0
        assert collector.load_artifact(model) == {"coef": [1.0, 2.0]}
        assert collector.check().ok
    finally:
        writer.close()
        collector.close()


def test_what_another_store_of_this_process_acknowledged_ends_the_lease(workspace, clock):
    """Issue 9 scenario 26, with a lease: one process reads what any of its stores acknowledged
    (lake spec §6), at once, however long the lease of the reading store still runs."""
    with WorkspaceStore(workspace, listing_ttl_seconds=30) as reader, WorkspaceStore(workspace) as writer:
        add_pipeline(writer)
        writer.flush()
        assert reader.query_predictions().height == 3  # takes a lease
        run_id = reader.list_runs()["run_id"][0]
        writer.fail_run(run_id, "stopped")  # acknowledged: a durability point, in the journal
        add_pipeline(writer, dataset="wheat")
        writer.flush()
        assert reader.get_run(run_id)["status"] == "failed"
        assert reader.query_predictions().height == 6
