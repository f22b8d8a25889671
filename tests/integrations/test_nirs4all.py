"""nirs4all 1.4.10 on nirslake: real ``nirs4all.run`` sweeps on both engines, with nirs4all's own
store and with ``install()``, compared as a user sees them (statuses and counts, ``top(5)``,
``cv_best_score``, the reload's ``top(3)``, ``predict(chain_id=...)`` for every chain, the exported
bundle's predictions); then the store surface nirs4all calls, call by call.

Each engine runs once per store for the module (tiny data), in a tmp folder, offline.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

nirs4all = pytest.importorskip("nirs4all", reason="the nirs4all extra (pip install nirslake[nirs4all]) is not installed")

from nirslake.integrations import nirs4all as integ  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
ENGINES = ("default", "legacy")
FIELDS = ("model_name", "model_classname", "fold_id", "partition", "val_score", "test_score", "train_score",
          "metric", "task_type", "n_samples", "n_features", "preprocessings", "branch_id", "refit_context")


def dataset():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(48, 12))
    y = X[:, :3].sum(1) + rng.normal(scale=0.1, size=48)
    return X, y


def pipeline():
    from sklearn.cross_decomposition import PLSRegression
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    return [StandardScaler(), KFold(3), PLSRegression(2)]


def seen(prediction) -> dict:
    """What a user reads off one ranked prediction (ids aside: each run draws its own)."""
    out = {k: prediction.get(k) for k in FIELDS}
    for k in ("y_true", "y_pred"):
        value = prediction.get(k)
        out[k] = None if value is None else np.asarray(value).tolist()
    return out


def counts(store) -> dict:
    runs = store.list_runs()
    pipelines = store.list_pipelines()
    chains = sum(store.get_chains_for_pipeline(pid).height for pid in pipelines["pipeline_id"].to_list())
    return {
        "run_status": sorted(runs["status"].to_list()),
        "runs": runs.height,
        "pipeline_status": sorted(pipelines["status"].to_list()),
        "pipelines": pipelines.height,
        "chains": chains,
        "predictions": store.query_predictions().height,
    }


def chain_ids(store) -> dict[tuple, str]:
    """Every chain by what it is (its pipeline's name, model, preprocessing, fold strategy and
    folds): ids differ between runs, and nirs4all's timestamps (to the second) cannot order them."""
    out = {}
    for pipeline in store.list_pipelines().iter_rows(named=True):
        for chain in store.get_chains_for_pipeline(pipeline["pipeline_id"]).iter_rows(named=True):
            folds = chain["fold_artifacts"]
            folds = json.loads(folds) if isinstance(folds, str) else folds
            key = (pipeline["name"], chain["model_class"], chain["preprocessings"], chain["fold_strategy"], tuple(sorted(folds or {})))
            assert key not in out
            out[key] = chain["chain_id"]
    return out


def observe(engine: str, ws: Path) -> dict:
    """Run the sweep into ``ws`` and look at it as a user would."""
    from nirs4all.data.predictions import Predictions
    from nirs4all.pipeline.storage.workspace_store import WorkspaceStore  # nirs4all's, or nirslake's once installed

    X, y = dataset()
    kw = {} if engine == "default" else {"engine": "legacy"}
    result = nirs4all.run(pipeline(), (X, y), workspace_path=str(ws), verbose=0, **kw)
    obs = {
        "top5": [seen(p) for p in result.top(5)],
        "cv_best_score": result.cv_best_score,
        "reload_top3": [seen(p) for p in Predictions.from_workspace(ws).top(3)],
    }
    with WorkspaceStore(ws) as store:
        obs["store_class"] = type(store).__name__
        obs.update(counts(store))
        chains = chain_ids(store)
    obs["chain_predictions"] = {
        key: np.asarray(nirs4all.predict(chain_id=c, data=X[:6], workspace_path=str(ws), verbose=0, **kw).y_pred).tolist()
        for key, c in chains.items()
    }
    bundle = result.export(str(ws.parent / f"{ws.name}.n4a"))
    obs["bundle_prediction"] = np.asarray(nirs4all.predict(model=str(bundle), data=X[:6], verbose=0, **kw).y_pred).tolist()
    obs["ws"] = ws
    return obs


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Each engine run once on nirs4all's own store and once on the lake (``install()``)."""
    root = tmp_path_factory.mktemp("nirs4all")
    cwd = os.getcwd()
    os.chdir(root)  # nirs4all writes nothing outside the tmp folder
    out = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for engine in ENGINES:
                integ.uninstall()
                out[engine, "nirs4all"] = observe(engine, root / f"native_{engine}")
                undo = integ.install()
                try:
                    out[engine, "lake"] = observe(engine, root / f"lake_{engine}")
                finally:
                    undo()
    finally:
        os.chdir(cwd)
        integ.uninstall()
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_the_lake_run_is_on_the_lake(sweeps, engine):
    assert sweeps[engine, "nirs4all"]["store_class"] == "WorkspaceStore"
    assert sweeps[engine, "lake"]["store_class"] == "Nirs4allStore"


@pytest.mark.parametrize("engine", ENGINES)
def test_status_and_counts_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    keys = ("run_status", "runs", "pipeline_status", "pipelines", "chains", "predictions")
    assert {k: lake[k] for k in keys} == {k: native[k] for k in keys}
    assert native["run_status"] == ["completed"] and native["predictions"] > 0 and native["chains"] > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_top5_and_cv_best_score_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    assert len(native["top5"]) == 5
    assert lake["top5"] == native["top5"]
    assert lake["cv_best_score"] == native["cv_best_score"] is not None


@pytest.mark.parametrize("engine", ENGINES)
def test_reload_top3_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    assert len(native["reload_top3"]) == 3 and native["reload_top3"][0]["y_pred"]
    assert lake["reload_top3"] == native["reload_top3"]


@pytest.mark.parametrize("engine", ENGINES)
def test_predict_every_chain_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    assert native["chain_predictions"] and all(len(p) == 6 for p in native["chain_predictions"].values())
    assert lake["chain_predictions"].keys() == native["chain_predictions"].keys()
    for key, values in native["chain_predictions"].items():
        np.testing.assert_allclose(lake["chain_predictions"][key], values, rtol=1e-12, atol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_exported_bundle_predicts_equal(sweeps, engine):
    native, lake = sweeps[engine, "nirs4all"], sweeps[engine, "lake"]
    assert len(native["bundle_prediction"]) == 6
    np.testing.assert_allclose(lake["bundle_prediction"], native["bundle_prediction"], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- nothing nirs4all gives is dropped
@pytest.fixture
def installed():
    undo = integ.install()
    yield
    undo()


def test_the_fields_nirs4all_adds_round_trip(sweeps):
    """Pipelines keep ``original_template``, chains their dataset, predictions ``refit_context``:
    read back from the lake as nirs4all's own store gives them."""
    from nirs4all.pipeline.storage.workspace_store import WorkspaceStore as Native

    templates = []
    for engine in ENGINES:
        with Native(sweeps[engine, "nirs4all"]["ws"]) as native, integ.Nirs4allStore(sweeps[engine, "lake"]["ws"]) as lake:
            n_pipes = native.list_pipelines().sort("created_at")["pipeline_id"].to_list()
            l_pipes = lake.list_pipelines().sort("created_at")["pipeline_id"].to_list()
            assert len(n_pipes) == len(l_pipes) > 0
            for n, l in zip(n_pipes, l_pipes):
                templates.append(lake.get_pipeline(l)["original_template"])
                assert templates[-1] == native.get_pipeline(n)["original_template"]
            order = ["fold_id", "partition", "val_score"]
            n_preds, l_preds = native.query_predictions().sort(order), lake.query_predictions().sort(order)
            assert l_preds["refit_context"].to_list() == n_preds["refit_context"].to_list()
            assert any(v is not None for v in l_preds["refit_context"].to_list())
            n_chains = native._fetch_pl("SELECT dataset_name FROM chains")["dataset_name"].to_list()
            assert sorted(lake.query_chain_summaries()["dataset_name"].to_list()) == sorted(n_chains)
    assert any(t is not None for t in templates)
