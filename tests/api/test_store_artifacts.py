"""Artifacts: fitted objects stored once by content hash, loaded back verified, collected when unused."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import let_object_times_pass, read_url, remove_url, write_url
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from nirslake.lake.storage import Storage

RNG = np.random.default_rng(11)
X = RNG.normal(size=(30, 8))
Y = X @ RNG.normal(size=8) + RNG.normal(scale=0.1, size=30)


def objects_on_disk(workspace: str) -> list[str]:
    """Every stored object file (docs/lake-spec.md: objects live under ``<workspace>/objects``)."""
    return Storage(workspace).list_files("objects", suffix="")


def fitted_scaler() -> StandardScaler:
    return StandardScaler().fit(X)


def test_save_and_load_a_fitted_transformer(store):
    scaler = fitted_scaler()

    artifact_id = store.save_artifact(scaler, "StandardScaler", "transformer", "joblib")

    assert isinstance(artifact_id, str) and artifact_id
    loaded = store.load_artifact(artifact_id)
    assert isinstance(loaded, StandardScaler)
    np.testing.assert_allclose(loaded.transform(X), scaler.transform(X))


@pytest.mark.parametrize("fmt", ["pickle", "joblib", "cloudpickle"])
def test_every_format_round_trips(store, fmt):
    if fmt == "cloudpickle":
        pytest.importorskip("cloudpickle", reason="cloudpickle is an optional artifact format")
    model = Ridge(alpha=0.5).fit(X, Y)

    artifact_id = store.save_artifact(model, "Ridge", "model", fmt)

    np.testing.assert_allclose(store.load_artifact(artifact_id).predict(X), model.predict(X))


def test_cloudpickle_stores_what_pickle_cannot(store):
    pytest.importorskip("cloudpickle", reason="cloudpickle is an optional artifact format")
    offset = 3.5
    artifact_id = store.save_artifact(lambda x: x + offset, "lambda", "function", "cloudpickle")
    assert store.load_artifact(artifact_id)(1.0) == 4.5


def test_identical_content_is_stored_once_under_one_id(store, workspace):
    scaler = fitted_scaler()

    first = store.save_artifact(scaler, "StandardScaler", "transformer", "pickle")
    second = store.save_artifact(scaler, "StandardScaler", "transformer", "pickle")

    assert first == second
    assert len(objects_on_disk(workspace)) == 1


def test_equal_objects_built_twice_share_one_object(store, workspace):
    def coefficients():
        return {"coef": np.linspace(0.0, 1.0, 8), "intercept": 0.25}

    first = store.save_artifact(coefficients(), "LinearCoefficients", "model", "joblib")
    second = store.save_artifact(coefficients(), "LinearCoefficients", "model", "joblib")

    assert first == second
    assert len(objects_on_disk(workspace)) == 1


def test_different_content_gets_a_different_id_and_object(store, workspace):
    a = store.save_artifact(fitted_scaler(), "StandardScaler", "transformer", "pickle")
    b = store.save_artifact(Ridge().fit(X, Y), "Ridge", "model", "pickle")

    assert a != b
    assert len(objects_on_disk(workspace)) == 2


def test_get_artifact_path_points_at_the_stored_object(store, workspace):
    artifact_id = store.save_artifact(fitted_scaler(), "StandardScaler", "transformer", "pickle")

    path = store.get_artifact_path(artifact_id)

    if "://" in workspace:  # a URL on object stores
        assert isinstance(path, str) and path.startswith(f"{workspace}/objects/")
    else:
        assert isinstance(path, Path)
        assert path.is_file()
        assert path.resolve().is_relative_to((Path(workspace) / "objects").resolve())
    assert isinstance(pickle.loads(read_url(path)), StandardScaler)


def test_register_existing_artifact_is_idempotent(store, tmp_path):
    data = pickle.dumps(Ridge(alpha=2.0).fit(X, Y))
    external = tmp_path / "exported_models" / "ridge.pkl"
    external.parent.mkdir()
    external.write_bytes(data)
    content_hash = hashlib.sha256(data).hexdigest()

    args = ("ridge-fold0", str(external), content_hash, "Ridge", "model", "pickle", len(data))
    first = store.register_existing_artifact(*args)
    second = store.register_existing_artifact(*args)

    assert first == second == "ridge-fold0"
    assert store.load_artifact("ridge-fold0").alpha == 2.0
    assert Path(store.get_artifact_path("ridge-fold0")).resolve() == external.resolve()


def test_load_unknown_artifact_raises_key_error(store):
    store.save_artifact(fitted_scaler(), "StandardScaler", "transformer", "pickle")
    with pytest.raises(KeyError):
        store.load_artifact("no-such-artifact")


def test_get_path_of_unknown_artifact_raises_key_error(store):
    with pytest.raises(KeyError):
        store.get_artifact_path("no-such-artifact")


def test_load_artifact_whose_bytes_are_gone_raises_file_not_found(store):
    artifact_id = store.save_artifact(fitted_scaler(), "StandardScaler", "transformer", "pickle")
    remove_url(store.get_artifact_path(artifact_id))

    with pytest.raises(FileNotFoundError):
        store.load_artifact(artifact_id)


def test_load_tampered_artifact_reports_a_hash_mismatch(store):
    artifact_id = store.save_artifact(fitted_scaler(), "StandardScaler", "transformer", "pickle")
    # A valid pickle of something else: only the hash check can tell.
    write_url(store.get_artifact_path(artifact_id), pickle.dumps({"not": "the scaler"}))

    with pytest.raises(Exception, match=r"(?i)(hash|sha256).*mismatch|mismatch.*(hash|sha256)"):
        store.load_artifact(artifact_id)


# --------------------------------------------------------------------------- garbage collection


def _chain_holding(store, pipeline_id, shared_id, model_id):
    return store.save_chain(
        pipeline_id,
        [
            {"step_idx": 0, "operator_class": "StandardScaler", "params": {}, "artifact_id": shared_id, "stateless": False},
            {"step_idx": 1, "operator_class": "Ridge", "params": {}, "artifact_id": model_id, "stateless": False},
        ],
        1,
        "Ridge",
        "StandardScaler",
        "KFold(1)",
        {"fold_0": model_id},
        {"0": [shared_id]},
    )


def test_gc_removes_only_unreferenced_artifacts(store, workspace, make_pipeline):
    ids = make_pipeline(store)
    scaler_id = store.save_artifact(fitted_scaler(), "StandardScaler", "transformer", "pickle")
    model_id = store.save_artifact(Ridge().fit(X, Y), "Ridge", "model", "pickle")
    orphan_id = store.save_artifact(Ridge(alpha=9.0).fit(X, Y), "Ridge", "model", "pickle")
    _chain_holding(store, ids.pipeline_id, scaler_id, model_id)

    let_object_times_pass(workspace)

    assert store.gc_artifacts() == 1

    assert len(objects_on_disk(workspace)) == 2
    assert isinstance(store.load_artifact(scaler_id), StandardScaler)
    assert store.load_artifact(model_id).alpha == 1.0
    with pytest.raises((KeyError, FileNotFoundError)):
        store.load_artifact(orphan_id)
    assert store.gc_artifacts() == 0


def test_gc_collects_artifacts_of_failed_pipelines(store, workspace, make_pipeline):
    kept = make_pipeline(store)
    failed = make_pipeline(store, run_name="doomed")
    shared = store.save_artifact(fitted_scaler(), "StandardScaler", "transformer", "pickle")
    kept_model = store.save_artifact(Ridge().fit(X, Y), "Ridge", "model", "pickle")
    failed_model = store.save_artifact(Ridge(alpha=4.0).fit(X, Y), "Ridge", "model", "pickle")
    _chain_holding(store, kept.pipeline_id, shared, kept_model)
    _chain_holding(store, failed.pipeline_id, shared, failed_model)

    store.fail_pipeline(failed.pipeline_id, "diverged")
    let_object_times_pass(workspace)

    assert store.gc_artifacts() == 1
    assert len(objects_on_disk(workspace)) == 2
    assert isinstance(store.load_artifact(shared), StandardScaler)  # still held by the live chain
    with pytest.raises((KeyError, FileNotFoundError)):
        store.load_artifact(failed_model)


def test_gc_on_an_empty_workspace_removes_nothing(store):
    assert store.gc_artifacts() == 0


# --------------------------------------------------------------------------- npz: arrays without pickle


class _RunsCodeWhenUnpickled:
    """Unpickling this makes the folder ``marker``: proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


def _npy_that_runs_code(marker: Path) -> bytes:
    """A valid ``.npy`` holding an object array: loading it with pickle allowed makes ``marker``."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([_RunsCodeWhenUnpickled(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_npz_round_trips_an_array(store, workspace):
    coef = np.asfortranarray(RNG.normal(size=(8, 3)).astype(np.float32))

    artifact_id = store.save_artifact(coef, "PLSRegression", "coefficients", "npz")

    loaded = store.load_artifact(artifact_id)
    assert isinstance(loaded, np.ndarray) and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, coef)
    assert store.save_artifact(coef.copy(), "PLSRegression", "coefficients", "npz") == artifact_id
    assert len(objects_on_disk(workspace)) == 1


def test_npz_round_trips_a_dict_of_arrays_and_numbers(store):
    model = Ridge(alpha=0.5).fit(X, Y)
    params = {"coef": model.coef_, "intercept": float(model.intercept_), "n_iter": 3, "classes": np.array(["a", "b"])}

    artifact_id = store.save_artifact(params, "Ridge", "model", "npz")

    loaded = store.load_artifact(artifact_id)
    assert sorted(loaded) == sorted(params)
    np.testing.assert_array_equal(loaded["coef"], model.coef_)
    assert loaded["intercept"] == params["intercept"] and loaded["n_iter"] == 3
    assert loaded["classes"].tolist() == ["a", "b"]
    # Key order does not change the bytes: one object, one id.
    assert store.save_artifact(dict(reversed(list(params.items()))), "Ridge", "model", "npz") == artifact_id


def test_npz_refuses_object_arrays_and_stores_nothing(store, workspace):
    with pytest.raises(TypeError, match="refuses object arrays"):
        store.save_artifact({"coef": np.ones(3), "model": np.array([Ridge()], dtype=object)}, "Ridge", "model", "npz")
    with pytest.raises(TypeError, match="arrays and numbers only"):
        store.save_artifact({"model": Ridge()}, "Ridge", "model", "npz")
    assert objects_on_disk(workspace) == []


def test_an_unknown_format_is_refused_with_the_known_ones(store, workspace):
    with pytest.raises(ValueError, match="unknown artifact format 'numpy': use one of 'joblib', 'pickle', 'cloudpickle', 'npz'"):
        store.save_artifact(np.ones(3), "X", "model", "numpy")
    assert objects_on_disk(workspace) == []


def test_a_tampered_npz_is_refused_by_its_hash_before_it_is_read(store, tmp_path):
    from nirslake.lake.artifacts import ArtifactIntegrityError

    artifact_id = store.save_artifact(np.ones(3), "PLSRegression", "coefficients", "npz")
    marker = tmp_path / "code-ran"
    write_url(store.get_artifact_path(artifact_id), _npy_that_runs_code(marker))

    with pytest.raises(ArtifactIntegrityError, match="sha256 mismatch"):
        store.load_artifact(artifact_id)
    assert not marker.exists()


def test_npz_loads_without_pickle_even_when_the_bytes_hold_a_pickle(store, tmp_path):
    """Bytes whose hash matches but which hold an object array: loading refuses to unpickle."""
    import io

    from nirslake.lake.artifacts import put_object

    marker = tmp_path / "code-ran"
    data = _npy_that_runs_code(marker)
    np.load(io.BytesIO(data), allow_pickle=True)  # the payload is live: with pickle allowed it runs
    assert marker.is_dir()
    marker.rmdir()
    digest, rel = put_object(store.storage, data)
    store.register_existing_artifact(digest, rel, digest, "Evil", "model", "npz", len(data))

    with pytest.raises(ValueError, match="refused to load an 'npz' artifact holding object arrays"):
        store.load_artifact(digest)
    assert not marker.exists()
