"""Which engine should rank inside WorkspaceStore: polars over cached Arrow, or DuckDB over the views?

Writes a sweep (D datasets x P pipelines x 15 predictions) once, then times top-10 per dataset and
fold aggregation both ways on the reopened workspace. Run: python benchmarks/ranking_engines.py [P]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import numpy as np

import nirslake.query as q
from nirslake import WorkspaceStore


def write_sweep(workspace: str, datasets: int, pipelines: int, samples: int = 50) -> int:
    rng = np.random.default_rng(0)
    with WorkspaceStore(workspace) as store:
        run = store.begin_run("bench", {}, [{"name": f"ds{d}"} for d in range(datasets)])
        for d in range(datasets):
            for p in range(pipelines):
                pipe = store.begin_pipeline(run, f"p{p}", {}, {}, f"ds{d}", "h")
                chain = store.save_chain(pipe, [], 0, "PLS", "", "kfold", {}, {})
                for fold in range(5):
                    for part in ("train", "val", "test"):
                        pid = store.save_prediction(pipe, chain, f"ds{d}", f"m{p}", "PLS", fold, part, rng.random(), rng.random(),
                                                    rng.random(), "rmse", "regression", samples, 100, {}, {}, None, None, 0, 0.0)
                        store.save_prediction_arrays(pid, rng.random(samples), rng.random(samples))
                store.complete_pipeline(pipe, 0.1, 0.1, "rmse", 1)
    return datasets * pipelines * 15


def best_of(fn, repeat: int = 5) -> tuple[float, float]:
    """(best, median) of ``repeat`` timed calls, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


TOP_SQL = """
SELECT * FROM predictions WHERE partition = 'val'
QUALIFY row_number() OVER (PARTITION BY dataset_name ORDER BY val_score ASC NULLS LAST) <= 10
"""


def main() -> None:
    pipelines = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    with tempfile.TemporaryDirectory() as ws:
        n = write_sweep(ws, 4, pipelines)
        store = WorkspaceStore(ws)
        store.top_predictions(10, group_by="dataset_name")  # warm the file cache, as a long-lived store has
        rows = [
            ("top-10 per dataset", lambda: store.top_predictions(10, group_by="dataset_name"), lambda: store.sql(TOP_SQL)),
            (
                "fold aggregation per chain",
                lambda: q.fold_summary(store.query_predictions()),
                lambda: store.sql("SELECT * FROM chain_summary"),
            ),
        ]
        print(f"{n} predictions, {pipelines * 4} pipelines")
        print(f"{'query':<28} {'polars best/median ms':>24} {'duckdb best/median ms':>24}")
        for name, polars_fn, duck_fn in rows:
            pb, pm = best_of(polars_fn)
            db, dm = best_of(duck_fn)
            print(f"{name:<28} {pb*1e3:>11.1f} /{pm*1e3:>9.1f}   {db*1e3:>11.1f} /{dm*1e3:>9.1f}")
        store.close()


if __name__ == "__main__":
    main()
