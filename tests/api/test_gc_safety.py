"""gc and ``check --repair`` never take the bytes of an artifact a writer acknowledged: references
in journals not yet published count, and a re-save racing gc's removal keeps its object."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nirslake import WorkspaceStore
from nirslake.lake import artifacts as art
from nirslake.lake.tables import CLOCK

from conftest import create_pipeline

TESTS = Path(__file__).resolve().parents[1]  # conftest.py
HOUR_US = 3_600_000_000
MODEL = {"coef": [0.25, 0.5, 0.75], "intercept": 1.5}


def _saved_an_hour_ago(monkeypatch, workspace: str) -> tuple[str, str]:
    """A run whose chain holds MODEL, recorded and stored an hour ago; returns (run_id, artifact_id)."""
    with monkeypatch.context() as m:
        m.setattr(CLOCK, "now_us", lambda: time.time_ns() // 1000 - HOUR_US)
        with WorkspaceStore(workspace) as store:
            ids = create_pipeline(store, run_name="old")
            artifact_id = store.save_artifact(MODEL, "Ridge", "model", "pickle")
            store.save_chain(ids.pipeline_id, [], 1, "Ridge", "SNV", "KFold", {"0": artifact_id}, {})
            store.complete_pipeline(ids.pipeline_id, 0.1, 0.2, "rmse", 5)
    hour_ago = time.time() - 3600
    os.utime(_object(workspace, artifact_id), (hour_ago, hour_ago))
    return ids.run_id, artifact_id


def _object(workspace: str, artifact_id: str) -> str:
    return os.path.join(workspace, art.object_path(artifact_id))


class Writer:
    """Writer A: a separate process holding what it saved in its journal (flush_seconds of an
    hour: nothing is published until it closes). ``step(name)`` runs one of its steps below."""

    SCRIPT = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, {tests!r})
        from nirslake import WorkspaceStore
        from conftest import create_pipeline
        store = WorkspaceStore({workspace!r}, flush_seconds=3600, flush_bytes=1 << 30)
        ids = None
        for line in sys.stdin:
            step = line.split()
            if step[0] == "chain":  # a new pipeline whose chain holds the given artifact: buffered
                ids = create_pipeline(store, run_name="new")
                chain = store.save_chain(ids.pipeline_id, [], 1, "Ridge", "SNV", "KFold", {{"0": step[1]}}, {{}})
                print(chain, flush=True)
            elif step[0] == "artifact":  # a new artifact and a chain holding it: buffered
                ids = create_pipeline(store, run_name="new")
                artifact_id = store.save_artifact({{"fresh": 1.0}}, "Ridge", "model", "pickle")
                store.save_chain(ids.pipeline_id, [], 1, "Ridge", "SNV", "KFold", {{"0": artifact_id}}, {{}})
                print(artifact_id, flush=True)
            elif step[0] == "durable":  # a durability point: acknowledged, still unpublished
                store.complete_pipeline(ids.pipeline_id, 0.1, 0.2, "rmse", 5)
                print("durable", flush=True)
        if ids is not None:  # a writer that ends well records its run's end (else check reports it left running)
            store.complete_run(ids.run_id, {{}})
        store.close()
        """
    )

    def __init__(self, workspace: str):
        code = self.SCRIPT.format(tests=str(TESTS), workspace=workspace)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def step(self, *words: str) -> str:
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def test_gc_keeps_an_artifact_held_by_a_durable_unpublished_chain(workspace, monkeypatch):
    """Issue 9 scenario 5: writer A saves a chain holding an old artifact (object and record an
    hour old) and makes it durable (complete_pipeline) without publishing it. Process B's
    delete_run of the old run then runs gc after A's save is older than the grace period. What A
    acknowledged must survive: the artifact's record and bytes, loadable through A's chain."""
    old_run, artifact_id = _saved_an_hour_ago(monkeypatch, workspace)
    writer = Writer(workspace)
    try:
        chain_id = writer.step("chain", artifact_id)
        assert writer.step("durable") == "durable"
        time.sleep(1.2)  # A's save is now older than B's grace period
        with WorkspaceStore(workspace, grace_seconds=1) as other:
            assert other.get_chain(chain_id) is None  # durable in A's journal, not published
            assert other.delete_run(old_run) == 4  # run, pipeline, two chains
            assert os.path.exists(_object(workspace, artifact_id))
            assert other.load_artifact(artifact_id) == MODEL
    finally:
        writer.close()
    with WorkspaceStore(workspace, grace_seconds=0) as store:
        assert store.get_chain(chain_id)["fold_artifacts"] == {"0": artifact_id}
        assert store.load_artifact(artifact_id) == MODEL
        assert store.gc_artifacts() == 0  # now held by A's published chain
        report = store.check()
        assert report.ok, report.problems


def test_gc_keeps_an_artifact_held_by_a_chain_still_in_memory(workspace, monkeypatch):
    """Issue 9 scenario 5, before the durability point: A's chain is only buffered. save_chain
    refreshed the objects it holds, so gc's grace period (30 s here) keeps the old artifact, and
    A's durability point afterwards acknowledges a chain whose artifact is there."""
    old_run, artifact_id = _saved_an_hour_ago(monkeypatch, workspace)
    writer = Writer(workspace)
    try:
        chain_id = writer.step("chain", artifact_id)
        with WorkspaceStore(workspace, grace_seconds=30) as other:
            assert other.delete_run(old_run) == 4  # run, pipeline, two chains
        assert writer.step("durable") == "durable"
    finally:
        writer.close()
    with WorkspaceStore(workspace) as store:
        assert store.get_chain(chain_id)["fold_artifacts"] == {"0": artifact_id}
        assert store.load_artifact(artifact_id) == MODEL


def test_repair_keeps_the_objects_of_durable_unpublished_artifacts(workspace):
    """Issue 9 scenario 6: writer A saves an artifact and a chain holding it and makes them
    durable; they stay unpublished for longer than the grace period. ``check --repair`` in
    process B must not take the object for an unreferenced one: A's artifact must load."""
    writer = Writer(workspace)
    try:
        artifact_id = writer.step("artifact")
        assert writer.step("durable") == "durable"
        time.sleep(1.2)  # older than B's grace period
        with WorkspaceStore(workspace, grace_seconds=1) as other:
            report = other.check(repair=True)
        assert report.ok, report.problems
        assert report.leftovers["unreferenced objects"] == []
        assert report.removed == 0
        assert os.path.exists(_object(workspace, artifact_id))
    finally:
        writer.close()
    with WorkspaceStore(workspace) as store:
        assert store.load_artifact(artifact_id) == {"fresh": 1.0}
        assert store.check().ok


def _collectable(monkeypatch, workspace: str) -> str:
    """MODEL saved an hour ago and held by no chain (its run deleted): gc collects it."""
    run_id, artifact_id = _saved_an_hour_ago(monkeypatch, workspace)
    with WorkspaceStore(workspace, grace_seconds=3600) as store:
        store.delete_run(run_id, delete_artifacts=False)
    return artifact_id


def test_a_resave_between_gcs_last_check_and_its_removal_keeps_its_bytes(workspace, monkeypatch):
    """Issue 9 scenario 8: gc decided to collect an object (old, unheld) and a writer saves the
    same bytes again right before gc removes them (injected where gc calls Storage.delete on the
    object). The writer's save_artifact returned: its record must have its bytes."""
    artifact_id = _collectable(monkeypatch, workspace)
    writer = WorkspaceStore(workspace)
    collector = WorkspaceStore(workspace, grace_seconds=60)
    real_delete = collector.storage.delete
    resaved = []

    def delete_after_a_resave(rel: str) -> bool:
        if not resaved and not rel.startswith("_journal/"):  # gc's removal of the object's bytes
            resaved.append(writer.save_artifact(MODEL, "Ridge", "model", "pickle"))
            writer.flush()
        return real_delete(rel)

    monkeypatch.setattr(collector.storage, "delete", delete_after_a_resave)
    try:
        assert collector.gc_artifacts() == 1
        assert resaved == [artifact_id]
        assert writer.load_artifact(artifact_id) == MODEL
    finally:
        collector.close()
        writer.close()
    with WorkspaceStore(workspace) as store:
        assert store.load_artifact(artifact_id) == MODEL
        report = store.check()
        assert report.ok, report.problems


def test_a_resave_before_gc_moves_the_object_aside_brings_it_back(workspace, monkeypatch):
    """The other side of scenario 8's window: the writer's re-save lands after gc's first look at
    the object and before gc moves it aside. gc sees the fresh time on the moved file, moves it
    back and records the artifact again after its own deletion record."""
    artifact_id = _collectable(monkeypatch, workspace)
    writer = WorkspaceStore(workspace)
    collector = WorkspaceStore(workspace, grace_seconds=60)
    real_modified = collector.storage.modified_us
    resaved = []

    def modified_then_resaved(rel: str) -> int | None:
        stamp = real_modified(rel)
        if not resaved and rel == art.object_path(artifact_id):
            resaved.append(writer.save_artifact(MODEL, "Ridge", "model", "pickle"))
            writer.flush()
        return stamp

    monkeypatch.setattr(collector.storage, "modified_us", modified_then_resaved)
    try:
        assert collector.gc_artifacts() == 0
        assert resaved == [artifact_id]
        assert collector.load_artifact(artifact_id) == MODEL
    finally:
        collector.close()
        writer.close()
    assert os.listdir(os.path.join(workspace, "_staging")) == []  # nothing left aside
