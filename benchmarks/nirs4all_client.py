"""nirs4all 1.4.10 on its own store and on nirslake (``install()``), side by side.

One real sweep (a few preprocessings x PLS components, KFold(3), a small synthetic dataset) per
engine and store, timed whole (``nirs4all.run``); then the reload a user does in a new session
(``Predictions.from_workspace(ws).top(3)``), timed in fresh processes alternating between the stores (median and fastest of ``--repeat``),
imports excluded. Prints one line per measure with the ratio nirs4all / nirslake (> 1: nirslake
faster). Everything happens in a temporary folder, offline.

    PYTHONPATH=src python benchmarks/nirs4all_client.py [--engines default legacy] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

SWEEP = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
from sklearn.cross_decomposition import PLSRegression
from sklearn.model_selection import KFold
from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, RobustScaler, StandardScaler
import nirs4all
engine, store, ws = sys.argv[1], sys.argv[2], sys.argv[3]
if store == "nirslake":
    from nirslake.integrations.nirs4all import install
    install()
rng = np.random.default_rng(0)
X = rng.normal(size=(120, 60)); y = X[:, :5].sum(1) + rng.normal(scale=0.1, size=120)
pipeline = [{"_or_": [StandardScaler(), MinMaxScaler(), RobustScaler(), MaxAbsScaler()]}, KFold(3),
            {"_range_": [1, 13], "param": "n_components", "model": PLSRegression}]
kw = {} if engine == "default" else {"engine": engine}
start = time.perf_counter()
result = nirs4all.run(pipeline, (X, y), workspace_path=ws, verbose=0, **kw)
elapsed = time.perf_counter() - start
print(json.dumps({"run_s": elapsed, "best": result.cv_best_score}))
"""

RELOAD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import nirs4all, nirs4all.pipeline.storage  # registers the store Predictions opens (import nirs4all alone does not)
from nirs4all.data.predictions import Predictions
store, ws = sys.argv[1], sys.argv[2]
if store == "nirslake":
    from nirslake.integrations.nirs4all import install
    install()
start = time.perf_counter()
predictions = Predictions.from_workspace(ws)
top = predictions.top(3)
elapsed = time.perf_counter() - start
print(json.dumps({"reload_s": elapsed, "n": predictions.num_predictions,
                  "top": [(p.get("model_name"), p.get("fold_id"), p.get("val_score")) for p in top]}))
"""


def python(code: str, *args: str, cwd: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"failed: {args}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["default", "legacy"])
    parser.add_argument("--repeat", type=int, default=9, help="fresh processes per reload measure (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nirslake-n4a-bench-") as tmp:
        print(f"{'engine':8} {'measure':28} {'nirs4all':>10} {'nirslake':>10} {'ratio':>7}")
        for engine in args.engines:
            runs, reloads = {}, {"nirs4all": [], "nirslake": []}
            for store in ("nirs4all", "nirslake"):
                runs[store] = python(SWEEP, engine, store, str(Path(tmp) / f"{engine}-{store}"), cwd=tmp)
            # The reloads alternate between the stores, so a change of load on the machine (shared
            # cores) weighs on both alike.
            for _ in range(args.repeat):
                for store in ("nirs4all", "nirslake"):
                    reloads[store].append(python(RELOAD, store, str(Path(tmp) / f"{engine}-{store}"), cwd=tmp))
            n = {s: reloads[s][0]["n"] for s in reloads}
            assert n["nirs4all"] == n["nirslake"], n
            assert reloads["nirs4all"][0]["top"] == reloads["nirslake"][0]["top"], "the rankings differ"
            assert runs["nirs4all"]["best"] == runs["nirslake"]["best"], "the best scores differ"
            run = {s: runs[s]["run_s"] for s in runs}
            reload = {s: statistics.median(r["reload_s"] for r in reloads[s]) for s in reloads}
            best = {s: min(r["reload_s"] for r in reloads[s]) for s in reloads}
            print(f"{engine:8} {'whole run (s)':28} {run['nirs4all']:10.3f} {run['nirslake']:10.3f} {run['nirs4all'] / run['nirslake']:7.2f}")
            label = f"reload+top(3), {n['nirs4all']} preds (s)"
            print(f"{engine:8} {label:28} {reload['nirs4all']:10.3f} {reload['nirslake']:10.3f} {reload['nirs4all'] / reload['nirslake']:7.2f}")
            print(f"{engine:8} {'  (fastest of the repeats)':28} {best['nirs4all']:10.3f} {best['nirslake']:10.3f} {best['nirs4all'] / best['nirslake']:7.2f}")


if __name__ == "__main__":
    main()
