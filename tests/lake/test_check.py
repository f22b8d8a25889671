"""``store.check()`` and ``nirslake check``: problems are found and reported, leftovers found and repaired."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from nirslake import WorkspaceStore
from nirslake.lake import schema as S
from nirslake.cli import main

from conftest import PipelineIds


@pytest.fixture
def filled(workspace, make_pipeline, add_prediction):
    """A workspace with two pipelines, each with an artifact in its chain and two predictions."""
    with WorkspaceStore(workspace) as store:
        for dataset in ("corn", "wheat"):
            ids = make_pipeline(store, dataset_name=dataset)
            artifact = store.save_artifact({"coef": [1.0, 2.0], "dataset": dataset}, "PLS", "model", "pickle")
            chain = store.save_chain(ids.pipeline_id, [], 1, "PLS", "SNV", "KFold", {"0": artifact}, {})
            for fold in ("0", "1"):
                pid = add_prediction(store, PipelineIds(ids.run_id, ids.pipeline_id, chain), dataset_name=dataset, fold_id=fold)
                store.save_prediction_arrays(pid, np.arange(4.0), np.arange(4.0) + 1)
            store.complete_pipeline(ids.pipeline_id, 0.1, 0.2, "rmse", 10)
            store.flush()
    return workspace


def _data_files(store, tdef):
    return [r for r in store.storage.list_files(tdef.dir) if "-schema-" not in r]


def test_a_sound_workspace_has_no_problem(filled):
    with WorkspaceStore(filled) as store:
        report = store.check()
    assert report.ok, report.summary()
    assert report.files_checked >= 9  # at least one file per table with rows, plus schema files
    assert report.artifacts_checked == 2
    assert all(not rels for rels in report.leftovers.values()), report.leftovers
    assert "no problem found" in report.summary()


def test_a_corrupt_data_file_is_a_problem_that_repair_leaves_alone(filled):
    with WorkspaceStore(filled) as store:
        victim = _data_files(store, S.PREDICTIONS)[0]
        path = store.storage.path(victim)
        with open(path, "r+b") as fh:
            fh.seek(8)
            fh.write(b"\x00garbage\x00" * 20)
        report = store.check(repair=True)
    assert not report.ok
    assert any(victim in p and "does not open" in p for p in report.problems), report.problems
    assert os.path.exists(path)  # a problem is reported, never "repaired" away


def test_a_tampered_or_missing_artifact_is_a_problem(filled):
    with WorkspaceStore(filled) as store:
        rows = store.sql("SELECT artifact_id, path FROM artifacts ORDER BY artifact_id").rows()
        (tampered, tampered_path), (gone, gone_path) = rows
        with open(store.storage.path(tampered_path), "ab") as fh:
            fh.write(b"x")
        os.remove(store.storage.path(gone_path))
        report = store.check()
    assert any(tampered in p and "sha256 mismatch" in p for p in report.problems), report.problems
    assert any(gone in p and "missing" in p for p in report.problems), report.problems
    # a chain holds each artifact, and both records still exist: no link problem on top
    assert len(report.problems) == 2


def test_a_prediction_whose_chain_and_pipeline_are_gone_is_a_problem(filled):
    with WorkspaceStore(filled) as store:
        for tdef in (S.CHAINS, S.PIPELINES):
            for rel in _data_files(store, tdef):
                os.remove(store.storage.path(rel))
        report = store.check()
    text = "\n".join(report.problems)
    assert text.count("names chain") == 4 and text.count("names pipeline") == 4, text
    assert "which does not exist" in text


def test_leftovers_are_listed_after_the_grace_period_and_repair_removes_them(filled):
    with WorkspaceStore(filled, grace_seconds=0) as store:
        store.compact()  # replaces files: superseded leftovers
        storage = store.storage
        os.makedirs(storage.path("_staging"), exist_ok=True)
        with open(storage.path("_staging/abc.tmp"), "wb") as fh:
            fh.write(b"half a file")
        stray = "objects/ff/" + "f" * 64
        os.makedirs(storage.path("objects/ff"), exist_ok=True)
        with open(storage.path(stray), "wb") as fh:
            fh.write(b"bytes no record names")
        uncommitted = f"{S.LOGS.dir}/compact-00000000000001-{'0' * 32}.parquet"
        with open(storage.path(uncommitted), "wb") as fh:
            fh.write(b"PAR1")
        time.sleep(0.01)
        before = store.query_predictions().sort("prediction_id")

        report = store.check()
        assert report.ok, report.summary()
        assert report.leftovers["staging"] == ["_staging/abc.tmp"]
        assert report.leftovers["unreferenced objects"] == [stray]
        assert report.leftovers["uncommitted"] == [uncommitted]
        assert len(report.leftovers["superseded"]) > 5
        assert report.removed == 0 and storage.exists(stray)  # without repair nothing goes

        repaired = store.check(repair=True)
        assert repaired.removed == sum(len(v) for v in report.leftovers.values())
        assert not storage.exists(stray) and not storage.exists("_staging/abc.tmp")
        after = store.check()
        assert after.ok and all(not v for v in after.leftovers.values()), after.summary()
        assert store.query_predictions().sort("prediction_id").equals(before)
        for pid in before["prediction_id"]:
            assert store.get_prediction(pid, load_arrays=True)["y_true"].shape == (4,)
        for artifact_id in store.sql("SELECT artifact_id FROM artifacts")["artifact_id"]:
            assert store.load_artifact(artifact_id)["coef"] == [1.0, 2.0]


def test_a_journal_segment_never_named_is_a_staging_leftover(local_workspace):
    """A writer that crashed between creating its segment and naming it (lake spec §6) leaves an
    empty hidden file in _journal/: a leftover once older than the grace period, never a record."""
    with WorkspaceStore(local_workspace, grace_seconds=1) as store:
        hidden = "_journal/host~1~abc~0661a0a5a70fe9.wal.0123abcd.tmp"
        path = store.storage.path(hidden)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
        fresh = store.check()
        assert hidden not in fresh.leftovers["staging"]  # within the grace period: kept
        long_ago = time.time() - 10
        os.utime(path, (long_ago, long_ago))
        assert store.check().leftovers["staging"] == [hidden]
        store.check(repair=True)
        assert not os.path.exists(path)


def test_fresh_leftovers_are_kept_within_the_grace_period(filled):
    with WorkspaceStore(filled) as store:  # default grace: one hour
        store.compact()
        stray = "objects/ee/" + "e" * 64
        os.makedirs(store.storage.path("objects/ee"), exist_ok=True)
        with open(store.storage.path(stray), "wb") as fh:
            fh.write(b"a writer's object, not yet recorded")
        report = store.check(repair=True)
    assert report.removed == 0
    assert all(not v for v in report.leftovers.values()), report.leftovers
    assert os.path.exists(os.path.join(filled, stray))


def test_nirslake_check_exit_code_and_repair(filled, capsys):
    assert main(["check", "-w", filled]) == 0
    assert "no problem found" in capsys.readouterr().out
    with WorkspaceStore(filled) as store:
        os.makedirs(store.storage.path("_staging"), exist_ok=True)
        with open(store.storage.path("_staging/old.tmp"), "wb") as fh:
            fh.write(b"x")
    assert main(["check", "-w", filled, "--repair", "--grace-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert "leftover staging: 1 file(s)" in out and "repair removed" in out
    with WorkspaceStore(filled) as store:
        rel = _data_files(store, S.RUNS)[0]
        with open(store.storage.path(rel), "wb") as fh:
            fh.write(b"not parquet")
    assert main(["check", "-w", filled]) == 1
    assert "does not open" in capsys.readouterr().out


def test_nirslake_compact_prints_what_it_did(filled, capsys):
    assert main(["compact", "-w", filled]) == 0
    out = capsys.readouterr().out
    assert "pipelines: 4 files" in out and "compacted" in out
    assert main(["compact", "-w", filled]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    assert main(["compact", "-w", filled, "--target-mb", "-3"]) == 2
    assert "target_file_mb must be a positive number" in capsys.readouterr().err
    with WorkspaceStore(filled) as store:
        assert store.query_predictions().height == 4
