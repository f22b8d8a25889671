"""Push and pull while the source collects garbage (issue 9, scenario 16): the target never ends up
with an artifact record whose bytes are missing while the sync says ok.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from nirslake import WorkspaceStore
from nirslake.lake.artifacts import OBJECTS_DIR
from nirslake.lake.storage import Storage
from nirslake.api.sync import sync


def source_with_an_unheld_artifact(workspace: str) -> tuple[str, str]:
    """A workspace with a chain holding one model, and one more model no chain holds (gc's to
    take). Returns (held id, unheld id)."""
    with WorkspaceStore(workspace) as store:
        run = store.begin_run("r", {}, [{"name": "corn"}])
        pipe = store.begin_pipeline(run, "p", [], {}, "corn", "h")
        held = store.save_artifact({"coef": np.arange(4.0)}, "PLSRegression", "model", "npz")
        store.save_chain(pipe, [], 0, "PLSRegression", "SNV", "kfold", {"fold_0": held}, {})
        unheld = store.save_artifact({"coef": np.arange(4.0) + 100}, "PLSRegression", "model", "npz")
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
        store.complete_run(run, {})
    time.sleep(0.01)  # with grace_seconds=0, gc takes what was saved before now
    return held, unheld


def gc_when_the_sync_lists_the_objects(monkeypatch, source: str, after_data=True) -> list[int]:
    """Run a real gc on ``source`` (another store, as another process would) right before the
    sync's first listing of the source's objects, i.e. after it listed the data files. Returns
    the number of artifacts that gc removed, once it ran."""
    real = Storage.list_sizes
    root = Storage(source).root
    removed: list[int] = []

    def list_sizes(self, rel_dir, suffix=""):
        if self.root == root and rel_dir == OBJECTS_DIR and not removed:
            with WorkspaceStore(source, grace_seconds=0) as store:
                removed.append(store.gc_artifacts())
        return real(self, rel_dir, suffix)

    monkeypatch.setattr(Storage, "list_sizes", list_sizes)
    return removed


def test_a_gc_on_the_source_during_a_push_leaves_no_record_without_bytes(tmp_path, monkeypatch):
    """Issue 9 scenario 16: a push lists the source's data files (holding the record of an
    artifact no chain holds), then the source's gc publishes that artifact's deletion and removes
    its object, then the push lists the objects. The push must not report ok with the record on
    the target and its bytes missing: it lists again (picking up the deletion) and ends with the
    target consistent: the held model loads, the collected one is gone on both sides."""
    source, target = str(tmp_path / "source"), str(tmp_path / "target")
    held, unheld = source_with_an_unheld_artifact(source)
    removed = gc_when_the_sync_lists_the_objects(monkeypatch, source)

    result = sync(source, target)

    assert removed == [1]
    with WorkspaceStore(target) as store:
        problems = [p for p in store.check().problems if "bytes are missing" in p]
        assert problems == []
        assert store.load_artifact(held)["coef"].tolist() == [0.0, 1.0, 2.0, 3.0]
        assert store.sql("SELECT artifact_id FROM artifacts")["artifact_id"].to_list() == [held]
    assert result.ok and result.passes == 2 and result.missing_bytes == [], result.summary()
    with WorkspaceStore(source) as store:
        assert store.sql("SELECT artifact_id FROM artifacts")["artifact_id"].to_list() == [held]
        with pytest.raises(Exception):
            store.load_artifact(unheld)


def test_a_source_record_without_bytes_makes_the_sync_not_ok_naming_the_artifact(tmp_path):
    """Issue 9 scenario 16, the report: when the source itself holds an artifact record whose
    object is gone (removed by hand), another pass cannot help; the sync says so (not ok, the
    artifact named, exit code 1) instead of reporting a complete copy."""
    source, target = str(tmp_path / "source"), str(tmp_path / "target")
    held, unheld = source_with_an_unheld_artifact(source)
    with WorkspaceStore(source) as store:
        path = store.get_artifact_path(unheld)
    os.remove(path)

    result = sync(source, target)

    assert not result.ok and result.passes == 3
    assert result.missing_bytes == [f"{unheld} at {Storage(source).relative(str(path))}"]
    assert f"error: 1 artifact record(s) on {Storage(target).url()} have no bytes there: {unheld} at objects/" in (
        result.summary()
    )
