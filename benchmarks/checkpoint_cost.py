"""What the current-state manifest costs (lake spec §11), on the sweep of run.py.

    python benchmarks/checkpoint_cost.py                  # 4 x 400 pipelines: 24,000 predictions
    python benchmarks/checkpoint_cost.py --pipelines 4000 # 240,000

Runs the sweep workload (workloads.sweep: ingest timed from opening the store to close()) with
the checkpoint that close() writes timed on its own, then, in the same process, a delete and a
second checkpoint (files read once per process: only what changed is read again), then one in a
fresh process (`WorkspaceStore(ws).checkpoint()`, nothing cached). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from workloads import Sweep, disk_bytes, sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=4)
    parser.add_argument("--pipelines", type=int, default=400, help="pipelines per dataset")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--fresh", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fresh:
        from nirslake import WorkspaceStore

        store = WorkspaceStore(args.fresh)
        started = time.perf_counter()
        result = store.checkpoint()
        print(json.dumps({"seconds": time.perf_counter() - started, "copies_written": result.copies_written}))
        store.close()
        return

    import nirslake.lake.checkpoint as C
    from nirslake import WorkspaceStore

    timed: list[tuple[float, object]] = []
    real = C.write_checkpoint

    def write_checkpoint(storage, cache):
        started = time.perf_counter()
        result = real(storage, cache)
        timed.append((time.perf_counter() - started, result))
        return result

    C.write_checkpoint = write_checkpoint  # the store imports it when it checkpoints
    size = Sweep(args.datasets, args.pipelines, args.samples)
    with tempfile.TemporaryDirectory(prefix="nirslake-ckpt-") as tmp:
        ws = os.path.join(tmp, "ws")
        ingest = sweep("nirslake", ws, size)
        close_s, close_result = timed[-1]
        store = WorkspaceStore(ws)
        store.delete_prediction(store.query_predictions(partition="val")["prediction_id"][0])
        started = time.perf_counter()
        again = store.checkpoint()
        again_s = time.perf_counter() - started
        store.close()
        fresh = subprocess.run([sys.executable, __file__, "--fresh", ws], capture_output=True, text=True, check=True)
        current = os.path.join(ws, "_current")
        copies = sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(os.path.join(ws, "tables"))
            for name in names
            if name.startswith(C.COPY_PREFIX)
        )
        print(json.dumps({
            "predictions": size.predictions,
            "ingest_s": round(ingest["ingest_s"], 3),
            "checkpoint_in_close_s": round(close_s, 3),
            "share_of_ingest": round(close_s / ingest["ingest_s"], 4),
            "close_manifest_files": close_result.files,
            "close_copies_written": close_result.copies_written,
            "after_a_delete_same_process_s": round(again_s, 3),
            "after_a_delete_copies_written": again.copies_written,
            "after_a_delete_copies_reused": again.copies_reused,
            "fresh_process_s": round(json.loads(fresh.stdout.splitlines()[-1])["seconds"], 3),
            "checkpoint_file_bytes": os.path.getsize(os.path.join(current, "manifest.parquet")),
            "current_dir_bytes": disk_bytes(current),
            "copies_bytes": copies,
            "workspace_bytes": disk_bytes(ws),
        }))


if __name__ == "__main__":
    main()
