"""Subprocess entry points of tests/lake/test_concurrency.py: writers, a worker killed at random, a
maintenance process and readers, all on one workspace. Run as ``python tests/_workers.py <role> ...``.

What a worker writes is a function of small integers (a *tag* per pipeline, ``k`` per prediction),
defined here, so the test recomputes every array and artifact instead of shipping them back.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PARTITIONS = ("train", "val", "test")
DATASETS = ("corn", "wheat", "soil")
PREDICTIONS_PER_PIPELINE = 15  # 5 folds x 3 partitions
RESAVED_LENGTH = 50  # samples per prediction in the readers' test


# ---------------------------------------------------------------- what is written
def expected_arrays(tag: int, k: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """y_true and y_pred of prediction ``k`` of pipeline ``tag`` (its length varies with both)."""
    n = 8 + (tag + k) % 9 if n is None else n
    y_true = tag + k / 16 + np.arange(n) / 8
    return y_true, y_true * 0.5 - k


def model_name(tag: int, k: int) -> str:
    """Every prediction names its pipeline tag and index, so a reader can recompute its arrays."""
    return f"{tag}:{k}"


def parse_model_name(name: str) -> tuple[int, int]:
    tag, k = name.split(":")
    return int(tag), int(k)


def writer_artifact(writer: int, i: int) -> dict:
    """A fitted model: every fifth pipeline's is the same in every writer (stored once)."""
    if i % 5 == 0:
        return {"shared": i, "coef": [i * 0.5 + j for j in range(16)]}
    return {"writer": writer, "pipeline": i, "coef": [writer + i * 0.25 + j for j in range(16)]}


def chaos_artifact(tag: int) -> dict:
    """One pipeline in three holds one of three pooled models, shared across runs: deleting a run
    or collecting garbage must keep a pooled model while any live chain holds it."""
    if tag % 3 == 0:
        pool = (tag // 3) % 3
        return {"pool": pool, "coef": [pool + j / 4 for j in range(32)]}
    return {"tag": tag, "coef": [tag + j / 4 for j in range(32)]}


def save_pipeline(
    store, run_id: str, tag: int, dataset: str, artifact: dict | None, n: int | None = None, pause: float = 0.0
):
    """Begin a pipeline, save its chain (holding ``artifact``) and its 15 predictions with arrays,
    ``pause`` seconds apart (a model fitting between saves).

    Returns (pipeline_id, prediction ids, artifact id); the pipeline is left running.
    """
    pipe = store.begin_pipeline(run_id, f"t{tag}", {"tag": tag}, {}, dataset, f"h{tag}")
    aid = None
    if artifact is not None:
        aid = store.save_artifact(artifact, "PLSRegression", "model", "pickle")
    steps = [{"step_idx": 0, "operator_class": "PLSRegression", "params": {}, "artifact_id": aid, "stateless": False}]
    chain = store.save_chain(pipe, steps, 0, "PLSRegression", "SNV", "kfold", {"fold_0": aid} if aid else {}, {})
    ids = []
    for k in range(PREDICTIONS_PER_PIPELINE):
        y_true, y_pred = expected_arrays(tag, k, n)
        pid = store.save_prediction(
            pipe, chain, dataset, model_name(tag, k), "PLSRegression", k // 3, PARTITIONS[k % 3],
            0.1 + k, 0.2, 0.3, "rmse", "regression", len(y_true), 100, {"val": {"rmse": 0.1 + k}}, {},
            None, None, 0, 0.0,
        )
        store.save_prediction_arrays(pid, y_true, y_pred)
        ids.append(pid)
        if pause:
            time.sleep(pause)
    return pipe, ids, aid


# ---------------------------------------------------------------- the sidecar log
class SideLog:
    """Lines appended with one write() and fsynced before the call returns: a line in this file
    means the operation it reports had returned. A line cut by a kill has no newline and is ignored."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self.fd).st_size:
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    self.line("")  # end the line a killed writer left cut

    def line(self, text: str) -> None:
        os.write(self.fd, (text + "\n").encode())
        os.fsync(self.fd)


def read_lines(path: str | Path) -> list[str]:
    """The complete lines of a sidecar log (a cut last line is left out)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]


OP_KINDS = ("write", "compact", "delete", "gc")


def op_kind(op: str) -> str:
    return "delete" if op.startswith("delete") else op


@dataclass
class ChaosLog:
    """What the killed workers reported, folded over every generation's lines."""

    # pipeline_id -> (run_id, tag, prediction ids, "completed" | "failed")
    pipelines: dict[str, tuple[str, int, list[str], str]] = field(default_factory=dict)
    runs_by_generation: dict[int, str] = field(default_factory=dict)
    deleted_runs: set[str] = field(default_factory=set)
    deleted_predictions: set[str] = field(default_factory=set)
    maybe_deleted_runs: set[str] = field(default_factory=set)  # killed inside delete_run
    maybe_deleted_predictions: set[str] = field(default_factory=set)
    killed_in: dict[int, str] = field(default_factory=dict)  # generation -> op kind running, or "between"
    ops: dict[str, int] = field(default_factory=dict)  # op kind -> how many returned

    @classmethod
    def parse(cls, lines: list[str]) -> ChaosLog:
        log = cls()
        generation = None
        pending: list[str] | None = None  # the last "begin" line not yet ended

        def close_generation() -> None:
            if generation is None:
                return
            if pending is not None:
                log.killed_in[generation] = op_kind(pending[1])
                if pending[1] == "delete_run":
                    log.maybe_deleted_runs.add(pending[2])
                elif pending[1] == "delete_prediction":
                    log.maybe_deleted_predictions.add(pending[2])
            else:
                log.killed_in[generation] = "between"

        for line in lines:
            word, *rest = line.split(" ")
            if word == "ready":
                close_generation()
                generation, pending = int(rest[0]), None
            elif word == "run":
                log.runs_by_generation[generation] = rest[0]
            elif word == "begin":
                pending = [word, *rest]
            else:
                if word in ("completed", "failed"):
                    run_id, pipe, tag, ids = rest
                    log.pipelines[pipe] = (run_id, int(tag), ids.split(","), word)
                    kind = "write"
                elif word == "deleted_run":
                    log.deleted_runs.add(rest[0])
                    kind = "delete"
                elif word == "deleted_prediction":
                    log.deleted_predictions.add(rest[0])
                    kind = "delete"
                elif word == "end":
                    kind = op_kind(rest[0])
                else:
                    raise ValueError(f"unexpected sidecar line {line!r}")
                log.ops[kind] = log.ops.get(kind, 0) + 1
                pending = None
        close_generation()
        return log

    def live_runs(self, before_generation: int) -> list[str]:
        """Runs of earlier generations with a reported pipeline, not (maybe) deleted, oldest first."""
        with_pipelines = {run for run, *_ in self.pipelines.values()}
        return [
            run
            for gen, run in sorted(self.runs_by_generation.items())
            if gen < before_generation and run in with_pipelines
            and run not in self.deleted_runs and run not in self.maybe_deleted_runs
        ]


# ---------------------------------------------------------------- roles
def writer(workspace: str, index: str, n_pipelines: str, go_file: str, out_file: str) -> None:
    """Test 1: wait for the go file, then open the (maybe not yet created) workspace and write
    whole pipelines as fast as possible."""
    from nirslake import WorkspaceStore

    w = int(index)
    print("ready", flush=True)
    while not os.path.exists(go_file):
        time.sleep(0.002)
    store = WorkspaceStore(workspace, flush_seconds=0.5)  # publish while the others write
    run = store.begin_run(f"writer {w}", {"writer": w}, [{"name": d} for d in DATASETS])
    written = {"run": run, "pipelines": {}}
    for i in range(int(n_pipelines)):
        tag = w * 1000 + i
        pipe, ids, aid = save_pipeline(store, run, tag, DATASETS[(w + i) % 3], writer_artifact(w, i))
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 10)
        written["pipelines"][pipe] = {"tag": tag, "i": i, "artifact": aid, "predictions": ids}
    store.complete_run(run, {"pipelines": int(n_pipelines)})
    store.close()
    Path(out_file).write_text(json.dumps(written))


def compactor(workspace: str, go_file: str, stop_file: str, out_file: str) -> None:
    """Test 1: compact the workspace over and over while the writers write (default grace)."""
    from nirslake import WorkspaceStore

    while not os.path.exists(go_file):
        time.sleep(0.002)
    while not os.path.exists(os.path.join(workspace, "catalog.duckdb")):
        time.sleep(0.01)  # the writers create the workspace
    store = WorkspaceStore(workspace)
    compact = getattr(store, "compact", None) or store.vacuum
    rounds, replaced = 0, 0
    while not os.path.exists(stop_file):
        result = compact()
        rounds += 1
        replaced += getattr(result, "files_replaced", 0)
    store.close()
    Path(out_file).write_text(json.dumps({"rounds": rounds, "files_replaced": replaced}))


def chaos(workspace: str, log_path: str, seed: str, generation: str) -> None:
    """Test 2: write, compact, delete and collect garbage on one workspace until SIGKILLed,
    reporting each operation to the sidecar log once it returned."""
    from nirslake import WorkspaceStore

    gen = int(generation)
    # grace_seconds=0: vacuum and gc_artifacts really remove what they may.
    store = WorkspaceStore(workspace, grace_seconds=0, flush_seconds=0.3)
    history = ChaosLog.parse(read_lines(log_path))
    log = SideLog(log_path)
    log.line(f"ready {gen}")
    rng = random.Random(f"{seed}:{gen}")
    run = store.begin_run(f"gen {gen}", {"generation": gen}, [{"name": d} for d in DATASETS])
    log.line(f"run {run}")
    live_predictions = [
        pid
        for run_id, _, ids, _ in history.pipelines.values()
        if run_id not in history.deleted_runs and run_id not in history.maybe_deleted_runs
        for pid in ids
        if pid not in history.deleted_predictions and pid not in history.maybe_deleted_predictions
    ]
    deletable_runs = history.live_runs(gen)
    compact = getattr(store, "compact", None)
    n = 0
    while True:
        op = rng.choices(["write", "compact", "gc", "delete_prediction", "delete_run"], [75, 5, 6, 8, 6])[0]
        if op == "delete_run" and len(deletable_runs) < 3:
            op = "delete_prediction"  # keep a few earlier runs, so there is data to compact
        if op == "delete_prediction" and not live_predictions:
            op = "write"
        if op == "write":
            tag = gen * 10_000 + n
            n += 1
            log.line(f"begin write {tag}")
            # Saves a few ms apart, as between model fits: without the pause a pipeline's saves take
            # under 2 ms, so random kills almost never land inside a write, only in maintenance.
            pipe, ids, _ = save_pipeline(store, run, tag, DATASETS[tag % 3], chaos_artifact(tag), pause=0.002)
            if rng.random() < 0.1:
                store.fail_pipeline(pipe, "diverged")  # its chain stops holding its model
                word = "failed"
            else:
                store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 10)
                word = "completed"
            log.line(f"{word} {run} {pipe} {tag} {','.join(ids)}")
            live_predictions.extend(ids)
        elif op == "compact":
            log.line("begin compact")
            if compact is not None and rng.random() < 0.5:
                compact()
            else:
                store.vacuum()
            log.line("end compact")
        elif op == "gc":
            log.line("begin gc")
            removed = store.gc_artifacts()
            log.line(f"end gc {removed}")
        elif op == "delete_prediction":
            pid = live_predictions.pop(rng.randrange(len(live_predictions)))
            log.line(f"begin delete_prediction {pid}")
            store.delete_prediction(pid)
            log.line(f"deleted_prediction {pid}")
        else:
            target = deletable_runs.pop(0) if len(deletable_runs) > 4 else deletable_runs.pop(rng.randrange(len(deletable_runs)))
            log.line(f"begin delete_run {target}")
            store.delete_run(target)
            log.line(f"deleted_run {target}")
            gone = {pid for run_id, _, ids, _ in history.pipelines.values() if run_id == target for pid in ids}
            live_predictions = [pid for pid in live_predictions if pid not in gone]


def maintain(workspace: str, plan_file: str, out_file: str) -> None:
    """Test 3: run the plan's steps in order (compactions, deletions, re-saves), timing each."""
    from nirslake import WorkspaceStore

    plan = json.loads(Path(plan_file).read_text())
    store = WorkspaceStore(workspace)  # the default grace: readers may still hold replaced files
    compact = getattr(store, "compact", None) or store.vacuum
    timings = []
    for step in plan["steps"]:
        time.sleep(plan["pause"])  # let the readers see every state
        op = step["op"]
        begin = time.time()
        if op == "compact":
            compact()
        elif op == "delete_run":
            assert store.delete_run(step["run_id"]) > 0
        elif op == "delete_prediction":
            assert store.delete_prediction(step["prediction_id"])
        elif op == "resave":
            # Saving the same prediction ids again: new files, the same number of predictions.
            for pid, k in zip(step["prediction_ids"], range(PREDICTIONS_PER_PIPELINE)):
                store.save_prediction(
                    step["pipeline_id"], None, step["dataset"], model_name(step["tag"], k), "PLSRegression",
                    k // 3, PARTITIONS[k % 3], 9.0 + k, 0.2, 0.3, "rmse", "regression", RESAVED_LENGTH, 100, {}, {},
                    None, None, 0, 0.0, prediction_id=pid,
                )
                y_true, y_pred = expected_arrays(step["tag"], k, RESAVED_LENGTH)
                store.save_prediction_arrays(pid, y_true, -y_pred)
            store.flush()
        else:
            raise ValueError(op)
        timings.append({"op": op, "begin": begin, "end": time.time()})
    store.close()
    Path(out_file).write_text(json.dumps(timings))


def reader(workspace: str, out_file: str, done_file: str, use_cli: str) -> None:
    """Test 3: count the predictions every way a user can, until the done file appears (then once more).

    Each observation is one JSON line: how, when (begin, end), the count, duplicated ids.
    """
    import polars as pl

    import nirslake.query as q
    from nirslake import WorkspaceStore

    duckdb_cli = Path(sys.executable).with_name("duckdb")
    catalog = os.path.join(workspace, "catalog.duckdb")
    with open(out_file, "a") as out:

        def record(how: str, begin: float, count: int, duplicates: int, **extra) -> None:
            row = {"how": how, "begin": begin, "end": time.time(), "count": count, "duplicates": duplicates, **extra}
            out.write(json.dumps(row) + "\n")
            out.flush()

        iteration = 0
        while True:
            last = os.path.exists(done_file)
            begin = time.time()
            with WorkspaceStore(workspace) as store:
                ids = store.query_predictions()["prediction_id"]
                record("store", begin, len(ids), len(ids) - ids.n_unique())
                begin = time.time()
                # Each subquery is one snapshot of its own (a statement naming a view twice may see
                # two states, as globs are listed per reference): counts and duplicates come from one.
                n, distinct, arrays, visible_twice = store.sql(
                    "SELECT p.n, p.d, a.n, v.twice FROM "
                    "(SELECT count(*) AS n, count(DISTINCT prediction_id) AS d FROM predictions) AS p, "
                    "(SELECT count(*) AS n FROM prediction_arrays) AS a, "
                    # a row copied by compaction keeps its created_at: seen twice means both files were visible
                    "(SELECT count(*) - count(DISTINCT (prediction_id, created_at)) AS twice FROM lake_table('predictions')) AS v"
                ).row(0)
                record("duckdb", begin, n, n - distinct, arrays=arrays, visible_twice=visible_twice)
            begin = time.time()
            ids = q.scan(workspace, "predictions").select("prediction_id").collect()["prediction_id"]
            arrays = q.scan(workspace, "prediction_arrays").select(pl.len()).collect().item()
            record("polars", begin, len(ids), len(ids) - ids.n_unique(), arrays=arrays)
            if use_cli == "1" and iteration % 3 == 0:
                begin = time.time()
                done = subprocess.run(
                    [str(duckdb_cli), "-readonly", "-csv", "-noheader", catalog, "-c",
                     "SELECT count(*), count(DISTINCT prediction_id) FROM predictions"],
                    capture_output=True, text=True, timeout=60, check=True,
                )
                n, distinct = map(int, done.stdout.strip().split(","))
                record("duckdb-cli", begin, n, n - distinct)
            iteration += 1
            if last:
                break


if __name__ == "__main__":
    roles = {"writer": writer, "compactor": compactor, "chaos": chaos, "maintain": maintain, "reader": reader}
    roles[sys.argv[1]](*sys.argv[2:])
