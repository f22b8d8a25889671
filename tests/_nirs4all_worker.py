"""A nirs4all sweep into a workspace, on nirslake (``install()``): run by the two-process test.

    python tests/_nirs4all_worker.py <workspace> <engine> <name> <out.json> [<start-file>]

Waits for ``start-file`` to exist (so two workers start together), runs the sweep, then writes
what its run holds: every prediction as (fold, partition, model, preprocessing, val score).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    ws, engine, name, out = sys.argv[1:5]
    start = sys.argv[5] if len(sys.argv) > 5 else None
    import numpy as np
    from sklearn.cross_decomposition import PLSRegression
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    import nirslake.integrations.nirs4all as integ

    integ.install()
    import nirs4all

    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 10))
    y = X[:, :2].sum(1) + rng.normal(scale=0.1, size=40)
    pipeline = [{"_or_": [StandardScaler(), MinMaxScaler()]}, KFold(3), {"_range_": [1, 4], "param": "n_components", "model": PLSRegression}]
    while start is not None and not os.path.exists(start):
        time.sleep(0.01)
    kw = {} if engine == "default" else {"engine": engine}
    nirs4all.run(pipeline, (X, y), workspace_path=ws, name=name, verbose=0, **kw)
    from nirslake import WorkspaceStore

    with WorkspaceStore(ws) as store:
        runs = store.list_runs()
        runs = runs.filter(runs["name"].str.starts_with(name))  # the legacy engine adds a suffix (_p0)
        run_id = runs["run_id"].to_list()
        rows = store.query_predictions(run_id=run_id[0]) if len(run_id) == 1 else None
    seen = [] if rows is None else sorted(
        [r["fold_id"], r["partition"], r["model_name"], r["preprocessings"], r["val_score"], r["prediction_id"]]
        for r in rows.iter_rows(named=True)
    )
    with open(out, "w") as fh:
        json.dump({"run_ids": run_id, "predictions": seen}, fh)


if __name__ == "__main__":
    main()
