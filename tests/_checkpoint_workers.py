"""Subprocess entry points of tests/test_checkpoint.py: a writer, and checkpointers racing it.

``python tests/_checkpoint_workers.py writer <workspace> <pipelines>`` prints ``ack <i>`` once
pipeline ``i`` is published; ``checkpointer <workspace> <stop file> <compact every>`` checkpoints
in a loop (compacting every n-th time) until the stop file exists, then once more, and prints
one ``landed <n> <attempts>`` line per checkpoint.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from nirslake import WorkspaceStore


def writer(workspace: str, pipelines: int) -> None:
    # flush_seconds=0: every durability point publishes, so each acknowledged pipeline is in the lake.
    store = WorkspaceStore(workspace, flush_seconds=0)
    run = store.begin_run("racing", {}, [{"name": "corn"}, {"name": "wheat"}])
    previous = None
    for i in range(pipelines):
        dataset = ("corn", "wheat")[i % 2]
        pipe = store.begin_pipeline(run, f"p{i}", {}, {}, dataset, "h")
        chain = store.save_chain(pipe, [], 0, "PLS", "SNV", "kfold", {}, {})
        for k in range(3):
            pid = store.save_prediction(pipe, chain, dataset, "PLS", "PLS", str(k), "val", i + k / 10, 0.2, 0.3, "rmse",
                                        "regression", 4, 10, {}, {}, None, None, 0, 0.0)
            store.save_prediction_arrays(pid, np.arange(4.0) + i, np.arange(4.0))
        if previous is not None:  # saved again: its older row is hidden from now on
            p_pipe, p_chain, p_dataset, p_pid = previous
            store.save_prediction(p_pipe, p_chain, p_dataset, "PLS_again", "PLS", "0", "val", -1.0, 0.2, 0.3, "rmse",
                                  "regression", 4, 10, {}, {}, None, None, 0, 0.0, "", p_pid)
        previous = (pipe, chain, dataset, pid)
        store.complete_pipeline(pipe, 0.1, 0.2, "rmse", 1)  # a durability point: published
        print(f"ack {i}", flush=True)
    store.complete_run(run, {})
    store.close()
    print("closed", flush=True)


def checkpointer(workspace: str, stop_file: str, compact_every: int) -> None:
    store = WorkspaceStore(workspace)
    turn = 0
    while True:
        stopping = os.path.exists(stop_file)
        turn += 1
        if compact_every and turn % compact_every == 0:
            store.compact()
        else:
            result = store.checkpoint()
            print(f"landed {result.number} {result.attempts}", flush=True)
        if stopping:
            break
    store.close()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "writer":
        writer(args[0], int(args[1]))
    else:
        checkpointer(args[0], args[1], int(args[2]))
