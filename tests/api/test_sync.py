"""Push and pull (nirslake.api.sync): only what the target lacks is sent, in an order that keeps the
target a consistent lake at every moment, and an interrupted sync is finished by running it again.

Each side is a local folder or ``s3://`` on the session's local S3 endpoint (moto).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from nirslake import WorkspaceStore, cli
from nirslake.query import catalog
from nirslake.api import sync as S
from nirslake.lake.storage import Storage
from nirslake.api.sync import SyncError, progress_printer, sync
from nirslake.lake.schema import COMMITS
from nirslake.lake.tables import FileCache, counting_commits, land_commit

# --------------------------------------------------------------------------- helpers


def fill(workspace: str, tag: int, datasets=("corn", "wheat"), **store_kw) -> str:
    """One completed run: per dataset a pipeline, a chain holding an npz model, three predictions
    with arrays and a log line, flushed per pipeline (so each pipeline adds its own files)."""
    with WorkspaceStore(workspace, **store_kw) as store:
        run = store.begin_run(f"run{tag}", {"tag": tag}, [{"name": d} for d in datasets])
        for i, dataset in enumerate(datasets):
            pipe = store.begin_pipeline(run, f"p{tag}.{i}", [{"class": "PLSRegression"}], {}, dataset, f"h{tag}.{i}")
            aid = store.save_artifact({"coef": np.arange(4.0) + 10 * tag + i}, "PLSRegression", "model", "npz")
            steps = [{"step_idx": 0, "operator_class": "PLSRegression", "params": {}, "artifact_id": aid, "stateless": False}]
            chain = store.save_chain(pipe, steps, 0, "PLSRegression", "SNV", "kfold", {"fold_0": aid}, {})
            for k, partition in enumerate(("train", "val", "test")):
                pid = store.save_prediction(
                    pipe, chain, dataset, "PLS", "PLSRegression", "0", partition, tag + 0.1 * k + 0.01 * i, 0.2, 0.3,
                    "rmse", "regression", 4, 10, {}, {}, None, None, 0, 0.0, "SNV", None,
                )
                store.save_prediction_arrays(pid, np.arange(4.0) + k, np.arange(4.0) * tag + i)
            store.log_step(pipe, 0, "PLSRegression", "end", 1.0)
            store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 5)
            store.flush()
        store.complete_run(run, {})
    return run


def lake_files(workspace: str) -> set[str]:
    """What a sync copies: the data files and the objects (not the checkpoints' copies, lake spec §11)."""
    storage = Storage(workspace)
    tables = {rel for rel in storage.list_files("tables") if "/current-" not in rel}
    return tables | set(storage.list_files("objects", suffix=""))


def state(workspace: str, sql: bool = True) -> dict:
    """Everything a user reads: predictions, runs, every view's count (``sql``), artifacts loaded, arrays."""
    with WorkspaceStore(workspace) as store:
        predictions = store.query_predictions().sort("prediction_id")
        counts = None
        if sql:
            # One statement: on S3 each one costs a round of listings and reads of its own.
            counts = store.sql(
                "SELECT " + ", ".join(f"(SELECT count(*) FROM {v}) AS {v}" for v in cli.VIEWS)
            ).row(0, named=True)
        chains = [store.get_chain(c) for c in sorted(set(predictions["chain_id"].to_list()))]
        artifact_ids = sorted({aid for chain in chains for aid in chain["fold_artifacts"].values()})
        return {
            "predictions": predictions,
            "runs": store.list_runs().sort("run_id"),
            "counts": counts,
            "artifacts": {aid: store.load_artifact(aid)["coef"].tolist() for aid in artifact_ids},
            "arrays": {
                pid: store.get_prediction(pid, load_arrays=True)["y_pred"].tolist()
                for pid in predictions["prediction_id"].to_list()
            },
        }


def assert_same_state(a: dict, b: dict) -> None:
    assert a["predictions"].equals(b["predictions"])
    assert a["runs"].equals(b["runs"])
    if a["counts"] is not None and b["counts"] is not None:
        assert a["counts"] == b["counts"]
    for side in (a, b):  # the SQL views agree with the API
        if side["counts"] is not None:
            assert side["counts"]["predictions"] == side["predictions"].height
            assert side["counts"]["runs"] == side["runs"].height
    assert a["artifacts"] == b["artifacts"] and a["artifacts"]
    assert a["arrays"] == b["arrays"]


def check_ok(workspace: str) -> None:
    with WorkspaceStore(workspace) as store:
        report = store.check()
    assert report.ok, report.summary()


@pytest.fixture
def source(tmp_path) -> str:
    """A local workspace with two runs, a deleted prediction and a compaction (a commit, and the
    files it replaced still on disk for the grace period)."""
    workspace = str(tmp_path / "source")
    fill(workspace, 0)
    fill(workspace, 1)
    with WorkspaceStore(workspace) as store:
        store.delete_prediction(store.query_predictions(partition="test")["prediction_id"][0])
        assert store.compact(tables=["predictions"]).files_replaced >= 2
    return workspace


def interrupt_after(monkeypatch, target: str, k: int, exc: type[BaseException] = KeyboardInterrupt) -> list[str]:
    """Make the target's ``publish`` of lake files raise once ``k`` files went through; returns
    the files published, in order."""
    real = Storage.publish
    root = Storage(target).root
    done: list[str] = []

    def publish(self, rel, *args, **kwargs):
        # Lake files only: a checkpoint's resolved copies (lake spec §11) are the target's own.
        if self.root == root and rel.startswith(("tables/", "objects/")) and "/current-" not in rel:
            if len(done) >= k:
                raise exc("interrupted")
            done.append(rel)
        return real(self, rel, *args, **kwargs)

    monkeypatch.setattr(Storage, "publish", publish)
    return done


# --------------------------------------------------------------------------- local -> local


def test_push_copies_everything_then_nothing(source, tmp_path):
    target = str(tmp_path / "target")
    files = lake_files(source)
    calls = []
    result = sync(source, target, progress=lambda *args: calls.append(args))
    assert result.ok and result.passes == 1
    assert result.files_copied == len(files) and result.files_skipped == 0
    assert result.bytes_copied == sum(os.path.getsize(os.path.join(source, f)) for f in files)
    assert lake_files(target) == files
    assert calls[0] == (0, len(files), 0) and calls[-1] == (len(files), len(files), result.bytes_copied)
    assert_same_state(state(source), state(target))
    # The catalog is the target's own, for its location; nothing of the source's bookkeeping came.
    assert catalog.is_current(Storage(target))
    assert json.loads(Path(target, "_meta/catalog.json").read_text())["lake"] == Storage(target).url()
    for name in ("_staging", "_journal"):
        assert not list(Path(target, name).glob("*"))
    with WorkspaceStore(target) as store:
        assert store.sql("SELECT count(*) FROM predictions").item() == 11  # 2 runs x 2 datasets x 3 partitions, one deleted

    again = sync(source, target)
    assert (again.files_copied, again.bytes_copied, again.files_skipped) == (0, 0, len(files))


def test_new_work_sends_only_the_new_files(source, tmp_path):
    target = str(tmp_path / "target")
    sync(source, target)
    before = lake_files(source)
    fill(source, 2, datasets=("corn", "soil"))
    new = lake_files(source) - before
    assert new
    result = sync(source, target)
    assert result.files_copied == len(new) and result.files_skipped == len(before)
    assert_same_state(state(source), state(target))


def test_copy_order_objects_then_tables_in_publication_order_then_commits(source, tmp_path, monkeypatch):
    target = str(tmp_path / "target")
    order = interrupt_after(monkeypatch, target, 10**9)
    sync(source, target)
    kinds = [rel.split("/")[0] if rel.startswith("objects/") else rel.split("/")[1] for rel in order]
    assert kinds[: kinds.count("objects")] == ["objects"] * kinds.count("objects")
    tables = [k for k in kinds if k != "objects"]
    assert tables[-1] == "commits" and tables.index("commits") == len(tables) - tables.count("commits")
    ranks = [S.TABLE_ORDER.index(t) for t in tables if t != "commits"]
    assert ranks == sorted(ranks), tables
    assert S.TABLE_ORDER == ("runs", "pipelines", "artifacts", "chains", "predictions", "prediction_arrays", "logs", "deletions")


def test_interrupted_pushes_leave_a_consistent_target_and_a_rerun_finishes(source, tmp_path, monkeypatch):
    target = str(tmp_path / "target")
    # Interrupted every 7 files, all the way through: after each, the target is a lake that
    # `check` finds without problems (no record before its parent, no commit before its files).
    # (Opening a store on the target writes its own schema files: a rerun skips them.)
    interruptions = 0
    while True:
        interrupt_after(monkeypatch, target, 7)
        try:
            result = sync(source, target)
        except KeyboardInterrupt:
            monkeypatch.undo()
            interruptions += 1
            assert lake_files(target) <= lake_files(source)
            check_ok(target)
            continue
        monkeypatch.undo()
        break
    assert interruptions >= (len(lake_files(source)) - 9) // 7  # less the 9 schema files
    assert result.ok and lake_files(target) == lake_files(source)
    assert_same_state(state(source), state(target))


def test_an_error_midway_keeps_what_was_copied(source, tmp_path, monkeypatch):
    target = str(tmp_path / "target")
    interrupt_after(monkeypatch, target, 20, exc=OSError)
    with pytest.raises(OSError):
        sync(source, target)
    monkeypatch.undo()
    result = sync(source, target)
    assert result.files_copied == len(lake_files(source)) - 20
    assert not os.listdir(os.path.join(target, "_staging"))
    assert_same_state(state(source), state(target))


def test_compaction_and_vacuum_on_the_source_between_pushes(source, tmp_path):
    target = str(tmp_path / "target")
    sync(source, target)
    fill(source, 2)
    with WorkspaceStore(source, grace_seconds=0) as store:
        store.vacuum()  # merges the small files, then deletes every replaced file at once
    assert not lake_files(target) <= lake_files(source), "the vacuum should have deleted files the target holds"
    result = sync(source, target)
    assert result.ok
    # The target keeps the files the source deleted; the commits it received hide them.
    assert lake_files(target) > lake_files(source)
    assert_same_state(state(source), state(target))
    check_ok(target)


def test_a_target_that_is_ahead_keeps_its_files(source, tmp_path):
    target = str(tmp_path / "target")
    sync(source, target)
    own_run = fill(target, 7, datasets=("soil",))
    own_files = lake_files(target) - lake_files(source)
    fill(source, 2)
    result = sync(source, target)
    assert result.ok
    assert lake_files(target) >= own_files | lake_files(source)
    with WorkspaceStore(target) as store:
        runs = set(store.list_runs()["run_id"].to_list())
    with WorkspaceStore(source) as store:
        assert runs == set(store.list_runs()["run_id"].to_list()) | {own_run}
        assert own_run not in set(store.list_runs()["run_id"].to_list())  # nothing flows back


def test_compactions_of_the_same_files_on_both_sides_hold_back_the_source_commits(tmp_path):
    """Two compaction histories over the same files cannot be merged (lake spec §4 resolves races
    within one lake only): the source's commits are held back, and the target never shows a row
    twice. Chains and logs have no version column, so a duplicate there would show."""
    source, target = str(tmp_path / "source"), str(tmp_path / "target")
    fill(source, 0)
    sync(source, target)
    for workspace in (target, source):  # both merge the same log files, each in its own commit
        with WorkspaceStore(workspace) as store:
            assert store.compact(tables=["logs", "chains"]).files_replaced
    result = sync(source, target)
    assert not result.ok and result.held_back and "held back" in result.summary()
    fill(source, 1)
    with WorkspaceStore(source) as store:  # merges the first compaction's output with new files
        assert store.compact(tables=["logs", "chains"]).files_replaced
    result = sync(source, target)
    assert not result.ok and len(result.held_back) == 4
    assert_same_state(state(source), state(target))
    with WorkspaceStore(source) as a, WorkspaceStore(target) as b:
        for table in ("logs", "chains"):
            assert a.sql(f"SELECT count(*) FROM {table}").item() == b.sql(f"SELECT count(*) FROM {table}").item()
    check_ok(target)

    # The rule is the lake's own: on a lake holding both histories, the same commits count.
    source_rows = S._read_commits(Storage(source), Storage(source).list_files("tables/commits"))
    for row in source_rows:
        if row["rel"] in result.held_back:
            land_commit(Storage(target), {name: row[name] for name in COMMITS.schema.names})
    storage = Storage(target)
    rels = storage.list_files("tables/commits")
    ours = S.counting(S._read_commits(storage, rels))
    commits, _, _ = counting_commits(storage, FileCache(), rels)
    table = pq.read_table(os.path.join(target, "tables/commits"))
    assert len(ours) == len(commits) < table.num_rows
    assert {c.created_us for c in commits} == {
        int(row["created_at"].timestamp() * 1e6) for row in table.to_pylist() if row["commit_id"] in ours
    }


def test_compactions_of_different_files_on_each_side_merge(tmp_path):
    """Two workspaces pushing into one target, each compacting its own files: every commit is copied."""
    one, two, target = (str(tmp_path / name) for name in ("one", "two", "target"))
    for tag, workspace in enumerate((one, two)):
        fill(workspace, tag)
        fill(workspace, tag + 10)
        with WorkspaceStore(workspace) as store:
            assert store.compact().files_replaced
        assert sync(workspace, target).ok
    with WorkspaceStore(one) as a, WorkspaceStore(two) as b, WorkspaceStore(target) as t:
        for table in ("predictions", "logs", "chains", "runs"):
            count = f"SELECT count(*) FROM {table}"
            assert t.sql(count).item() == a.sql(count).item() + b.sql(count).item()
    check_ok(target)


def test_a_file_of_another_size_on_the_target_is_a_conflict_left_untouched(source, tmp_path):
    target = str(tmp_path / "target")
    sync(source, target)
    rel = next(f for f in sorted(lake_files(target)) if f.startswith("tables/runs/part-") and "schema" not in f)
    path = os.path.join(target, rel)
    with open(path, "r+b") as fh:
        fh.truncate(10)
    result = sync(source, target)
    assert not result.ok and result.conflicts == [rel]
    assert os.path.getsize(path) == 10
    assert "error: 1 file(s)" in result.summary("pushed") and rel in result.summary("pushed")


def test_schema_files_written_by_the_target_itself_are_not_conflicts(source, tmp_path):
    target = str(tmp_path / "target")
    WorkspaceStore(target).close()  # an empty workspace: its own schema files
    result = sync(source, target)
    assert result.ok
    assert result.files_skipped == sum(1 for f in lake_files(source) if "-schema-v" in f)


def test_a_live_writers_journal_is_not_copied_until_it_publishes(source, tmp_path):
    target = str(tmp_path / "target")
    writer = WorkspaceStore(source, flush_seconds=3600)
    run = writer.begin_run("live", {}, [])
    writer.complete_run(run, {})  # durable in the journal, not published yet
    result = sync(source, target)
    assert result.live_journals == 1 and "1 journal(s) of writers still running" in result.summary()
    with WorkspaceStore(target) as store:
        assert store.get_run(run) is None
    writer.close()
    result = sync(source, target)
    assert result.live_journals == 0 and result.files_copied >= 1
    with WorkspaceStore(target) as store:
        assert store.get_run(run)["status"] == "completed"


def test_a_crashed_writers_journal_is_published_then_copied(source, tmp_path):
    target = str(tmp_path / "target")
    code = textwrap.dedent(
        f"""
        import os
        from nirslake import WorkspaceStore
        store = WorkspaceStore({source!r}, flush_seconds=3600)
        run = store.begin_run("crashed", {{}}, [])
        store.complete_run(run, {{}})
        print(run, flush=True)
        os._exit(0)  # no close(): the journal stays, unpublished
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert os.listdir(os.path.join(source, "_journal"))
    result = sync(source, target)
    assert result.live_journals == 0
    with WorkspaceStore(target) as store:
        assert store.get_run(run)["name"] == "crashed"


def test_files_vanishing_from_the_source_are_picked_up_by_another_pass(source, tmp_path, monkeypatch):
    target = str(tmp_path / "target")
    victim = next(f for f in sorted(lake_files(source)) if f.startswith("tables/logs/part-") and "schema" not in f)
    real = Storage.read_bytes
    seen = []

    def read_bytes(self, rel):
        if rel == victim and not seen:
            seen.append(rel)
            raise FileNotFoundError(rel)
        return real(self, rel)

    monkeypatch.setattr(Storage, "read_bytes", read_bytes)
    result = sync(source, target)
    assert result.ok and result.passes == 2 and victim in lake_files(target)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no nirslake workspace at"),
        ("empty", "no nirslake workspace at"),
        ("same", "the same workspace"),
        ("nested", "inside one another"),
        ("foreign", "is not empty and is not a nirslake workspace"),
    ],
)
def test_bad_locations_are_refused_before_anything_is_written(source, tmp_path, case, message):
    target = str(tmp_path / "target")
    src = source
    if case == "missing":
        src = str(tmp_path / "nope")
    elif case == "empty":
        src = str(tmp_path / "empty")
        os.mkdir(src)
    elif case == "same":
        target = source + "/"
    elif case == "nested":
        target = os.path.join(source, "backup")
    elif case == "foreign":
        os.mkdir(target)
        (tmp_path / "target" / "notes.txt").write_text("mine")
    before = sorted(os.walk(tmp_path))
    with pytest.raises(SyncError, match=message):
        sync(src, target)
    assert sorted(os.walk(tmp_path)) == before


# --------------------------------------------------------------------------- S3


def test_push_to_s3(source, s3_workspace):
    result = sync(source, s3_workspace)
    assert result.ok and result.files_copied == len(lake_files(source))
    assert lake_files(s3_workspace) == lake_files(source)
    assert_same_state(state(source), state(s3_workspace))
    assert Storage(s3_workspace).exists("catalog.duckdb")
    assert sync(source, s3_workspace).files_copied == 0

    fill(source, 2, datasets=("soil",))
    new = lake_files(source) - lake_files(s3_workspace)
    result = sync(source, s3_workspace)
    assert result.files_copied == len(new) and lake_files(s3_workspace) == lake_files(source)
    with WorkspaceStore(source) as a, WorkspaceStore(s3_workspace) as b:
        assert a.query_predictions().sort("prediction_id").equals(b.query_predictions().sort("prediction_id"))


def test_interrupted_push_to_s3_then_rerun(source, s3_workspace, monkeypatch):
    interrupt_after(monkeypatch, s3_workspace, 15)
    with pytest.raises(KeyboardInterrupt):
        sync(source, s3_workspace)
    monkeypatch.undo()
    assert len(lake_files(s3_workspace)) == 15
    check_ok(s3_workspace)  # opening a store there adds the schema files not copied yet
    there = len(lake_files(s3_workspace))
    result = sync(source, s3_workspace)
    assert result.files_skipped == there and result.files_copied == len(lake_files(source)) - there
    assert lake_files(s3_workspace) == lake_files(source)
    with WorkspaceStore(source) as a, WorkspaceStore(s3_workspace) as b:
        assert a.query_predictions().sort("prediction_id").equals(b.query_predictions().sort("prediction_id"))
        assert a.list_runs().sort("run_id").equals(b.list_runs().sort("run_id"))


def test_pull_a_workspace_written_on_s3(s3_workspace, tmp_path):
    fill(s3_workspace, 0)
    fill(s3_workspace, 1, datasets=("corn",))
    with WorkspaceStore(s3_workspace) as store:
        assert store.compact().files_replaced
    local = str(tmp_path / "local")
    result = sync(s3_workspace, local)
    assert result.ok and result.files_copied == len(lake_files(s3_workspace))
    assert_same_state(state(s3_workspace, sql=False), state(local))
    check_ok(local)
    assert sync(s3_workspace, local).files_copied == 0


def test_an_s3_prefix_without_a_workspace_is_refused(s3_workspace, tmp_path):
    with pytest.raises(SyncError, match="no nirslake workspace at"):
        sync(s3_workspace, str(tmp_path / "local"))
    assert not os.path.exists(tmp_path / "local")


# --------------------------------------------------------------------------- the CLI


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_push_and_pull(source, s3_workspace, tmp_path, capsys):
    n = len(lake_files(source))
    code, out, err = run(["push", source, s3_workspace], capsys)
    assert code == 0, err
    assert out.startswith(f"pushed {n} files (") and out.strip().endswith(f"to {s3_workspace}, 0 already there")

    code, out, err = run(["push", source, s3_workspace], capsys)
    assert code == 0, err
    assert out.strip() == f"nothing to copy: all {n} files are already at {s3_workspace}"

    local = str(tmp_path / "pulled")
    code, out, err = run(["pull", s3_workspace, local], capsys)
    assert code == 0, err
    assert out.startswith(f"pulled {n} files (") and f"to {local}, 0 already there" in out
    assert_same_state(state(source), state(local))


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    code, out, err = run(["push", missing, str(tmp_path / "target")], capsys)
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and err.startswith("nirslake: error: no nirslake workspace at")
    assert not os.path.exists(tmp_path / "target")
    with pytest.raises(SystemExit) as exc:
        cli.main(["pull", "only-one"])
    assert exc.value.code == 2


def test_cli_conflicts_exit_1(source, tmp_path, capsys):
    target = str(tmp_path / "target")
    assert run(["push", source, target], capsys)[0] == 0
    rel = next(f for f in sorted(lake_files(target)) if f.startswith("objects/"))
    with open(os.path.join(target, rel), "ab") as fh:
        fh.write(b"x")
    code, out, _ = run(["push", source, target], capsys)
    assert code == 1 and "error: 1 file(s)" in out and rel in out


def test_progress_printer_prints_every_n_files():
    lines: list[str] = []
    report = progress_printer("pushed", every=2, seconds=3600, out=lines.append)
    report(0, 5, 0)
    for done in range(1, 6):
        report(done, 5, done * 1536)
    assert lines == ["pushed 2 of 5 files (3.0 KiB)", "pushed 4 of 5 files (6.0 KiB)"]
    assert S.human_bytes(3 * 1048576 + 400_000) == "3.4 MiB" and S.human_bytes(12) == "12 B"
