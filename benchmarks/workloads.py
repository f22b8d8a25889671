"""The benchmark workloads, run the same way against nirslake and against the peer (nirs4all 1.4.10).

Each function runs inside a fresh worker process (see run.py) and returns a dict of figures.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass

import numpy as np

FOLDS, PARTITIONS = 5, ("train", "val", "test")


@dataclass(frozen=True)
class Sweep:
    datasets: int = 4
    pipelines: int = 400  # per dataset
    samples: int = 200

    @property
    def total_pipelines(self) -> int:
        return self.datasets * self.pipelines

    @property
    def predictions(self) -> int:
        return self.total_pipelines * FOLDS * len(PARTITIONS)


def open_store(store_name: str, workspace: str):
    if store_name == "nirslake":
        from nirslake import WorkspaceStore

        # benchmarks/s3.py measures the listing lease through this variable
        return WorkspaceStore(workspace, listing_ttl_seconds=float(os.environ.get("NIRSLAKE_BENCH_LISTING_TTL", "0")))
    from nirs4all.pipeline.storage.workspace_store import WorkspaceStore

    return WorkspaceStore(workspace)


class PeerArrays:
    """nirs4all 1.4.10 has no save_prediction_arrays: its executor buffers a pipeline's arrays and
    writes them with ``array_store.save_batch`` once per pipeline, then refreshes the chain
    summaries. The benchmark calls it the same way, so the peer runs its own real write path."""

    def __init__(self, store):
        self.store = store
        self.pending: list[dict] = []

    def save(self, prediction_id, dataset, model, fold, partition, score, y_true, y_pred):
        self.pending.append(
            {"prediction_id": prediction_id, "dataset_name": dataset, "model_name": model, "fold_id": str(fold),
             "partition": partition, "metric": "rmse", "val_score": score, "task_type": "regression",
             "y_true": y_true, "y_pred": y_pred}
        )

    def end_pipeline(self, chain_id: str) -> None:
        self.store.array_store.save_batch(self.pending)
        self.pending = []
        self.store.bulk_update_chain_summaries([chain_id])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_bytes(path: str) -> int:
    if "://" in path:  # a bucket: what the store holds there
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        return int(fs.du(root))
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def pipeline_arrays(p: int, samples: int) -> np.ndarray:
    """y_true and y_pred of pipeline ``p``'s 15 predictions, shape (15, 2, samples).

    Every prediction gets its own random values (as real ones are: they do not compress away),
    the same for both stores and the floor; drawing them costs ~60 µs per pipeline in every run.
    """
    rng = np.random.default_rng(p)
    y_true = rng.normal(10.0, 2.0, (FOLDS * len(PARTITIONS), samples))
    return np.stack([y_true, y_true + rng.normal(0.0, 0.3, y_true.shape)], axis=1)


def sweep(store_name: str, workspace: str, sweep: Sweep) -> dict:
    """D datasets x P pipelines: per pipeline an artifact, a chain, 5 folds x 3 partitions of
    predictions with y_true and y_pred, saved call by call, then complete_pipeline. Timed to close()."""
    rng = np.random.default_rng(1)
    scores = rng.random(sweep.predictions)
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    store = open_store(store_name, workspace)
    peer = PeerArrays(store) if store_name == "peer" else None
    datasets = [f"dataset_{d}" for d in range(sweep.datasets)]
    run_id = store.begin_run("benchmark sweep", {"pipelines": sweep.pipelines}, [{"name": d} for d in datasets])
    k = 0
    for p in range(sweep.total_pipelines):
        dataset = datasets[p % sweep.datasets]
        pipe = store.begin_pipeline(run_id, f"pipeline_{p}", {"model": "PLS", "n_components": p % 20}, {}, dataset, f"h{p % sweep.datasets}")
        arrays = pipeline_arrays(p, sweep.samples)
        model = {"coef": arrays[0, 0, :20].tolist(), "pipeline": p}
        artifact = store.save_artifact(model, "PLSRegression", "model", "pickle")
        steps = [{"step_idx": 0, "operator_class": "PLSRegression", "params": {"n_components": p % 20}, "artifact_id": artifact, "stateless": False}]
        chain = store.save_chain(pipe, steps, 0, "PLSRegression", "SNV", "kfold", {"fold_0": artifact}, {})
        for fold in range(FOLDS):
            for partition in PARTITIONS:
                score = float(scores[k])
                y_true, y_pred = arrays[k % 15, 0], arrays[k % 15, 1]
                pid = store.save_prediction(pipe, chain, dataset, f"PLS_{p % 20}", "PLSRegression", str(fold), partition,
                                            score, score + 0.01, score - 0.01, "rmse", "regression", sweep.samples, 100,
                                            {"val": {"rmse": score}}, {"n_components": p % 20}, None, None, 0, 0.0, "SNV")
                if peer is None:
                    store.save_prediction_arrays(pid, y_true, y_pred)
                else:
                    peer.save(pid, dataset, f"PLS_{p % 20}", fold, partition, score, y_true, y_pred)
                k += 1
        if peer is not None:
            peer.end_pipeline(chain)
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 10)
    store.complete_run(run_id, {"pipelines": sweep.pipelines})
    store.close()
    elapsed = time.perf_counter() - started
    size = disk_bytes(workspace)
    return {
        "predictions": sweep.predictions,
        "ingest_s": elapsed,
        "ingest_rate": sweep.predictions / elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
        "disk_bytes": size,
        "bytes_per_prediction": size / sweep.predictions,
    }


def sweep_facade(store_name: str, workspace: str, sweep: Sweep) -> dict:
    """The sweep, its predictions written the way training loops write them: each pipeline's 15
    rows added to a ``Predictions`` facade with their arrays, then one ``flush`` (nirslake:
    ``nirslake.Predictions``; the peer: nirs4all's own ``nirs4all.data.predictions.Predictions``
    on its store). Timed to close()."""
    if store_name == "nirslake":
        from nirslake import Predictions
    else:
        from nirs4all.data.predictions import Predictions
    rng = np.random.default_rng(1)
    scores = rng.random(sweep.predictions)
    started = time.perf_counter()
    store = open_store(store_name, workspace)
    datasets = [f"dataset_{d}" for d in range(sweep.datasets)]
    run_id = store.begin_run("benchmark sweep", {"pipelines": sweep.pipelines}, [{"name": d} for d in datasets])
    k = 0
    for p in range(sweep.total_pipelines):
        dataset = datasets[p % sweep.datasets]
        pipe = store.begin_pipeline(run_id, f"pipeline_{p}", {"model": "PLS", "n_components": p % 20}, {}, dataset, f"h{p % sweep.datasets}")
        arrays = pipeline_arrays(p, sweep.samples)
        model = {"coef": arrays[0, 0, :20].tolist(), "pipeline": p}
        artifact = store.save_artifact(model, "PLSRegression", "model", "pickle")
        steps = [{"step_idx": 0, "operator_class": "PLSRegression", "params": {"n_components": p % 20}, "artifact_id": artifact, "stateless": False}]
        chain = store.save_chain(pipe, steps, 0, "PLSRegression", "SNV", "kfold", {"fold_0": artifact}, {})
        predictions = Predictions(store=store)  # one per pipeline, as nirs4all's executor holds it
        for fold in range(FOLDS):
            for partition in PARTITIONS:
                score = float(scores[k])
                predictions.add_prediction(
                    dataset_name=dataset, model_name=f"PLS_{p % 20}", model_classname="PLSRegression", fold_id=fold,
                    partition=partition, y_true=arrays[k % 15, 0], y_pred=arrays[k % 15, 1], val_score=score,
                    test_score=score + 0.01, train_score=score - 0.01, metric="rmse", task_type="regression",
                    n_samples=sweep.samples, n_features=100, scores={"val": {"rmse": score}},
                    best_params={"n_components": p % 20}, preprocessings="SNV",
                )
                k += 1
        predictions.flush(pipeline_id=pipe, chain_id=chain)
        if store_name == "peer":
            store.bulk_update_chain_summaries([chain])
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 10)
    store.complete_run(run_id, {"pipelines": sweep.pipelines})
    store.close()
    elapsed = time.perf_counter() - started
    stored = open_store(store_name, workspace)
    written = stored.query_predictions().height
    stored.close()
    assert written == sweep.predictions, f"{store_name}: {written} predictions stored, {sweep.predictions} written"
    return {"facade_ingest_s": elapsed, "facade_ingest_rate": sweep.predictions / elapsed}


def _timed(fn, repeat: int = 5) -> tuple[float, float]:
    """(first call, median of the following calls), in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    rest = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        rest.append(time.perf_counter() - t0)
    return first, statistics.median(rest)


def queries(store_name: str, workspace: str, sweep: Sweep) -> dict:
    """The query workload on the reopened workspace; delete_run last, as it empties it."""
    store = open_store(store_name, workspace)
    out: dict = {}
    out["top10_first_s"], out["top10_s"] = _timed(lambda: store.top_predictions(10, group_by="dataset_name"))
    out["query_first_s"], out["query_s"] = _timed(lambda: store.query_predictions(dataset_name="dataset_1", partition="val"))
    ids = store.query_predictions(dataset_name=f"dataset_{sweep.datasets - 1}")["prediction_id"].to_list()
    rng = np.random.default_rng(3)
    chosen = [ids[i] for i in rng.choice(len(ids), size=min(20, len(ids)), replace=False)]

    def arrays_of_20():
        for pid in chosen:
            row = store.get_prediction(pid, load_arrays=True)
            assert row["y_true"] is not None and len(row["y_true"]) == sweep.samples

    out["arrays20_first_s"], out["arrays20_s"] = _timed(arrays_of_20, repeat=3)
    if store_name == "nirslake":
        from nirslake.query import fold_summary

        aggregate = lambda: fold_summary(store.query_predictions())
    else:
        aggregate = lambda: store.query_aggregated_predictions()
    out["fold_agg_first_s"], out["fold_agg_s"] = _timed(aggregate, repeat=3)
    run_id = store.list_runs()["run_id"][0]
    t0 = time.perf_counter()
    deleted = store.delete_run(run_id)
    out["delete_run_s"] = time.perf_counter() - t0
    out["deleted_records"] = deleted
    assert store.query_predictions().height == 0
    store.close()
    return out


def floor(workspace: str, sweep: Sweep) -> dict:
    """pyarrow alone writing the same arrays: one zstd file, and one file per pipeline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks = [pipeline_arrays(p, sweep.samples) for p in range(sweep.total_pipelines)]  # drawn before timing

    def table(first: int, count: int) -> pa.Table:
        chosen = np.concatenate(blocks[first : first + count])  # (count * 15, 2, samples)
        n = len(chosen)
        offsets = pa.array(np.arange(0, (n + 1) * sweep.samples, sweep.samples, dtype=np.int32))
        return pa.table({
            "prediction_id": pa.array([f"p{first:06d}-{i:05d}" for i in range(n)]),
            "y_true": pa.ListArray.from_arrays(offsets, pa.array(chosen[:, 0].reshape(-1))),
            "y_pred": pa.ListArray.from_arrays(offsets, pa.array(chosen[:, 1].reshape(-1))),
        })

    os.makedirs(workspace, exist_ok=True)
    t0 = time.perf_counter()
    pq.write_table(table(0, sweep.total_pipelines), os.path.join(workspace, "all.parquet"), compression="zstd")
    one_file = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in range(sweep.total_pipelines):
        pq.write_table(table(p, 1), os.path.join(workspace, f"p{p:06d}.parquet"), compression="zstd")
    per_file = time.perf_counter() - t0
    return {
        "predictions": sweep.predictions,
        "one_file_rate": sweep.predictions / one_file,
        "per_pipeline_rate": sweep.predictions / per_file,
    }


# The same question in every fresh process: the best 10 validation predictions of each dataset.
TOP10_SQL = (
    "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY dataset_name ORDER BY val_score ASC NULLS LAST) AS rank "
    "FROM predictions WHERE partition = 'val') WHERE rank <= 10 ORDER BY dataset_name, rank"
)
PEER_TOP10 = (
    "import sys; from nirs4all.pipeline.storage.workspace_store import WorkspaceStore; "
    "print(WorkspaceStore(sys.argv[1]).top_predictions(10, group_by='dataset_name').height)"
)


def _wall(cmd: list[str], repeat: int) -> float:
    """Median wall time of ``cmd`` run ``repeat`` times, each a fresh process (it must succeed)."""
    import subprocess
    import sys

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd} failed: {done.stderr[-2000:]}")
    del sys
    return statistics.median(times)


def startup(store_name: str, workspace: str, repeat: int = 5) -> dict:
    """Fresh processes on the reopened workspace: the interpreter alone, the import, and the
    top-10 per dataset answered by a whole process (CLI or script; the DuckDB shell beside it)."""
    import sys
    from pathlib import Path

    python = sys.executable
    out = {"python_s": _wall([python, "-c", "pass"], repeat)}
    if store_name == "nirslake":
        out["import_s"] = _wall([python, "-c", "import nirslake"], repeat)
        out["cli_top_s"] = _wall([python, "-m", "nirslake.cli", "top", "--workspace", workspace, "-n", "10", "--by", "dataset_name"], repeat)
        shell = Path(python).with_name("duckdb")
        if shell.exists():
            catalog = str(Path(workspace) / "catalog.duckdb")
            out["duckdb_shell_top_s"] = _wall([str(shell), "-readonly", catalog, TOP10_SQL], repeat)
    else:
        out["import_s"] = _wall([python, "-c", "import nirs4all.pipeline.storage.workspace_store"], repeat)
        out["cli_top_s"] = _wall([python, "-c", PEER_TOP10, workspace], repeat)
    return out
