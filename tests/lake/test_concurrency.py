"""Many processes on one workspace: concurrent writers, SIGKILL at random moments, readers during
compaction and deletions (lake spec §3-§7). The subprocess entry points are in tests/_workers.py."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import _workers as W
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import nirslake.query as q
from nirslake import WorkspaceStore

WORKERS = str(Path(__file__).resolve().parents[1] / "_workers.py")
DUCKDB_CLI = str(Path(sys.executable).with_name("duckdb"))


def _spawn(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, WORKERS, *args], env=env, text=True, **kw)


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """Leave no worker behind when a test fails half-way."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _finish(proc: subprocess.Popen, stderr_path: Path, what: str, timeout: float = 300) -> None:
    """Wait for a worker; it must exit 0 with nothing on stderr (no traceback, no warning)."""
    proc.wait(timeout=timeout)
    err = stderr_path.read_text()
    assert proc.returncode == 0 and "Traceback" not in err and err.strip() == "", f"{what} exited {proc.returncode}:\n{err}"


def _check_data_files(store: WorkspaceStore, root: Path, where: str = "") -> None:
    """Every data file opens; with ``check()``, nothing is wrong beyond leftovers."""
    if hasattr(store, "check"):  # it reads every visible data file, and more
        report = store.check()
        assert report.problems == [], f"{where}{report.summary()}"
    else:
        for path in sorted((root / "tables").rglob("*.parquet")):
            pq.read_table(path)


def _arrays_match(arrays: pl.DataFrame, names: dict[str, str], n: int | None = None) -> list[str]:
    """Prediction ids whose stored y_true / y_pred differ from what their writer saved."""
    wrong = []
    for pid, y_true, y_pred in arrays.select("prediction_id", "y_true", "y_pred").iter_rows():
        tag, k = W.parse_model_name(names[pid])
        want_true, want_pred = W.expected_arrays(tag, k, n)
        if not (np.array_equal(np.asarray(y_true), want_true) and np.array_equal(np.asarray(y_pred), want_pred)):
            wrong.append(pid)
    return wrong


# ----------------------------------------------------------------------------- 1. writers
N_WRITERS, N_PIPELINES, N_COMPACTORS = 8, 50, 2


@pytest.mark.slow
def test_eight_writer_processes_at_once_lose_and_duplicate_nothing(workspace, tmp_path):
    # The workspace does not exist yet: the eight writers also create it at once. Two more
    # processes compact it over and over meanwhile, racing the writers and each other (§4).
    go, stop = tmp_path / "go", tmp_path / "stop"
    procs = []
    for w in range(N_WRITERS):
        err = tmp_path / f"writer{w}.err"
        with err.open("w") as fh:
            proc = _spawn("writer", workspace, str(w), str(N_PIPELINES), str(go), str(tmp_path / f"writer{w}.json"),
                          stdout=subprocess.PIPE, stderr=fh)
        procs.append((proc, err))
    compactors = []
    for c in range(N_COMPACTORS):
        err = tmp_path / f"compactor{c}.err"
        with err.open("w") as fh:
            compactors.append((_spawn("compactor", workspace, str(go), str(stop), str(tmp_path / f"compactor{c}.json"),
                                      stderr=fh), err))
    try:
        for proc, err in procs:  # every writer imported its modules: start them together
            assert proc.stdout.readline().strip() == "ready", err.read_text()
        go.touch()
        for w, (proc, err) in enumerate(procs):
            _finish(proc, err, f"writer {w}")
        stop.touch()
        for c, (proc, err) in enumerate(compactors):
            _finish(proc, err, f"compactor {c}")
    finally:
        _kill_all([proc for proc, _ in procs + compactors])
    compacted = [json.loads((tmp_path / f"compactor{c}.json").read_text()) for c in range(N_COMPACTORS)]
    print(f"compactions during the writes: {compacted}")
    assert sum(c["rounds"] for c in compacted) >= 2

    written = [json.loads((tmp_path / f"writer{w}.json").read_text()) for w in range(N_WRITERS)]
    reported_ids = [pid for out in written for p in out["pipelines"].values() for pid in p["predictions"]]
    n_expected = N_WRITERS * N_PIPELINES * W.PREDICTIONS_PER_PIPELINE
    assert len(reported_ids) == len(set(reported_ids)) == n_expected == 6_000

    with WorkspaceStore(workspace) as store:
        preds = store.query_predictions()
        assert preds.height == n_expected
        assert preds["prediction_id"].n_unique() == n_expected
        assert set(preds["prediction_id"].to_list()) == set(reported_ids)
        names = dict(zip(preds["prediction_id"], preds["model_name"]))

        # Every array, read in bulk, equals what its writer saved; a sample also through the API.
        arrays = q.scan(workspace, "prediction_arrays").select("prediction_id", "y_true", "y_pred").collect()
        assert arrays.height == n_expected and arrays["prediction_id"].n_unique() == n_expected
        assert _arrays_match(arrays, names) == []
        for pid in random.Random(0).sample(reported_ids, 100):
            row = store.get_prediction(pid, load_arrays=True)
            want_true, want_pred = W.expected_arrays(*W.parse_model_name(row["model_name"]))
            assert np.array_equal(row["y_true"], want_true) and np.array_equal(row["y_pred"], want_pred)

        pipelines = store.list_pipelines()
        assert pipelines.height == N_WRITERS * N_PIPELINES
        assert set(pipelines["status"].to_list()) == {"completed"}
        runs = store.list_runs()
        assert runs.height == N_WRITERS and set(runs["status"].to_list()) == {"completed"}

        # Every chain's artifact loads and is the writer's object; shared ones are stored once.
        artifact_ids = set()
        for w, out in enumerate(written):
            for pipe, p in out["pipelines"].items():
                (chain,) = store.get_chains_for_pipeline(pipe).rows(named=True)
                assert json.loads(chain["fold_artifacts"]) == {"fold_0": p["artifact"]}
                artifact_ids.add(p["artifact"])
        objects = {aid: store.load_artifact(aid) for aid in artifact_ids}
        for w, out in enumerate(written):
            for p in out["pipelines"].values():
                assert objects[p["artifact"]] == W.writer_artifact(w, p["i"])
        n_shared = len(range(0, N_PIPELINES, 5))
        assert len(artifact_ids) == n_shared + N_WRITERS * (N_PIPELINES - n_shared)
        on_disk = [f for f in (Path(workspace) / "objects").rglob("*") if f.is_file()]
        assert len(on_disk) == len(artifact_ids)

        assert store.sql("SELECT count(*), count(DISTINCT prediction_id) FROM predictions").row(0) == (n_expected,) * 2
        assert store.sql("SELECT count(*) FROM prediction_arrays").item() == n_expected
        _check_data_files(store, Path(workspace))

    cli = subprocess.run(
        [DUCKDB_CLI, "-readonly", "-csv", "-noheader", os.path.join(workspace, "catalog.duckdb"), "-c",
         "SELECT count(*), count(DISTINCT prediction_id) FROM predictions"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == f"{n_expected},{n_expected}"


# ----------------------------------------------------------------------------- 2. kill loop
N_KILLS = 50
# How long after an operation begins a targeted kill waits, at most (s): about its length.
KILL_WITHIN = {"write": 0.02, "compact": 0.15, "delete": 0.01, "gc": 0.03}


class _Tail:
    """The complete lines appended to a sidecar log since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [line for line in data[:end].decode().split("\n") if line]

    def wait_for(self, predicate, timeout: float, proc: subprocess.Popen | None = None) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.new_lines():
                if predicate(line):
                    return line
            if proc is not None and proc.poll() is not None:
                return None
            time.sleep(0.0005)
        return None


def _check_after_kill(workspace: str, log: W.ChaosLog, fail, with_duckdb: bool = True) -> dict:
    """Open the workspace a killed worker left and check every promise of lake spec §4-§7."""
    root = Path(workspace)
    with WorkspaceStore(workspace) as store:  # opening publishes the dead worker's journal (§6)
        assert not list((root / "_journal").glob("*.wal")), fail("a dead writer's journal segment was not published")
        _check_data_files(store, root, fail("store.check(): "))
        runs = set(store.list_runs(limit=1_000_000)["run_id"].to_list())
        pipelines = store.list_pipelines()
        preds = store.query_predictions()
        arrays = q.scan(workspace, "prediction_arrays").select("prediction_id", "y_true", "y_pred").collect()
        chains = q.scan(workspace, "chains").select("chain_id", "pipeline_id", "fold_artifacts").collect()
        n_sql = store.sql("SELECT count(*) FROM predictions").item() if with_duckdb else None

        status = dict(zip(pipelines["pipeline_id"], pipelines["status"]))
        pipeline_run = dict(zip(pipelines["pipeline_id"], pipelines["run_id"]))
        tags = {pid: int(name[1:]) for pid, name in zip(pipelines["pipeline_id"], pipelines["name"])}
        assert set(status.values()) <= {"completed", "failed"}, fail(f"pipelines left running: {Counter(status.values())}")
        assert set(pipeline_run.values()) <= runs, fail("a pipeline's run is missing")

        ids = preds["prediction_id"].to_list()
        assert len(ids) == len(set(ids)), fail("a prediction id is visible twice")
        assert n_sql in (None, len(ids)), fail(f"DuckDB counts {n_sql} predictions, the store {len(ids)}")
        visible = set(ids)
        by_pipeline: dict[str, set[str]] = {}
        for pid, pipe in zip(ids, preds["pipeline_id"]):
            by_pipeline.setdefault(pipe, set()).add(pid)
        assert set(by_pipeline) <= set(status), fail("a prediction's pipeline is missing")
        assert not visible & log.deleted_predictions, fail(f"deleted predictions visible: {visible & log.deleted_predictions}")

        # Runs: deleted ones vanished whole; one killed mid-deletion is whole or gone, never half.
        shown_runs = set(pipeline_run.values()) | set(preds["run_id"].to_list())
        assert not shown_runs & log.deleted_runs and not runs & log.deleted_runs, fail("a deleted run is visible")
        for run in log.maybe_deleted_runs:
            if run not in runs:
                assert run not in shown_runs, fail(f"run {run} is half deleted")

        # Reported pipelines: there, with the status they were given and every prediction not deleted.
        reported = set()
        for pipe, (run, _tag, pids, word) in log.pipelines.items():
            if run in log.deleted_runs or (run in log.maybe_deleted_runs and run not in runs):
                assert pipe not in status, fail(f"pipeline {pipe} of a deleted run is visible")
                continue
            reported.add(pipe)
            assert status.get(pipe) == word, fail(f"pipeline {pipe} reported {word} is {status.get(pipe)}")
            have = by_pipeline.get(pipe, set())
            assert have <= set(pids), fail(f"pipeline {pipe} has predictions it never saved")
            missing = set(pids) - have
            unexplained = missing - log.deleted_predictions - log.maybe_deleted_predictions
            assert not unexplained, fail(f"pipeline {pipe} lost {len(unexplained)} of its {len(pids)} predictions")
        # Pipelines whose report the kill cut off: whole or absent (nothing deletes from them).
        for pipe in set(status) - reported:
            n = len(by_pipeline.get(pipe, ()))
            assert n == W.PREDICTIONS_PER_PIPELINE, fail(f"unreported pipeline {pipe} has {n} predictions")

        # Arrays: exactly one per visible prediction, equal to what was saved.
        assert arrays["prediction_id"].n_unique() == arrays.height, fail("arrays visible twice")
        assert set(arrays["prediction_id"].to_list()) == visible, fail("arrays and predictions disagree")
        wrong = _arrays_match(arrays, dict(zip(preds["prediction_id"], preds["model_name"])))
        assert not wrong, fail(f"{len(wrong)} predictions' arrays differ, e.g. {wrong[:3]}")

        # Artifacts held by live chains (pipeline not failed, run not deleted): recorded, their
        # bytes there and unchanged; a sample also through load_artifact.
        records = {
            row["artifact_id"]: row
            for row in q.scan(workspace, "artifacts").select("artifact_id", "path", "content_hash").collect().iter_rows(named=True)
        }
        live = {}
        for pipe, fold_artifacts in zip(chains["pipeline_id"], chains["fold_artifacts"]):
            if status.get(pipe) == "completed":
                for aid in json.loads(fold_artifacts).values():
                    live.setdefault(aid, pipe)
        n_completed = sum(1 for s in status.values() if s == "completed")
        assert sum(1 for pipe in chains["pipeline_id"] if status.get(pipe) == "completed") == n_completed, fail(
            "a completed pipeline has not exactly one chain"
        )
        for aid, pipe in live.items():
            assert aid in records, fail(f"artifact {aid} of live pipeline {pipe} has no record")
            data = (root / records[aid]["path"]).read_bytes() if (root / records[aid]["path"]).exists() else None
            assert data is not None, fail(f"the bytes of artifact {aid} of live pipeline {pipe} are gone")
            assert hashlib.sha256(data).hexdigest() == aid == records[aid]["content_hash"], fail(f"artifact {aid} is corrupt")
            assert pickle.loads(data) == W.chaos_artifact(tags[pipe]), fail(f"artifact {aid} is not pipeline {pipe}'s model")
        for aid in random.Random(len(live)).sample(sorted(live), min(10, len(live))):
            assert store.load_artifact(aid) == W.chaos_artifact(tags[live[aid]]), fail(f"load_artifact({aid})")
    return {"predictions": len(ids), "pipelines": len(status), "runs": len(runs), "artifacts": len(live)}


@pytest.mark.slow
def test_sigkill_at_random_moments_of_writes_compactions_deletes_and_gc(workspace, tmp_path):
    seed = int(os.environ.get("NIRSLAKE_CHAOS_SEED", random.randrange(2**32)))
    print(f"kill loop seed: {seed} (rerun with NIRSLAKE_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    WorkspaceStore(workspace).close()
    log_path = tmp_path / "sidecar.log"
    tail = _Tail(log_path)
    sizes = []
    for kill in range(N_KILLS):

        def fail(message: str, kill=kill) -> str:
            return f"after kill {kill} (seed {seed}): {message}"

        err = tmp_path / "chaos.err"
        with err.open("w") as fh:
            proc = _spawn("chaos", workspace, str(log_path), str(seed), str(kill), stdout=subprocess.DEVNULL, stderr=fh)
        try:
            ready = tail.wait_for(lambda line, kill=kill: line == f"ready {kill}", 120, proc)
            assert ready, fail(f"the worker never became ready (exit {proc.poll()}):\n{err.read_text()}")
            time.sleep(rng.uniform(0.05, 1.5) if kill % 3 else rng.uniform(0.05, 0.5))
            if kill % 3 == 0:
                # Every third kill waits for one kind of operation to begin, so all four are hit.
                kind = W.OP_KINDS[(kill // 3) % 4]
                began = tail.wait_for(lambda line, kind=kind: line.startswith("begin ") and W.op_kind(line.split()[1]) == kind, 10, proc)
                if began:
                    time.sleep(rng.uniform(0, KILL_WITHIN[kind]))
            assert proc.poll() is None, fail(f"the worker died on its own (exit {proc.returncode}):\n{err.read_text()}")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, fail(f"exit {proc.returncode}:\n{err.read_text()}")
        tail.new_lines()
        log = W.ChaosLog.parse(W.read_lines(log_path))
        sizes.append(_check_after_kill(workspace, log, fail, with_duckdb=kill % 5 == 4))  # DuckDB: 0.5 s a time

    log = W.ChaosLog.parse(W.read_lines(log_path))
    hits = Counter(log.killed_in.values())
    print(f"kills landed in: {dict(hits)}; operations that returned: {log.ops}; lake sizes: {sizes[-1]}, "
          f"max predictions {max(s['predictions'] for s in sizes)}")
    assert len(log.killed_in) == N_KILLS
    for kind in W.OP_KINDS:
        assert hits[kind] >= 1, f"no kill landed during {kind} (seed {seed}): {dict(hits)}"
    assert min(log.ops.get(k, 0) for k in W.OP_KINDS) >= 3, f"too few operations of some kind: {log.ops}"
    assert max(s["predictions"] for s in sizes) >= 1_000, "the workspace never accumulated real data"

    # Finally a full compaction and vacuum of what all those crashes left: nothing lost, nothing left over.
    with WorkspaceStore(workspace, grace_seconds=0) as store:
        before = store.query_predictions().height
        store.vacuum()
        assert store.query_predictions().height == before
        if hasattr(store, "check"):
            # The killed writers' runs stay 'running' (lake spec §12): check names them, and
            # mark_failed records them failed, as a person would after the crashes.
            store.check(repair=True)
            store.mark_failed()
            report = store.check()
            assert report.ok and not any(report.leftovers.values()), report.summary()
    _check_after_kill(workspace, log, lambda m: f"after the final vacuum (seed {seed}): {m}")


# ----------------------------------------------------------------------------- 3. readers
N_RUNS, PIPELINES_PER_RUN = 6, 10


def _prepare_runs(workspace: str) -> list[dict]:
    """6 runs x 10 pipelines x 15 predictions, published pipeline by pipeline (many small files)."""
    runs = []
    with WorkspaceStore(workspace) as store:
        for r in range(N_RUNS):
            run = store.begin_run(f"run {r}", {}, [{"name": d} for d in W.DATASETS[:2]])
            pipelines = []
            for i in range(PIPELINES_PER_RUN):
                tag = r * 100 + i
                dataset = W.DATASETS[tag % 2]
                pipe, ids, _ = W.save_pipeline(store, run, tag, dataset, None, n=W.RESAVED_LENGTH)
                store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)
                store.flush()
                pipelines.append({"pipeline_id": pipe, "tag": tag, "dataset": dataset, "prediction_ids": ids})
            store.complete_run(run, {})
            runs.append({"run_id": run, "pipelines": pipelines})
    return runs


def _plan(runs: list[dict]) -> tuple[list[dict], list[int]]:
    """Compactions between deletions and re-saves; returns the steps and the count after each."""
    per_run = PIPELINES_PER_RUN * W.PREDICTIONS_PER_PIPELINE
    count = N_RUNS * per_run
    kept = runs[-1]["pipelines"]  # never deleted: its predictions are re-saved, one is deleted at a time
    steps, counts = [], []

    def add(step: dict, removed: int = 0) -> None:
        nonlocal count
        count -= removed
        steps.append(step)
        counts.append(count)

    def resave(i: int) -> dict:
        return {"op": "resave", **{k: kept[i][k] for k in ("pipeline_id", "tag", "dataset", "prediction_ids")}}

    deletable = iter(kept[5]["prediction_ids"])
    add({"op": "compact"})
    for r in range(4):
        add({"op": "delete_run", "run_id": runs[r]["run_id"]}, per_run)
        add(resave(r))
        add({"op": "compact"})
        add({"op": "delete_prediction", "prediction_id": next(deletable)}, 1)
        add(resave(r + 1))
        add({"op": "compact"})
    return steps, counts


@pytest.mark.slow
def test_readers_see_only_the_counts_before_or_after_each_compaction_and_delete(workspace, tmp_path):
    runs = _prepare_runs(workspace)
    steps, counts = _plan(runs)
    start = N_RUNS * PIPELINES_PER_RUN * W.PREDICTIONS_PER_PIPELINE
    allowed = {start, *counts}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"steps": steps, "pause": 0.1}))
    done = tmp_path / "done"

    readers = []
    for r in range(2):
        err = tmp_path / f"reader{r}.err"
        with err.open("w") as fh:
            proc = _spawn("reader", workspace, str(tmp_path / f"reader{r}.jsonl"), str(done), "1" if r == 0 else "0",
                          stderr=fh)
        readers.append((proc, err, tmp_path / f"reader{r}.jsonl"))
    maint = None
    try:
        # The maintenance starts once both readers are reading.
        deadline = time.monotonic() + 120
        while not all(out.exists() and out.stat().st_size for _, _, out in readers):
            assert time.monotonic() < deadline and all(p.poll() is None for p, _, _ in readers), [e.read_text() for _, e, _ in readers]
            time.sleep(0.02)
        err = tmp_path / "maintain.err"
        with err.open("w") as fh:
            maint = _spawn("maintain", workspace, str(plan_file), str(tmp_path / "timings.json"), stderr=fh)
        try:
            _finish(maint, err, "the maintenance process")
        finally:
            done.touch()
        for r, (proc, rerr, _) in enumerate(readers):
            _finish(proc, rerr, f"reader {r}")
    finally:
        _kill_all([p for p, _, _ in readers] + ([maint] if maint else []))

    timings = json.loads((tmp_path / "timings.json").read_text())
    compactions = [(t["begin"], t["end"]) for t in timings if t["op"] == "compact"]
    during_compaction, states_seen = 0, set()
    for r, (_, _, out) in enumerate(readers):
        seen = [json.loads(line) for line in out.read_text().splitlines()]
        by_how = Counter(s["how"] for s in seen)
        assert min(by_how[h] for h in ("store", "duckdb", "polars")) >= 5, f"reader {r} read too little: {by_how}"
        if r == 0:
            assert by_how["duckdb-cli"] >= 2, by_how
        # Arrays are counted by another scan (another listing): a value of its own, also allowed.
        bad = [s for s in seen if s["count"] not in allowed or s.get("arrays", s["count"]) not in allowed]
        assert not bad, f"reader {r} saw counts outside {sorted(allowed)}: {bad[:5]}"
        assert not [s for s in seen if s["duplicates"] or s.get("visible_twice")], f"reader {r} saw an id twice"
        observed = [s["count"] for s in seen]
        states_seen.update(observed)
        ups = [(a, b) for a, b in itertools.pairwise(observed) if b > a]
        assert not ups, f"reader {r} saw the count go back up: {ups[:5]}"
        assert observed[0] == start and observed[-1] == counts[-1]
        during_compaction += sum(
            1 for s in seen for begin, end in compactions if s["begin"] < end and s["end"] > begin
        )
        print(f"reader {r}: {dict(by_how)} reads, counts seen {sorted(set(observed), reverse=True)}")
    print(f"reads overlapping one of {len(compactions)} compactions: {during_compaction}")
    assert during_compaction >= 1, "no read overlapped a compaction"
    assert len(states_seen) >= 4, f"the readers saw too few of the states: {sorted(states_seen)}"

    with WorkspaceStore(workspace) as store:
        assert store.query_predictions().height == counts[-1]
        kept = runs[-1]["pipelines"]
        # The re-saved predictions resolve to their latest version, arrays included.
        for pid in kept[0]["prediction_ids"][:3]:
            row = store.get_prediction(pid, load_arrays=True)
            tag, k = W.parse_model_name(row["model_name"])
            assert row["val_score"] == 9.0 + k
            assert np.array_equal(row["y_pred"], -W.expected_arrays(tag, k, W.RESAVED_LENGTH)[1])
        _check_data_files(store, Path(workspace))
