"""``check`` on a damaged or busy workspace: every damaged file named, the rest still checked, no
false report while writers publish; a store opens on a workspace whose catalog cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nirslake import WorkspaceStore
from nirslake.lake import schema as S
from nirslake.cli import main

from conftest import PipelineIds, create_pipeline, record_prediction

TESTS = Path(__file__).resolve().parents[1]  # conftest.py


@pytest.fixture
def copied(local_workspace, tmp_path):
    """A workspace with artifacts, predictions, a deletion and a compaction commit, copied to a new
    place (so its catalog must be rebuilt there); returns (copy, {table: one data file})."""
    with WorkspaceStore(local_workspace) as store:
        for dataset in ("corn", "wheat"):
            ids = create_pipeline(store, dataset_name=dataset)
            artifact = store.save_artifact({"dataset": dataset}, "PLS", "model", "pickle")
            chain = store.save_chain(ids.pipeline_id, [], 1, "PLS", "SNV", "KFold", {"0": artifact}, {})
            for fold in ("0", "1", "2"):
                record_prediction(store, PipelineIds(ids.run_id, ids.pipeline_id, chain), dataset_name=dataset, fold_id=fold)
                store.flush()
        store.delete_prediction(record_prediction(store, ids, dataset_name="wheat", fold_id="9"))
        store.compact()
    copy = str(tmp_path / "copy")
    shutil.copytree(local_workspace, copy)
    return copy, {tdef.name: _data_files(copy, tdef)[0] for tdef in (S.PREDICTIONS, S.COMMITS, S.DELETIONS)}


def _data_files(workspace: str, tdef: S.TableDef) -> list[str]:
    root = Path(workspace)
    return sorted(
        p.relative_to(root).as_posix() for p in (root / tdef.dir).rglob("*.parquet") if "-schema-" not in p.name
    )


def _damage_footer(workspace: str, rel: str) -> None:
    """Overwrite bytes of the Parquet footer: the file's metadata no longer reads."""
    path = os.path.join(workspace, rel)
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) - 40)
        fh.write(b"\x00damaged\x00" * 3)


def test_a_damaged_predictions_file_is_named_and_everything_else_is_checked(copied, capsys):
    """Issue 9 scenario 21: one predictions file of a copied workspace has a damaged footer.
    Opening a store must not die in the catalog build (a warning names the file and the fix),
    and ``check`` reports that file by name while still verifying artifacts and links."""
    workspace, victims = copied
    victim = victims["predictions"]
    _damage_footer(workspace, victim)
    with pytest.warns(RuntimeWarning, match=r"could not build catalog\.duckdb.*" + victim.rsplit("/", 1)[1] + r".*nirslake check"):
        store = WorkspaceStore(workspace)
    with store:
        report = store.check()
    assert [p for p in report.problems if "does not open" in p] == [
        p for p in report.problems if p.startswith(f"data file {victim} does not open: OSError")
    ]
    assert len(report.problems) == 1, report.problems
    assert report.artifacts_checked == 2  # the other tables were still checked
    assert main(["check", "-w", workspace]) == 1
    out, err = capsys.readouterr()
    assert f"problem: data file {victim} does not open" in out and "1 problem(s)" in out
    assert err.count("nirslake: warning: could not build catalog.duckdb") == 1 and f"(damaged: {victim})" in err


@pytest.mark.parametrize("table", ["commits", "deletions"])
def test_a_damaged_rules_file_is_named_and_check_goes_on(copied, table, capsys):
    """Issue 9 scenario 21: a damaged commits or deletions file (they decide which rows count).
    ``check`` must report it by name, read every other file, and say what it could not check;
    ``nirslake check`` exits 1 with that report instead of a traceback."""
    workspace, victims = copied
    victim = victims[table]
    with WorkspaceStore(workspace) as store:
        files = store.check().files_checked
    _damage_footer(workspace, victim)
    with WorkspaceStore(workspace) as store:  # a new process would start here: nothing cached
        report = store.check()
    assert report.problems[0].startswith(f"data file {victim} does not open: OSError")
    assert report.problems[1:] == [
        "parent links and artifacts not checked: the damaged commits or deletions file decides which rows "
        "count; restore it from a copy of the workspace and check again"
    ]
    assert report.files_checked >= files  # every data file was still read
    assert main(["check", "-w", workspace]) == 1
    assert f"problem: data file {victim} does not open" in capsys.readouterr().out


WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from nirslake import WorkspaceStore
    from conftest import create_pipeline, record_prediction
    store = WorkspaceStore({workspace!r})
    while not os.path.exists({stop!r}):
        ids = create_pipeline(store)
        for fold in range(3):
            record_prediction(store, ids, fold_id=str(fold))
        store.flush()  # published: run, pipeline, chain and predictions files appear one by one
        print("published", flush=True)
        time.sleep(0.05)  # files keep coming, not so fast that each check reads thousands
    store.close()
    """
)


def test_check_during_writes_reports_no_missing_parent(local_workspace):
    """Issue 9 scenario 17: a writer process publishes pipelines, chains and predictions without
    pause while ``check`` runs again and again. Every prediction's parents were published before
    it, so no check may report a missing parent (one listing for the whole check)."""
    with WorkspaceStore(local_workspace):
        pass
    stop = os.path.join(local_workspace, "stop-writing")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(tests=str(TESTS), workspace=local_workspace, stop=stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "published"  # writing has begun
        false_reports, checks, seen = [], 0, set()
        deadline = time.monotonic() + 5
        with WorkspaceStore(local_workspace) as store:
            while checks < 40 and time.monotonic() < deadline and writer.poll() is None:
                report = store.check()
                checks += 1
                false_reports += [p for p in report.problems if "does not exist" in p or "has no record" in p]
                seen.add(report.files_checked)
    finally:
        Path(stop).touch()
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert checks >= 3 and len(seen) >= 3  # the checks ran while files kept coming
    assert false_reports == []
