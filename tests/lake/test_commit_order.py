"""Compaction commits in landing order, purge's claim on uncommitted output, the snapshot's
listing order, the reader's cache and errors that name a damaged file (lake spec §4, issue 9).

A compaction is paused between writing its output and landing its commit (a threading.Event
inside ``Storage.publish``) so that other compactions, a repair or a writer can act in between,
as a slow machine or a stalled upload would let them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nirslake import WorkspaceStore
from nirslake.lake import maintenance
from nirslake.lake import tables
from nirslake.lake import schema as S
from nirslake.lake.maintenance import compact_table, leftovers, purge
from nirslake.query import scan
from nirslake.lake.storage import Storage
from nirslake.lake.tables import CLOCK, FileCache, take_snapshot, write_table

ROWS_PER_FILE = 5


def write_logs(workspace: str, files: int, pipeline_id: str | None = None) -> str:
    """``files`` log files of ``ROWS_PER_FILE`` rows (one flush each) under one pipeline; returns it."""
    with WorkspaceStore(workspace) as store:
        if pipeline_id is None:
            run = store.begin_run("r", {}, [{"name": "corn"}])
            pipeline_id = store.begin_pipeline(run, "p", [], {}, "corn", "h")
        for _ in range(files):
            for step in range(ROWS_PER_FILE):
                store.log_step(pipeline_id, step, "PLS", "end")
            store.flush()
    return pipeline_id


class PausedCompaction:
    """A compaction of the logs run in a thread that stops inside the publication of its commit
    (every merged file already written) until ``release()``."""

    def __init__(self, workspace: str, monkeypatch):
        self.reached, self._go = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(workspace,))
        self.error: BaseException | None = None
        publish = Storage.publish

        def pausing_publish(storage, rel, *args, **kwargs):
            if threading.current_thread() is self.thread and rel.startswith(f"{S.COMMITS.dir}/"):
                self.reached.set()
                assert self._go.wait(30), "the paused compaction was never released"
            return publish(storage, rel, *args, **kwargs)

        monkeypatch.setattr(Storage, "publish", pausing_publish)

    def _run(self, workspace: str) -> None:
        try:
            self.result = compact_table(Storage(workspace), FileCache(), S.LOGS)
        except BaseException as exc:  # reported by release()
            self.error = exc

    def start(self) -> PausedCompaction:
        self.thread.start()
        while not self.reached.wait(0.05):
            if not self.thread.is_alive():
                raise AssertionError("the compaction ended before its commit") from self.error
        return self

    def release(self) -> None:
        self._go.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error


def log_counts(workspace: str, pipeline_id: str) -> tuple[int, int, int, int]:
    """(rows, distinct ids) through the store API, then the same through the SQL view."""
    with WorkspaceStore(workspace) as store:
        log = store.get_pipeline_log(pipeline_id)
        rows, ids = store.sql("SELECT count(*), count(DISTINCT log_id) FROM logs").row(0)
    return log.height, log["log_id"].n_unique(), rows, ids


def test_a_stalled_compaction_commit_counts_by_when_it_lands(tmp_path, monkeypatch):
    """Issue 9 scenario 10: a compaction whose commit stalls (or whose clock is behind) counted
    first, by its commit_id, although it landed last. Acknowledged: 20 log rows; they must read
    as 20 rows of 20 ids in the API and the SQL view, not with the first 10 twice.

    A merges files X and Y and stalls before its commit. B merges X and Y and commits; C merges
    B's output with two new files and commits; then A's commit lands. By landing order A comes
    last and does not count (B already replaced X and Y); by commit_id A counted and B did not,
    so C's output (holding X and Y's rows) and A's both showed.
    """
    workspace = str(tmp_path / "ws")
    pipe = write_logs(workspace, 2)
    stalled = PausedCompaction(workspace, monkeypatch).start()
    with WorkspaceStore(workspace) as store:
        assert store.compact(tables=["logs"]).files_replaced == 2  # B
    write_logs(workspace, 2, pipe)
    with WorkspaceStore(workspace) as store:
        assert store.compact(tables=["logs"]).files_replaced == 3  # C
    stalled.release()
    assert stalled.result.files_replaced == 2

    assert log_counts(workspace, pipe) == (20, 20, 20, 20)
    assert scan(workspace, "logs").collect().height == 20
    storage = Storage(workspace)
    names = [os.path.basename(rel) for rel in storage.list_files(S.COMMITS.dir) if not tables.is_schema_file(rel)]
    assert names == [f"commit-{n:020d}.parquet" for n in (1, 2, 3)]  # A lost number 1 to B, re-listed, took 3
    commits, _, _ = tables.counting_commits(storage, FileCache())
    assert [os.path.basename(c.rel) for c in commits] == names[:2]


SKEWED_COMPACTOR = textwrap.dedent(
    """
    import os, sys, time
    workspace, ready, go = sys.argv[1:]
    real_time_ns = time.time_ns
    time.time_ns = lambda: real_time_ns() - 10_000_000_000  # this machine's clock is 10 s behind
    from nirslake.lake import schema as S
    from nirslake.lake.maintenance import compact_table
    from nirslake.lake.storage import Storage
    from nirslake.lake.tables import FileCache

    publish = Storage.publish

    def slow_commit(storage, rel, *args, **kwargs):
        if rel.startswith(S.COMMITS.dir + "/"):  # merged and written: hold the commit back
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
        return publish(storage, rel, *args, **kwargs)

    Storage.publish = slow_commit
    print(compact_table(Storage(workspace), FileCache(), S.LOGS).files_replaced)
    """
)


def test_a_compactor_whose_clock_is_behind_counts_when_it_lands(tmp_path):
    """Issue 9 scenario 10, across processes: a compactor in another process whose clock is 10 s
    behind merges X and Y, and its commit lands after two compactions of this process (B over X
    and Y, C over B's output and two new files). Acknowledged: 20 log rows; the stale commit must
    not count (it did, being 10 s "older", and 10 rows showed twice)."""
    workspace = str(tmp_path / "ws")
    pipe = write_logs(workspace, 2)
    ready, go = tmp_path / "ready", tmp_path / "go"
    child = subprocess.Popen(
        [sys.executable, "-c", SKEWED_COMPACTOR, workspace, str(ready), str(go)], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the skewed compactor never reached its commit"
            time.sleep(0.01)
        with WorkspaceStore(workspace) as store:
            assert store.compact(tables=["logs"]).files_replaced == 2  # B
        write_logs(workspace, 2, pipe)
        with WorkspaceStore(workspace) as store:
            assert store.compact(tables=["logs"]).files_replaced == 3  # C
    finally:
        go.touch()
        out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.strip() == "2"
    assert log_counts(workspace, pipe) == (20, 20, 20, 20)


def test_commits_written_before_numbering_order_first_by_commit_id(tmp_path):
    """A workspace compacted by an older version holds commits named ``part-...``: they count
    before every numbered one, among themselves by commit_id, in every reader."""
    workspace = str(tmp_path / "ws")
    pipe = write_logs(workspace, 2)
    storage = Storage(workspace)
    with WorkspaceStore(workspace) as store:
        store.compact(tables=["logs"])
    [landed] = [rel for rel in storage.list_files(S.COMMITS.dir) if not tables.is_schema_file(rel)]
    old_style = f"{S.COMMITS.dir}/{tables.new_file_name()}"
    os.rename(storage.path(landed), storage.path(old_style))
    row = pq.read_table(storage.path(old_style)).to_pylist()[0]
    # A numbered commit over the same files with an earlier commit_id still comes after it.
    tables.land_commit(storage, {**row, "commit_id": "0" * 32, "added": ["compact-never-written.parquet"]})
    commits, added, _ = tables.counting_commits(storage, FileCache())
    assert [c.rel for c in commits] == [old_style] and "compact-never-written.parquet" not in added
    assert log_counts(workspace, pipe) == (10, 10, 10, 10)


@pytest.mark.parametrize("repair", ["check --repair", "vacuum's purge"])
def test_a_repair_during_a_slow_compaction_keeps_every_row(tmp_path, monkeypatch, repair):
    """Issue 9 scenario 7: a compaction slower than the grace period, and a repair meanwhile.
    Acknowledged: 10 log rows. The repair deleted the compaction's output as uncommitted, then
    the commit landed and hid the old files: 10 rows became 0 and check reported nothing. Now
    the repair first lands a commit claiming that output; the late commit then does not count,
    and all 10 rows stay visible, in the API, the SQL view and polars, and check is clean."""
    workspace = str(tmp_path / "ws")
    pipe = write_logs(workspace, 2)
    slow = PausedCompaction(workspace, monkeypatch).start()
    time.sleep(0.01)  # the output is now older than a grace period of 0
    storage = Storage(workspace)
    output = [rel for rel in storage.list_files(S.LOGS.dir) if os.path.basename(rel).startswith("compact-")]
    assert len(output) == 1
    if repair == "check --repair":
        with WorkspaceStore(workspace, grace_seconds=0) as store:
            report = store.check(repair=True)
        assert report.leftovers["uncommitted"] == output and report.removed == 1
    else:
        assert purge(storage, FileCache(), CLOCK.now_us()) == 1
    assert not storage.exists(output[0])
    slow.release()

    assert log_counts(workspace, pipe) == (10, 10, 10, 10)
    assert scan(workspace, "logs").collect().height == 10
    with WorkspaceStore(workspace, grace_seconds=0) as store:
        report = store.check()
        assert report.ok, report.problems
        # Earlier checkpoints (lake spec §11) are leftovers at once with a grace period of 0.
        assert not any(v for kind, v in report.leftovers.items() if kind != "checkpoints"), report.leftovers


def test_a_compaction_that_landed_before_the_claim_keeps_its_output(tmp_path):
    """The claim's other side: when the compaction's commit lands between the repair's listing
    and its claim, the claim does not count and the output, now committed, is not deleted."""
    workspace = str(tmp_path / "ws")
    pipe = write_logs(workspace, 2)
    storage = Storage(workspace)
    with WorkspaceStore(workspace) as store:
        store.compact(tables=["logs"])
    [commit] = [rel for rel in storage.list_files(S.COMMITS.dir) if not tables.is_schema_file(rel)]
    data = storage.read_bytes(commit)
    storage.delete(commit)  # as if it had not landed yet when the repair listed the lake
    time.sleep(0.01)
    found = leftovers(storage, FileCache(), CLOCK.now_us())
    assert len(found["uncommitted"]) == 1
    storage.publish(commit, data)  # the commit lands; then the repair claims and deletes
    assert maintenance.remove_leftovers(storage, FileCache(), {"uncommitted": found["uncommitted"]}) == 0
    assert storage.exists(found["uncommitted"][0])
    assert log_counts(workspace, pipe) == (10, 10, 10, 10)


def test_conditional_writes_claim_commit_numbers_on_s3(s3_workspace):
    """Put-if-absent on S3 (s3fs sends ``If-None-Match: *``; the moto server honours it): the
    second claim of a name fails, and two commits take numbers 1 and 2."""
    storage = Storage(s3_workspace)
    storage.publish("tables/commits/x.parquet", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        storage.publish("tables/commits/x.parquet", b"second", exclusive=True)
    assert storage.read_bytes("tables/commits/x.parquet") == b"first"
    storage.delete("tables/commits/x.parquet")
    row = {"commit_id": "a" * 32, "table_name": "logs", "added": [], "removed": ["x"], "created_at": CLOCK.now_us()}
    assert [tables.land_commit(storage, row) for _ in range(2)] == [tables.commit_file(1), tables.commit_file(2)]


def test_committers_racing_for_numbers_lose_no_commit(tmp_path):
    """Four committers landing five commits each at once: every commit lands, under numbers 1 to 20."""
    storage = Storage(str(tmp_path / "ws"))
    ids = [[f"{t}-{i}" for i in range(5)] for t in range(4)]

    def committer(mine):
        for commit_id in mine:
            row = {"commit_id": commit_id, "table_name": "logs", "added": [], "removed": [commit_id], "created_at": 0}
            tables.land_commit(storage, row)

    threads = [threading.Thread(target=committer, args=(mine,)) for mine in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rels = storage.list_files(S.COMMITS.dir)
    assert rels == [tables.commit_file(n) for n in range(1, 21)]
    landed = [pq.read_table(storage.path(rel))["commit_id"][0].as_py() for rel in rels]
    assert sorted(landed) == sorted(i for mine in ids for i in mine)


def test_a_snapshot_holds_the_parent_of_every_child_it_holds(tmp_path, monkeypatch):
    """Issue 9 scenario 17: check during writes reported missing parents that were not missing.
    The snapshot listed tables/ in one alphabetical walk, pipelines before predictions: a
    pipeline and its prediction published in between (parents first, as writers do) gave a
    prediction without its pipeline. Children are now listed before parents, so every child a
    snapshot holds has its parent in it."""
    workspace = str(tmp_path / "ws")
    write_logs(workspace, 1)
    storage = Storage(workspace)
    real_scandir = os.scandir
    fired = []

    def scandir_with_a_writer(path):
        if str(path).endswith("/tables/predictions") and not fired:
            fired.append(path)
            now = CLOCK.now_us()
            ids = {"run_id": tables.new_id(), "pipeline_id": tables.new_id(), "chain_id": tables.new_id()}
            write_table(storage, S.RUNS, pl.DataFrame([{"run_id": ids["run_id"], "status": "running", "_version": now}]).to_arrow())
            pipeline = {"pipeline_id": ids["pipeline_id"], "run_id": ids["run_id"], "status": "running", "_version": now}
            write_table(storage, S.PIPELINES, pl.DataFrame([pipeline]).to_arrow())
            prediction = {**ids, "prediction_id": tables.new_id(), "dataset_name": "corn"}
            write_table(storage, S.PREDICTIONS, pl.DataFrame([prediction]).to_arrow())
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_with_a_writer)
    snap = take_snapshot(storage, FileCache())
    assert fired
    predictions = pq.ParquetDataset([storage.path(r) for r in snap.table_files(S.PREDICTIONS)]).read()
    pipelines = pq.ParquetDataset([storage.path(r) for r in snap.table_files(S.PIPELINES)]).read()
    runs = pq.ParquetDataset([storage.path(r) for r in snap.table_files(S.RUNS)]).read()
    assert predictions.num_rows == 1
    assert set(predictions["pipeline_id"].to_pylist()) - set(pipelines["pipeline_id"].to_pylist()) == set()
    assert set(pipelines["run_id"].to_pylist()) - set(runs["run_id"].to_pylist()) == set()


def test_a_long_lived_reader_forgets_the_files_compaction_replaced(tmp_path):
    """Issue 9 scenario 23: a long-lived reader held 179 files, 22 MB, for 2 on disk. Its cache
    now drops the files a snapshot no longer shows, so it holds only files still visible."""
    workspace = str(tmp_path / "ws")
    pipe = write_logs(workspace, 2)
    storage = Storage(workspace)
    with WorkspaceStore(workspace) as reader:
        for _ in range(4):
            write_logs(workspace, 3, pipe)
            assert reader.get_pipeline_log(pipe).height > 0
            with WorkspaceStore(workspace, grace_seconds=0) as maintainer:
                maintainer.vacuum()
                maintainer.vacuum()  # the second purges what the first replaced
        assert reader.get_pipeline_log(pipe).height == 2 * ROWS_PER_FILE + 12 * ROWS_PER_FILE
        cached = set(reader._reads.cache._tables) | set(reader._reads.cache._frames) | set(reader._reads.cache._footers)
        assert cached, "the reader cached no file: this test would check nothing"
        on_disk = set(storage.list_files("tables"))
        assert cached <= on_disk, sorted(cached - on_disk)
        visible_logs = set(take_snapshot(storage, FileCache(), ("logs",)).table_files(S.LOGS))
        assert {rel for rel in cached if rel.startswith("tables/logs/")} <= visible_logs


def test_a_corrupt_file_is_named_and_other_tables_stay_readable(tmp_path):
    """Issue 9 scenario 21 (the reader's part): one corrupt data file stopped every read with an
    error naming ``<Buffer>`` (or no file). Now a read that needs it raises CorruptFileError
    naming it, and reads of other tables go on; a corrupt deletions file fails reads, by name."""
    workspace = str(tmp_path / "ws")
    with WorkspaceStore(workspace) as store:
        run = store.begin_run("r", {}, [{"name": "corn"}])
        pipe = store.begin_pipeline(run, "p", [], {}, "corn", "h")
        chain = store.save_chain(pipe, [], 0, "PLS", "SNV", "KFold", {}, {})
        store.save_prediction(
            pipe, chain, "corn", "PLS", "PLS", "0", "val", 1.0, 1.0, 0.5, "rmse", "regression", 3, 10,
            {}, {}, None, None, 0, 0.0, "SNV", None,
        )
    storage = Storage(workspace)
    [damaged] = [r for r in storage.list_files(S.PREDICTIONS.dir) if not tables.is_schema_file(r)]
    with open(storage.path(damaged), "r+b") as fh:
        fh.truncate(40)
    with WorkspaceStore(workspace) as store:
        with pytest.raises(Exception) as info:
            store.query_predictions(dataset_name="corn")
        assert type(info.value).__name__ == "CorruptFileError" and isinstance(info.value, OSError)
        assert f"data file {damaged} cannot be read" in str(info.value)
        assert store.list_runs()["run_id"].to_list() == [run]
        assert store.get_pipeline(pipe)["status"] == "running"
    deletion = {"kind": "prediction", "entity_id": "gone", "deleted_at": CLOCK.now_us()}
    [deletions] = write_table(storage, S.DELETIONS, pl.DataFrame([deletion]).to_arrow())
    with open(storage.path(deletions), "wb") as fh:
        fh.write(b"not parquet at all")
    with WorkspaceStore(workspace) as store:
        with pytest.raises(Exception, match=f"data file {deletions} cannot be read") as info:
            store.list_runs()
        assert type(info.value).__name__ == "CorruptFileError"


def test_replaced_files_stay_a_grace_period_after_their_commit_landed(tmp_path):
    """A compactor whose clock is an hour behind stamps its commit an hour "old": purging by that
    stamp deleted the files it replaced at once, under readers that had just listed them. The
    grace period now counts from when the commit landed (its file's modification time)."""
    workspace = str(tmp_path / "ws")
    pipe = write_logs(workspace, 2)
    storage = Storage(workspace)
    with WorkspaceStore(workspace) as store:
        before = take_snapshot(storage, FileCache(), ("logs",)).table_files(S.LOGS)
        store.compact(tables=["logs"])
    [commit] = [rel for rel in storage.list_files(S.COMMITS.dir) if not tables.is_schema_file(rel)]
    row = pq.read_table(storage.path(commit)).to_pylist()[0]
    skewed = tables.to_parquet_bytes(
        pa.Table.from_pylist([{**row, "created_at": row["created_at"] - timedelta(hours=1)}], schema=S.COMMITS.schema)
    )
    storage.publish(commit, skewed, overwrite=True)
    assert purge(storage, FileCache(), CLOCK.now_us() - 60_000_000) == 0  # a grace period of one minute
    assert all(storage.exists(rel) for rel in before)
    assert log_counts(workspace, pipe) == (10, 10, 10, 10)
