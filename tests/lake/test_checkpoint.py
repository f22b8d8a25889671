"""Checkpoints (lake spec §11): when they run, how they land in order, what they reuse, and what
vacuum keeps for them. What engines read from them is tests/test_engines.py's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from conftest import PipelineIds, record_prediction

from nirslake import WorkspaceStore
from nirslake.lake import checkpoint as C
from nirslake import query as q
from nirslake.lake import schema as S
from nirslake.cli import main as cli
from nirslake.lake.storage import Storage
from nirslake.api.sync import sync
from nirslake.lake.tables import FileCache

WORKERS = str(Path(__file__).parents[1] / "_checkpoint_workers.py")
TABLES = C.MANIFEST_TABLES


def write_some(store, datasets=("corn", "wheat"), pipelines=2) -> list[str]:
    """A run with completed pipelines (each pipelines file then holds hidden 'running' rows)."""
    run_id = store.begin_run("r", {}, [{"name": d} for d in datasets])
    pids = []
    for dataset in datasets:
        for p in range(pipelines):
            pipeline_id = store.begin_pipeline(run_id, f"p{p}", {}, {}, dataset, "h")
            chain_id = store.save_chain(pipeline_id, [], 0, "PLS", "", "KFold", {}, {})
            for fold in range(2):
                pid = record_prediction(store, PipelineIds(run_id, pipeline_id, chain_id), dataset_name=dataset, fold_id=str(fold))
                store.save_prediction_arrays(pid, np.arange(3.0), np.arange(3.0) + fold)
                pids.append(pid)
            store.complete_pipeline(pipeline_id, 0.1, 0.2, "rmse", 1)
        store.flush()
    store.complete_run(run_id, {})
    return pids


def manifest_rows(storage: Storage, rel: str = C.POINTER) -> dict[str, Counter]:
    """Each table's rows as the files a manifest lists hold them (read through polars)."""
    manifest = C.read_manifest(storage, rel)
    out = {}
    for table in TABLES:
        files = [storage.url(f) for f, t in zip(manifest["file"].to_pylist(), manifest["table"].to_pylist()) if t == table]
        frame = pl.scan_parquet(files, missing_columns="insert", hive_partitioning=False, storage_options=storage.storage_options or None).collect()
        out[table] = _rows(frame, table)
    return out


def current_rows(storage: Storage) -> dict[str, Counter]:
    return {table: _rows(q.scan(storage, table).collect(), table) for table in TABLES}


def _rows(frame: pl.DataFrame, table: str) -> Counter:
    frame = frame.select(S.TABLES[table].schema.names)
    return Counter(tuple(tuple(v) if isinstance(v, list) else v for v in row) for row in frame.iter_rows())


def checkpoints(storage: Storage) -> list[int]:
    return [n for n, _ in C.list_checkpoints(storage)]


# -- when checkpoints run ----------------------------------------------------------------------


def test_close_after_writes_checkpoints_and_a_read_only_close_does_not(local_workspace):
    storage = Storage(local_workspace)
    with WorkspaceStore(local_workspace) as store:
        write_some(store)
    assert checkpoints(storage) == [1]
    assert manifest_rows(storage) == current_rows(storage)
    with WorkspaceStore(local_workspace) as store:
        store.query_predictions()
        store.list_runs()
    assert checkpoints(storage) == [1], "a store that wrote nothing leaves the manifest alone"
    with WorkspaceStore(local_workspace) as store:
        store.delete_prediction(store.query_predictions()["prediction_id"][0])
    assert checkpoints(storage) == [1, 2]
    assert manifest_rows(storage) == current_rows(storage)
    assert storage.read_bytes(C.POINTER) == storage.read_bytes(C.checkpoint_file(2))


def test_compact_vacuum_check_and_the_cli_checkpoint(local_workspace, capsys):
    storage = Storage(local_workspace)

    def highest() -> int:
        return checkpoints(storage)[-1]

    with WorkspaceStore(local_workspace, grace_seconds=0) as store:
        pids = write_some(store)
        store.checkpoint()
        before = highest()
        assert store.compact().files_replaced
        assert highest() == before + 1, "the compaction's files replace the ones it merged"
        store.delete_prediction(pids[0])
        store.vacuum()  # nothing more to compact; the deletion is in the checkpoint before the purge
        assert checkpoints(storage) == [before + 2], "with a grace period of 0 the older ones go"
        store.delete_prediction(pids[1])
        store.check(repair=True)
        assert checkpoints(storage) == [before + 3]
        assert store.check().ok
        assert manifest_rows(storage) == current_rows(storage)
    assert cli(["checkpoint", "--workspace", local_workspace]) == 0
    assert f"checkpoint {before + 3} is current (nothing changed since it)" in capsys.readouterr().out
    with WorkspaceStore(local_workspace) as store:
        store.delete_prediction(pids[2])
        store.flush()
        assert cli(["checkpoint", "--workspace", local_workspace]) == 0  # another store, while this one is open
    assert f"checkpoint {before + 4} landed" in capsys.readouterr().out
    assert checkpoints(storage)[-1] == before + 4, "the close found it current: nothing new landed"
    assert manifest_rows(storage) == current_rows(storage)


def test_a_failed_checkpoint_at_close_warns_and_loses_nothing(local_workspace, monkeypatch):
    def broken(storage, cache):
        raise OSError("disk full")

    monkeypatch.setattr(C, "write_checkpoint", broken)
    store = WorkspaceStore(local_workspace)
    pids = write_some(store)
    with pytest.warns(RuntimeWarning, match="manifest .* was not updated .*disk full.*the lake is intact"):
        store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.flush()
    monkeypatch.undo()
    with WorkspaceStore(local_workspace) as store:
        assert sorted(store.query_predictions()["prediction_id"]) == sorted(pids)
        store.checkpoint()
    assert manifest_rows(Storage(local_workspace)) == current_rows(Storage(local_workspace))


# -- what a checkpoint writes ------------------------------------------------------------------


def test_copies_are_reused_while_the_rows_they_hide_stay_the_same(local_workspace):
    storage = Storage(local_workspace)
    with WorkspaceStore(local_workspace) as store:
        pids = write_some(store)
        store.flush()
        first = store.checkpoint()
        assert first.copies_written == 0, "hidden 'running' rows fill whole files: those are left out"
        store.delete_prediction(pids[0])  # one row of a predictions and an arrays file is hidden now
        second = store.checkpoint()
        assert second.copies_written == 2 and second.copies_reused == 0
        third = store.checkpoint()
        assert (third.copies_written, third.copies_reused) == (0, 2), "nothing changed: the same copies"
        assert not third.landed and third.number == second.number, "and no new checkpoint"
        store.delete_prediction(pids[1])  # same files, other rows hidden: new copies
        fourth = store.checkpoint()
        assert (fourth.copies_written, fourth.copies_reused) == (2, 0)
    manifest = C.read_manifest(storage)
    copies = [f for f in manifest["file"].to_pylist() if "/current-" in f]
    assert len(copies) == 2 and all(f.split("/")[-2] == "dataset=corn" for f in copies), "beside the file they stand for"
    assert manifest_rows(storage) == current_rows(storage)


def test_our_readers_never_read_the_copies(local_workspace):
    """Copies are not lake data (spec §4): the store, its views and query.scan show each row once."""
    with WorkspaceStore(local_workspace) as store:
        pids = write_some(store)
        store.delete_prediction(pids[0])
        store.checkpoint()
        shown = len(pids) - 1
        assert store.query_predictions().height == shown
        assert store.sql("SELECT count(*) FROM predictions").item() == shown
        assert q.scan(local_workspace, "predictions").collect().height == shown
        copies = [r for r in Storage(local_workspace).list_files("tables") if "/current-" in r]
        assert copies, "the copies exist"


def test_an_empty_workspace_lists_its_schema_files(local_workspace):
    WorkspaceStore(local_workspace).close()
    manifest = C.read_manifest(Storage(local_workspace))
    assert manifest["table"].to_pylist() == list(TABLES)
    assert all("-schema-v" in f for f in manifest["file"].to_pylist())
    assert f"tables/predictions/dataset=__null__/part-00000000000000-schema-v{S.FORMAT_VERSION}.parquet" in manifest["file"].to_pylist()


# -- order between checkpoints -----------------------------------------------------------------


def test_a_checkpoint_that_loses_its_number_lists_again(local_workspace, monkeypatch):
    """Another checkpoint lands between this one's look at the highest number and its own landing:
    this one must not land as the next number with what it listed; it lists again, so it holds
    what the other one held and more."""
    storage = Storage(local_workspace)
    with WorkspaceStore(local_workspace) as store:
        write_some(store)
    real_list = C.list_checkpoints
    other = WorkspaceStore(local_workspace)

    def listing_then_a_race(storage_):
        found = real_list(storage_)
        if not hasattr(other, "raced"):  # the first look: then another store writes and checkpoints
            other.raced = True
            write_some(other, datasets=("soil",))
            assert other.checkpoint().number == 2
            write_some(other, datasets=("sand",))
            other.flush()  # published, not yet in any checkpoint
        return found

    monkeypatch.setattr(C, "list_checkpoints", listing_then_a_race)
    result = C.write_checkpoint(storage, FileCache())
    monkeypatch.undo()
    assert (result.number, result.attempts, result.landed) == (3, 2, True)
    assert checkpoints(storage) == [1, 2, 3]
    assert manifest_rows(storage) == current_rows(storage), "the soil and sand rows are in it"
    assert storage.read_bytes(C.POINTER) == storage.read_bytes(C.checkpoint_file(3))
    other.close()
    assert checkpoints(storage) == [1, 2, 3], "its close found checkpoint 3 current"


def test_the_pointer_ends_at_the_highest_checkpoint(local_workspace):
    """A pointer writer that finds a higher checkpoint landed meanwhile copies it in."""
    storage = Storage(local_workspace)
    for datasets in (("corn",), ("wheat",)):
        with WorkspaceStore(local_workspace) as store:
            write_some(store, datasets)
    assert checkpoints(storage) == [1, 2]
    old = storage.read_bytes(C.checkpoint_file(1))
    C._point(storage, 1, old)  # a slow writer of checkpoint 1's pointer, after 2 landed
    assert storage.read_bytes(C.POINTER) == storage.read_bytes(C.checkpoint_file(2))


def test_two_checkpointing_processes_and_a_writer(local_workspace, tmp_path):
    """Checkpoints land in order while a writer publishes and others compact: every checkpoint
    holds every row the one before it held, and the last pointer holds exactly the current rows."""
    WorkspaceStore(local_workspace).close()
    stop = tmp_path / "stop"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH", "")]))
    writer = subprocess.Popen([sys.executable, WORKERS, "writer", local_workspace, "40"], stdout=subprocess.PIPE, text=True, env=env)
    racers = [
        subprocess.Popen([sys.executable, WORKERS, "checkpointer", local_workspace, str(stop), str(every)],
                         stdout=subprocess.PIPE, text=True, env=env)
        for every in (0, 4)
    ]
    try:
        out, _ = writer.communicate(timeout=300)
        assert writer.returncode == 0
        stop.write_text("")
        landed = [racer.communicate(timeout=300)[0] for racer in racers]
    finally:
        for proc in (writer, *racers):
            proc.kill()
    assert all(racer.returncode == 0 for racer in racers)
    assert out.count("ack ") == 40 and "closed" in out
    lines = [line.split() for text in landed for line in text.splitlines() if line.startswith("landed")]
    assert len(lines) >= 4, "the checkpointers ran while the writer wrote"
    storage = Storage(local_workspace)
    numbers = checkpoints(storage)
    assert numbers == list(range(1, len(numbers) + 1)), "numbered in landing order, none lost"
    assert storage.read_bytes(C.POINTER) == storage.read_bytes(C.checkpoint_file(numbers[-1]))
    final = manifest_rows(storage)
    assert final == current_rows(storage), "the last pointer holds exactly the current rows"
    assert len(final["pipelines"]) == 40 and len(final["predictions"]) == 120
    # Monotone: each checkpoint holds every prediction and pipeline the one before it held.
    held_before: dict[str, set] = {"predictions": set(), "pipelines": set()}
    for n in numbers:
        held = manifest_rows(storage, C.checkpoint_file(n))
        for table, key in (("predictions", 0), ("pipelines", 0)):
            ids = {row[key] for row in held[table]}
            assert held_before[table] <= ids, f"checkpoint {n} lost {table} of an earlier one"
            assert len(ids) == held[table].total(), f"checkpoint {n} shows a {table} row twice"
            held_before[table] = ids
    retried = sum(int(attempts) > 1 for _, _, attempts in lines)
    print(f"{len(numbers)} checkpoints, {retried} of the racers' needed a second listing")


# -- vacuum ------------------------------------------------------------------------------------


def _age(storage: Storage, rel: str, seconds: float) -> None:
    """Make ``rel`` look ``seconds`` old (as if that much time had passed since it landed)."""
    stamp = time.time() - seconds
    os.utime(storage.path(rel), (stamp, stamp))


def test_vacuum_keeps_what_a_recent_checkpoint_lists(local_workspace):
    storage = Storage(local_workspace)
    store = WorkspaceStore(local_workspace, grace_seconds=60)
    pids = write_some(store)
    store.delete_prediction(pids[0])
    first = store.checkpoint()  # lists the part files, and copies of two of them
    listed = set(C.read_manifest(storage, first.file)["file"].to_pylist())
    store.compact()  # replaces the part files; checkpoint 2 lists the compacted ones
    commits = [r for r in storage.list_files("tables/commits") if "/commit-" in r]
    assert commits
    for rel in commits:
        _age(storage, rel, 3600)  # the compaction landed long ago: its replaced files are leftovers
    store.vacuum()  # checkpoint 3, then the purge
    on_disk = set(storage.list_files("tables"))
    assert listed <= on_disk, "checkpoint 1 was replaced less than the grace period ago: its files stay"
    assert {C.checkpoint_file(1), C.checkpoint_file(2)} <= set(storage.list_files(C.CURRENT_DIR))

    # Once checkpoint 2 (which replaced checkpoint 1) is older than the grace period, 1 goes, and
    # with it the replaced files and the copies only it listed.
    _age(storage, C.checkpoint_file(2), 3600)
    for rel in listed:
        _age(storage, rel, 3600)
    store.vacuum()
    remaining = set(storage.list_files(C.CURRENT_DIR))
    assert C.checkpoint_file(1) not in remaining and C.checkpoint_file(2) in remaining
    gone = listed - set(storage.list_files("tables"))
    assert gone and all("/current-" in rel or "/part-" in rel for rel in gone)
    assert not any("-schema-v" in rel for rel in gone)
    still_listed = set(C.read_manifest(storage)["file"].to_pylist())
    assert still_listed <= set(storage.list_files("tables")), "the pointer's files are all there"
    assert manifest_rows(storage) == current_rows(storage)
    store.close()


def test_check_lists_old_checkpoints_and_unlisted_copies_as_leftovers(local_workspace):
    storage = Storage(local_workspace)
    with WorkspaceStore(local_workspace, grace_seconds=60) as store:
        pids = write_some(store)
        store.delete_prediction(pids[0])
        store.checkpoint()
        store.delete_prediction(pids[1])
        store.checkpoint()  # new copies of the same two files; checkpoint 1's are listed by it alone
        store.checkpoint()
        for rel in storage.list_files(C.CURRENT_DIR) + [r for r in storage.list_files("tables") if "/current-" in r]:
            _age(storage, rel, 3600)
        report = store.check()
        assert report.ok
        old = report.leftovers["checkpoints"]
        assert old and C.checkpoint_file(len(checkpoints(storage))) not in old
        assert report.leftovers["resolved copies"], "copies only old checkpoints list"
        listed = set(C.read_manifest(storage)["file"].to_pylist())
        assert not listed & set(report.leftovers["resolved copies"])


# -- sync and S3 -------------------------------------------------------------------------------


def test_a_pushed_workspace_gets_its_own_manifest_and_no_copies(tmp_path):
    source, target = str(tmp_path / "src"), str(tmp_path / "dst")
    with WorkspaceStore(source) as store:
        pids = write_some(store)
        store.delete_prediction(pids[0])
    assert any("/current-" in r for r in Storage(source).list_files("tables"))
    result = sync(source, target)
    assert result.ok
    dst = Storage(target)
    own = [r for r in dst.list_files("tables") if "/current-" in r]
    assert set(own) == {f for f in C.read_manifest(dst)["file"].to_pylist() if "/current-" in f}, "its own copies only"
    assert manifest_rows(dst) == current_rows(dst) == current_rows(Storage(source))


def test_checkpoint_and_pointer_on_s3(s3_workspace, monkeypatch):
    storage = Storage(s3_workspace)
    with WorkspaceStore(s3_workspace) as store:
        pids = write_some(store)
        store.delete_prediction(pids[0])
    assert checkpoints(storage) == [1]
    assert manifest_rows(storage) == current_rows(storage)
    # The documented polars line, on the bucket.
    files = pl.read_parquet(storage.url(C.POINTER)).filter(pl.col("table") == "predictions")["file"]
    frame = pl.scan_parquet([storage.url(f) for f in files], hive_partitioning=True, missing_columns="insert").collect()
    assert sorted(frame["prediction_id"]) == sorted(pids[1:]) and "dataset" in frame.columns

    # Two checkpoints that both take number 2: S3's If-None-Match refuses the second one's PUT,
    # which then lists again, and finds that 2 holds what it would have written.
    real_list = C.list_checkpoints
    stale = []

    def stale_listing(storage_):
        found = real_list(storage_)
        if not stale:
            stale.append(1)
            with WorkspaceStore(s3_workspace) as other:
                write_some(other, ("soil",))  # its close lands 2 after this listing
        return found

    monkeypatch.setattr(C, "list_checkpoints", stale_listing)
    result = C.write_checkpoint(storage, FileCache())
    monkeypatch.undo()
    assert (result.number, result.attempts) == (2, 2) and not result.landed, "2 holds exactly what it listed"
    assert checkpoints(storage) == [1, 2]
    assert manifest_rows(storage) == current_rows(storage)
    assert storage.read_bytes(C.POINTER) == storage.read_bytes(C.checkpoint_file(2))


# -- the rules, as the checkpoint applies them -------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("table", ["runs", "chains", "predictions", "prediction_arrays", "artifacts"])
def test_the_checkpoint_hides_exactly_the_rows_query_resolve_hides(table, seed):
    """The checkpoint applies the read rules in numpy (it must run where polars cannot, below);
    on random rows with repeated keys, equal stamps, null datasets and deletions of every kind,
    it keeps exactly the rows ``query.resolve`` (and, for arrays, ``with_visible_prediction``) keeps."""
    rng = np.random.default_rng(seed)
    tdef = S.TABLES[table]
    n = int(rng.integers(1, 80))
    values = {
        "run_id": rng.choice(["r1", "r2", "r3", None], n).tolist(),
        "dataset_name": rng.choice(["a", "b", None], n).tolist(),
        tdef.key: rng.choice([f"k{i}" for i in range(12)], n).tolist(),
        "_version": rng.integers(1, 6, n).tolist(),
        "created_at": rng.integers(1, 6, n).tolist(),
    }
    columns = C._rule_columns(tdef)
    narrow = pa.table({c: pa.array(values[c]).cast(tdef.schema.field(c).type) for c in columns})
    cuts = sorted(set(rng.integers(0, n, 3).tolist()) | {0, n})
    files = [(narrow.slice(a, b - a), 0) for a, b in zip(cuts, cuts[1:])]
    deletions = pa.table({
        "kind": ["run", "prediction", "prediction", "artifact", "artifact"],
        "entity_id": ["r2", "k1", "k2", "k1", "k3"],
        "deleted_at": pa.array([0, 3, 9, 2, 4]).cast(S.DELETIONS.schema.field("deleted_at").type),
    })
    predictions = pa.table({"dataset_name": ["a", None, "b", "a"], "prediction_id": ["k0", "k1", "k2", "k5"]})
    pairs = predictions if table == "prediction_arrays" else None
    kept, _ = C._kept_rows(tdef, files, C.Deleted.from_table(deletions), pairs)
    mine = {(f, int(r)) for f, (rows, (t, _)) in enumerate(zip(kept, files)) for r in (range(t.num_rows) if rows is None else rows)}

    frame = pl.concat(
        [pl.from_arrow(t).with_columns(pl.lit(f).alias("_f"), pl.int_range(pl.len()).alias("_r")) for f, (t, _) in enumerate(files)]
    ).lazy()
    current = q.resolve(frame, tdef, pl.from_arrow(deletions).lazy())
    if pairs is not None:
        current = q.with_visible_prediction(current, pl.from_arrow(pairs).lazy())
    reference = {(f, r) for f, r in current.select("_f", "_r").collect().iter_rows()}
    assert mine == reference


def test_a_forked_writer_checkpoints_at_close(local_workspace):
    """polars hangs in a process forked from one that used it; the checkpoint does not use it, so
    a writer forked from a reader closes (and checkpoints) as before."""
    import multiprocessing

    with WorkspaceStore(local_workspace) as store:
        write_some(store, ("corn",))
        assert store.query_predictions().height  # the parent has run polars
    child = multiprocessing.get_context("fork").Process(target=_forked_writer, args=(local_workspace,))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    storage = Storage(local_workspace)
    assert checkpoints(storage) == [1, 2]
    assert "wheat" in {row[4] for row in manifest_rows(storage)["predictions"]}
    assert manifest_rows(storage) == current_rows(storage)


def _forked_writer(workspace: str) -> None:
    with WorkspaceStore(workspace) as store:
        run_id = store.begin_run("forked", {}, [{"name": "wheat"}])
        pipeline_id = store.begin_pipeline(run_id, "p", {}, {}, "wheat", "h")
        chain_id = store.save_chain(pipeline_id, [], 0, "PLS", "", "KFold", {}, {})
        record_prediction(store, PipelineIds(run_id, pipeline_id, chain_id), dataset_name="wheat")
        store.complete_pipeline(pipeline_id, 0.1, 0.2, "rmse", 1)
