"""Exports (chain bundle, pipeline config, run YAML), run deletion, vacuum and chain replay."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import let_object_times_pass, read_url
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from nirslake.lake.storage import Storage

RNG = np.random.default_rng(2024)
N_FEATURES = 12
X_TRAIN = RNG.normal(loc=5.0, scale=2.0, size=(40, N_FEATURES))
Y_TRAIN = X_TRAIN @ RNG.normal(size=N_FEATURES) + RNG.normal(scale=0.2, size=40)
X_NEW = RNG.normal(loc=5.0, scale=2.0, size=(15, N_FEATURES))


def objects_on_disk(workspace: str) -> list[str]:
    return Storage(workspace).list_files("objects", suffix="")


def strings_in(document) -> set[str]:
    """Every string key or value anywhere in a decoded JSON/YAML document."""
    if isinstance(document, str):
        return {document}
    if isinstance(document, dict):
        return set().union(*(strings_in(k) | strings_in(v) for k, v in document.items())) if document else set()
    if isinstance(document, (list, tuple)):
        return set().union(*(strings_in(v) for v in document)) if document else set()
    return set()


def fit_cv_models():
    """A scaler shared by the folds, and one Ridge per half of the training set (2-fold CV)."""
    scaler = StandardScaler().fit(X_TRAIN)
    Xs = scaler.transform(X_TRAIN)
    m0 = Ridge(alpha=1.0).fit(Xs[:20], Y_TRAIN[:20])
    m1 = Ridge(alpha=1.0).fit(Xs[20:], Y_TRAIN[20:])
    return scaler, m0, m1


def save_ridge_chain(store, pipeline_id):
    """Store the fitted objects and the chain that holds them; returns (chain_id, objects, ids)."""
    scaler, m0, m1 = fit_cv_models()
    scaler_id = store.save_artifact(scaler, "StandardScaler", "transformer", "joblib")
    m0_id = store.save_artifact(m0, "Ridge", "model", "joblib")
    m1_id = store.save_artifact(m1, "Ridge", "model", "joblib")
    chain_id = store.save_chain(
        pipeline_id,
        [
            {"step_idx": 0, "operator_class": "StandardScaler", "params": {}, "artifact_id": scaler_id, "stateless": False},
            {"step_idx": 1, "operator_class": "Ridge", "params": {"alpha": 1.0}, "artifact_id": None, "stateless": False},
        ],
        1,
        "Ridge",
        "StandardScaler",
        "KFold(n_splits=2)",
        {"fold_0": m0_id, "fold_1": m1_id},
        {"0": [scaler_id]},
    )
    return chain_id, (scaler, m0, m1), (scaler_id, m0_id, m1_id)


# --------------------------------------------------------------------------- export_chain


def test_export_chain_writes_a_bundle_with_manifest_chain_and_artifacts(store, make_pipeline, tmp_path):
    ids = make_pipeline(store)
    chain_id, _, artifact_ids = save_ridge_chain(store, ids.pipeline_id)

    bundle = store.export_chain(chain_id, tmp_path / "ridge_model.n4a")

    assert Path(bundle) == tmp_path / "ridge_model.n4a"
    with zipfile.ZipFile(bundle) as zf:
        names = zf.namelist()
        assert "manifest.json" in names
        assert "chain.json" in names
        json.loads(zf.read("manifest.json"))
        chain_doc = json.loads(zf.read("chain.json"))
        artifact_names = [n for n in names if n.startswith("artifacts/") and not n.endswith("/")]
        bundled = {zf.read(n) for n in artifact_names}
    assert len(artifact_names) == 3
    assert bundled == {read_url(store.get_artifact_path(a)) for a in artifact_ids}
    assert "Ridge" in strings_in(chain_doc)
    assert set(artifact_ids) <= strings_in(chain_doc)


def test_export_chain_adds_n4a_suffix_when_missing(store, make_pipeline, tmp_path):
    ids = make_pipeline(store)
    chain_id, _, _ = save_ridge_chain(store, ids.pipeline_id)

    bundle = store.export_chain(chain_id, str(tmp_path / "ridge_model"))

    assert Path(bundle) == tmp_path / "ridge_model.n4a"
    assert zipfile.is_zipfile(bundle)


def test_export_chain_keeps_a_given_suffix(store, make_pipeline, tmp_path):
    ids = make_pipeline(store)
    chain_id, _, _ = save_ridge_chain(store, ids.pipeline_id)

    bundle = store.export_chain(chain_id, tmp_path / "ridge_model.zip", "n4a")

    assert Path(bundle) == tmp_path / "ridge_model.zip"
    assert zipfile.is_zipfile(bundle)


def test_export_unknown_chain_raises_key_error(store, tmp_path):
    with pytest.raises(KeyError):
        store.export_chain("no-such-chain", tmp_path / "bundle")


# --------------------------------------------------------------------------- export_pipeline_config / export_run


def test_export_pipeline_config_writes_the_expanded_config_as_json(store, make_pipeline, tmp_path):
    ids = make_pipeline(store)

    out = store.export_pipeline_config(ids.pipeline_id, tmp_path / "snv_pls10")

    assert Path(out) == tmp_path / "snv_pls10.json"
    assert json.loads(Path(out).read_text()) == store.get_pipeline(ids.pipeline_id)["expanded_config"]
    assert json.loads(Path(out).read_text())[1]["params"] == {"n_components": 10}


def test_export_pipeline_config_keeps_a_given_suffix(store, make_pipeline, tmp_path):
    ids = make_pipeline(store)
    out = store.export_pipeline_config(ids.pipeline_id, str(tmp_path / "config.txt"))
    assert Path(out) == tmp_path / "config.txt"
    assert json.loads(Path(out).read_text())[0] == {"class": "SNV"}


def test_export_run_writes_run_pipelines_and_chains_as_yaml(store, make_pipeline, tmp_path):
    ids = make_pipeline(store)
    second_pipeline = store.begin_pipeline(ids.run_id, "msc_ridge", [{"class": "MSC"}], {}, "corn_m5", "h2")
    ridge_chain, _, _ = save_ridge_chain(store, second_pipeline)
    store.complete_run(ids.run_id, {"pipelines": 2})
    other = make_pipeline(store, run_name="unrelated_run")

    out = store.export_run(ids.run_id, tmp_path / "protein_sweep")

    assert Path(out) == tmp_path / "protein_sweep.yaml"
    document = yaml.safe_load(Path(out).read_text())
    found = strings_in(document)
    assert {ids.run_id, "protein_sweep", ids.pipeline_id, second_pipeline, ids.chain_id, ridge_chain} <= found
    assert other.pipeline_id not in found
    assert other.chain_id not in found


def test_export_run_keeps_a_yml_suffix(store, make_pipeline, tmp_path):
    ids = make_pipeline(store)
    out = store.export_run(ids.run_id, tmp_path / "run.yml")
    assert Path(out) == tmp_path / "run.yml"
    assert ids.run_id in strings_in(yaml.safe_load(Path(out).read_text()))


# --------------------------------------------------------------------------- delete_run / vacuum


@pytest.fixture
def two_runs(store, make_pipeline, add_prediction):
    """Run ``doomed`` and run ``kept``; their chains share the scaler but not the fold models."""
    doomed = make_pipeline(store, run_name="doomed")
    kept = make_pipeline(store, run_name="kept")
    doomed_chain, _, doomed_artifacts = save_ridge_chain(store, doomed.pipeline_id)
    kept_model = store.save_artifact(Ridge(alpha=7.0).fit(X_TRAIN, Y_TRAIN), "Ridge", "model", "joblib")
    kept_chain = store.save_chain(
        kept.pipeline_id,
        [{"step_idx": 0, "operator_class": "StandardScaler", "params": {}, "artifact_id": doomed_artifacts[0], "stateless": False},
         {"step_idx": 1, "operator_class": "Ridge", "params": {}, "artifact_id": None, "stateless": False}],
        1, "Ridge", "StandardScaler", "KFold(1)", {"fold_0": kept_model}, {"0": [doomed_artifacts[0]]},
    )  # fmt: skip
    doomed_predictions = [add_prediction(store, doomed, fold_id=str(f)) for f in range(2)]
    store.save_prediction_arrays(doomed_predictions[0], np.ones(15), np.ones(15))
    store.log_step(doomed.pipeline_id, 0, "StandardScaler", "end", duration_ms=2.0)
    kept_prediction = add_prediction(store, kept, val_score=0.33)
    store.save_prediction_arrays(kept_prediction, np.arange(15.0), np.arange(15.0) + 0.5)
    return {
        "doomed": doomed,
        "doomed_chain": doomed_chain,
        "doomed_predictions": doomed_predictions,
        "scaler_id": doomed_artifacts[0],
        "doomed_models": doomed_artifacts[1:],
        "kept": kept,
        "kept_chain": kept_chain,
        "kept_model": kept_model,
        "kept_prediction": kept_prediction,
    }


def test_delete_run_removes_the_run_and_everything_under_it(store, two_runs):
    doomed = two_runs["doomed"]

    removed = store.delete_run(doomed.run_id)

    assert removed > 0
    assert store.get_run(doomed.run_id) is None
    assert store.get_pipeline(doomed.pipeline_id) is None
    assert store.get_chain(two_runs["doomed_chain"]) is None
    assert store.list_pipelines(run_id=doomed.run_id).height == 0
    for prediction_id in two_runs["doomed_predictions"]:
        assert store.get_prediction(prediction_id) is None
    assert store.query_predictions(run_id=doomed.run_id).height == 0
    assert store.get_pipeline_log(doomed.pipeline_id).height == 0
    assert store.list_runs()["run_id"].to_list() == [two_runs["kept"].run_id]


def test_delete_run_leaves_other_runs_intact(store, two_runs):
    kept = two_runs["kept"]
    store.delete_run(two_runs["doomed"].run_id)

    assert store.get_run(kept.run_id)["name"] == "kept"
    assert store.get_chain(two_runs["kept_chain"])["fold_artifacts"] == {"fold_0": two_runs["kept_model"]}
    kept_prediction = store.get_prediction(two_runs["kept_prediction"], load_arrays=True)
    np.testing.assert_allclose(kept_prediction["y_pred"], np.arange(15.0) + 0.5)
    assert store.query_predictions().height == 1


def test_delete_run_removes_artifacts_nothing_else_references(store, workspace, two_runs):
    let_object_times_pass(workspace)
    store.delete_run(two_runs["doomed"].run_id, delete_artifacts=True)

    for model_id in two_runs["doomed_models"]:
        with pytest.raises((KeyError, FileNotFoundError)):
            store.load_artifact(model_id)
    assert isinstance(store.load_artifact(two_runs["scaler_id"]), StandardScaler)  # kept's chain holds it
    assert store.load_artifact(two_runs["kept_model"]).alpha == 7.0
    assert len(objects_on_disk(workspace)) == 2


def test_delete_run_can_keep_artifacts(store, workspace, two_runs):
    store.delete_run(two_runs["doomed"].run_id, False)

    assert store.get_run(two_runs["doomed"].run_id) is None
    assert store.load_artifact(two_runs["doomed_models"][0]).alpha == 1.0
    assert len(objects_on_disk(workspace)) == 4


def test_delete_unknown_run_returns_zero(store, two_runs):
    assert store.delete_run("no-such-run") == 0
    assert store.list_runs().height == 2


def test_vacuum_keeps_live_data(store, two_runs):
    store.delete_run(two_runs["doomed"].run_id)

    assert store.vacuum() is None

    assert store.get_run(two_runs["kept"].run_id)["status"] == "running"
    assert store.query_predictions()["prediction_id"].to_list() == [two_runs["kept_prediction"]]
    arrays = store.get_prediction(two_runs["kept_prediction"], load_arrays=True)
    np.testing.assert_allclose(arrays["y_true"], np.arange(15.0))
    assert store.load_artifact(two_runs["kept_model"]).alpha == 7.0
    assert store.top_predictions(1)["prediction_id"].to_list() == [two_runs["kept_prediction"]]


def test_vacuum_on_an_empty_workspace(store):
    store.vacuum()
    assert store.list_runs().height == 0


# --------------------------------------------------------------------------- replay_chain


def test_replay_chain_transforms_then_averages_the_fold_models(store, make_pipeline):
    ids = make_pipeline(store)
    chain_id, (scaler, m0, m1), _ = save_ridge_chain(store, ids.pipeline_id)

    y = store.replay_chain(chain_id, X_NEW)

    Xs = scaler.transform(X_NEW)
    expected = (m0.predict(Xs) + m1.predict(Xs)) / 2
    assert isinstance(y, np.ndarray)
    assert y.shape == (15,)
    np.testing.assert_allclose(y, expected, rtol=1e-10)
    # Applying the scaler matters: the raw data would give other predictions.
    assert not np.allclose(y, (m0.predict(X_NEW) + m1.predict(X_NEW)) / 2)


def test_replay_chain_accepts_wavelengths_for_plain_operators(store, make_pipeline):
    ids = make_pipeline(store)
    chain_id, (scaler, m0, m1), _ = save_ridge_chain(store, ids.pipeline_id)
    wavelengths = np.linspace(1100.0, 2500.0, N_FEATURES)

    y = store.replay_chain(chain_id, X_NEW, wavelengths)

    Xs = scaler.transform(X_NEW)
    np.testing.assert_allclose(y, (m0.predict(Xs) + m1.predict(Xs)) / 2, rtol=1e-10)


def test_replay_unknown_chain_raises_key_error(store):
    with pytest.raises(KeyError):
        store.replay_chain("no-such-chain", X_NEW)


def test_replay_chain_without_fold_models_raises_runtime_error(store, make_pipeline):
    ids = make_pipeline(store)  # its chain has a model step but no fold artifacts
    assert store.get_chain(ids.chain_id)["fold_artifacts"] == {}

    with pytest.raises(RuntimeError):
        store.replay_chain(ids.chain_id, X_NEW)
