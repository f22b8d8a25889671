"""Compaction: target sizes, and the listing order that keeps every reader on the before or after state.

The swap is one commit file (lake spec §4). It is safe only if readers list the commits before
the data files; the tests here record the order of every view's globs, then inject a
compaction (or a delete) between any two listings of one read and check what the read returns.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import duckdb
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from nirslake import WorkspaceStore
from nirslake.query import catalog
from nirslake.lake import schema as S


class HookFS(LocalFileSystem):
    """The local filesystem under ``hookfs://``, calling ``on_glob(path)`` after each glob DuckDB makes."""

    protocol = ("hookfs",)
    cachable = False

    def __init__(self, on_glob=None, **kwargs):
        super().__init__(**kwargs)
        self.on_glob = on_glob
        self.globs: list[str] = []

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("hookfs://"):
            path = path[len("hookfs://"):]
        return super()._strip_protocol(path)

    def glob(self, path, **kwargs):
        found = super().glob(path, **kwargs)
        self.globs.append(path.split("/tables/", 1)[1].split("/", 1)[0])
        if self.on_glob is not None:
            self.on_glob(len(self.globs))
        return found


fsspec.register_implementation("hookfs", HookFS, clobber=True)


def duckdb_over(workspace, on_glob=None) -> tuple[duckdb.DuckDBPyConnection, HookFS]:
    """A connection with the lake views over ``hookfs://<workspace>``, so every glob is seen."""
    fs = HookFS()
    # view_statements only asks for the URL (a Storage would call hookfs local, being a subclass)
    location = SimpleNamespace(url=lambda: f"hookfs://{workspace}")
    con = duckdb.connect()
    con.register_filesystem(fs)
    con.execute(catalog.view_statements(location))  # creating the views globs too: not counted
    fs.globs.clear()
    fs.on_glob = on_glob
    return con, fs


def fill(workspace, runs=3, pipelines=4, preds=5, samples=3) -> list[str]:
    """Runs of pipelines with predictions and arrays, one flush (so one set of files) per pipeline."""
    run_ids = []
    with WorkspaceStore(workspace) as store:
        for r in range(runs):
            run = store.begin_run(f"run{r}", {}, [{"name": "corn"}])
            run_ids.append(run)
            for p in range(pipelines):
                pipe = store.begin_pipeline(run, f"p{p}", [], {}, ("corn", "wheat")[p % 2], "h")
                chain = store.save_chain(pipe, [], p, "PLS", "SNV", "KFold", {}, {})
                for k in range(preds):
                    pid = store.save_prediction(
                        pipe, chain, ("corn", "wheat")[p % 2], "PLS", "PLS", str(k), "val", float(k), 1.0, 0.5,
                        "rmse", "regression", 3, 10, {}, {}, None, None, 0, 0.0, "SNV", None,
                    )
                    # Every array its own values (no two runs alike): sizes then follow the sample count
                    y = np.random.default_rng(k + 10 * p + 1000 * r).normal(size=samples) if samples > 3 else np.arange(3.0)
                    store.save_prediction_arrays(pid, y, y + k)
                store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 5)
                store.flush()
            store.complete_run(run, {})
    return run_ids


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "ws"
    run_ids = fill(str(path))
    return path, run_ids


def fresh_copy(template, tmp_path, name="ws"):
    path, run_ids = template
    target = tmp_path / name
    shutil.copytree(path, target)
    return str(target), run_ids


def counts(con) -> tuple[int, int, int, int]:
    row = con.execute(
        "SELECT (SELECT count(*) FROM predictions), (SELECT count(DISTINCT prediction_id) FROM predictions),"
        " (SELECT count(*) FROM prediction_arrays), (SELECT count(*) FROM runs)"
    ).fetchone()
    return tuple(row)


# ---------------------------------------------------------------------------- listing order
@pytest.mark.parametrize("view", ["runs", "pipelines", "chains", "logs", "predictions", "prediction_arrays", "artifacts",
                                  "predictions_with_run", "chain_summary", "leaderboard"])
def test_every_view_lists_the_commits_before_the_files_it_reads(template, view):
    path, _ = template
    con, fs = duckdb_over(path)
    con.execute(f"SELECT count(*) FROM {view}").fetchall()
    assert fs.globs, "the view read no file"
    for i, table in enumerate(fs.globs):
        if table != "commits":
            assert i > 0 and fs.globs[i - 1] == "commits", f"{view}: {table} listed without the commits first: {fs.globs}"
    first_data = next(t for t in fs.globs if t != "commits")
    assert first_data != "deletions", f"{view}: deletions listed before the data: {fs.globs}"


def test_the_store_lists_the_commits_first(template, tmp_path):
    ws, _ = fresh_copy(template, tmp_path)
    with WorkspaceStore(ws) as store:
        seen: list[str] = []
        original = store.storage.list_files
        store.storage.list_files = lambda rel, *a, **k: (seen.append(rel), original(rel, *a, **k))[1]
        store.query_predictions()
        store.get_run(store.list_runs()["run_id"][0])
    data_listings = [rel for rel in seen if rel.startswith("tables")]
    assert data_listings[0] == S.COMMITS.dir, seen


# ---------------------------------------------------------------------------- compaction between listings
def _inject(ws, action):
    """``on_glob`` that runs ``action(ws)`` once, after the glob numbered ``at``."""

    def make(at):
        def on_glob(n):
            if n == at:
                action(ws)

        return on_glob

    return make


def _compact(ws):
    with WorkspaceStore(ws) as other:
        assert other.compact().files_replaced > 0


@pytest.mark.parametrize("at", range(1, 9))
def test_duckdb_reads_during_a_compaction_see_every_row_once(template, tmp_path, at):
    ws, _ = fresh_copy(template, tmp_path)
    before = counts(duckdb_over(ws)[0])
    assert before == (60, 60, 60, 3)
    con, fs = duckdb_over(ws, _inject(ws, _compact)(at))
    assert counts(con) == before
    # the compaction happened inside this read, unless the read made fewer globs than ``at``
    if len(fs.globs) >= at:
        assert counts(duckdb_over(ws)[0]) == before


DELETE_STATES = {"predictions": {60, 40}, "prediction_arrays": {60, 40}, "runs": {3, 2}}
KEYS = {"predictions": "prediction_id", "prediction_arrays": "prediction_id", "runs": "run_id"}


@pytest.mark.parametrize("view", sorted(DELETE_STATES))
@pytest.mark.parametrize("at", range(1, 5))
def test_duckdb_reads_during_a_delete_see_before_or_after(template, tmp_path, view, at):
    """One view read is one listing: a delete (then a compaction dropping the rows) landing
    between any two of its globs leaves it on the before or the after count."""
    ws, run_ids = fresh_copy(template, tmp_path)

    def delete_then_compact(path):
        with WorkspaceStore(path) as other:
            other.delete_run(run_ids[0], delete_artifacts=False)
            other.compact()

    con, fs = duckdb_over(ws, _inject(ws, delete_then_compact)(at))
    n, distinct = con.execute(f"SELECT count(*), count(DISTINCT {KEYS[view]}) FROM {view}").fetchone()
    assert len(fs.globs) >= at, "the delete was not injected into the read"
    assert n == distinct
    assert n in DELETE_STATES[view]
    assert duckdb_over(ws)[0].execute(f"SELECT count(*) FROM {view}").fetchone()[0] == min(DELETE_STATES[view])


@pytest.mark.parametrize("at", range(1, 6))
def test_store_reads_during_a_compaction_see_every_row_once(template, tmp_path, at):
    ws, run_ids = fresh_copy(template, tmp_path)
    with WorkspaceStore(ws) as reader:
        calls = {"n": 0}
        original = reader.storage.list_files

        def listing(rel, *a, **k):
            found = original(rel, *a, **k)
            calls["n"] += 1
            if calls["n"] == at:
                _compact(ws)
            return found

        reader.storage.list_files = listing
        frame = reader.query_predictions()
        assert frame.height == frame["prediction_id"].n_unique() == 60
        assert len(reader.list_pipelines()) == 12


# ---------------------------------------------------------------------------- the compact() API
def test_compact_merges_small_files_into_files_near_the_target(tmp_path):
    ws = str(tmp_path / "ws")
    fill(ws, runs=2, pipelines=6, preds=5, samples=2_000)  # ~160 KB of arrays per file, 6 files per dataset
    with WorkspaceStore(ws, grace_seconds=0) as store:
        before = store.query_predictions().sort("prediction_id")
        arrays_before = store.get_prediction(before["prediction_id"][7], load_arrays=True)
        files_before = len(store.storage.list_files(S.PREDICTION_ARRAYS.dir)) - 1  # without the schema file
        result = store.compact(target_file_mb=0.5, tables=["prediction_arrays"])
        assert result.tables == {"prediction_arrays": files_before}
        assert result.partitions == 2
        # ~1 MB of arrays per dataset in 6 files -> 2 or 3 files each, none over the target
        assert 4 <= result.files_written <= 6
        written = [r for r in store.storage.list_files(S.PREDICTION_ARRAYS.dir) if "/compact-" in r]
        assert all(0.25 * 1048576 <= store.storage.size(r) <= 0.5 * 1048576 for r in written)
        assert store.query_predictions().sort("prediction_id").equals(before)
        again = store.get_prediction(before["prediction_id"][7], load_arrays=True)
        np.testing.assert_array_equal(again["y_pred"], arrays_before["y_pred"])
        # the merged files are not small any more: a second compaction leaves them alone
        assert store.compact(target_file_mb=0.5, tables=["prediction_arrays"]).files_replaced == 0
        assert store.sql("SELECT count(*) FROM prediction_arrays").item() == 60


def test_files_at_least_half_the_target_are_left_alone(template, tmp_path):
    ws, _ = fresh_copy(template, tmp_path)
    with WorkspaceStore(ws) as store:
        sizes = [store.storage.size(r) for r in store.storage.list_files(S.PREDICTIONS.dir) if "-schema-" not in r]
        result = store.compact(target_file_mb=2 * min(sizes) / 1048576 * 0.99, tables=["predictions"])
        assert result.files_replaced == 0
        assert store.compact(tables=["predictions"]).files_replaced == len(sizes)


def test_compact_refuses_bad_arguments_and_keeps_the_data(template, tmp_path):
    ws, _ = fresh_copy(template, tmp_path)
    with WorkspaceStore(ws) as store:
        for bad in (0, -1, "10", float("nan"), True):
            with pytest.raises(ValueError, match="target_file_mb must be a positive number"):
                store.compact(target_file_mb=bad)
        for table, message in (("deletions", "never compacted"), ("commits", "never compacted"), ("nope", "unknown table")):
            with pytest.raises(ValueError, match=message):
                store.compact(tables=[table])
        assert store.query_predictions().height == 60


def test_compaction_drops_deleted_and_superseded_rows(template, tmp_path):
    ws, run_ids = fresh_copy(template, tmp_path)
    with WorkspaceStore(ws, grace_seconds=0) as store:
        store.delete_run(run_ids[1], delete_artifacts=False)
        pid = store.query_predictions()["prediction_id"][0]
        store.delete_prediction(pid)
        store.vacuum()
        store.vacuum()  # the second one purges what the first replaced (grace 0)
        files = store.storage.list_files(S.PREDICTIONS.dir)
        rows_on_disk = sum(pq.read_metadata(store.storage.path(r)).num_rows for r in files)
        assert rows_on_disk == 39 == store.query_predictions().height
